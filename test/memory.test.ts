import { describe, expect, it } from 'vitest';
import * as tf from '@tensorflow/tfjs-core';
import { Decoder } from '../src/model/decoder.js';
import { makeBatch } from '../src/infer/batch.js';
import { sftLoss } from '../src/stages/sft.js';
import { LoraAdapter, attach } from '../src/lora/lora.js';
import { checkpoint } from '../src/engine/checkpoint.js';
import { Rng } from '../src/util/rng.js';
import { ARCH_SPECS, makeTestModel } from './helpers/models.js';

/*
 * Bounded activations: recomputing layers in the backward pass (checkpointing) and running the
 * LM head in chunks are two formulations of the same function, so they must give the loss and
 * every gradient of the plain pass — bit for bit where the arithmetic is the same, and within
 * float32 summation order where the chunked head splits a product.
 */
function load(spec: (typeof ARCH_SPECS)[string]) {
  const { cfg, w } = makeTestModel(spec, 3, 0.2);
  return Decoder.fromHF(cfg, (n) => w.get(n)!, true);
}

function batchFor(vocab: number) {
  const rng = new Rng(7);
  const rows = [9, 6, 11].map((n) => {
    const ids = Array.from({ length: n }, () => 2 + Math.floor(rng.next() * (vocab - 2)));
    return { ids, weights: ids.map((_, t) => (t >= 3 ? 1 : 0)) };
  });
  return makeBatch(rows, 0);
}

/** The SFT loss and its gradients for `vars`, as host arrays. */
function lossAndGrads(model: Decoder, vars: tf.Variable[], sb: ReturnType<typeof makeBatch>, before?: () => void) {
  return tf.tidy(() => {
    before?.();
    const { value, grads } = tf.variableGrads(() => sftLoss(model, sb), vars);
    return { loss: value.dataSync()[0], grads: vars.map((v) => grads[v.name].dataSync()) };
  });
}

function expectClose(a: ArrayLike<number>, b: ArrayLike<number>, tol: number, what: string) {
  expect(a.length, what).toBe(b.length);
  let worst = 0;
  for (let i = 0; i < a.length; i++) worst = Math.max(worst, Math.abs(a[i] - b[i]) / (1 + Math.abs(b[i])));
  expect(worst, what).toBeLessThanOrEqual(tol);
}

describe('activation checkpointing', () => {
  for (const name of ['qwen2 biases tied rope 1e6', 'zhinao fused qkv GQA', 'qwen3 q/k norms, head_dim 12 apart from hidden / heads, tied']) {
    it(`full-model gradients are the same with and without it: ${name}`, () => {
      const model = load(ARCH_SPECS[name]);
      const sb = batchFor(model.cfg.vocab_size);
      const vars = [...model.params.values()];
      const plain = lossAndGrads(model, vars, sb);
      model.checkpointLayers = true;
      const ck = lossAndGrads(model, vars, sb);
      expect(ck.loss).toBe(plain.loss);
      vars.forEach((_, i) => expectClose(ck.grads[i], plain.grads[i], 1e-6, [...model.params.keys()][i]));
      // The gradients are not trivially zero: the comparison has something to compare.
      expect(plain.grads.some((g) => g.some((x) => Math.abs(x) > 1e-4))).toBe(true);
      model.dispose();
    });
  }

  it('LoRA gradients with dropout replay the same masks in the recompute', () => {
    const model = load(ARCH_SPECS['llama GQA untied']);
    model.setTrainable(false);
    const ad = LoraAdapter.create(model, { r: 4, alpha: 8, dropout: 0.3, targets: ['q_proj', 'v_proj', 'down_proj'], useRslora: false }, 5);
    // B starts at zero (PEFT); give it values so that A's gradient is not zero either.
    for (const w of ad.weights.values()) w.b.assign(tf.randomNormal(w.b.shape, 0, 0.3, 'float32', 11));
    attach(model, ad);
    const vars = [...ad.params().values()];
    const sb = batchFor(model.cfg.vocab_size);
    const run = () => lossAndGrads(model, vars, sb, () => ad.setTraining(true, new Rng(99)));
    const plain = run();
    model.checkpointLayers = true;
    const ck = run();
    expect(ck.loss).toBe(plain.loss);
    vars.forEach((_, i) => expectClose(ck.grads[i], plain.grads[i], 1e-6, `lora ${i}`));
    // Dropout is live: another stream gives another loss.
    const other = lossAndGrads(model, vars, sb, () => ad.setTraining(true, new Rng(100)));
    expect(other.loss).not.toBe(plain.loss);
    model.dispose();
    ad.dispose();
  });

  it('the outer tape survives a checkpoint inside it and frees every tensor', () => {
    const x = tf.variable(tf.tensor1d([0.5, -1, 2]));
    const before = tf.memory().numTensors;
    const f = (t: tf.Tensor) => tf.mul(tf.sin(t), tf.square(t));
    const g = tf.tidy(() => {
      const { grads } = tf.variableGrads(() => tf.sum(tf.mul(checkpoint(f, tf.exp(x), []), 3)) as tf.Scalar, [x]);
      return grads[x.name].arraySync() as number[];
    });
    // d/dx 3·sin(eˣ)·e²ˣ = 3·(cos(eˣ)·e³ˣ + 2·sin(eˣ)·e²ˣ)
    const want = [0.5, -1, 2].map((v) => 3 * (Math.cos(Math.exp(v)) * Math.exp(3 * v) + 2 * Math.sin(Math.exp(v)) * Math.exp(2 * v)));
    expectClose(g, want, 1e-5, 'chain rule through the recompute');
    expect(tf.memory().numTensors).toBe(before);
    x.dispose();
  });
});

describe('chunked LM head', () => {
  for (const name of ['qwen2 biases tied rope 1e6', 'llama GQA untied']) {
    it(`values and gradients equal the whole head (chunks of 1, 4 and 7 rows): ${name}`, () => {
      const model = load(ARCH_SPECS[name]);
      const sb = batchFor(model.cfg.vocab_size);
      const vars = [...model.params.values()];
      const whole = lossAndGrads(model, vars, sb);
      for (const rows of [1, 4, 7]) {
        model.headChunkBytes = rows * 4 * model.cfg.vocab_size;
        expect(model.headChunkRows()).toBe(rows);
        const ch = lossAndGrads(model, vars, sb);
        expect(Math.abs(ch.loss - whole.loss)).toBeLessThanOrEqual(1e-6 * Math.abs(whole.loss));
        vars.forEach((_, i) => expectClose(ch.grads[i], whole.grads[i], 1e-6, `${rows} rows: ${[...model.params.keys()][i]}`));
      }
      model.dispose();
    });
  }

  it('a frozen head (LoRA) takes its slope from the forward pass: same loss and adapter gradients as the whole head', () => {
    for (const name of ['qwen2 biases tied rope 1e6', 'llama GQA untied']) {
      const model = load(ARCH_SPECS[name]);
      model.setTrainable(false);
      const ad = LoraAdapter.create(model, { r: 4, alpha: 8, dropout: 0, targets: ['q_proj', 'o_proj', 'up_proj'], useRslora: false }, 5);
      for (const w of ad.weights.values()) w.b.assign(tf.randomNormal(w.b.shape, 0, 0.3, 'float32', 12));
      attach(model, ad);
      const vars = [...ad.params().values()];
      const sb = batchFor(model.cfg.vocab_size);
      const whole = lossAndGrads(model, vars, sb);
      for (const rows of [1, 5]) {
        model.headChunkBytes = rows * 4 * model.cfg.vocab_size;
        const ch = lossAndGrads(model, vars, sb);
        expect(Math.abs(ch.loss - whole.loss)).toBeLessThanOrEqual(1e-6 * Math.abs(whole.loss));
        vars.forEach((_, i) => expectClose(ch.grads[i], whole.grads[i], 1e-6, `${name}, ${rows} rows: lora ${i}`));
      }
      expect(whole.grads.some((g) => g.some((x) => Math.abs(x) > 1e-4))).toBe(true);
      model.dispose();
      ad.dispose();
    }
  });
});
