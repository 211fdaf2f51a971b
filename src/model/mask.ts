import * as tf from '@tensorflow/tfjs-core';
import { MASK_KERNEL } from '../engine/kernels.js';

/**
 * Additive attention masks [B, 1, T, Tk] built on the host. Query t of row b (at absolute key
 * index t + Tk − T) may see key j when j ≤ that index, key j is valid (not padding), and — for
 * packed rows — both belong to the same segment, and — with a sliding window — j is less than
 * `window` keys back. Blocked entries get a large negative number
 * rather than −∞ so that a fully padded query row stays finite.
 */
export const MASKED = -1e9;


export interface MaskSpec {
  batch: number;
  queryLen: number;
  keyLen: number;
  /** [B*Tk], 1 for real tokens; default all valid. */
  keyValid?: ArrayLike<number>;
  /** [B*Tk] segment ids for packed rows; queries use the last T entries. */
  segments?: ArrayLike<number>;
  /** Sliding window (Mistral): key j is seen only when qi − j < window. */
  window?: number;
}

export function attentionMask(s: MaskSpec): Float32Array {
  const { batch: B, queryLen: T, keyLen: Tk, keyValid, segments, window } = s;
  const out = new Float32Array(B * T * Tk);
  const off = Tk - T;
  for (let b = 0; b < B; b++) {
    for (let t = 0; t < T; t++) {
      const qi = off + t;
      const row = (b * T + t) * Tk;
      // Causality and the window bound a row to the keys lo..qi; only those need a look.
      const lo = window === undefined ? 0 : Math.max(0, qi - window + 1);
      out.fill(MASKED, row, row + lo);
      out.fill(MASKED, row + qi + 1, row + Tk);
      if (!keyValid && !segments) continue;
      const seg = segments ? segments[b * Tk + qi] : 0;
      for (let j = lo; j <= qi; j++) {
        if ((keyValid && keyValid[b * Tk + j] === 0) || (segments && segments[b * Tk + j] !== seg)) out[row + j] = MASKED;
      }
    }
  }
  return out;
}

/**
 * attentionMask as a tensor [B, 1, T, Tk], made by the backend when it has MASK_KERNEL (from the
 * keys' validity and segments, [B, Tk] int32 each: on the cuda backend B·Tk ids go up instead of
 * B·T·Tk floats, and no host loop runs), else on the host.
 */
export function maskTensor(s: MaskSpec): tf.Tensor4D {
  const { batch: B, queryLen: T, keyLen: Tk } = s;
  if (!tf.getKernel(MASK_KERNEL, tf.getBackend())) return tf.tensor4d(attentionMask(s), [B, 1, T, Tk]);
  return tf.tidy(() => {
    const valid = s.keyValid ? tf.tensor2d(Int32Array.from(s.keyValid), [B, Tk], 'int32') : tf.ones([B, Tk], 'int32');
    const segments = s.segments ? tf.tensor2d(Int32Array.from(s.segments), [B, Tk], 'int32') : tf.zeros([B, Tk], 'int32');
    return tf.engine().runKernel(MASK_KERNEL, { valid, segments }, { queryLen: T, window: s.window ?? -1 }) as tf.Tensor4D;
  });
}
