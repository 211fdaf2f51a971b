import * as path from 'node:path';
import * as tf from '@tensorflow/tfjs-core';
import { DEFAULT_TRAIN, LossOut, TrainConfig, Trainer, TrainResult } from '../train/trainer.js';
import { checkTrainingFits } from '../model/memory.js';
import { paramsCheckpoint } from '../train/params-io.js';
import { DEFAULT_LORA, LoraAdapter, LoraConfig, attach, withAdapterOff } from '../lora/lora.js';
import { DEFAULT_DPO, DpoParams, chosenNll, dpoLosses, dpoMetrics, validateDpoParams } from '../dpo/loss.js';
import { filesHash, pairBatch, pairLogpsHost, referenceLogps, sequenceLogps } from '../dpo/logps.js';
import { PrefPair, loadPrefs } from '../data/prefs.js';
import { SeqBatch } from '../infer/batch.js';
import { Policy, openPolicy } from '../model/policy.js';
import { Decoder } from '../model/decoder.js';
import { loadModel } from '../model/load.js';
import { TensorSource } from '../io/checkpoint.js';
import { openDb } from '../store/db.js';
import { Rng } from '../util/rng.js';
import { holdOut } from '../data/split.js';
import { UserError } from '../util/errors.js';
import { log } from '../util/log.js';
import { chunk, publishFiles, validTokens } from './sft.js';

/**
 * Stage 2 (and the training step of every on-policy round): DPO with LoRA adapters on a frozen
 * base. The reference is the base with the adapter switched off (no second model in memory),
 * an explicit reference checkpoint, or the base plus a given adapter; its log-probs are computed
 * once per pair and cached in SQLite under (reference hash, pair hash).
 */
export interface DpoConfig {
  model: string;
  data: string | PrefPair[];
  out: string;
  evalData?: string | PrefPair[];
  evalRatio: number;
  refModel?: string;
  /** Start from this adapter instead of a fresh one. */
  adapter?: string;
  /** Reference = base + the starting adapter (the previous round's policy) instead of adapter off. */
  refIsStartAdapter: boolean;
  dpo: DpoParams;
  lora: LoraConfig;
  maxLength: number;
  maxPromptLength: number;
  strict: boolean;
  batchSize: number;
  train: TrainConfig;
  cacheDb?: string;
  resume: boolean;
}

export const DEFAULT_DPO_STAGE: Omit<DpoConfig, 'model' | 'data' | 'out'> = {
  evalRatio: 0.1,
  refIsStartAdapter: false,
  dpo: DEFAULT_DPO,
  lora: DEFAULT_LORA,
  maxLength: 512,
  maxPromptLength: 256,
  strict: false,
  batchSize: 4,
  train: { ...DEFAULT_TRAIN, lr: 5e-4, epochs: 1, scheduler: 'linear', warmupRatio: 0.1, weightDecay: 0 },
  resume: false,
};

export interface DpoBatch {
  sb: SeqBatch;
  n: number;
  refChosen: Float32Array;
  refRejected: Float32Array;
  lenChosen: Float32Array;
  lenRejected: Float32Array;
}

export function makeDpoBatches(pairs: PrefPair[], ref: { chosen: number[]; rejected: number[] }, bs: number, padId: number): DpoBatch[] {
  const idx = pairs.map((_, i) => i);
  return chunk(idx, bs).map((ids) => ({
    sb: pairBatch(ids.map((i) => pairs[i]), padId),
    n: ids.length,
    refChosen: Float32Array.from(ids.map((i) => ref.chosen[i])),
    refRejected: Float32Array.from(ids.map((i) => ref.rejected[i])),
    lenChosen: Float32Array.from(ids.map((i) => pairs[i].chosen.length)),
    lenRejected: Float32Array.from(ids.map((i) => pairs[i].rejected.length)),
  }));
}

/** Per-pair losses (with rpo_alpha's NLL term added to each, as TRL does) and the policy log-probs. */
function batchLosses(model: Decoder, b: DpoBatch, p: DpoParams): { losses: tf.Tensor1D; pc: tf.Tensor1D; pr: tf.Tensor1D; nll: tf.Scalar | null } {
  const all = sequenceLogps(model, b.sb);
  const pc = tf.slice(all, [0], [b.n]) as tf.Tensor1D;
  const pr = tf.slice(all, [b.n], [b.n]) as tf.Tensor1D;
  const lenChosen = tf.tensor1d(b.lenChosen);
  let losses = dpoLosses({ policyChosen: pc, policyRejected: pr, refChosen: tf.tensor1d(b.refChosen), refRejected: tf.tensor1d(b.refRejected), lenChosen, lenRejected: tf.tensor1d(b.lenRejected) }, p);
  const nll = p.rpoAlpha > 0 ? chosenNll(pc, lenChosen) : null;
  if (nll) losses = tf.add(losses, tf.mul(nll, p.rpoAlpha)) as tf.Tensor1D;
  return { losses, pc, pr, nll };
}

/** A training step's loss on one batch: the pairs' mean loss, and TRL's logged metrics as tensors. */
export function dpoBatchLoss(model: Decoder, b: DpoBatch, p: DpoParams): LossOut {
  const { losses, pc, pr, nll } = batchLosses(model, b, p);
  const lw = tf.sub(pc, tf.tensor1d(b.refChosen));
  const ll = tf.sub(pr, tf.tensor1d(b.refRejected));
  return {
    loss: tf.mean(losses) as tf.Scalar,
    metrics: {
      'rewards/chosen': tf.mean(tf.mul(lw, p.beta)) as tf.Scalar,
      'rewards/rejected': tf.mean(tf.mul(ll, p.beta)) as tf.Scalar,
      'rewards/accuracies': tf.mean(tf.cast(tf.greater(lw, ll), 'float32')) as tf.Scalar,
      'rewards/margins': tf.mean(tf.mul(tf.sub(lw, ll), p.beta)) as tf.Scalar,
      'logps/chosen': tf.mean(pc) as tf.Scalar,
      'logps/rejected': tf.mean(pr) as tf.Scalar,
      ...(nll ? { nll_loss: nll } : {}),
    },
  };
}

/** TRL's metrics over pairs for the model as it is now (adapter state untouched). */
export function evaluatePairs(model: Decoder, pairs: PrefPair[], ref: { chosen: number[]; rejected: number[] }, p: DpoParams, bs: number, padId: number): Record<string, number> {
  const rows: Parameters<typeof dpoMetrics>[0] = [];
  for (const b of makeDpoBatches(pairs, ref, bs, padId)) {
    const out = tf.tidy(() => {
      const r = batchLosses(model, b, p);
      return [r.losses, r.pc, r.pr, ...(r.nll ? [r.nll] : [])];
    });
    const [l, pc, pr, nll] = out.map((t) => Array.from(t.dataSync()));
    out.forEach((t) => t.dispose());
    for (let i = 0; i < b.n; i++) rows.push({ pc: pc[i], pr: pr[i], rc: b.refChosen[i], rr: b.refRejected[i], loss: l[i], ...(nll ? { nll: nll[0] } : {}) });
  }
  return dpoMetrics(rows, p.beta);
}

export function weightFiles(dir: string): string[] {
  const src = TensorSource.open(dir);
  return [...new Set(src.names().map((n) => src.fileOf(n)))];
}

/** How reference log-probs are produced, and the hash that keys their cache. */
export function referenceFor(policy: Policy, c: { refModel?: string; adapter?: string; refIsStartAdapter: boolean }, batchSize: number): { hash: string; compute: (pairs: PrefPair[]) => { chosen: number[]; rejected: number[] }; dispose: () => void } {
  if (c.refModel) {
    let ref: Decoder | null = null;
    return {
      hash: filesHash(weightFiles(c.refModel)),
      compute: (pairs) => {
        ref ??= loadModel(c.refModel!);
        return pairLogpsHost(ref, pairs, batchSize, policy.padId);
      },
      dispose: () => ref?.dispose(),
    };
  }
  const base = weightFiles(policy.dir);
  if (c.refIsStartAdapter && c.adapter) {
    // Only valid before the adapter trains: callers compute every reference value up front.
    return { hash: filesHash([...base, path.join(c.adapter, 'adapter_model.safetensors')]), compute: (pairs) => pairLogpsHost(policy.model, pairs, batchSize, policy.padId), dispose: () => {} };
  }
  return { hash: filesHash(base), compute: (pairs) => withAdapterOff(policy.model, () => pairLogpsHost(policy.model, pairs, batchSize, policy.padId)), dispose: () => {} };
}

export interface DpoResult extends TrainResult {
  pairs: number;
  evalPairs: number;
  skipped: Record<string, number>;
  cacheHits: number;
  trainMetrics: Record<string, number>;
  evalMetrics: Record<string, number>;
  evalBefore: Record<string, number>;
}

/** The pairs a job trains and evaluates on: read with the job's limits, held out as configured. */
export function dpoPairs(c: DpoConfig, policy: Policy): { pairs: PrefPair[]; evalPairs: PrefPair[]; skipped: Record<string, number> } {
  const V = policy.model.cfg.vocab_size;
  const lim = { maxLength: Math.min(c.maxLength, policy.model.cfg.max_position_embeddings), maxPromptLength: c.maxPromptLength, strict: c.strict };
  const skipped: Record<string, number> = {};
  const load = (src: string | PrefPair[]) => {
    if (Array.isArray(src)) return src;
    const r = loadPrefs(src, policy.tok, V, lim);
    for (const [k, v] of Object.entries(r.skipped)) skipped[k] = (skipped[k] ?? 0) + v;
    return r.pairs;
  };
  let pairs = load(c.data);
  let evalPairs = c.evalData ? load(c.evalData) : [];
  if (!c.evalData) ({ train: pairs, held: evalPairs } = holdOut(pairs, c.evalRatio, c.train.seed));
  if (!pairs.length) throw new UserError(`${typeof c.data === 'string' ? c.data : 'pairs'}: no usable preference pairs (skipped: ${JSON.stringify(skipped)})`);
  if (Object.keys(skipped).length) log('skipped-pairs', skipped);
  return { pairs, evalPairs, skipped };
}

/** The adapter a job starts from (the given one, or a fresh one from the seed), attached to the policy. */
export function startAdapter(c: DpoConfig, policy: Policy): LoraAdapter {
  const adapter = c.adapter ? LoraAdapter.load(policy.model, c.adapter) : LoraAdapter.create(policy.model, c.lora, c.train.seed);
  adapter.baseModelName = path.resolve(c.model);
  attach(policy.model, adapter);
  return adapter;
}

export async function runDpo(c: DpoConfig): Promise<DpoResult> {
  validateDpoParams(c.dpo);
  const checkpointed = checkTrainingFits(c.model, `dpo on ${c.model}`, { rows: 2 * c.batchSize, len: c.maxLength, train: c.train, lora: c.lora });
  const policy = openPolicy(c.model);
  const model = policy.model;
  const { pairs, evalPairs, skipped } = dpoPairs(c, policy);
  const adapter = startAdapter(c, policy);
  const db = openDb(c.cacheDb ?? path.join(c.out, 'prefopt.db'));
  const ref = referenceFor(policy, c, c.batchSize);
  let trainer: Trainer<DpoBatch> | null = null;
  try {
    const all = [...pairs, ...evalPairs];
    const r = referenceLogps(db, ref.hash, all, ref.compute, c.batchSize);
    log('reference', { pairs: all.length, cache_hits: r.hits, ref: ref.hash.slice(0, 12) });
    const refTrain = { chosen: r.chosen.slice(0, pairs.length), rejected: r.rejected.slice(0, pairs.length) };
    const refEval = { chosen: r.chosen.slice(pairs.length), rejected: r.rejected.slice(pairs.length) };
    const evalBefore = evalPairs.length ? evaluatePairs(model, evalPairs, refEval, c.dpo, c.batchSize, policy.padId) : {};
    const order = new Rng(c.train.seed, 'pairs').shuffle(pairs.map((_, i) => i));
    const batches = makeDpoBatches(
      order.map((i) => pairs[i]),
      { chosen: order.map((i) => refTrain.chosen[i]), rejected: order.map((i) => refTrain.rejected[i]) },
      c.batchSize,
      policy.padId,
    );
    const params = adapter.params();
    trainer = new Trainer<DpoBatch>(
      {
        params,
        model,
        trainBatches: batches,
        tokens: (b) => validTokens(b.sb),
        loss: (b, rng, training) => {
          adapter.setTraining(training, rng);
          return dpoBatchLoss(model, b, c.dpo);
        },
        evaluate: evalPairs.length
          ? () => {
              adapter.setTraining(false);
              return evaluatePairs(model, evalPairs, refEval, c.dpo, c.batchSize, policy.padId);
            }
          : undefined,
      },
      { ...c.train, gradientCheckpointing: checkpointed ? 'on' : 'off' },
      c.out,
    );
    const res = await trainer.fit({
      resume: c.resume,
      label: 'dpo',
      ...paramsCheckpoint(params, 'adapter.safetensors'),
    });
    adapter.setTraining(false);
    const evalMetrics = evalPairs.length ? evaluatePairs(model, evalPairs, refEval, c.dpo, c.batchSize, policy.padId) : {};
    await publishFiles(c.out, 'adapter_config.json', (tmp) => adapter.save(tmp));
    const last = trainer.history.at(-1) ?? {};
    return { ...res, pairs: pairs.length, evalPairs: evalPairs.length, skipped, cacheHits: r.hits, trainMetrics: last, evalMetrics, evalBefore };
  } finally {
    trainer?.dispose();
    ref.dispose();
    db.close();
    adapter.dispose();
    model.dispose();
  }
}
