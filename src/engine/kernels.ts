import * as tf from '@tensorflow/tfjs-core';

/**
 * Plumbing shared by prefopt's own tfjs kernels on the wasm and cpu backends: tensor memory as
 * typed arrays read and written in place, and replacing one of tfjs's kernels while keeping the
 * original for the cases the replacement does not cover.
 */

/**
 * Allocate float32 outputs of `shapes` on backend `be` ('wasm', 'cpu' or 'native'), then call
 * fill(input views, output views) on the tensors' own memory. An absent (optional) input's
 * view is null.
 */
export function runInPlace(backend: string, be: any, inputs: tf.TensorInfo[], shapes: number[][], fill: (ins: any[], outs: Float32Array[]) => void): tf.TensorInfo[] {
  if (backend === 'wasm') {
    const outs = shapes.map((s) => be.makeOutput(s, 'float32') as tf.TensorInfo);
    // Views are taken after every output is allocated: allocation may grow (and move) the heap.
    fill(inputs.map((t) => (t ? tensorView(backend, be, t) : null)), outs.map((t) => tensorView(backend, be, t)));
    return outs;
  }
  // The native backend's outputs live in the addon's memory (engine/native-backend).
  const arrs = shapes.map((s) => (be.allocFloat32 ? be.allocFloat32(tf.util.sizeFromShape(s)) : new Float32Array(tf.util.sizeFromShape(s))) as Float32Array);
  fill(inputs.map((t) => (t ? tensorView(backend, be, t) : null)), arrs);
  return arrs.map((a, i) => be.makeTensorInfo(shapes[i], 'float32', a));
}

/** A tensor's own memory as a typed array on backend `be` ('wasm': a heap view, valid until the heap grows; 'cpu', 'native': its array). */
export function tensorView(backend: string, be: any, t: tf.TensorInfo): any {
  return backend === 'wasm' ? be.typedArrayFromHeap(t) : be.data.get(t.dataId).values;
}

/**
 * The kernel a backend may register to make model/mask's attention mask where its tensors live
 * (the cuda backend's, engine/cuda-glue): inputs valid and segments [B, Tk] int32, attrs queryLen
 * and window (-1: none), output [B, 1, T, Tk] float32.
 */
export const MASK_KERNEL = 'PrefoptAttentionMask';

/** Replace tfjs's kernel `name` on `backend` with `f`, which may pass any call on to the original. */
export function overrideKernel(name: string, backend: string, f: (args: any, original: tf.KernelFunc) => tf.TensorInfo | tf.TensorInfo[]): boolean {
  const original = tf.getKernel(name, backend);
  if (!original) return false;
  tf.unregisterKernel(name, backend);
  tf.registerKernel({ kernelName: name, backendName: backend, kernelFunc: (args) => f(args, original.kernelFunc), setupFunc: original.setupFunc, disposeFunc: original.disposeFunc });
  return true;
}

/**
 * The kernel a backend may register to take infer/sampling's first pass where its tensors live
 * (the cuda backend's, engine/cuda-glue): input logits [B, V] float32, attr temperature; output
 * [B, 2V] float32 holding the bytes of B·V doubles, exp(x/t − max x/t) with Math.exp's bits.
 */
export const SAMPLE_EXPS_KERNEL = 'PrefoptSampleExps';

/**
 * The kernel a backend may register to draw the next token where its tensors live (infer/sampling's
 * whole sampler, top-k and top-p included, bit for bit): input logits [B, V] float32, attrs
 * temperature, draws (each row's uniform from its own stream), topK (0: off) and topP (1: off);
 * outputs ids [B] int32 and probs [B, 2V] float32 holding the bytes of B·V doubles. A row whose
 * filters keep more than SAMPLE_KEPT_MAX tokens gets id −1 and its probabilities e/Σe in probs,
 * for the host to draw from; no other row of probs is to be read.
 */
export const SAMPLE_DRAW_KERNEL = 'PrefoptSampleDraw';

/** The most tokens SAMPLE_DRAW_KERNEL's filters keep on the device (native/cuda/kernels.cu: KEPT_MAX). */
export const SAMPLE_KEPT_MAX = 2048;
