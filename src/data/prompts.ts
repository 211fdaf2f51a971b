import { Message } from '../tokenizer/chat.js';
import { UserError } from '../util/errors.js';
import { isMessages } from './encode.js';
import { readJsonl } from './jsonl.js';

/**
 * Prompt rows for sampling and evaluation: `{"prompt": text | messages, ...}`; any other fields
 * (e.g. "answer") ride along for rule scorers. A text prompt is one user message: these prompts
 * are always sampled in the chat format.
 */
export interface PromptItem {
  idx: number;
  messages: Message[];
  row: Record<string, unknown>;
  where: string;
}

/** A stored prompt row's messages: a text prompt is one user message. */
export function rowMessages(row: { prompt: string | Message[] }): Message[] {
  return typeof row.prompt === 'string' ? [{ role: 'user', content: row.prompt }] : row.prompt;
}

export function loadPrompts(file: string): PromptItem[] {
  const out = readJsonl(file).map(({ line, value }, idx) => {
    const where = `${file}:${line}`;
    if (!value || typeof value !== 'object' || Array.isArray(value)) throw new UserError(`${where}: expected {"prompt": text | messages}`);
    const p = value.prompt;
    if (typeof p === 'string' && !p.trim()) throw new UserError(`${where}: "prompt" is empty`);
    if (typeof p !== 'string' && !(isMessages(p) && p.length)) throw new UserError(`${where}: "prompt" must be a non-empty string or a list of {"role","content"} messages`);
    return { idx, messages: rowMessages(value), row: value, where };
  });
  if (!out.length) throw new UserError(`${file}: no prompts`);
  return out;
}
