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

export function loadPrompts(file: string): PromptItem[] {
  const out = readJsonl(file).map(({ line, value }, idx) => {
    const where = `${file}:${line}`;
    if (!value || typeof value !== 'object' || Array.isArray(value)) throw new UserError(`${where}: expected {"prompt": text | messages}`);
    const p = value.prompt;
    let messages: Message[];
    if (typeof p === 'string') {
      if (!p.trim()) throw new UserError(`${where}: "prompt" is empty`);
      messages = [{ role: 'user', content: p }];
    } else if (isMessages(p) && p.length) messages = p;
    else throw new UserError(`${where}: "prompt" must be a non-empty string or a list of {"role","content"} messages`);
    return { idx, messages, row: value, where };
  });
  if (!out.length) throw new UserError(`${file}: no prompts`);
  return out;
}
