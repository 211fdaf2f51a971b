import * as tf from '@tensorflow/tfjs-core';
import { overrideKernel } from './kernels.js';
import { nativeMatmulActive } from './native.js';

/**
 * tfjs-wasm's gaps and prefopt's workarounds for them, in one place (docs/REFERENCE.md §11).
 * wasm is the default backend for models under 1 GiB of weights; each workaround applies only
 * there, and only where the native addon does not already cover the case:
 *
 * - matmul: wasm's fast kernel takes plain 2-D products only (transposed and batched forms fall
 *   to a scalar loop about 40× slower): transposes are materialised and batches split;
 * - Slice costs about 1 ms per 32 KB even for contiguous pieces: axis-0 splits copy through host
 *   memory instead;
 * - Identity and same-dtype Cast copy their input: they share it instead.
 */

/**
 * wasm's own kernel is fast only for plain 2-D matmuls; with the native kernel registered (or
 * on other backends) any form — transposed, batched — goes straight to BatchMatMul.
 */
export function needsPlainMatmul(): boolean {
  return tf.getBackend() === 'wasm' && !nativeMatmulActive();
}

/** wasm's Slice kernel costs ~1 ms per 32 KB even for contiguous pieces. */
function slowSlice(): boolean {
  return tf.getBackend() === 'wasm';
}

/**
 * tfjs-wasm copies data for Identity and for a Cast to the same dtype. The autodiff tape clones
 * (Identity) every tensor a gradient saves, so each matmul copied its activations and weights
 * once more per training step. Tensors are immutable, so a clone can share the buffer and bump
 * its reference count — what tfjs's cpu backend and wasm's own Reshape already do.
 */
let done = false;

export function registerZeroCopyKernels(): void {
  if (done || tf.getBackend() !== 'wasm') return;
  const share = (be: any, x: tf.TensorInfo) => {
    be.incRef(x.dataId);
    return { dataId: x.dataId, shape: x.shape, dtype: x.dtype };
  };
  for (const name of ['Identity', 'Cast'])
    overrideKernel(name, 'wasm', (args, original) => {
      const x = args.inputs.x as tf.TensorInfo;
      const same = name === 'Identity' ? x.dtype !== 'string' : args.attrs.dtype === x.dtype;
      return same ? share(args.backend, x) : original(args);
    });
  done = true;
}

/**
 * Split along axis 0 into pieces of the given sizes. On wasm the Slice kernel is very slow even
 * for contiguous pieces (~1 ms per 32 KB), while a copy through host memory costs microseconds;
 * the gradient is a plain concat.
 */
export function split0(x: tf.Tensor, sizes: number[]): tf.Tensor[] {
  if (!slowSlice()) return tf.split(x, sizes, 0);
  const shape = x.shape as number[];
  const inner = shape.slice(1).reduce((a, b) => a * b, 1);
  let off = 0;
  return sizes.map((n) => {
    const start = off;
    off += n;
    const f = tf.customGrad(((t: tf.Tensor) => ({
      value: tf.tensor((t.dataSync() as Float32Array).subarray(start * inner, (start + n) * inner), [n, ...shape.slice(1)]),
      gradFunc: (dy: tf.Tensor) => {
        const parts: tf.Tensor[] = [];
        if (start > 0) parts.push(tf.zeros([start, ...shape.slice(1)]));
        parts.push(dy);
        if (start + n < shape[0]) parts.push(tf.zeros([shape[0] - start - n, ...shape.slice(1)]));
        return [parts.length === 1 ? dy : tf.concat(parts, 0)];
      },
    })) as any) as any;
    return f(x) as tf.Tensor;
  });
}

/** op(a)·op(b) per batch entry, for 3-D a, b. */
export function bmmT(a: tf.Tensor3D, b: tf.Tensor3D, ta: boolean, tb: boolean): tf.Tensor3D {
  if (!needsPlainMatmul()) return tf.matMul(a, b, ta, tb);
  if (ta) a = tf.transpose(a, [0, 2, 1]);
  if (tb) b = tf.transpose(b, [0, 2, 1]);
  const [n, m, k] = a.shape;
  const p = b.shape[2];
  if (n === 1) return tf.reshape(tf.matMul(tf.reshape(a, [m, k]) as tf.Tensor2D, tf.reshape(b, [k, p]) as tf.Tensor2D), [1, m, p]) as tf.Tensor3D;
  // Inside bmm's custom gradient: no gradient is needed for these pieces, so read them directly.
  const ad = a.dataSync() as Float32Array;
  const bd = b.dataSync() as Float32Array;
  const outs: tf.Tensor[] = [];
  for (let i = 0; i < n; i++) {
    const x = tf.tensor2d(ad.subarray(i * m * k, (i + 1) * m * k), [m, k]);
    const y = tf.tensor2d(bd.subarray(i * k * p, (i + 1) * k * p), [k, p]);
    outs.push(tf.matMul(x, y));
  }
  return tf.reshape(tf.concat(outs, 0), [n, m, p]) as tf.Tensor3D;
}

