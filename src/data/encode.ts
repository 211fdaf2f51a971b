import { TextTokenizer } from '../tokenizer/tokenizer.js';
import { Message } from '../tokenizer/chat.js';
import { UserError } from '../util/errors.js';

/**
 * Prompts and completions as token ids, the way TRL builds them: a message-list prompt is
 * rendered with the chat template and the generation prompt; completion ids are what
 * tokenizing prompt+completion adds after the prompt's ids (or the completion on its own when
 * the tokenizer merges across the boundary).
 */
export type PromptLike = string | Message[];

export function isMessages(x: unknown): x is Message[] {
  return Array.isArray(x) && x.every((m) => m && typeof m === 'object' && typeof m.role === 'string' && typeof m.content === 'string');
}

export function promptText(tok: TextTokenizer, prompt: PromptLike, where: string): string {
  if (typeof prompt === 'string') return prompt;
  if (!isMessages(prompt)) throw new UserError(`${where}: "prompt" must be a string or a list of {"role","content"} messages`);
  try {
    return tok.applyChat(prompt, true);
  } catch (e: any) {
    throw new UserError(`${where}: ${e.message}`);
  }
}

/** Completion text: a string, or an assistant message list rendered as the template would. */
export function completionText(tok: TextTokenizer, prompt: PromptLike, completion: unknown, where: string, field: string): string {
  if (typeof completion === 'string') return completion;
  if (isMessages(completion) && Array.isArray(prompt)) {
    const full = tok.applyChat([...prompt, ...completion], false);
    const head = tok.applyChat(prompt, true);
    if (!full.startsWith(head)) throw new UserError(`${where}: chat template output for "${field}" does not extend the prompt's`);
    return full.slice(head.length);
  }
  throw new UserError(`${where}: "${field}" must be a string${Array.isArray(prompt) ? ' or a list of messages' : ''}`);
}

export function encodePair(tok: TextTokenizer, prompt: string, completion: string): { prompt: number[]; completion: number[] } {
  const p = tok.encode(prompt);
  const full = tok.encode(prompt + completion);
  if (full.length >= p.length && p.every((id, i) => full[i] === id)) return { prompt: p, completion: full.slice(p.length) };
  return { prompt: p, completion: tok.encode(completion) };
}

export function checkIds(x: unknown, vocab: number, where: string, field: string, allowEmpty = false): number[] {
  if (!Array.isArray(x) || x.some((v) => !Number.isInteger(v))) throw new UserError(`${where}: "${field}" must be a list of integer token ids`);
  if (!allowEmpty && x.length === 0) throw new UserError(`${where}: "${field}" is empty`);
  const bad = x.find((v) => v < 0 || v >= vocab);
  if (bad !== undefined) throw new UserError(`${where}: "${field}" holds token id ${bad}, outside the vocabulary [0, ${vocab})`);
  return x as number[];
}
