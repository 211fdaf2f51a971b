import * as tf from '@tensorflow/tfjs-core';
import { Decoder } from '../src/model/decoder.js';
import { SeqBatch } from '../src/infer/batch.js';
import { sftLoss } from '../src/stages/sft.js';
import { AdamW } from '../src/train/adamw.js';
import { LoraAdapter, attach, withAdapterOff } from '../src/lora/lora.js';
import { DEFAULT_DPO, dpoLosses } from '../src/dpo/loss.js';
import { sequenceLogps } from '../src/dpo/logps.js';
import { Rng } from '../src/util/rng.js';
import { makeBatch } from '../src/infer/batch.js';

/** The timed steps both benchmarks run (bench/run.ts at 5M, bench/real-size.ts at 0.5B). */

/**
 * Seconds per call of f: the fastest of `reps` timed calls after a warm-up. This VM's speed swings
 * by up to 3x within a minute (other tenants' load; GEMM rates of 90 to 260 GFLOP/s in one run),
 * so a mean mostly measured when the slow spells fell; the fastest call is the least disturbed.
 * bench/torch_ref.py times PyTorch the same way.
 */
export function timeIt(f: () => void, reps: number): number {
  f(); // warm-up
  let best = Infinity;
  for (let i = 0; i < reps; i++) {
    const t0 = performance.now();
    f();
    best = Math.min(best, performance.now() - t0);
  }
  return best / 1000;
}

/** The bench's SFT step on `model` (trainable): forward, backward and AdamW on every weight. */
export function sftStepOf(model: Decoder, sb: SeqBatch): { step: () => void; dispose: () => void } {
  const opt = new AdamW({ beta1: 0.9, beta2: 0.95, eps: 1e-8, weightDecay: 0.1 }, model.params);
  const vars = [...model.params.values()];
  const step = () => {
    const { value, grads } = tf.variableGrads(() => sftLoss(model, sb), vars);
    value.dispose();
    opt.step(new Map([...model.params].map(([n, v]) => [n, grads[v.name]])), 1e-4);
    Object.values(grads).forEach((x) => x.dispose());
  };
  return { step, dispose: () => opt.dispose() };
}

/**
 * One DPO step on the pairs of `pb` ([chosen…, rejected…]): reference log-probs without
 * gradients, then the policy pass and an update of `trainable`. LoRA and full-model DPO differ
 * only in the reference and what trains.
 */
export function dpoStepOf(model: Decoder, pb: SeqBatch, trainable: Map<string, tf.Variable>, o: AdamW, lr: number, reference: () => tf.Tensor1D): () => void {
  const n = pb.batch / 2;
  return () => {
    const ref = tf.tidy(reference);
    const rd = ref.dataSync();
    ref.dispose();
    const { value, grads } = tf.variableGrads(() => {
      const all = sequenceLogps(model, pb);
      const l = dpoLosses({ policyChosen: tf.slice(all, [0], [n]) as tf.Tensor1D, policyRejected: tf.slice(all, [n], [n]) as tf.Tensor1D, refChosen: tf.tensor1d(rd.slice(0, n)), refRejected: tf.tensor1d(rd.slice(n)), lenChosen: tf.fill([n], 64) as tf.Tensor1D, lenRejected: tf.fill([n], 64) as tf.Tensor1D }, { ...DEFAULT_DPO, beta: 0.1 });
      return tf.mean(l) as tf.Scalar;
    }, [...trainable.values()]);
    value.dispose();
    o.step(new Map([...trainable].map(([k, v]) => [k, grads[v.name]])), lr);
    Object.values(grads).forEach((x) => x.dispose());
  };
}

export const ALL_LINEARS = ['q_proj', 'k_proj', 'v_proj', 'o_proj', 'gate_proj', 'up_proj', 'down_proj'];

/**
 * LoRA DPO on frozen `model`: rank-16 adapters on every linear layer. The reference is the
 * adapter switched off, computed in each step, or with `cachedReference` those log-probs once
 * (as a DPO stage reads them from its cache). `dropout` on the adapters' inputs draws from a
 * fresh seeded stream each step.
 */
export function loraDpoStepOf(model: Decoder, pb: SeqBatch, o: { dropout?: number; cachedReference?: boolean } = {}): { step: () => void; params: Map<string, tf.Variable>; dispose: () => void } {
  const ad = LoraAdapter.create(model, { r: 16, alpha: 32, dropout: o.dropout ?? 0, targets: ALL_LINEARS, useRslora: false }, 0);
  attach(model, ad);
  const params = ad.params();
  const opt = new AdamW({ beta1: 0.9, beta2: 0.95, eps: 1e-8, weightDecay: 0 }, params);
  const reference = () => withAdapterOff(model, () => sequenceLogps(model, pb));
  const cached = o.cachedReference ? tf.tidy(reference).dataSync() : null;
  let calls = 0;
  const train = dpoStepOf(model, pb, params, opt, 1e-4, cached ? () => tf.tensor1d(cached) : reference);
  const step = () => {
    ad.setTraining(true, new Rng(0, 'bench-dropout', calls++));
    train();
    ad.setTraining(false);
  };
  return {
    step,
    params,
    dispose: () => {
      opt.dispose();
      ad.dispose();
      model.adapter = null;
    },
  };
}


/** Qwen2.5-0.5B's shape (494M parameters), the real-size bench's and the GPU check's model. */
export const QWEN05_SHAPE = { hidden_size: 896, intermediate_size: 4864, num_hidden_layers: 24, num_attention_heads: 14, num_key_value_heads: 2, head_dim: 64, max_position_embeddings: 32768, rope_theta: 1000000, tie_word_embeddings: true, vocab_size: 151936 };
export const PROMPT = 64;
export const COMPLETION = 192;

/** n rows of `len` (PROMPT + COMPLETION) random tokens, scored from position scoredFrom on. */
export function benchRows(n: number, scoredFrom: number, vocab = QWEN05_SHAPE.vocab_size, len = PROMPT + COMPLETION): SeqBatch {
  const rng = new Rng(1);
  return makeBatch(Array.from({ length: n }, () => {
    const ids = Array.from({ length: len }, () => rng.int(vocab));
    return { ids, weights: ids.map((_, t) => (t >= scoredFrom ? 1 : 0)) };
  }));
}

/**
 * LoRA DPO on `model` for comparing two backends: the adapter's B set non-zero (so that A has a
 * gradient too), then `steps` steps with dropout; the loss of each step, the adapter's
 * gradients at the first and the adapter after the last. Reads everything back as arrays.
 */
export function loraDpoTrace(model: Decoder, pb: SeqBatch, o: { dropout: number; steps: number; lr: number; r: number; targets: string[] }) {
  const ad = LoraAdapter.create(model, { r: o.r, alpha: 2 * o.r, dropout: o.dropout, targets: o.targets, useRslora: false }, 0);
  attach(model, ad);
  const params = ad.params();
  const rng = new Rng(7);
  for (const [name, v] of params) if (name.includes('lora_B')) tf.tidy(() => v.assign(tf.tensor(Float32Array.from({ length: v.size }, () => rng.normal() * 0.1), v.shape)));
  const opt = new AdamW({ beta1: 0.9, beta2: 0.95, eps: 1e-8, weightDecay: 0.01 }, params);
  const n = pb.batch / 2;
  const out = { loss: [] as number[], grads: {} as Record<string, Float32Array>, adapter: {} as Record<string, Float32Array> };
  for (let step = 0; step < o.steps; step++) {
    const refT = tf.tidy(() => withAdapterOff(model, () => sequenceLogps(model, pb)));
    const ref = refT.dataSync();
    refT.dispose();
    ad.setTraining(true, new Rng(0, 'dropout', step));
    const { value, grads } = tf.variableGrads(() => {
      const all = sequenceLogps(model, pb);
      const l = dpoLosses({ policyChosen: tf.slice(all, [0], [n]) as tf.Tensor1D, policyRejected: tf.slice(all, [n], [n]) as tf.Tensor1D, refChosen: tf.tensor1d(ref.slice(0, n)), refRejected: tf.tensor1d(ref.slice(n)), lenChosen: tf.fill([n], 8) as tf.Tensor1D, lenRejected: tf.fill([n], 8) as tf.Tensor1D }, { ...DEFAULT_DPO, beta: 0.5 });
      return tf.mean(l) as tf.Scalar;
    }, [...params.values()]);
    ad.setTraining(false);
    out.loss.push(value.dataSync()[0]);
    if (step === 0) for (const [k, v] of params) out.grads[k] = grads[v.name].dataSync() as Float32Array;
    opt.step(new Map([...params].map(([k, v]) => [k, grads[v.name]])), o.lr);
    value.dispose();
    Object.values(grads).forEach((g) => g.dispose());
  }
  for (const [k, v] of params) out.adapter[k] = v.dataSync() as Float32Array;
  opt.dispose();
  ad.dispose();
  model.adapter = null;
  return out;
}

/** max |a − b| over max |b|: one backend's array against another's. */
export function worstRel(a: ArrayLike<number>, b: ArrayLike<number>): number {
  if (a.length !== b.length) return Infinity;
  let scale = 0;
  let w = 0;
  for (let i = 0; i < b.length; i++) {
    scale = Math.max(scale, Math.abs(b[i]));
    w = Math.max(w, Math.abs(a[i] - b[i]));
  }
  return w / Math.max(scale, 1e-30);
}
