import { TextTokenizer } from '../tokenizer/tokenizer.js';
import { Message, ROLES } from '../tokenizer/chat.js';
import { UserError } from '../util/errors.js';
import { readRecords } from './jsonl.js';
import { OptionRow, bool, firstViolation, int, num, valuesFrom } from '../util/schema.js';
import { checkIds, completionText, encodePair, isMessages, promptText } from './encode.js';

/**
 * Preference pairs: TRL rows `{"prompt","chosen","rejected"}` (strings or message lists), the
 * conversation format with a final chosen/rejected assistant turn, and token-id rows
 * `{"prompt_ids","chosen_ids","rejected_ids"}`. Malformed rows are errors naming file:line;
 * unusable ones (empty completion, chosen == rejected, prompt over the limit) are skipped and
 * counted, or errors under `strict`.
 */
export interface PrefPair {
  prompt: number[];
  chosen: number[];
  rejected: number[];
  where: string;
  /** Optional margin column (reward-model training). */
  margin?: number;
}

export interface PrefLimits {
  maxLength: number;
  maxPromptLength: number;
  strict: boolean;
  /** Evaluation keeps pairs whose answers are identical (they score Δ = 0). */
  allowIdentical?: boolean;
}

export interface PrefLoad {
  pairs: PrefPair[];
  skipped: Record<string, number>;
}

function turnText(t: any): Message | null {
  if (typeof t === 'string') return { role: 'assistant', content: t };
  if (t && typeof t === 'object' && typeof t.value === 'string') return { role: t.from ?? 'assistant', content: t.value };
  if (t && typeof t === 'object' && typeof t.content === 'string') return { role: t.role ?? 'assistant', content: t.content };
  return null;
}

export function parsePrefRow(r: any, where: string, tok: TextTokenizer | null, vocab: number): { prompt: number[]; chosen: number[]; rejected: number[]; margin?: number } {
  if (!r || typeof r !== 'object' || Array.isArray(r)) throw new UserError(`${where}: expected a JSON object`);
  let margin: number | undefined;
  if (r.margin !== undefined) {
    if (typeof r.margin !== 'number' || !Number.isFinite(r.margin)) throw new UserError(`${where}: "margin" must be a finite number`);
    margin = r.margin;
  }
  if ('prompt_ids' in r || 'chosen_ids' in r || 'rejected_ids' in r) {
    return {
      prompt: checkIds(r.prompt_ids, vocab, where, 'prompt_ids'),
      chosen: checkIds(r.chosen_ids, vocab, where, 'chosen_ids', true),
      rejected: checkIds(r.rejected_ids, vocab, where, 'rejected_ids', true),
      margin,
    };
  }
  if (!tok) throw new UserError(`${where}: text rows need a checkpoint with tokenizer files (or use prompt_ids/chosen_ids/rejected_ids)`);
  for (const k of ['chosen', 'rejected']) if (!(k in r)) throw new UserError(`${where}: missing "${k}"`);
  let prompt: string | Message[];
  let chosenText: string;
  let rejectedText: string;
  if (Array.isArray(r.conversations)) {
    const msgs: Message[] = r.conversations.map((t: any, i: number) => {
      const m = turnText(t);
      if (!m || !ROLES.has(m.role)) throw new UserError(`${where}: conversations[${i}] must be {"from": system|user|assistant, "value": string}`);
      return m;
    });
    if (!msgs.length || msgs[msgs.length - 1].role !== 'user') throw new UserError(`${where}: "conversations" must end with a user turn before the chosen/rejected answers`);
    prompt = msgs;
    const c = turnText(r.chosen);
    const j = turnText(r.rejected);
    if (!c || !j) throw new UserError(`${where}: "chosen" and "rejected" must be strings or {"from":"assistant","value":...} turns`);
    chosenText = completionText(tok, prompt, [{ role: 'assistant', content: c.content }], where, 'chosen');
    rejectedText = completionText(tok, prompt, [{ role: 'assistant', content: j.content }], where, 'rejected');
  } else {
    if (!('prompt' in r)) throw new UserError(`${where}: missing "prompt" (or "conversations", or token-id fields)`);
    if (typeof r.prompt !== 'string' && !isMessages(r.prompt)) throw new UserError(`${where}: "prompt" must be a string or a list of {"role","content"} messages`);
    prompt = r.prompt;
    chosenText = completionText(tok, prompt, r.chosen, where, 'chosen');
    rejectedText = completionText(tok, prompt, r.rejected, where, 'rejected');
  }
  const pt = promptText(tok, prompt, where);
  const c = encodePair(tok, pt, chosenText);
  const j = encodePair(tok, pt, rejectedText);
  return { prompt: c.prompt, chosen: c.completion, rejected: j.completion, margin };
}

export function loadPrefs(file: string, tok: TextTokenizer | null, vocab: number, lim: PrefLimits): PrefLoad {
  const pairs: PrefPair[] = [];
  const skipped: Record<string, number> = {};
  const skip = (where: string, reason: string) => {
    if (lim.strict) throw new UserError(`${where}: ${reason}`);
    skipped[reason] = (skipped[reason] ?? 0) + 1;
  };
  for (const { line, value } of readRecords(file)) {
    const where = `${file}:${line}`;
    const p = parsePrefRow(value, where, tok, vocab);
    if (p.prompt.length === 0) {
      skip(where, 'empty prompt');
      continue;
    }
    if (p.chosen.length === 0 || p.rejected.length === 0) {
      skip(where, 'empty completion');
      continue;
    }
    if (p.prompt.length > lim.maxPromptLength || p.prompt.length >= lim.maxLength) {
      skip(where, 'prompt longer than max_prompt_length');
      continue;
    }
    const room = lim.maxLength - p.prompt.length;
    const [chosen, rejected] = [p.chosen.slice(0, room), p.rejected.slice(0, room)];
    // Compared as truncated: answers that differ only past max_length teach nothing, and reading
    // the pairs a trainer command is handed (already truncated) keeps the same ones.
    if (!lim.allowIdentical && chosen.length === rejected.length && chosen.every((v, i) => v === rejected[i])) {
      skip(where, 'chosen identical to rejected');
      continue;
    }
    pairs.push({ prompt: p.prompt, chosen, rejected, where, margin: p.margin });
  }
  return { pairs, skipped };
}

/** How a stage that trains on pairs (dpo, rm_train; online for the shape rows) reads and batches them. */
export interface PairSettings {
  evalRatio: number;
  maxLength: number;
  maxPromptLength: number;
  batchSize: number;
  strict: boolean;
}

/** The length and batch rows, which evaluation and the online rounds share. */
export const PAIR_SHAPE_OPTIONS: OptionRow<'maxLength' | 'maxPromptLength' | 'batchSize'>[] = [
  { key: 'maxLength', field: 'max_length', spec: int({ min: 2 }), help: 'prompt + completion tokens at most' },
  { key: 'maxPromptLength', field: 'max_prompt_length', spec: int({ min: 1 }), help: 'prompt tokens at most (longer prompts are skipped)' },
  { key: 'batchSize', field: 'batch_size', hf: 'per_device_train_batch_size', spec: int({ min: 1 }), help: 'pairs per micro-batch' },
];

export const PAIR_OPTIONS: OptionRow<keyof PairSettings>[] = [
  { key: 'evalRatio', field: 'eval_ratio', hf: null, spec: num({ min: 0, max: 0.9 }), help: 'fraction of the pairs held out for evaluation when no eval data is given' },
  ...PAIR_SHAPE_OPTIONS,
  { key: 'strict', field: 'strict', hf: null, spec: bool, help: 'unusable rows are errors instead of being skipped and counted' },
];

/** A stage's pair settings from CLI flags or recipe fields over its defaults, range-checked. */
export function pairSettingsFrom(o: Record<string, any>, base: PairSettings, from: 'flags' | 'recipe', where = ''): PairSettings {
  const s = valuesFrom(PAIR_OPTIONS, o, { evalRatio: base.evalRatio, maxLength: base.maxLength, maxPromptLength: base.maxPromptLength, batchSize: base.batchSize, strict: base.strict }, from);
  const bad = firstViolation(PAIR_OPTIONS, s);
  if (bad) throw new UserError(`${where}${bad}`);
  return s;
}
