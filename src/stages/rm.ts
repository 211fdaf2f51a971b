import * as tf from '@tensorflow/tfjs-core';
import { DEFAULT_TRAIN, TrainConfig, Trainer, TrainResult } from '../train/trainer.js';
import { checkTrainingFits } from '../model/memory.js';
import { paramsCheckpoint } from '../train/params-io.js';
import { LoraAdapter, LoraConfig, attach, mergeInto } from '../lora/lora.js';
import { PrefPair, loadPrefs } from '../data/prefs.js';
import { SeqBatch, makeBatch, promptCompletionRow } from '../infer/batch.js';
import { openPolicy } from '../model/policy.js';
import { Decoder } from '../model/decoder.js';
import { logSigmoid } from '../dpo/loss.js';
import { rewardModelFrom, rewards } from '../../rm/bt.js';
import { Rng } from '../util/rng.js';
import { holdOut } from '../data/split.js';
import { UserError } from '../util/errors.js';
import { log } from '../util/log.js';
import { chunk, publishFiles, validTokens } from './sft.js';
import { saveModel } from '../model/load.js';

/**
 * Reward-model training (Bradley–Terry): loss = −log σ(r_chosen − r_rejected − margin), on the
 * shared trainer, full-parameter or with LoRA (the score head always trains; LoRA is merged
 * into the saved checkpoint so transformers reads it as a plain …ForSequenceClassification).
 */
export interface RmConfig {
  model: string;
  data: string;
  out: string;
  evalData?: string;
  evalRatio: number;
  lora: LoraConfig | null;
  batchSize: number;
  maxLength: number;
  maxPromptLength: number;
  strict: boolean;
  resume: boolean;
  train: TrainConfig;
}

export const DEFAULT_RM: Omit<RmConfig, 'model' | 'data' | 'out'> = {
  evalRatio: 0.1,
  lora: null,
  batchSize: 8,
  maxLength: 512,
  maxPromptLength: 256,
  strict: false,
  resume: false,
  train: { ...DEFAULT_TRAIN, lr: 1e-4, epochs: 1, scheduler: 'linear', warmupRatio: 0.05 },
};

interface RmBatch {
  sb: SeqBatch;
  n: number;
  margin: Float32Array;
}

function rmBatches(pairs: PrefPair[], bs: number, padId: number): RmBatch[] {
  return chunk(pairs, bs).map((ps) => ({
    sb: makeBatch([...ps.map((p) => promptCompletionRow(p.prompt, p.chosen)), ...ps.map((p) => promptCompletionRow(p.prompt, p.rejected))], padId),
    n: ps.length,
    margin: Float32Array.from(ps.map((p) => p.margin ?? 0)),
  }));
}

export function btLoss(rc: tf.Tensor1D, rr: tf.Tensor1D, margin: tf.Tensor1D): tf.Scalar {
  return tf.neg(tf.mean(logSigmoid(tf.sub(tf.sub(rc, rr), margin)))) as tf.Scalar;
}

export function rmEval(model: Decoder, batches: RmBatch[]): { accuracy: number; margin: number; loss: number } {
  let acc = 0;
  let mar = 0;
  let loss = 0;
  let n = 0;
  for (const b of batches) {
    const r = tf.tidy(() => rewards(model, b.sb));
    const d = r.dataSync();
    r.dispose();
    for (let i = 0; i < b.n; i++) {
      const diff = d[i] - d[b.n + i];
      acc += diff > 0 ? 1 : 0;
      mar += diff;
      const z = diff - b.margin[i];
      loss += Math.max(-z, 0) + Math.log1p(Math.exp(-Math.abs(z)));
      n++;
    }
  }
  return { accuracy: acc / Math.max(n, 1), margin: mar / Math.max(n, 1), loss: loss / Math.max(n, 1) };
}

export interface RmResult extends TrainResult {
  pairs: number;
  evalPairs: number;
  evalBefore: Record<string, number>;
  evalMetrics: Record<string, number>;
}

export async function runRmTrain(c: RmConfig): Promise<RmResult> {
  const checkpointed = checkTrainingFits(c.model, `rm train on ${c.model}`, { rows: 2 * c.batchSize, len: c.maxLength, train: c.train, lora: c.lora });
  const policy = openPolicy(c.model, { trainable: !c.lora });
  const model = rewardModelFrom(policy.model, c.train.seed);
  const lim = { maxLength: Math.min(c.maxLength, model.cfg.max_position_embeddings), maxPromptLength: c.maxPromptLength, strict: c.strict };
  let pairs = loadPrefs(c.data, policy.tok, model.cfg.vocab_size, lim).pairs;
  let evalPairs = c.evalData ? loadPrefs(c.evalData, policy.tok, model.cfg.vocab_size, lim).pairs : [];
  if (!c.evalData) ({ train: pairs, held: evalPairs } = holdOut(pairs, c.evalRatio, c.train.seed));
  if (!pairs.length) throw new UserError(`${c.data}: no usable preference pairs`);
  let adapter: LoraAdapter | null = null;
  let params: Map<string, tf.Variable>;
  if (c.lora) {
    adapter = LoraAdapter.create(model, c.lora, c.train.seed);
    attach(model, adapter);
    params = adapter.params();
    const head = model.p('score.weight');
    head.trainable = true;
    params.set('score.weight', head);
  } else params = model.params;
  const shuffled = new Rng(c.train.seed, 'pairs').shuffle([...pairs]);
  const batches = rmBatches(shuffled, c.batchSize, policy.padId);
  const evalBatches = rmBatches(evalPairs, c.batchSize, policy.padId);
  const evalBefore = evalPairs.length ? rmEval(model, evalBatches) : {};
  log('rm', { pairs: pairs.length, eval_pairs: evalPairs.length, lora: !!c.lora, trainable: [...params.values()].reduce((a, v) => a + v.size, 0) });
  const trainer = new Trainer<RmBatch>(
    {
      params,
      model,
      trainBatches: batches,
      tokens: (b) => validTokens(b.sb),
      loss: (b, rng, training) => {
        adapter?.setTraining(training, rng);
        const r = rewards(model, b.sb);
        const rc = tf.slice(r, [0], [b.n]) as tf.Tensor1D;
        const rr = tf.slice(r, [b.n], [b.n]) as tf.Tensor1D;
        return {
          loss: btLoss(rc, rr, tf.tensor1d(b.margin)),
          metrics: { accuracy: tf.mean(tf.cast(tf.greater(rc, rr), 'float32')) as tf.Scalar, margin: tf.mean(tf.sub(rc, rr)) as tf.Scalar },
        };
      },
      evaluate: evalPairs.length
        ? () => {
            adapter?.setTraining(false);
            return rmEval(model, evalBatches);
          }
        : undefined,
    },
    { ...c.train, gradientCheckpointing: checkpointed ? 'on' : 'off' },
    c.out,
  );
  try {
    const res = await trainer.fit({
      resume: c.resume,
      label: 'rm',
      ...paramsCheckpoint(params, 'trainable.safetensors'),
    });
    adapter?.setTraining(false);
    const evalMetrics = evalPairs.length ? rmEval(model, evalBatches) : {};
    if (adapter) {
      mergeInto(model, adapter);
      model.adapter = null;
    }
    await publishFiles(c.out, 'config.json', (tmp) => saveModel(model, tmp, { copyFrom: c.model }));
    return { ...res, pairs: pairs.length, evalPairs: evalPairs.length, evalBefore, evalMetrics };
  } finally {
    trainer.dispose();
    adapter?.dispose();
    model.dispose();
  }
}
