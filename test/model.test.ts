import { describe, expect, it } from 'vitest';
import * as tf from '@tensorflow/tfjs-core';
import { Decoder, KVCache } from '../src/model/decoder.js';
import { makeBatch, promptCompletionRow, tokenLogps } from '../src/infer/batch.js';
import { labelLogProbs } from '../src/engine/ops.js';
import { setFused } from '../src/engine/fused.js';
import { completionLogprobs } from '../src/infer/logprobs.js';
import { referenceLogits, logSoftmax } from './helpers/reference.js';
import { ARCH_SPECS, makeTestModel } from './helpers/models.js';
import { ropeTables } from '../src/model/rope.js';
import { MASKED, attentionMask } from '../src/model/mask.js';
import { Rng } from '../src/util/rng.js';

function maxAbsDiff(a: ArrayLike<number>, b: ArrayLike<number>): number {
  let m = 0;
  for (let i = 0; i < a.length; i++) m = Math.max(m, Math.abs(a[i] - b[i]));
  return m;
}

function logitsOf(model: Decoder, ids: number[][]): number[][][] {
  const sb = makeBatch(ids.map((r) => ({ ids: r, weights: r.map(() => 1) })));
  const out = tf.tidy(() => {
    const h = model.hidden(sb);
    return model.logits(tf.reshape(h, [sb.batch * sb.len, model.cfg.hidden_size]) as tf.Tensor2D);
  });
  const d = out.dataSync();
  out.dispose();
  const V = model.cfg.vocab_size;
  return ids.map((r, b) => r.map((_, t) => Array.from(d.subarray((b * sb.len + t) * V, (b * sb.len + t + 1) * V))));
}

describe('decoder logits against a float64 reference', () => {
  for (const [label, spec] of Object.entries(ARCH_SPECS)) {
    it(label, () => {
      const { cfg, w, ref } = makeTestModel(spec);
      const model = Decoder.fromHF(cfg, (n) => w.get(n)!);
      // Two rows of different lengths: the shorter one is right-padded and must be unaffected.
      const seqs = [[3, 7, 1, 9, 4, 4, 2, 11, 5], [8, 2, 6]];
      const got = logitsOf(model, seqs);
      for (const [b, s] of seqs.entries()) {
        const want = referenceLogits(ref, w, s);
        for (let t = 0; t < s.length; t++) {
          // float32 against float64 on O(1..10) logits: 2e-4 absolute.
          expect(maxAbsDiff(got[b][t], want[t])).toBeLessThan(2e-4);
        }
      }
      model.dispose();
    });
  }
});

describe('KV cache', () => {
  for (const [label, spec] of Object.entries(ARCH_SPECS)) {
    it(`incremental decoding equals the full forward (${label})`, () => {
      const { cfg, w } = makeTestModel(spec, 3);
      const model = Decoder.fromHF(cfg, (n) => w.get(n)!);
      const seq = [5, 1, 8, 2, 9, 3, 7];
      const full = logitsOf(model, [seq])[0];
      const cache = new KVCache(cfg.num_hidden_layers, 1);
      // A 4-token prefill, then one token at a time.
      const chunks = [seq.slice(0, 4), [seq[4]], [seq[5]], [seq[6]]];
      let t0 = 0;
      for (const c of chunks) {
        const lg = tf.tidy(() => {
          const h = model.hidden({ ids: c, batch: 1, len: c.length }, cache);
          return model.logits(tf.reshape(h, [c.length, cfg.hidden_size]) as tf.Tensor2D);
        });
        const d = lg.dataSync();
        lg.dispose();
        for (let i = 0; i < c.length; i++) {
          expect(maxAbsDiff(d.subarray(i * cfg.vocab_size, (i + 1) * cfg.vocab_size), full[t0 + i])).toBeLessThan(1e-4);
        }
        t0 += c.length;
      }
      cache.dispose();
      model.dispose();
    });
  }
});

describe('completion log-probs', () => {
  it('equal the reference sum of log-softmax over completion tokens, batched with padding', () => {
    const { cfg, w, ref } = makeTestModel(ARCH_SPECS['zhinao fused qkv GQA'], 5);
    const model = Decoder.fromHF(cfg, (n) => w.get(n)!);
    const rows = [
      { prompt: [1, 2, 3], completion: [4, 5] },
      { prompt: [9], completion: [10, 11, 12, 13, 14] },
      { prompt: [7, 7, 7, 7, 7, 7], completion: [3] },
    ];
    const got = completionLogprobs(model, rows, { batchSize: 2 });
    rows.forEach((r, i) => {
      const ids = [...r.prompt, ...r.completion];
      const lg = referenceLogits(ref, w, ids);
      let want = 0;
      const per: number[] = [];
      for (let j = 0; j < r.completion.length; j++) {
        const t = r.prompt.length + j;
        const v = logSoftmax(lg[t - 1])[ids[t]];
        per.push(v);
        want += v;
      }
      expect(got[i].n_tokens).toBe(r.completion.length);
      expect(Math.abs(got[i].logp - want)).toBeLessThan(1e-4 * r.completion.length);
      expect(maxAbsDiff(got[i].token_logps, per)).toBeLessThan(1e-4);
    });
    model.dispose();
  });

  it('leaves no tensors behind across repeated calls', () => {
    const { cfg, w } = makeTestModel(ARCH_SPECS['llama GQA untied'], 2);
    const model = Decoder.fromHF(cfg, (n) => w.get(n)!);
    const rows = [{ prompt: [1, 2], completion: [3, 4] }];
    completionLogprobs(model, rows);
    const before = tf.memory().numTensors;
    for (let i = 0; i < 5; i++) completionLogprobs(model, rows);
    expect(tf.memory().numTensors).toBe(before);
    model.dispose();
  });
});

describe('token log-probs of partly scored rows', () => {
  it('score only the weighted positions: values and every parameter gradient equal the all-positions form', () => {
    const { cfg } = makeTestModel(ARCH_SPECS['qwen2 biases tied rope 1e6'], 3);
    const model = Decoder.init(cfg, 4, 0.3);
    // Prompts are unscored, completions scored; one row fully padded past its end.
    const sb = makeBatch([promptCompletionRow([1, 2, 3, 4], [5, 6]), promptCompletionRow([7], [8, 9, 10, 11]), promptCompletionRow([12, 13], [14])]);
    const vars = [...model.params.values()];
    const coef = tf.tensor2d(Array.from({ length: sb.batch * sb.len }, (_, i) => 1 + (i % 5) * 0.25), [sb.batch, sb.len]);
    // The second formulation: logits at every position, then the weights.
    const allPositions = () => {
      const h = tf.reshape(model.hidden(sb), [sb.batch * sb.len, cfg.hidden_size]) as tf.Tensor2D;
      const labels = new Int32Array(sb.batch * sb.len), wt = new Float32Array(sb.batch * sb.len);
      for (let b = 0; b < sb.batch; b++)
        for (let t = 0; t + 1 < sb.len; t++) {
          labels[b * sb.len + t] = sb.ids[b * sb.len + t + 1];
          wt[b * sb.len + t] = sb.weights[b * sb.len + t + 1];
        }
      return tf.reshape(tf.mul(labelLogProbs(model.logits(h), tf.tensor1d(labels, 'int32')), tf.tensor1d(wt)), [sb.batch, sb.len]) as tf.Tensor2D;
    };
    for (const on of [true, false]) {
      setFused(on);
      const run = (f: () => tf.Tensor2D) => {
        const values = tf.tidy(() => f().dataSync());
        const { value, grads } = tf.variableGrads(() => tf.sum(tf.mul(f(), coef)) as tf.Scalar, vars);
        const out = { values: Array.from(values), loss: value.dataSync()[0], grads: vars.map((v) => Array.from(grads[v.name].dataSync())) };
        value.dispose();
        Object.values(grads).forEach((g) => g.dispose());
        return out;
      };
      const got = run(() => tokenLogps(model, sb));
      const want = run(allPositions);
      expect(maxAbsDiff(got.values, want.values), `fused ${on}`).toBeLessThan(1e-6);
      expect(got.values.filter((v) => v !== 0).length).toBe(2 + 4 + 1);
      expect(Math.abs(got.loss - want.loss)).toBeLessThan(1e-5);
      got.grads.forEach((g, i) => expect(maxAbsDiff(g, want.grads[i]), `fused ${on}: gradient of parameter ${i}`).toBeLessThan(1e-6 * Math.max(1, ...want.grads[i].map(Math.abs))));
    }
    setFused(true);
    coef.dispose();
    model.dispose();
  });
});

describe('rotary tables', () => {
  it('give every row cos/sin of position·θ^(-2j/d) (float64, then float32), repeated positions included', () => {
    const { cfg } = makeTestModel(ARCH_SPECS['llama GQA untied']);
    const d = cfg.head_dim;
    // Rows of a batch repeat positions (0..T-1 per row), and a packed or offset row starts elsewhere.
    const positions = [0, 1, 2, 3, 0, 1, 2, 3, 7, 5, 0, 7];
    const { cos, sin } = ropeTables(cfg, positions);
    positions.forEach((p, i) => {
      for (let j = 0; j < d; j++) {
        const a = p * Math.pow(cfg.rope_theta, (-2 * (j % (d / 2))) / d);
        expect(cos[i * d + j], `row ${i} cos ${j}`).toBe(Math.fround(Math.cos(a)));
        expect(sin[i * d + j], `row ${i} sin ${j}`).toBe(Math.fround(Math.sin(a)));
      }
    });
  });
});

describe('attention masks', () => {
  it('equal the rule written out per entry (causal, padding, packed segments, a sliding window, queries after a cache), on random specs', () => {
    const rng = new Rng(12);
    for (let trial = 0; trial < 60; trial++) {
      const B = 1 + rng.int(3);
      const Tk = 1 + rng.int(12);
      const T = 1 + rng.int(Tk);
      const keyValid = rng.next() < 0.6 ? Array.from({ length: B * Tk }, () => (rng.next() < 0.8 ? 1 : 0)) : undefined;
      const segments = rng.next() < 0.4 ? Array.from({ length: B * Tk }, () => rng.int(3)) : undefined;
      const window = rng.next() < 0.4 ? 1 + rng.int(5) : undefined;
      const got = attentionMask({ batch: B, queryLen: T, keyLen: Tk, keyValid, segments, window });
      let masked = 0;
      for (let b = 0; b < B; b++)
        for (let t = 0; t < T; t++)
          for (let j = 0; j < Tk; j++) {
            const qi = Tk - T + t;
            const seen = j <= qi && (window === undefined || qi - j < window) && (!keyValid || keyValid[b * Tk + j] === 1) && (!segments || segments[b * Tk + j] === segments[b * Tk + qi]);
            expect(got[(b * T + t) * Tk + j], `trial ${trial} (${b}, ${t}, ${j})`).toBe(seen ? 0 : MASKED);
            masked += seen ? 0 : 1;
          }
      if (trial === 0) expect(masked).toBeGreaterThan(0);
    }
  });
});
