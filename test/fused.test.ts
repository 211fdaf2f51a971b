import { describe, expect, it } from 'vitest';
import * as tf from '@tensorflow/tfjs-core';
import { fusedActive, setFused } from '../src/engine/fused.js';
import { loadNative } from '../src/engine/native.js';
import { addRmsNorm, attention, embed, labelLogProbs, linear, loraLinear, rmsNorm, rope, splitQkv, sumSquares, swiglu } from '../src/engine/ops.js';
import { Decoder } from '../src/model/decoder.js';
import { parseConfig, presetConfig } from '../src/model/config.js';
import { makeBatch } from '../src/infer/batch.js';
import { attentionMask } from '../src/model/mask.js';
import { sftLoss } from '../src/stages/sft.js';
import { Rng } from '../src/util/rng.js';
import { LoraAdapter, attach } from '../src/lora/lora.js';

/*
 * Every fused kernel and the plain tfjs composition it replaces, held to the same float64
 * reference: values from a float64 forward pass, gradients by central differences of
 * Σ dy ⊙ f in float64 (so the backward formulas are checked against the forward, not against
 * themselves). Tolerances: float32 rounding of sums over ≤ 64 terms, |error| ≤ 2e-5·(1 + |want|)
 * for values, ≤ 1e-4·(1 + |want|) for gradients.
 */
const native = loadNative();
const rand = (rng: Rng, n: number, s = 1) => Float64Array.from({ length: n }, () => s * rng.normal());
const f32 = (a: ArrayLike<number>) => Float32Array.from(a);

function close(got: ArrayLike<number>, want: ArrayLike<number>, tol: number, what: string) {
  expect(got.length, what).toBe(want.length);
  let worst = 0;
  let at = -1;
  for (let i = 0; i < want.length; i++) {
    const e = Math.abs(got[i] - want[i]) / (1 + Math.abs(want[i]));
    if (!(e <= worst)) [worst, at] = [e, i];
  }
  expect(worst, `${what}: worst at ${at}: got ${got[at]}, want ${want[at]}`).toBeLessThanOrEqual(tol);
}

/** ∂/∂x_i of Σ dy ⊙ f(x) by central differences, everything in float64. */
function numGrad(f: (x: Float64Array) => Float64Array, x: Float64Array, dy: Float64Array, h = 1e-5): Float64Array {
  const g = new Float64Array(x.length);
  const dot = (y: Float64Array) => y.reduce((s, v, i) => s + v * dy[i], 0);
  for (let i = 0; i < x.length; i++) {
    const xp = Float64Array.from(x);
    const xm = Float64Array.from(x);
    xp[i] += h;
    xm[i] -= h;
    g[i] = (dot(f(xp)) - dot(f(xm))) / (2 * h);
  }
  return g;
}

/** Value and gradients of op(...inputs) with upstream dy, through whichever path is active. */
function run(op: (...xs: tf.Tensor[]) => tf.Tensor, inputs: tf.Tensor[], dy: Float64Array, wrt: number[]) {
  return tf.tidy(() => {
    const y = op(...inputs);
    const dyt = tf.tensor(f32(dy), y.shape);
    const grads = tf.grads((...xs: tf.Tensor[]) => tf.sum(tf.mul(op(...inputs.map((t, i) => (wrt.includes(i) ? xs[wrt.indexOf(i)] : t))), dyt)))(wrt.map((i) => inputs[i]));
    return { y: y.dataSync(), grads: grads.map((g) => g.dataSync()) };
  });
}

/** Both paths: the fused kernels (where the addon is built) and the tfjs composition. */
function bothPaths(check: (path: string) => void) {
  const paths = native.active ? [true, false] : [false];
  try {
    for (const on of paths) {
      setFused(on);
      expect(fusedActive()).toBe(on);
      check(on ? 'fused' : 'tfjs');
    }
  } finally {
    setFused(true);
  }
}

// float64 references
function refRmsNorm(x: Float64Array, w: Float64Array, D: number, eps: number): Float64Array {
  const y = new Float64Array(x.length);
  for (let r = 0; r < x.length / D; r++) {
    let s = 0;
    for (let j = 0; j < D; j++) s += x[r * D + j] ** 2;
    const k = 1 / Math.sqrt(s / D + eps);
    for (let j = 0; j < D; j++) y[r * D + j] = x[r * D + j] * k * w[j];
  }
  return y;
}
const refSwiglu = (g: Float64Array, u: Float64Array) => g.map((v, i) => (v / (1 + Math.exp(-v))) * u[i]);
function refRope(x: Float64Array, c: Float64Array, s: Float64Array, rows: number, H: number, hd: number): Float64Array {
  const y = new Float64Array(x.length);
  const h = hd / 2;
  for (let r = 0; r < rows; r++)
    for (let k = 0; k < H; k++)
      for (let j = 0; j < hd; j++) {
        const i = (r * H + k) * hd;
        const rot = j < h ? -x[i + j + h] : x[i + j - h];
        y[i + j] = x[i + j] * c[r * hd + j] + rot * s[r * hd + j];
      }
  return y;
}
/** softmax(scale · q kᵀ + mask) v per query head; head h reads kv head ⌊h / (H / KV)⌋. */
function refAttention(q: Float64Array, k: Float64Array, v: Float64Array, mask: Float64Array, scale: number, [B, T, Tk, H, KV, hd]: number[]): Float64Array {
  const o = new Float64Array(B * T * H * hd);
  for (let b = 0; b < B; b++)
    for (let h = 0; h < H; h++) {
      const g = Math.floor(h / (H / KV));
      for (let t = 0; t < T; t++) {
        const z = Array.from({ length: Tk }, (_, j) => {
          let s = 0;
          for (let d = 0; d < hd; d++) s += q[((b * T + t) * H + h) * hd + d] * k[((b * Tk + j) * KV + g) * hd + d];
          return scale * s + mask[(b * T + t) * Tk + j];
        });
        const mx = Math.max(...z);
        const e = z.map((x) => Math.exp(x - mx));
        const sum = e.reduce((a, x) => a + x, 0);
        for (let d = 0; d < hd; d++) o[((b * T + t) * H + h) * hd + d] = e.reduce((a, x, j) => a + (x / sum) * v[((b * Tk + j) * KV + g) * hd + d], 0);
      }
    }
  return o;
}

describe('fused kernels against float64', () => {
  it('RMSNorm: value, gradient for x and for the weight; rows long enough to use every thread', () => {
    const rng = new Rng(1);
    for (const [N, D] of [[6, 12], [300, 160]]) {
      const X = rand(rng, N * D);
      const W = rand(rng, D, 0.5).map((v) => 1 + v);
      const DY = rand(rng, N * D);
      const eps = 1e-6;
      const want = refRmsNorm(X, W, D, eps);
      const small = N * D < 1000;
      const gx = small ? numGrad((x) => refRmsNorm(x, W, D, eps), X, DY) : null;
      const gw = numGrad((w) => refRmsNorm(X, w, D, eps), W, DY);
      bothPaths((path) => {
        const r = run((x, w) => rmsNorm(x, w, eps), [tf.tensor2d(f32(X), [N, D]), tf.tensor1d(f32(W))], DY, [0, 1]);
        close(r.y, want, 2e-5, `${path} rmsNorm ${N}×${D}`);
        if (gx) close(r.grads[0], gx, 1e-4, `${path} ∂x`);
        close(r.grads[1], gw, 1e-4 * Math.sqrt(N), `${path} ∂w`);
      });
    }
  });

  it('residual add + RMSNorm: both outputs (the sum and its norm), gradients for x, r (both reach the sum) and the weight', () => {
    const rng = new Rng(11);
    for (const [N, D] of [[5, 12], [300, 160]]) {
      const X = rand(rng, N * D);
      const R = rand(rng, N * D);
      const W = rand(rng, D, 0.5).map((v) => 1 + v);
      const DY = rand(rng, 2 * N * D); // upstream of [s, y], side by side per row
      const eps = 1e-6;
      // f(x, r, w) = [x + r | rmsnorm(x + r)·w] per row, in float64.
      const ref = (x: Float64Array, r: Float64Array, w: Float64Array) => {
        const sum = x.map((v, i) => v + r[i]);
        const y = refRmsNorm(sum, w, D, eps);
        const out = new Float64Array(2 * N * D);
        for (let i = 0; i < N; i++) {
          out.set(sum.subarray(i * D, (i + 1) * D), 2 * i * D);
          out.set(y.subarray(i * D, (i + 1) * D), (2 * i + 1) * D);
        }
        return out;
      };
      const small = N * D < 1000;
      const gx = small ? numGrad((x) => ref(x, R, W), X, DY) : null;
      const gr = small ? numGrad((r) => ref(X, r, W), R, DY) : null;
      const gw = numGrad((w) => ref(X, R, w), W, DY);
      bothPaths((path) => {
        const op = (x: tf.Tensor, r: tf.Tensor, w: tf.Tensor) => tf.concat(addRmsNorm(x, r, w, eps), 1);
        const res = run(op, [tf.tensor2d(f32(X), [N, D]), tf.tensor2d(f32(R), [N, D]), tf.tensor1d(f32(W))], DY, [0, 1, 2]);
        close(res.y, ref(X, R, W), 2e-5, `${path} addRmsNorm ${N}×${D}`);
        if (gx) close(res.grads[0], gx, 1e-4, `${path} ∂x`);
        if (gr) close(res.grads[1], gr, 1e-4, `${path} ∂r`);
        expect(Array.from(res.grads[0]), `${path}: x and r get the same gradient`).toEqual(Array.from(res.grads[1]));
        close(res.grads[2], gw, 1e-4 * Math.sqrt(N), `${path} ∂w`);
      });
    }
  });

  it('SwiGLU: value and both gradients, across the kernel\'s 4096-element chunks, for large |g|', () => {
    const rng = new Rng(2);
    const n = 9000;
    const G = rand(rng, n, 3);
    G[0] = 40;
    G[1] = -40;
    const U = rand(rng, n);
    const DY = rand(rng, n);
    // Elementwise: the derivative of element i by a central difference of element i alone.
    const d = (f: (a: number) => number, a: number, h = 1e-5) => (f(a + h) - f(a - h)) / (2 * h);
    const silu = (v: number) => v / (1 + Math.exp(-v));
    const wantG = G.map((g, i) => DY[i] * U[i] * d(silu, g));
    const wantU = G.map((g, i) => DY[i] * silu(g));
    bothPaths((path) => {
      const r = run((g, u) => swiglu(g, u), [tf.tensor1d(f32(G)), tf.tensor1d(f32(U))], DY, [0, 1]);
      close(r.y, refSwiglu(G, U), 2e-6 * 40, `${path} swiglu`);
      close(r.grads[0], wantG, 1e-4, `${path} ∂g`);
      close(r.grads[1], wantU, 1e-5, `${path} ∂u`);
    });
  });

  it('rotary embedding: value and the transposed rotation as its gradient', () => {
    const rng = new Rng(3);
    const [B, T, H, hd] = [2, 3, 4, 8];
    const X = rand(rng, B * T * H * hd);
    const ang = rand(rng, B * T * hd, 2);
    const C = ang.map(Math.cos);
    const S = ang.map(Math.sin);
    const DY = rand(rng, X.length);
    const want = refRope(X, C, S, B * T, H, hd);
    const gx = numGrad((x) => refRope(x, C, S, B * T, H, hd), X, DY);
    bothPaths((path) => {
      const r = run((x, c, s) => rope(x, c, s), [tf.tensor4d(f32(X), [B, T, H, hd]), tf.tensor4d(f32(C), [B, T, 1, hd]), tf.tensor4d(f32(S), [B, T, 1, hd])], DY, [0]);
      close(r.y, want, 2e-6, `${path} rope`);
      close(r.grads[0], gx, 1e-5, `${path} ∂x`);
    });
  });

  it('360Zhinao qkv split: each kv head\'s G queries, key and value in place, and the gradient puts them back (also when k and v get none)', () => {
    const rng = new Rng(15);
    const [N, KV, G, hd] = [37, 3, 2, 4];
    const X = rand(rng, N * KV * (G + 2) * hd);
    const at = (n: number, kv: number, slot: number, d: number) => ((n * KV + kv) * (G + 2) + slot) * hd + d;
    const wantQ: number[] = [], wantK: number[] = [], wantV: number[] = [];
    for (let n = 0; n < N; n++)
      for (let kv = 0; kv < KV; kv++) {
        for (let g = 0; g < G; g++) for (let d = 0; d < hd; d++) wantQ.push(X[at(n, kv, g, d)]);
        for (let d = 0; d < hd; d++) wantK.push(X[at(n, kv, G, d)]);
        for (let d = 0; d < hd; d++) wantV.push(X[at(n, kv, G + 1, d)]);
      }
    const [DQ, DK, DV] = [rand(rng, wantQ.length), rand(rng, wantK.length), rand(rng, wantV.length)];
    // The gradient is the same placement run backwards.
    const grad = (withKv: boolean) => {
      const g = new Float64Array(X.length);
      let iq = 0, ik = 0, iv = 0;
      for (let n = 0; n < N; n++)
        for (let kv = 0; kv < KV; kv++) {
          for (let s = 0; s < G; s++) for (let d = 0; d < hd; d++) g[at(n, kv, s, d)] = DQ[iq++];
          for (let d = 0; d < hd; d++) g[at(n, kv, G, d)] = withKv ? DK[ik++] : 0;
          for (let d = 0; d < hd; d++) g[at(n, kv, G + 1, d)] = withKv ? DV[iv++] : 0;
        }
      return g;
    };
    bothPaths((path) => {
      const x = tf.tensor2d(f32(X), [N, KV * (G + 2) * hd]);
      const [q, k, v] = splitQkv(x, KV, G, hd);
      expect(q.shape).toEqual([N, KV * G, hd]);
      expect(k.shape).toEqual([N, KV, hd]);
      close(q.dataSync(), f32(wantQ), 0, `${path} q`);
      close(k.dataSync(), f32(wantK), 0, `${path} k`);
      close(v.dataSync(), f32(wantV), 0, `${path} v`);
      const dot = (t: tf.Tensor, d: Float64Array) => tf.sum(tf.mul(t, tf.tensor(f32(d), t.shape)));
      const all = tf.grad((xi: tf.Tensor) => {
        const [a, b, c] = splitQkv(xi as tf.Tensor2D, KV, G, hd);
        return tf.addN([dot(a, DQ), dot(b, DK), dot(c, DV)]);
      })(x);
      close(all.dataSync(), f32(grad(true)), 0, `${path} ∂qkv`);
      const qOnly = tf.grad((xi: tf.Tensor) => dot(splitQkv(xi as tf.Tensor2D, KV, G, hd)[0], DQ))(x);
      close(qOnly.dataSync(), f32(grad(false)), 0, `${path} ∂qkv from q alone`);
      tf.dispose([x, q, k, v, all, qOnly]);
    });
  });

  /** Value and ∂q, ∂k, ∂v of attention with mask M [B, 1, T, Tk] against float64, on both paths. */
  function checkAttention(rng: Rng, dims: number[], M: Float64Array) {
    const [B, T, Tk, H, KV, hd] = dims;
    const Q = rand(rng, B * T * H * hd);
    const K = rand(rng, B * Tk * KV * hd);
    const V = rand(rng, B * Tk * KV * hd);
    const DY = rand(rng, Q.length);
    const scale = 1 / Math.sqrt(hd);
    const f = (q: Float64Array, k: Float64Array, v: Float64Array) => refAttention(q, k, v, M, scale, dims);
    const want = f(Q, K, V);
    const gq = numGrad((q) => f(q, K, V), Q, DY);
    const gk = numGrad((k) => f(Q, k, V), K, DY);
    const gv = numGrad((v) => f(Q, K, v), V, DY);
    bothPaths((path) => {
      const mask = tf.tensor4d(f32(M), [B, 1, T, Tk]);
      const r = run((q, k, v) => attention(q as tf.Tensor4D, k as tf.Tensor4D, v as tf.Tensor4D, mask, scale), [tf.tensor4d(f32(Q), [B, T, H, hd]), tf.tensor4d(f32(K), [B, Tk, KV, hd]), tf.tensor4d(f32(V), [B, Tk, KV, hd])], DY, [0, 1, 2]);
      mask.dispose();
      close(r.y, want, 2e-6, `${path} attention`);
      close(r.grads[0], gq, 1e-5, `${path} ∂q`);
      close(r.grads[1], gk, 1e-5, `${path} ∂k`);
      close(r.grads[2], gv, 1e-5, `${path} ∂v`);
    });
  }

  it('attention (grouped heads, queries after a cache): value and the gradients for q, k and v; masked keys ignored', () => {
    const dims = [2, 3, 5, 4, 2, 6]; // B, T, Tk (2 cached keys), H, KV, hd
    const [B, T, Tk] = dims;
    // Causal over the 2 cached keys, and row 1's first key is padding.
    const M = new Float64Array(B * T * Tk);
    for (let b = 0; b < B; b++) for (let t = 0; t < T; t++) for (let j = 0; j < Tk; j++) if (j > t + 2 || (b === 1 && j === 0)) M[(b * T + t) * Tk + j] = -1e9;
    checkAttention(new Rng(4), dims, M);
  });

  it('attention over several blocks of query rows (the fused kernel skips keys a whole block cannot see): causal, left padding, packed segments', () => {
    const dims = [2, 40, 42, 2, 1, 3]; // 40 queries: blocks of 32 and 8 rows
    const [B, T, Tk] = dims;
    const keyValid = Array.from({ length: B * Tk }, (_, i) => (i >= Tk && i < Tk + 2 ? 0 : 1)); // row 1: 2 keys of left padding
    const segments = Array.from({ length: B * Tk }, (_, i) => (i < Tk ? (i < 20 ? 0 : 1) : 0)); // row 0: two packed sequences
    const M = Float64Array.from(attentionMask({ batch: B, queryLen: T, keyLen: Tk, keyValid, segments }));
    expect(M.filter((m) => m === 0).length).toBeLessThan(M.length / 2); // mostly dead keys: the skipping is exercised
    checkAttention(new Rng(14), dims, M);
  });

  it('attention: a fully masked query row (padding) averages the values, on both paths', () => {
    const rng = new Rng(5);
    const [B, T, H, hd] = [1, 2, 2, 4];
    const q = tf.tensor4d(f32(rand(rng, B * T * H * hd)), [B, T, H, hd]);
    const V = rand(rng, B * T * 1 * hd);
    const k = tf.tensor4d(f32(rand(rng, V.length)), [B, T, 1, hd]);
    const v = tf.tensor4d(f32(V), [B, T, 1, hd]);
    const mask = tf.tensor4d([-1e9, -1e9, 0, -1e9], [B, 1, T, T]); // query 0 sees nothing
    const mean = Array.from({ length: hd }, (_, d) => (V[d] + V[hd + d]) / 2);
    bothPaths((path) => {
      const o = attention(q, k, v, mask, 0.5).dataSync();
      close(o.subarray(0, hd), mean, 1e-6, `${path} head 0`);
      close(o.subarray(hd, 2 * hd), mean, 1e-6, `${path} head 1`);
    });
    tf.dispose([q, k, v, mask]);
  });

  it('log-softmax at the label: value and gradient; labels outside [0, V) give 0 and no gradient', () => {
    const rng = new Rng(8);
    const [N, V] = [37, 301];
    const X = rand(rng, N * V, 4);
    const Y = Int32Array.from({ length: N }, (_, i) => (i === 3 ? -100 : i === 5 ? V : rng.int(V)));
    const DY = rand(rng, N);
    const want = new Float64Array(N);
    const grad = new Float64Array(N * V);
    for (let i = 0; i < N; i++) {
      const row = X.subarray(i * V, (i + 1) * V);
      const m = Math.max(...row);
      const lse = m + Math.log(row.reduce((s, v) => s + Math.exp(v - m), 0));
      if (!(Y[i] >= 0 && Y[i] < V)) continue;
      want[i] = row[Y[i]] - lse;
      for (let j = 0; j < V; j++) grad[i * V + j] = DY[i] * ((j === Y[i] ? 1 : 0) - Math.exp(row[j] - lse));
    }
    bothPaths((path) => {
      const y = tf.tensor1d(Y, 'int32');
      const r = run((x) => labelLogProbs(x as tf.Tensor2D, y), [tf.tensor2d(f32(X), [N, V])], DY, [0]);
      y.dispose();
      close(r.y, want, 2e-5, `${path} log p`);
      close(r.grads[0], grad, 1e-5, `${path} ∂logits`);
    });
  });

  it('embedding: rows by id, and the gradient sums the rows of repeated ids; an id outside the table is refused', () => {
    const rng = new Rng(6);
    const [V, D] = [11, 7];
    const T = rand(rng, V * D);
    const ids = [3, 0, 3, 10, 5, 3];
    const DY = rand(rng, ids.length * D);
    const T32 = f32(T); // rows are copied exactly
    const want = Float64Array.from({ length: ids.length * D }, (_, i) => T32[ids[Math.floor(i / D)] * D + (i % D)]);
    const grad = new Float64Array(V * D);
    ids.forEach((id, r) => {
      for (let c = 0; c < D; c++) grad[id * D + c] += DY[r * D + c];
    });
    bothPaths((path) => {
      const idt = tf.tensor2d(ids, [2, 3], 'int32');
      const r = run((t) => embed(t as tf.Tensor2D, idt), [tf.tensor2d(f32(T), [V, D])], DY, [0]);
      idt.dispose();
      close(r.y, want, 0, `${path} rows`);
      close(r.grads[0], grad, 1e-6, `${path} ∂table`);
    });
    if (native.active) {
      const bad = tf.tensor1d([1, V], 'int32');
      const t = tf.zeros([V, D]) as tf.Tensor2D;
      expect(() => embed(t, bad)).toThrow(/token id 11 at position 1 is outside the vocabulary \[0, 11\)/);
      tf.dispose([bad, t]);
    }
  });

  it('linear layer with a bias: value, and gradients for input, weight and bias (the bias: column sums over every row)', () => {
    const rng = new Rng(7);
    const [B, T, I, O] = [3, 50, 9, 40]; // 150 rows × 40 columns: large enough for every thread
    const X = rand(rng, B * T * I);
    const W = rand(rng, I * O);
    const Bs = rand(rng, O);
    const DY = rand(rng, B * T * O);
    const f = (x: Float64Array, w: Float64Array, b: Float64Array) => {
      const y = new Float64Array(B * T * O);
      for (let r = 0; r < B * T; r++) for (let o = 0; o < O; o++) {
        let s = b[o];
        for (let i = 0; i < I; i++) s += x[r * I + i] * w[i * O + o];
        y[r * O + o] = s;
      }
      return y;
    };
    const want = f(X, W, Bs);
    const gb = new Float64Array(O);
    for (let r = 0; r < B * T; r++) for (let o = 0; o < O; o++) gb[o] += DY[r * O + o];
    const gx = numGrad((x) => f(x, W, Bs), X, DY);
    bothPaths((path) => {
      const r = run((x, w, b) => linear(x, w, b), [tf.tensor3d(f32(X), [B, T, I]), tf.tensor2d(f32(W), [I, O]), tf.tensor1d(f32(Bs))], DY, [0, 2]);
      close(r.y, want, 2e-5, `${path} x·W + b`);
      close(r.grads[0], gx, 1e-4, `${path} ∂x`);
      close(r.grads[1], gb, 2e-5 * Math.sqrt(B * T), `${path} ∂b`);
    });
  });

  it('LoRA layer x·W + b + s·(xd·A)·B (W frozen): value and the gradients for x, A, B and a trained bias, with xd = x and with a dropped-out xd; a frozen bias is added in the same call', () => {
    const rng = new Rng(13);
    const [M, K, N, r, s] = [20, 40, 45, 16, 0.5]; // more than one tile of C each way
    const X = rand(rng, M * K);
    const XD = X.map((v, i) => (i % 3 === 0 ? 0 : v / 0.75));
    const W = rand(rng, K * N, 0.3);
    const A = rand(rng, K * r, 0.3);
    const Bm = rand(rng, r * N, 0.3);
    const bias = rand(rng, N);
    const DY = rand(rng, M * N);
    const prod = (a: Float64Array, b: Float64Array, m: number, k: number, n: number) => {
      const c = new Float64Array(m * n);
      for (let i = 0; i < m; i++) for (let j = 0; j < n; j++) for (let l = 0; l < k; l++) c[i * n + j] += a[i * k + l] * b[l * n + j];
      return c;
    };
    const f = (x: Float64Array, xd: Float64Array, a: Float64Array, b: Float64Array, bs: Float64Array) => {
      const base = prod(x, W, M, K, N);
      const upd = prod(prod(xd, a, M, K, r), b, M, r, N);
      return base.map((v, i) => v + bs[i % N] + s * upd[i]);
    };
    for (const dropout of [false, true])
      for (const frozenBias of [false, true]) {
        const xd = dropout ? XD : X;
        const want = f(X, xd, A, Bm, bias);
        const gx = numGrad((x) => f(x, dropout ? XD : x, A, Bm, bias), X, DY);
        const gxd = dropout ? numGrad((v) => f(X, v, A, Bm, bias), XD, DY) : null;
        const ga = numGrad((a) => f(X, xd, a, Bm, bias), A, DY);
        const gb = numGrad((b) => f(X, xd, A, b, bias), Bm, DY);
        const gbias = numGrad((v) => f(X, xd, A, Bm, v), bias, DY);
        const w = tf.variable(tf.tensor2d(f32(W), [K, N]), false);
        // A frozen bias (the base model's, under LoRA) is not differentiated.
        const fixedBias = frozenBias ? tf.variable(tf.tensor1d(f32(bias)), false) : null;
        bothPaths((path) => {
          const what = `${path}${dropout ? ', dropout' : ''}${frozenBias ? ', frozen bias' : ''}`;
          const inputs = [tf.tensor2d(f32(X), [M, K]), tf.tensor2d(f32(A), [K, r]), tf.tensor2d(f32(Bm), [r, N]), tf.tensor1d(f32(bias)), tf.tensor2d(f32(XD), [M, K])];
          const op = (x: tf.Tensor, a: tf.Tensor, b: tf.Tensor, bs: tf.Tensor, xdt: tf.Tensor) => loraLinear(x as tf.Tensor2D, w, fixedBias ?? bs, a as tf.Tensor2D, b as tf.Tensor2D, s, dropout ? (xdt as tf.Tensor2D) : null);
          const res = run(op, inputs, DY, [0, 1, 2, ...(frozenBias ? [] : [3]), ...(dropout ? [4] : [])]);
          tf.dispose(inputs);
          close(res.y, want, 1e-5, `${what} value`);
          close(res.grads[0], gx, 1e-4, `${what} ∂x`);
          close(res.grads[1], ga, 1e-4, `${what} ∂A`);
          close(res.grads[2], gb, 1e-4, `${what} ∂B`);
          if (!frozenBias) close(res.grads[3], gbias, 1e-4, `${what} ∂bias`);
          if (gxd) close(res.grads.at(-1)!, gxd, 1e-4, `${what} ∂xd`);
        });
        w.dispose();
        fixedBias?.dispose();
      }
  });

  it('sum of squares (the gradient norm) over more elements than one chunk', () => {
    const rng = new Rng(12);
    const X = rand(rng, 100_003);
    const want = f32(X).reduce((a, v) => a + v * v, 0);
    bothPaths((path) => {
      const x = tf.tensor1d(f32(X));
      const got = sumSquares(x).dataSync()[0];
      x.dispose();
      // The kernel sums in double; tfjs in float32 (~√n·2⁻²⁴ relative).
      expect(Math.abs(got - want) / want, path).toBeLessThan(path === 'fused' ? 1e-7 : 1e-4);
    });
  });

  // Base weights trained (SFT; also 360Zhinao's fused qkv), or frozen under LoRA adapters (with and without dropout).
  for (const mode of ['full', 'zhinao', 'lora', 'lora+dropout'] as const)
    it(`a whole decoder step (${mode}): loss and every gradient agree between the fused and the tfjs path; no tensor leaks`, () => {
      if (!native.active) return;
      const V = 97;
      const cfg = parseConfig(presetConfig(mode === 'zhinao' ? 'zhinao' : 'qwen2', { hidden_size: 32, intermediate_size: 48, num_hidden_layers: 2, num_attention_heads: 4, num_key_value_heads: 2, max_position_embeddings: 64, rope_theta: 10000, tie_word_embeddings: true }, V, {}));
      const model = Decoder.init(cfg, 5, 0.3);
      const rng = new Rng(9);
      // Rows of different lengths: padding masks and fully masked query rows are exercised too.
      const batch = makeBatch([10, 7, 4].map((n) => ({ ids: Array.from({ length: n }, () => rng.int(V)), weights: Array(n).fill(1) })));
      let adapter: LoraAdapter | null = null;
      if (mode.startsWith('lora')) {
        adapter = LoraAdapter.create(model, { r: 4, alpha: 8, dropout: mode === 'lora' ? 0 : 0.25, targets: ['q_proj', 'k_proj', 'v_proj', 'o_proj', 'gate_proj', 'up_proj', 'down_proj'], useRslora: false }, 3);
        // B starts at zero (as PEFT's); give it values so that every gradient is non-trivial.
        for (const [name, v] of adapter.params()) if (name.includes('lora_B')) v.assign(tf.randomNormal(v.shape, 0, 0.3, 'float32', 4));
        attach(model, adapter);
        model.setTrainable(false);
      }
      const vars = adapter ? [...adapter.params().values()] : [...model.params.values()];
      const step = () => {
        adapter?.setTraining(mode === 'lora+dropout', new Rng(11)); // the same dropout masks on both paths
        const { value, grads } = tf.variableGrads(() => sftLoss(model, batch), vars);
        const out = { loss: value.dataSync()[0], grads: vars.map((v) => grads[v.name].dataSync()) };
        value.dispose();
        Object.values(grads).forEach((g) => g.dispose());
        return out;
      };
      setFused(true);
      step();
      const before = tf.memory().numTensors;
      const a = step();
      expect(tf.memory().numTensors).toBe(before);
      setFused(false);
      const b = step();
      setFused(true);
      expect(Math.abs(a.loss - b.loss)).toBeLessThan(1e-5 * Math.abs(b.loss));
      a.grads.forEach((g, i) => close(g, b.grads[i], 2e-5, `gradient ${vars[i].name}`));
      expect(a.grads.every((g) => g.some((x) => x !== 0))).toBe(true);
      adapter?.dispose();
      model.dispose();
    });
});

describe('dropout', () => {
  it.skipIf(!native.active)("the native kernel gives tf.dropout's mask bit for bit (values and gradients), for numeric seeds as the LoRA stream draws them", async () => {
    const { dropout } = await import('../src/engine/dropout.js');
    const rng = new Rng(21);
    const x = tf.tensor2d(f32(rand(rng, 37 * 29)), [37, 29]);
    for (const [rate, seed] of [[0.05, 0], [0.05, 4294967295], [0.3, 123456789], [0.5, 77]] as const) {
      const want = tf.tidy(() => {
        const [v, g] = [tf.dropout(x, rate, undefined, seed), tf.grad((t: tf.Tensor) => tf.sum(tf.mul(tf.dropout(t, rate, undefined, seed), tf.sin(t))))(x)];
        return [v.dataSync(), g.dataSync()];
      });
      const got = tf.tidy(() => {
        const [v, g] = [dropout(x, rate, seed), tf.grad((t: tf.Tensor) => tf.sum(tf.mul(dropout(t, rate, seed), tf.sin(t))))(x)];
        return [v.dataSync(), g.dataSync()];
      });
      expect(fusedActive()).toBe(true);
      expect(Array.from(got[0]), `values, rate ${rate} seed ${seed}`).toEqual(Array.from(want[0]));
      expect(Array.from(got[1]), `gradients, rate ${rate} seed ${seed}`).toEqual(Array.from(want[1]));
      const dropped = Array.from(got[0]).filter((v) => v === 0).length / got[0].length;
      expect(Math.abs(dropped - rate)).toBeLessThan(0.08);
    }
    x.dispose();
  });

  it.skipIf(!native.active)('a mask of 300,001 draws, drawn on every thread, each thread jumping ahead in the generator to its part (alea as a congruential generator), is tf.dropout\'s', async () => {
    const { dropout } = await import('../src/engine/dropout.js');
    const n = 300_001;
    const x = tf.fill([n], 1.5);
    for (const [rate, seed] of [[0.05, 3], [0.5, 4294967295]] as const) {
      const want = tf.tidy(() => tf.dropout(x, rate, undefined, seed).dataSync());
      const got = tf.tidy(() => dropout(x, rate, seed).dataSync());
      let diff = -1;
      for (let i = 0; i < n && diff < 0; i++) if (got[i] !== want[i]) diff = i;
      expect(diff, `first differing element, rate ${rate}`).toBe(-1);
    }
    x.dispose();
  });

  it.skipIf(!native.active)('a mask applied again from its recorded bits (a recompute, the backward pass) is the mask drawn, on another tensor of the same size too, across the 32-bit word and thread chunk boundaries', async () => {
    const { dropout } = await import('../src/engine/dropout.js');
    const rng = new Rng(22);
    const n = 3 * 4096 + 45;
    const x = tf.tensor1d(f32(rand(rng, n)));
    const z = tf.tensor1d(f32(rand(rng, n)));
    const want = tf.tidy(() => [tf.dropout(x, 0.1, undefined, 9).dataSync(), tf.dropout(z, 0.1, undefined, 9).dataSync(), tf.grad((t: tf.Tensor) => tf.sum(tf.dropout(t, 0.1, undefined, 9)))(x).dataSync()]);
    // Forward twice with no backward in between: the second comes from the recorded bits, and so
    // does the same seed's mask on z; then a gradient retires the entry and draws afresh.
    const first = tf.tidy(() => dropout(x, 0.1, 9).dataSync());
    const again = tf.tidy(() => dropout(x, 0.1, 9).dataSync());
    const onZ = tf.tidy(() => dropout(z, 0.1, 9).dataSync());
    const grad = tf.tidy(() => tf.grad((t: tf.Tensor) => tf.sum(dropout(t, 0.1, 9)))(x).dataSync());
    for (const got of [first, again]) expect(Array.from(got)).toEqual(Array.from(want[0]));
    expect(Array.from(onZ)).toEqual(Array.from(want[1]));
    expect(Array.from(grad)).toEqual(Array.from(want[2]));
    tf.dispose([x, z]);
  });
});
