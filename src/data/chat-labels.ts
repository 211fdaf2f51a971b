import type { TextTokenizer } from '../tokenizer/tokenizer.js';
import type { Message } from '../tokenizer/chat.js';
import { UserError } from '../util/errors.js';

/**
 * SFT labels from a checkpoint's own chat template (docs/REFERENCE.md §9). The
 * trained text of assistant turn i is what render(messages[:i+1]) adds after
 * render(messages[:i], add_generation_prompt=True): the assistant's content and the template's
 * own end-of-turn text. A template with `{% generation %}` blocks marks its trained text itself;
 * one that appends the generation prompt to every render has it cut from the turn's end.
 * The row is the tokenization of the whole rendered conversation, so the ids are exactly what the
 * tokenizer makes of the text.
 */
export interface TemplateRow {
  ids: number[];
  weights: number[];
  text: string;
  /** Character spans [start, end) of `text` that are trained. */
  spans: [number, number][];
}

export interface ChatRenderer {
  /**
   * render(messages, add_generation_prompt); without the flag, never ending with a generation
   * prompt the template appends to every render (TextTokenizer.applyChat cuts it).
   */
  applyChat(messages: Message[], addGenerationPrompt: boolean): string;
  /** The whole conversation with its `{% generation %}` spans, or null when the template has none. */
  renderGeneration(messages: Message[]): { text: string; spans: [number, number][] } | null;
}

/** The trained character spans of a conversation, by the prefix rule (or generation blocks). */
export function trainedSpans(r: ChatRenderer, messages: Message[], where: string): { text: string; spans: [number, number][] } {
  const gen = r.renderGeneration(messages);
  if (gen) return gen;
  const render = (n: number, addGen: boolean, what: string) => {
    try {
      return r.applyChat(messages.slice(0, n), addGen);
    } catch (e: any) {
      throw new UserError(`${where}: the chat template fails to render ${what}: ${e.message}`);
    }
  };
  const text = render(messages.length, false, 'the conversation');
  const spans: [number, number][] = [];
  for (let i = 0; i < messages.length; i++) {
    if (messages[i].role !== 'assistant') continue;
    const head = render(i, true, `the ${i} messages before assistant turn ${i} with the generation prompt`);
    const upTo = render(i + 1, false, `the conversation up to assistant turn ${i}`);
    if (!upTo.startsWith(head)) {
      throw new UserError(
        `${where}: the chat template is not prefix-consistent at message ${i}: rendering messages 0..${i} does not begin with ` +
          `the render of messages 0..${i - 1} plus the generation prompt (${JSON.stringify(excerpt(head, upTo))}), so the assistant's ` +
          `trained tokens are undefined; use a template whose generation prompt is what an assistant turn begins with`,
      );
    }
    if (!text.startsWith(upTo)) {
      throw new UserError(
        `${where}: the chat template is not prefix-consistent: rendering messages 0..${i} is not a prefix of rendering the whole ` +
          `conversation (${JSON.stringify(excerpt(upTo, text))}) — the template rewrites earlier turns (Qwen3's drops the <think> ` +
          `block of every assistant turn before the last user message). Split the conversation into one row per assistant turn, ` +
          `each ending with the turn it trains, or train with a template that leaves earlier turns unchanged`,
      );
    }
    if (upTo.length > head.length) spans.push([head.length, upTo.length]);
  }
  return { text, spans };
}

/** Where two renders part: a few characters of each around the first difference. */
function excerpt(a: string, b: string): string {
  let i = 0;
  while (i < a.length && i < b.length && a[i] === b[i]) i++;
  const from = Math.max(0, i - 12);
  return `…${a.slice(from, i + 20)}… vs …${b.slice(from, i + 20)}…`;
}

/**
 * Token ids of `text` with weight 1 on the tokens of `spans`. A boundary is found by tokenizing
 * the text up to it: where that is a prefix of the whole text's ids, the boundary falls between
 * two tokens. Where a token straddles it (`Assistant:` + `\n\nIt…` tokenized as `:\n\n`), the
 * span takes that token, as transformers' assistant masks do: every token holding any of the
 * span's characters is trained.
 */
export function labelSpans(encode: (s: string) => number[], text: string, spans: [number, number][]): { ids: number[]; weights: number[] } {
  const ids = encode(text);
  const weights = new Array<number>(ids.length).fill(0);
  /** [index of the first token holding character c, whether a token straddles c]. */
  const boundary = (c: number): [number, boolean] => {
    if (c === 0) return [0, false];
    if (c === text.length) return [ids.length, false];
    const head = encode(text.slice(0, c));
    let k = 0;
    while (k < head.length && k < ids.length && head[k] === ids[k]) k++;
    return [k, k < head.length];
  };
  for (const [a, b] of spans) {
    const [from] = boundary(a);
    const [to, cutB] = boundary(b);
    for (let t = from; t < to + +cutB; t++) weights[t] = 1;
  }
  return { ids, weights };
}

export function templateRow(tok: TextTokenizer, messages: Message[], where: string): TemplateRow {
  const { text, spans } = trainedSpans(tok, messages, where);
  const { ids, weights } = labelSpans((s) => tok.encode(s), text, spans);
  return { ids, weights, text, spans };
}
