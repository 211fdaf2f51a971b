import { Message, ROLES, withDefaultSystem } from '../tokenizer/chat.js';
import { TextTokenizer } from '../tokenizer/tokenizer.js';
import { UserError } from '../util/errors.js';
import { Row, readRecords } from './jsonl.js';
import { TokenRow } from '../infer/batch.js';
import { templateRow } from './chat-labels.js';

/**
 * Conversations for SFT: the seed's `{"id","conversations":[{"from","value"}]}` (JSON array or
 * JSONL) and OpenAI-style `{"messages":[{"role","content"}]}`, tokenized with the 360Zhinao
 * finetune script's labels (docs/REFERENCE.md §4).
 */
export interface Conversation {
  id: string | number;
  messages: Message[];
  where: string;
}

export interface LoadReport<T> {
  items: T[];
  skipped: { where: string; reason: string }[];
}

export function parseConversation(v: any, where: string): Conversation {
  if (!v || typeof v !== 'object' || Array.isArray(v)) throw new UserError(`${where}: expected a JSON object`);
  let msgs: Message[];
  if (Array.isArray(v.conversations)) {
    msgs = v.conversations.map((t: any, i: number) => {
      if (!t || typeof t.from !== 'string' || typeof t.value !== 'string') throw new UserError(`${where}: conversations[${i}] must be {"from": string, "value": string}`);
      return { role: t.from, content: t.value };
    });
  } else if (Array.isArray(v.messages)) {
    msgs = v.messages.map((t: any, i: number) => {
      if (!t || typeof t.role !== 'string' || typeof t.content !== 'string') throw new UserError(`${where}: messages[${i}] must be {"role": string, "content": string}`);
      return { role: t.role, content: t.content };
    });
  } else throw new UserError(`${where}: expected "conversations" (seed format) or "messages" (OpenAI format)`);
  if (msgs.length === 0) throw new UserError(`${where}: empty conversation`);
  msgs.forEach((m, i) => {
    if (!ROLES.has(m.role)) throw new UserError(`${where}: turn ${i}: unknown role "${m.role}" (expected system, user or assistant)`);
    if (m.role === 'system' && i !== 0) throw new UserError(`${where}: turn ${i}: a system message may only come first`);
  });
  if (msgs[msgs.length - 1].role !== 'assistant') throw new UserError(`${where}: the conversation does not end with an assistant turn`);
  return { id: v.id ?? where, messages: msgs, where };
}

/** Load and validate; with `skipBad`, bad rows are skipped and reported instead of fatal. */
export function loadConversations(file: string, skipBad = false): LoadReport<Conversation> {
  let rows: Row[];
  rows = readRecords(file);
  const items: Conversation[] = [];
  const skipped: LoadReport<Conversation>['skipped'] = [];
  for (const r of rows) {
    const where = `${file}:${r.line}`;
    try {
      items.push(parseConversation(r.value, where));
    } catch (e) {
      if (!(e instanceof UserError) || !skipBad) throw e;
      skipped.push({ where, reason: e.message });
    }
  }
  return { items, skipped };
}

/**
 * Token ids and per-token training weights: the seed's labels for the built-in Zhinao format,
 * else those the checkpoint's own chat template gives (data/chat-labels).
 */
export function tokenizeConversation(tok: TextTokenizer, c: Conversation): TokenRow {
  if (!tok.builtinFormat) {
    const { ids, weights } = templateRow(tok, c.messages, c.where);
    return { ids, weights };
  }
  return zhinaoRow(tok, c);
}

/**
 * The seed's labels. Every turn is `<|im_start|>{role}\n{content}<|im_end|>\n`; the
 * `<|im_start|>` and the closing `<|im_end|>\n` are always trained, the role line always
 * masked, and the content trained only in assistant turns — the targets of the 360Zhinao / Qwen
 * finetune script.
 */
export function zhinaoRow(tok: TextTokenizer, c: Conversation): TokenRow {
  const imStart = tok.id('<|im_start|>');
  const imEnd = tok.id('<|im_end|>');
  if (imStart === undefined || imEnd === undefined) throw new UserError(`${tok.dir}: tokenizer lacks <|im_start|> / <|im_end|>`);
  const nl = tok.encode('\n');
  const ids: number[] = [];
  const weights: number[] = [];
  const push = (xs: number[], w: number) => {
    for (const x of xs) {
      ids.push(x);
      weights.push(w);
    }
  };
  for (const m of withDefaultSystem(c.messages)) {
    push([imStart], 1);
    push([...tok.encode(m.role), ...nl], 0);
    push(tok.encode(m.content), m.role === 'assistant' ? 1 : 0);
    push([imEnd, ...nl], 1);
  }
  return { ids, weights };
}

/**
 * Pack whole conversations into rows of at most `maxLen` tokens (the finetune script's
 * `is_concat`): a conversation never spans two rows, longer ones are dropped, and each keeps
 * its own segment id and positions so attention stays inside it.
 */
export function packRows(rows: TokenRow[], maxLen: number): { packed: TokenRow[]; dropped: number } {
  const packed: TokenRow[] = [];
  let cur: TokenRow | null = null;
  let seg = 0;
  let dropped = 0;
  for (const r of rows) {
    if (r.ids.length > maxLen) {
      dropped++;
      continue;
    }
    if (!cur || cur.ids.length + r.ids.length > maxLen) {
      cur = { ids: [], weights: [], segments: [], positions: [] };
      packed.push(cur);
      seg = 0;
    }
    cur.ids.push(...r.ids);
    // A segment's first token would be predicted from the previous conversation: never train it.
    cur.weights.push(0, ...r.weights.slice(1));
    cur.segments!.push(...r.ids.map(() => seg));
    cur.positions!.push(...r.ids.map((_, i) => i));
    seg++;
  }
  return { packed, dropped };
}

export function truncateRow(r: TokenRow, maxLen: number): TokenRow {
  if (r.ids.length <= maxLen) return r;
  return { ids: r.ids.slice(0, maxLen), weights: r.weights.slice(0, maxLen) };
}
