import * as fs from 'node:fs';
import * as path from 'node:path';
import * as tf from '@tensorflow/tfjs-core';
import { DEFAULT_TRAIN, TrainConfig, Trainer, TrainResult } from '../train/trainer.js';
import { checkTrainingFits } from '../model/memory.js';
import { paramsCheckpoint } from '../train/params-io.js';
import { SchedulerName } from '../train/schedule.js';
import { Conversation, loadConversations, packRows, tokenizeConversation, truncateRow } from '../data/conversations.js';
import type { TextTokenizer } from '../tokenizer/tokenizer.js';
import { SeqBatch, TokenRow, makeBatch, tokenLogps } from '../infer/batch.js';
import { openPolicy, needTokenizer } from '../model/policy.js';
import { saveModel } from '../model/load.js';
import { Decoder } from '../model/decoder.js';
import { Rng } from '../util/rng.js';
import { holdOut } from '../data/split.js';
import { UserError } from '../util/errors.js';
import { log } from '../util/log.js';
import { DType, dtypeFromName } from '../io/safetensors.js';
import { OptionRow, bool, firstViolation, int, num, str, valuesFrom } from '../util/schema.js';

/**
 * Stage 1: full-parameter supervised fine-tuning (base → sft-base). The config is plain data
 * (CLI flags and recipe stages fill the same object); the loop is the shared Trainer.
 */
export interface SftConfig {
  model: string;
  data: string;
  out: string;
  evalData?: string;
  evalRatio: number;
  batchSize: number;
  maxLen: number;
  isConcat: boolean;
  skipBadRows: boolean;
  resume: boolean;
  dtype: DType;
  train: TrainConfig;
}

export const DEFAULT_SFT: Omit<SftConfig, 'model' | 'data' | 'out'> = {
  evalRatio: 0.05,
  batchSize: 4,
  maxLen: 512,
  isConcat: false,
  skipBadRows: false,
  resume: false,
  dtype: 'F32',
  train: { ...DEFAULT_TRAIN, lr: 5e-6, epochs: 3, scheduler: 'cosine' as SchedulerName, warmupRatio: 0.01 },
};

interface SftSettings {
  evalRatio: number;
  batchSize: number;
  maxLen: number;
  isConcat: boolean;
  skipBadRows: boolean;
  dtype: string;
}

/** The stage's data and output settings as flags and recipe fields (training settings: TRAIN_OPTIONS). */
export const SFT_OPTIONS: OptionRow<keyof SftSettings>[] = [
  { key: 'evalRatio', field: 'eval_ratio', spec: num({ min: 0, max: 0.9 }), help: `fraction of the data held out for evaluation when no eval data is given (default ${DEFAULT_SFT.evalRatio})` },
  { key: 'batchSize', field: 'batch_size', spec: int({ min: 1 }), help: `rows per micro-batch (default ${DEFAULT_SFT.batchSize})` },
  { key: 'maxLen', field: 'max_len', spec: int({ min: 2 }), help: `model_max_length in tokens (default ${DEFAULT_SFT.maxLen})` },
  { key: 'isConcat', field: 'is_concat', spec: bool, help: 'pack whole conversations up to max_len' },
  { key: 'skipBadRows', field: 'skip_bad_rows', spec: bool, help: 'skip malformed conversations and report how many' },
  { key: 'dtype', field: 'dtype', spec: str(['f32', 'f16', 'bf16']), help: 'output weights (default f32)' },
];

/** SFT's settings from CLI flags or recipe fields, range-checked. */
export function sftSettingsFrom(o: Record<string, any>, from: 'flags' | 'recipe', where = ''): Pick<SftConfig, 'evalRatio' | 'batchSize' | 'maxLen' | 'isConcat' | 'skipBadRows' | 'dtype'> {
  const base: SftSettings = { ...DEFAULT_SFT, dtype: DEFAULT_SFT.dtype.toLowerCase() };
  const s = valuesFrom(SFT_OPTIONS, o, base, from);
  const bad = firstViolation(SFT_OPTIONS, s);
  if (bad) throw new UserError(`${where}${bad}`);
  return { evalRatio: s.evalRatio, batchSize: s.batchSize, maxLen: s.maxLen, isConcat: s.isConcat, skipBadRows: s.skipBadRows, dtype: dtypeFromName(s.dtype) };
}

/** Mean negative log-likelihood over trained tokens. */
export function sftLoss(model: Decoder, b: SeqBatch): tf.Scalar {
  const lp = tokenLogps(model, b);
  return tf.div(tf.neg(tf.sum(lp)), Math.max(trainedTokens(b), 1)) as tf.Scalar;
}

export function trainedTokens(b: SeqBatch): number {
  let n = 0;
  for (let i = 0; i < b.batch; i++) for (let t = 1; t < b.len; t++) n += b.weights[i * b.len + t];
  return n;
}

/** Tokens processed (padding excluded): the throughput unit. */
export function validTokens(b: SeqBatch): number {
  let n = 0;
  for (let i = 0; i < b.valid!.length; i++) n += b.valid![i];
  return n;
}

export function chunk<T>(xs: T[], n: number): T[][] {
  const out: T[][] = [];
  for (let i = 0; i < xs.length; i += n) out.push(xs.slice(i, i + n));
  return out;
}

/**
 * Conversations as the rows SFT trains on: tokenized with their labels, then packed up to
 * `maxLen` (`is_concat`; longer conversations dropped) or truncated to it.
 */
export function sftRows(tok: TextTokenizer, convs: Conversation[], maxLen: number, isConcat: boolean): { rows: TokenRow[]; dropped: number } {
  const rows = convs.map((cv) => tokenizeConversation(tok, cv));
  if (isConcat) {
    const { packed, dropped } = packRows(rows, maxLen);
    return { rows: packed, dropped };
  }
  return { rows: rows.map((r) => truncateRow(r, maxLen)), dropped: 0 };
}

export interface SftResult extends TrainResult {
  rows: number;
  skipped: number;
  dropped: number;
  evalRows: number;
}

export async function runSft(c: SftConfig): Promise<SftResult> {
  const checkpointed = checkTrainingFits(c.model, `sft on ${c.model}`, { rows: c.batchSize, len: c.maxLen, train: c.train, lora: null });
  const policy = openPolicy(c.model, { trainable: true });
  const tok = needTokenizer(policy, 'SFT on conversations');
  const model = policy.model;
  const maxLen = Math.min(c.maxLen, model.cfg.max_position_embeddings);
  const load = (file: string) => {
    const rep = loadConversations(file, c.skipBadRows);
    if (rep.skipped.length) log('skipped-rows', { file, count: rep.skipped.length, first: rep.skipped[0].reason });
    return rep;
  };
  const train = load(c.data);
  let convs = train.items;
  let evalConvs = c.evalData ? load(c.evalData).items : [];
  if (!c.evalData) ({ train: convs, held: evalConvs } = holdOut(convs, c.evalRatio, c.train.seed));
  const tr = sftRows(tok, convs, maxLen, c.isConcat);
  const ev = sftRows(tok, evalConvs, maxLen, c.isConcat);
  if (tr.rows.length === 0) throw new UserError(`${c.data}: no usable conversations (${tr.dropped} longer than max_len ${maxLen})`);
  const shuffled = new Rng(c.train.seed, 'rows').shuffle([...tr.rows]);
  const trainBatches = chunk(shuffled, c.batchSize).map((rs) => makeBatch(rs, policy.padId));
  const evalBatches = chunk(ev.rows, c.batchSize).map((rs) => makeBatch(rs, policy.padId));
  log('sft', { rows: tr.rows.length, eval_rows: ev.rows.length, batches: trainBatches.length, params: model.paramCount(), dropped: tr.dropped, skipped: train.skipped.length });
  const trainer = new Trainer<SeqBatch>(
    {
      params: model.params,
      model,
      trainBatches,
      evalBatches,
      tokens: (b) => validTokens(b),
      loss: (b) => ({ loss: sftLoss(model, b) }),
    },
    { ...c.train, gradientCheckpointing: checkpointed ? 'on' : 'off' },
    c.out,
  );
  try {
    const res = await trainer.fit({
      resume: c.resume,
      label: 'sft',
      ...paramsCheckpoint(model.params, 'model.safetensors'),
    });
    await saveFinal(model, c.out, c.model, c.dtype);
    return { ...res, rows: tr.rows.length, skipped: train.skipped.length, dropped: tr.dropped, evalRows: ev.rows.length };
  } finally {
    trainer.dispose();
    model.dispose();
  }
}

/**
 * Write the final checkpoint into `out` (which also holds checkpoint-N/ and metrics.jsonl).
 */
export async function saveFinal(model: Decoder, out: string, copyFrom: string, dtype: DType): Promise<void> {
  await publishFiles(out, 'config.json', (tmp) => saveModel(model, tmp, { copyFrom, dtype }));
}

/**
 * Fill a temp dir and move its files into `out`, `lastFile` last: a directory holding `lastFile`
 * is whole, while the directory itself keeps training state (checkpoints, metrics) beside it.
 */
export async function publishFiles(out: string, lastFile: string, fill: (tmp: string) => Promise<void>): Promise<void> {
  fs.mkdirSync(out, { recursive: true });
  const tmp = path.join(out, '.publish.tmp');
  fs.rmSync(tmp, { recursive: true, force: true });
  try {
    // The previous model stays whole until the new one is complete (a failed write keeps it);
    // from here on, a directory without `lastFile` is never read as a model.
    await fill(tmp);
    fs.rmSync(path.join(out, lastFile), { force: true });
    for (const f of fs.readdirSync(tmp).filter((f) => f !== lastFile)) fs.renameSync(path.join(tmp, f), path.join(out, f));
    fs.renameSync(path.join(tmp, lastFile), path.join(out, lastFile));
  } finally {
    fs.rmSync(tmp, { recursive: true, force: true });
  }
}
