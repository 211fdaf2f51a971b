import * as tf from '@tensorflow/tfjs-core';
import { bmmT, needsPlainMatmul, split0 } from './wasm.js';
import { fused, fusedActive } from './fused.js';
import { Weight, isHalf } from './half.js';

/**
 * The few tensor primitives whose gradients need care. tfjs-wasm runs only 2-D, non-transposed,
 * unbatched matMul on its fast kernel (transposed/batched forms fall to a scalar loop ~40x
 * slower) and lacks UnsortedSegmentSum (the gather gradient). Every matmul in the model goes
 * through `mm`/`bmm`. With the native kernel (engine/native.ts) or another backend, transposes
 * are flags of one BatchMatMul; on bare wasm they are materialised as copies, which cost
 * O(size) against O(size·k) for the product, and batches are split into 2-D products.
 */

/** op(a)·op(b) for 2-D a, b. */
function mmT(a: tf.Tensor2D, b: tf.Tensor2D, ta: boolean, tb: boolean): tf.Tensor2D {
  if (!needsPlainMatmul()) return tf.matMul(a, b, ta, tb);
  return tf.matMul(ta ? tf.transpose(a) : a, tb ? tf.transpose(b) : b);
}

function mmWith(needA: boolean, needB: boolean) {
  return tf.customGrad(((a: tf.Tensor2D, b: tf.Tensor2D, save: tf.GradSaveFunc) => {
    save([a, b]);
    return {
      value: tf.matMul(a, b),
      gradFunc: (dy: tf.Tensor2D, saved: tf.Tensor[]) => {
        const [sa, sb] = saved as tf.Tensor2D[];
        // A frozen weight (LoRA's base) needs no gradient: skip its product entirely.
        return [needA ? mmT(dy, sb, false, true) : tf.zerosLike(sa), needB ? mmT(sa, dy, true, false) : tf.zerosLike(sb)];
      },
    };
  }) as any) as (a: tf.Tensor2D, b: tf.Tensor2D) => tf.Tensor2D;
}
const MM = { both: mmWith(true, true), frozenB: mmWith(true, false) };

const isFrozen = (t: tf.Tensor) => t instanceof tf.Variable && !t.trainable;

/** a [M,K] · b [K,N]; b may be a 16-bit frozen weight (engine/half), [K,N] as the model sees it. */
export function mm(a: tf.Tensor2D, b: Weight): tf.Tensor2D {
  if (isHalf(b)) return fused.halfMatmul(a, b, b.transposed);
  return (isFrozen(b) ? MM.frozenB : MM.both)(a, b as tf.Tensor2D);
}

/**
 * LoRA's layer (docs/REFERENCE.md §7) on rows x [M, in]: x·W (+ bias) + u·B with u = scale·(xd·A), where
 * xd is the dropped-out x while training (null: x itself). With the fused kernels and a frozen W,
 * the base product and the update are one pass over the output, and so is the input gradient
 * dx = dy·Wᵀ + scale·(dy·Bᵀ)·Aᵀ; otherwise the plain composition (whose gradients include W's).
 */
export function loraLinear(x: tf.Tensor2D, w: Weight, bias: tf.Tensor | null, a: tf.Tensor2D, b: tf.Tensor2D, scale: number, xd: tf.Tensor2D | null): tf.Tensor2D {
  let y: tf.Tensor2D;
  if (isHalf(w) || (fusedActive() && isFrozen(w))) {
    // A frozen bias is added in the same native call; a trained one keeps its own kernel (and gradient).
    if (!bias || isFrozen(bias)) return fused.lora(x, w, a, b, scale, xd, bias);
    y = fused.lora(x, w, a, b, scale, xd, null);
  } else {
    const u = tf.mul(mm(xd ?? x, a), scale) as tf.Tensor2D;
    y = tf.add(mm(x, w), mm(u, b));
  }
  if (!bias) return y;
  return (fusedActive() ? fused.biasAdd(y, bias) : tf.add(y, bias)) as tf.Tensor2D;
}

/** a [M,K] · bᵀ for b [N,K]: a transpose flag of the native matmul, or a copy on bare wasm. */
export function mmTransB(a: tf.Tensor2D, b: Weight): tf.Tensor2D {
  if (isHalf(b)) return fused.halfMatmul(a, b, !b.transposed);
  if (needsPlainMatmul()) return mm(a, tf.transpose(b) as tf.Tensor2D);
  return tf.matMul(a, b, false, true);
}

/** Batched a [B,M,K] · b [B,K,N]. */
export const bmm: (a: tf.Tensor3D, b: tf.Tensor3D) => tf.Tensor3D = tf.customGrad(
  ((a: tf.Tensor3D, b: tf.Tensor3D, save: tf.GradSaveFunc) => {
    save([a, b]);
    return {
      value: bmmT(a, b, false, false),
      gradFunc: (dy: tf.Tensor3D, saved: tf.Tensor[]) => {
        const [sa, sb] = saved as tf.Tensor3D[];
        return [bmmT(dy, sb, false, true), bmmT(sa, dy, true, false)];
      },
    };
  }) as any,
) as any;

/**
 * f over the rows of x [..., in]: x as [rows, in], and f's [rows, out] back as [..., out]. A 2-D x
 * (the decoder's [tokens, D] stream) passes as it is: each reshape is a kernel call, and another
 * in the backward pass.
 */
export function onRows(x: tf.Tensor, f: (x2: tf.Tensor2D) => tf.Tensor2D): tf.Tensor {
  const xs = x.shape as number[];
  if (xs.length === 2) return f(x as tf.Tensor2D);
  const y = f(tf.reshape(x, [-1, xs[xs.length - 1]]) as tf.Tensor2D);
  return tf.reshape(y, [...xs.slice(0, -1), y.shape[1]]);
}

/** x [..., in] · w [in, out] (+ b [out]). Weights are kept [in, out] in memory (16-bit ones as the file has them). */
export function linear(x: tf.Tensor, w: Weight, b?: tf.Tensor | null): tf.Tensor {
  return onRows(x, (x2) => {
    const y = mm(x2, w);
    if (!b) return y;
    return (fusedActive() ? fused.biasAdd(y, b) : tf.add(y, b)) as tf.Tensor2D;
  });
}

/**
 * Embedding lookup. Fused: a row copy and a scatter-add. Otherwise the gradient is
 * one-hot(ids)ᵀ · dY, a plain matmul, since wasm has no UnsortedSegmentSum for gather's own.
 */
export function embed(table: Weight, ids: tf.Tensor): tf.Tensor {
  const flat = tf.reshape(ids, [-1]) as tf.Tensor1D;
  const dim = table.shape[1] as number;
  if (isHalf(table) || fusedActive()) return ids.rank === 1 ? fused.embed(table, flat) : tf.reshape(fused.embed(table, flat), [...ids.shape, dim]);
  const vocab = table.shape[0];
  const f = tf.customGrad(((t: tf.Tensor2D, save: tf.GradSaveFunc) => {
    save([flat]); // the ids are not an input: keep them alive for the backward pass
    return {
      value: tf.gather(t, flat),
      gradFunc: (dy: tf.Tensor2D, saved: tf.Tensor[]) => [mmT(tf.oneHot(saved[0] as tf.Tensor1D, vocab) as tf.Tensor2D, dy, true, false)],
    };
  }) as any) as any;
  const out = f(table) as tf.Tensor2D;
  return tf.reshape(out, [...ids.shape, dim]);
}

/**
 * log p(label) for each row of logits [N, V]. One-hot masking instead of gather: gather with
 * batchDims > 0 returns wrong values on wasm (tfjs#8658) and gatherND has no gradient.
 * Labels outside [0, V) (e.g. -100) give 0; callers mask them anyway.
 */
export function labelLogProbs(logits: tf.Tensor2D, labels: tf.Tensor1D): tf.Tensor1D {
  if (fusedActive()) return fused.labelLogProbs(logits, labels);
  const lsm = tf.logSoftmax(logits);
  const oh = tf.oneHot(labels, logits.shape[1]);
  return tf.sum(tf.mul(lsm, oh), 1) as tf.Tensor1D;
}

/**
 * The derivative of labelLogProbs by the logits, onehot(label) − softmax(row), from the logits
 * and lp = labelLogProbs(logits, labels).
 */
export function labelLogProbsSlope(logits: tf.Tensor2D, labels: tf.Tensor1D, lp: tf.Tensor1D): tf.Tensor2D {
  if (fusedActive()) return fused.labelLogProbsGrad(logits, labels, lp, tf.onesLike(lp));
  return tf.sub(tf.oneHot(labels, logits.shape[1]), tf.softmax(logits)) as tf.Tensor2D;
}

/**
 * 360Zhinao's fused projection [N, KV·(G+2)·hd] — per kv head its G query heads, then its key and
 * value — split into q [N, KV·G, hd] (query head kv·G + g) and k, v [N, KV, hd]. Fused: one copy
 * each way. Otherwise the group axis goes to the front, where the split is cheap on wasm (inner-
 * axis slices are slow there).
 */
export function splitQkv(qkv: tf.Tensor2D, kv: number, g: number, hd: number): [tf.Tensor, tf.Tensor, tf.Tensor] {
  const N = qkv.shape[0];
  const grouped = tf.reshape(qkv, [N, kv, g + 2, hd]);
  if (fusedActive()) return fused.splitQkv(grouped, g) as [tf.Tensor, tf.Tensor, tf.Tensor];
  const [qs, ks, vs] = split0(tf.transpose(grouped, [2, 0, 1, 3]), [g, 1, 1]); // [G+2, N, KV, hd]
  return [tf.reshape(tf.transpose(qs, [1, 2, 0, 3]), [N, kv * g, hd]), tf.reshape(ks, [N, kv, hd]), tf.reshape(vs, [N, kv, hd])];
}

/** Σ x² as a scalar (for the global gradient norm). */
export function sumSquares(x: tf.Tensor): tf.Scalar {
  if (fusedActive()) return fused.sumSquares(x);
  return tf.sum(tf.square(x));
}

/*
 * The decoder's elementwise pieces. Each has a fused native kernel (engine/fused) where the
 * addon serves the backend, and the plain tfjs composition below everywhere else; tests hold
 * the two to the same float64 reference.
 */

export function rmsNorm(x: tf.Tensor, w: tf.Tensor, eps: number): tf.Tensor {
  if (fusedActive()) return fused.rmsNorm(x, w, eps);
  const ms = tf.mean(tf.square(x), -1, true);
  return tf.mul(tf.mul(x, tf.rsqrt(tf.add(ms, eps))), w);
}

/**
 * A residual connection and the RMSNorm after it: [s = x + r, rmsnorm(s)·w], in one pass each
 * way where the fused kernels run (the add's own kernel, and the add of s's two gradients, go).
 */
export function addRmsNorm(x: tf.Tensor, r: tf.Tensor, w: tf.Tensor, eps: number): [tf.Tensor, tf.Tensor] {
  if (fusedActive()) return fused.addRmsNorm(x, r, w, eps) as [tf.Tensor, tf.Tensor];
  const s = tf.add(x, r);
  return [s, rmsNorm(s, w, eps)];
}

/** silu(g) · u, the gated MLP's activation. */
export function swiglu(g: tf.Tensor, u: tf.Tensor): tf.Tensor {
  if (fusedActive()) return fused.swiglu(g, u);
  return tf.mul(tf.mul(g, tf.sigmoid(g)), u);
}

/**
 * Rotary embedding of x [B, T, H, hd] with cos, sin [B, T, 1, hd]: x·cos + rotate_half(x)·sin.
 * rotate_half([x1, x2]) = [−x2, x1] is done as x·R for a fixed signed permutation R: a plain
 * matmul instead of inner-axis slices, which wasm runs very slowly.
 */
export function rope(x: tf.Tensor, cos: tf.Tensor, sin: tf.Tensor): tf.Tensor {
  if (fusedActive()) return fused.rope(x, cos, sin);
  const shape = x.shape as number[];
  const hd = shape[shape.length - 1];
  const rotated = tf.reshape(mm(tf.reshape(x, [-1, hd]) as tf.Tensor2D, tf.tensor2d(rotateHalf(hd), [hd, hd])), shape);
  return tf.add(tf.mul(x, cos), tf.mul(rotated, sin));
}

const rotCache = new Map<number, Float32Array>();
function rotateHalf(hd: number): Float32Array {
  let r = rotCache.get(hd);
  if (!r) {
    const half = hd / 2;
    r = new Float32Array(hd * hd);
    for (let j = 0; j < half; j++) {
      r[(j + half) * hd + j] = -1; // out[j] = −x[j + half]
      r[j * hd + j + half] = 1; // out[j + half] = x[j]
    }
    rotCache.set(hd, r);
  }
  return r;
}

/**
 * softmax(scale · q kᵀ + mask) v for q [B, T, H, hd] and k, v [B, Tk, KV, hd]; query head h
 * reads kv head h / (H / KV) (grouped-query attention); mask [B, 1, T, Tk] is additive.
 * Returns [B, T, H, hd]. The tfjs form groups the G query heads of a kv head into one matrix,
 * so keys are never repeated.
 */
export function attention(q: tf.Tensor4D, k: tf.Tensor4D, v: tf.Tensor4D, mask: tf.Tensor4D, scale: number): tf.Tensor4D {
  if (fusedActive()) return fused.attention(q, k, v, mask, scale) as tf.Tensor4D;
  const [B, T, H, hd] = q.shape;
  const [, Tk, KV] = k.shape;
  const G = H / KV;
  const qg = tf.reshape(tf.transpose(tf.reshape(q, [B, T, KV, G, hd]), [0, 2, 3, 1, 4]), [B * KV, G * T, hd]) as tf.Tensor3D;
  const kT = tf.reshape(tf.transpose(k, [0, 2, 3, 1]), [B * KV, hd, Tk]) as tf.Tensor3D;
  const vt = tf.reshape(tf.transpose(v, [0, 2, 1, 3]), [B * KV, Tk, hd]) as tf.Tensor3D;
  const scores = tf.reshape(bmm(qg, kT), [B, H, T, Tk]);
  const probs = tf.reshape(tf.softmax(tf.add(tf.mul(scores, scale), mask)), [B * KV, G * T, Tk]) as tf.Tensor3D;
  const ctx = bmm(probs, vt); // [B*KV, G*T, hd]
  return tf.transpose(tf.reshape(ctx, [B, H, T, hd]), [0, 2, 1, 3]) as tf.Tensor4D;
}
