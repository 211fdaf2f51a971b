import * as fs from 'node:fs';
import * as path from 'node:path';
import { parseConfig } from '../model/config.js';
import { TextTokenizer } from '../tokenizer/tokenizer.js';
import { loadConversations } from '../data/conversations.js';
import { loadPrefs } from '../data/prefs.js';
import { loadPrompts } from '../data/prompts.js';
import { readRecords, toJsonl } from '../data/jsonl.js';
import { DEFAULT_SFT, sftRows } from '../stages/sft.js';
import { TokenRow } from '../infer/batch.js';
import { UserError } from '../util/errors.js';
import { readJson, writeFileAtomic } from '../util/fsutil.js';
import { log } from '../util/log.js';

/**
 * `prefopt tokenize`: the token ids training will see, for debugging masks. SFT rows come out
 * as Hugging Face's `{"input_ids", "labels"}` with -100 where a token is not trained (packed rows
 * add `position_ids`), pairs as prefopt's own id rows (`prompt_ids`, `chosen_ids`,
 * `rejected_ids`, which `prefopt dpo` reads back), prompts as `{"prompt_ids"}`. Only the
 * tokenizer and config.json are read, never the weights.
 */
export type DataKind = 'sft' | 'pairs' | 'prompts';
export const DATA_KINDS: DataKind[] = ['sft', 'pairs', 'prompts'];

export interface TokenizeOptions {
  model: string;
  data: string;
  kind?: DataKind;
  out?: string;
  maxLen?: number;
  isConcat?: boolean;
  maxLength?: number;
  maxPromptLength?: number;
  /** A readable preview instead of JSONL (default: when stdout is a TTY and there is no --out). */
  preview?: boolean;
  color?: boolean;
}

/** The kind of a data file from its first record's fields. */
export function detectKind(file: string): DataKind {
  const first = readRecords(file)[0];
  const v = first?.value;
  const where = first ? `${file}:${first.line}` : file;
  if (!v || typeof v !== 'object' || Array.isArray(v)) throw new UserError(`${where}: expected a JSON object (or pass --kind sft|pairs|prompts)`);
  if ('chosen' in v || 'rejected' in v || 'chosen_ids' in v) return 'pairs';
  if ('conversations' in v || 'messages' in v) return 'sft';
  if ('prompt' in v) return 'prompts';
  throw new UserError(`${where}: cannot tell the kind of data from its fields (${Object.keys(v).join(', ')}); pass --kind sft|pairs|prompts`);
}

interface Piece {
  ids: number[];
  /** Per token: 0 context, 1 trained; pairs use 2 for the rejected answer. */
  mark: number[];
}

export interface TokenizedRow {
  json: Record<string, unknown>;
  title: string;
  pieces: Piece[];
}

export function tokenizeRows(o: TokenizeOptions, tok: TextTokenizer): { kind: DataKind; rows: TokenizedRow[]; skipped: number } {
  const cfgFile = path.join(o.model, 'config.json');
  if (!fs.existsSync(cfgFile)) throw new UserError(`${o.model}: no config.json`);
  const cfg = parseConfig(readJson(cfgFile), cfgFile);
  const kind = o.kind ?? detectKind(o.data);
  if (!DATA_KINDS.includes(kind)) throw new UserError(`--kind must be one of ${DATA_KINDS.join(', ')}, found "${kind}"`);
  if (kind === 'sft') {
    const convs = loadConversations(o.data).items;
    const maxLen = Math.min(o.maxLen ?? DEFAULT_SFT.maxLen, cfg.max_position_embeddings);
    const { rows, dropped } = sftRows(tok, convs, maxLen, !!o.isConcat);
    return { kind, skipped: dropped, rows: rows.map((r, i) => sftRow(r, o.isConcat ? `packed row ${i + 1}` : convs[i].where)) };
  }
  if (kind === 'pairs') {
    const lim = { maxLength: o.maxLength ?? Infinity, maxPromptLength: o.maxPromptLength ?? Infinity, strict: false, allowIdentical: true };
    const { pairs, skipped } = loadPrefs(o.data, tok, cfg.vocab_size, lim);
    const rows = pairs.map((p) => ({
      json: { prompt_ids: p.prompt, chosen_ids: p.chosen, rejected_ids: p.rejected },
      title: p.where,
      pieces: [
        { ids: p.prompt, mark: p.prompt.map(() => 0) },
        { ids: p.chosen, mark: p.chosen.map(() => 1) },
        { ids: p.rejected, mark: p.rejected.map(() => 2) },
      ],
    }));
    return { kind, rows, skipped: Object.values(skipped).reduce((a, b) => a + b, 0) };
  }
  const rows = loadPrompts(o.data).map((p) => {
    const ids = tok.encode(tok.applyChat(p.messages, true));
    return { json: { prompt_ids: ids }, title: p.where, pieces: [{ ids, mark: ids.map(() => 0) }] };
  });
  return { kind, rows, skipped: 0 };
}

function sftRow(r: TokenRow, title: string): TokenizedRow {
  const json: Record<string, unknown> = { input_ids: r.ids, labels: r.ids.map((id, t) => (r.weights[t] ? id : -100)) };
  if (r.positions) json.position_ids = r.positions;
  return { json, title, pieces: [{ ids: r.ids, mark: r.weights.map((w) => (w ? 1 : 0)) }] };
}

const STYLE = { on: ['\x1b[2m', '\x1b[1;32m', '\x1b[1;31m'], off: '\x1b[0m' };

/**
 * A row as text: each run of context / trained / rejected tokens decoded on its own, marked by
 * colour on a terminal and by ⟦…⟧ (trained) and ⟪…⟫ (rejected) without one.
 */
export function previewRow(tok: TextTokenizer, r: TokenizedRow, color: boolean): string {
  const counts = [0, 0, 0];
  let body = '';
  const sep = r.pieces.length > 1;
  for (const p of r.pieces) {
    let i = 0;
    while (i < p.ids.length) {
      let j = i;
      while (j < p.ids.length && p.mark[j] === p.mark[i]) j++;
      const m = p.mark[i];
      counts[m] += j - i;
      const text = tok.decode(p.ids.slice(i, j));
      body += color ? STYLE.on[m] + text + STYLE.off : m === 1 ? `⟦${text}⟧` : m === 2 ? `⟪${text}⟫` : text;
      i = j;
    }
    if (sep) body += '\n';
  }
  const total = counts[0] + counts[1] + counts[2];
  const what = r.pieces.length === 3 ? `prompt ${counts[0]}, chosen ${counts[1]}, rejected ${counts[2]}` : `${counts[1]} trained`;
  return `── ${r.title}: ${total} tokens (${what})\n${body}${sep ? '' : '\n'}`;
}

export function tokenizeCmd(o: TokenizeOptions): void {
  const tok = TextTokenizer.load(o.model);
  const { kind, rows, skipped } = tokenizeRows(o, tok);
  const preview = o.preview ?? (!o.out && !!process.stdout.isTTY);
  const color = o.color ?? !!process.stdout.isTTY;
  const text = preview ? rows.map((r) => previewRow(tok, r, color)).join('\n') : toJsonl(rows.map((r) => r.json));
  if (o.out) writeFileAtomic(o.out, text);
  else process.stdout.write(text);
  log('tokenize', { kind, rows: rows.length, skipped, out: o.out ?? 'stdout' });
}
