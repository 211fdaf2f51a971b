import * as tf from '@tensorflow/tfjs-core';
import { CUDA_BACKEND, CudaBackend } from './cuda-backend.js';
import { evenSteps, shapesOf } from './native.js';
import { MAX_RANK, dims } from './cuda-device.js';
import { MASK_KERNEL, SAMPLE_DRAW_KERNEL, SAMPLE_EXPS_KERNEL, overrideKernel } from './kernels.js';

/**
 * The tfjs kernels around prefopt's fused ones, on the device: views (Reshape, Identity),
 * elementwise arithmetic with broadcasting, copies (Concat, Slice, SplitV, Transpose, PadV2),
 * sums, gathers, fills and BatchMatMul. Each handles float32 (and, for copies, int32: both are
 * 4-byte words); anything else goes to the host (engine/cuda-backend's onHost).
 */
type Info = tf.TensorInfo;
type Kernel = (be: CudaBackend, inputs: any, attrs: any) => Info | Info[] | null;

const size = (s: number[]) => tf.util.sizeFromShape(s);
const words = (t: Info) => t.dtype === 'float32' || t.dtype === 'int32';
const f32 = (t: Info) => t.dtype === 'float32';
const stridesOf = (shape: number[]) => {
  const s = new Array(shape.length).fill(1);
  for (let i = shape.length - 2; i >= 0; i--) s[i] = s[i + 1] * shape[i + 1];
  return s;
};


/** dst (+ dstOff words, strides dstStrides) ← src (+ srcOff, srcStrides) over `shape`. */
function copy(be: CudaBackend, src: number, srcOff: number, srcStrides: number[], dst: number, dstOff: number, dstStrides: number[], shape: number[]): void {
  const n = size(shape);
  if (n === 0) return;
  if (shape.length === 0) return be.device.copy(dst + 4 * dstOff, src + 4 * srcOff, 4);
  be.device.each('strided_copy', n, [src + 4 * srcOff, dst + 4 * dstOff, n, shape.length, dims(shape, srcStrides, dstStrides)]);
}

const alias = (be: CudaBackend, x: Info, shape: number[]): Info => {
  be.incRef(x.dataId);
  return { dataId: x.dataId, shape, dtype: x.dtype };
};

/** Strides of `shape` read as broadcast into `out` (0 along broadcast axes). */
function broadcastStrides(shape: number[], out: number[]): number[] {
  const s = stridesOf(shape);
  const off = out.length - shape.length;
  return out.map((_, i) => (i < off || shape[i - off] === 1 ? 0 : s[i - off]));
}

/** The launch arguments of an elementwise op over a and b broadcast together (null past MAX_RANK). */
function broadcastArgs(a: Info, b: Info): { shape: number[]; n: number; rest: (number | number[])[] } | null {
  const shape = tf.broadcast_util.assertAndGetBroadcastShape(a.shape, b.shape);
  if (shape.length > MAX_RANK) return null;
  const n = size(shape);
  const sh = shape.length ? shape : [1];
  return { shape, n, rest: [n, Math.max(shape.length, 1), dims(sh, shape.length ? broadcastStrides(a.shape, shape) : [0], shape.length ? broadcastStrides(b.shape, shape) : [0])] };
}

/**
 * A kernel of two float32 operands broadcast together (kernels.cu: `binary`, op 0 add … 5 maximum,
 * a float32 result; `compare`, op 0 < … 5 ≠, a bool one).
 */
const elementwise = (kernel: 'binary' | 'compare', op: number): Kernel => (be, { a, b }) => {
  const args = f32(a) && f32(b) ? broadcastArgs(a, b) : null;
  if (!args) return null;
  const y = be.makeTensorInfo(args.shape, kernel === 'binary' ? 'float32' : 'bool');
  be.device.each(kernel, args.n, [op, be.addr(a), be.addr(b), be.addr(y), ...args.rest]);
  return y;
};
const binary = (op: number) => elementwise('binary', op);
const compare = (op: number) => elementwise('compare', op);

/** kernels.cu's unary (op: 0 −x … 9 step with `alpha`) on a float32 tensor. */
const unary = (op: number): Kernel => (be, { x }, { alpha }) => {
  if (!f32(x)) return null;
  const y = be.makeTensorInfo(x.shape, 'float32');
  be.device.each('unary', size(x.shape), [op, be.addr(x), be.addr(y), size(x.shape), alpha ?? 0]);
  return y;
};

/** kernels.cu's cast codes of the dtypes it converts between. */
const CAST_CODE: Partial<Record<tf.DataType, number>> = { float32: 0, int32: 1, bool: 2 };

function slice(be: CudaBackend, x: Info, begin: number[], sz: number[]): Info {
  const y = be.makeTensorInfo(sz, x.dtype);
  const xs = stridesOf(x.shape);
  copy(be, be.addr(x), begin.reduce((o, b, i) => o + b * xs[i], 0), xs, be.addr(y), 0, stridesOf(sz), sz);
  return y;
}

/** x with its axes in `perm` order, as a new tensor. */
function transpose(be: CudaBackend, x: Info, perm: number[]): Info {
  const shape = perm.map((p) => x.shape[p]);
  const y = be.makeTensorInfo(shape, x.dtype);
  const xs = stridesOf(x.shape);
  copy(be, be.addr(x), 0, perm.map((p) => xs[p]), be.addr(y), 0, stridesOf(shape), shape);
  return y;
}

/** A tensor of x's shape and dtype, every element v. */
const filledLike = (v: number): Kernel => (be, { x }) => {
  if (!words(x)) return null;
  const y = be.makeTensorInfo(x.shape, x.dtype);
  be.device.fill(be.addr(y), size(x.shape), v, x.dtype === 'int32');
  return y;
};

const KERNELS: Record<string, Kernel> = {
  Reshape: (be, { x }, { shape }) => alias(be, x, tf.util.inferFromImplicitShape(shape, size(x.shape))),
  Identity: (be, { x }) => alias(be, x, x.shape),
  Cast: (be, { x }, { dtype }) => {
    if (x.dtype === dtype) return alias(be, x, x.shape);
    const from = CAST_CODE[x.dtype as tf.DataType];
    const to = CAST_CODE[dtype as tf.DataType];
    if (from === undefined || to === undefined) return null;
    const y = be.makeTensorInfo(x.shape, dtype);
    be.device.each('cast', size(x.shape), [be.addr(x), from, to, size(x.shape), be.addr(y)]);
    return y;
  },
  // The ops of the DPO losses and their gradients (dpo/loss: log σ, hinge, IPO; tfjs's gradients
  // of min, |x| and max(0, x) go through step, comparisons and casts) and of the logged metrics:
  // on the host, each would wait for the device's queued work to read its inputs.
  Add: binary(0),
  Sub: binary(1),
  Multiply: binary(2),
  RealDiv: binary(3),
  Minimum: binary(4),
  Maximum: binary(5),
  Less: compare(0),
  LessEqual: compare(1),
  Greater: compare(2),
  GreaterEqual: compare(3),
  Equal: compare(4),
  NotEqual: compare(5),
  Neg: unary(0),
  Exp: unary(1),
  Abs: unary(2),
  Log: unary(3),
  Log1p: unary(4),
  Relu: unary(5),
  Square: unary(6),
  Sqrt: unary(7),
  Sigmoid: unary(8),
  Step: unary(9),
  ZerosLike: filledLike(0),
  // The seed of every backward pass through a loss's scalar ops (tf.grad's dy): on the host it cost
  // a copy each way.
  OnesLike: filledLike(1),
  Fill: (be, _inputs, { shape, value, dtype }) => {
    if (dtype !== 'float32' && dtype !== 'int32') return null;
    const y = be.makeTensorInfo(shape, dtype);
    be.device.fill(be.addr(y), size(shape), value as number, dtype === 'int32');
    return y;
  },
  Concat: (be, inputs: Info[], { axis }) => {
    if (!inputs.every(words) || new Set(inputs.map((t) => t.dtype)).size !== 1) return null;
    const ax = tf.util.parseAxisParam(axis, inputs[0].shape)[0];
    const shape = tf.backend_util.computeOutShape(inputs.map((t) => t.shape), ax);
    const y = be.makeTensorInfo(shape, inputs[0].dtype);
    const ys = stridesOf(shape);
    let at = 0;
    for (const t of inputs) {
      copy(be, be.addr(t), 0, stridesOf(t.shape), be.addr(y), at * ys[ax], ys, t.shape);
      at += t.shape[ax];
    }
    return y;
  },
  // tf.stack: each input given the new axis (a view), then concatenated along it.
  Pack: (be, inputs: Info[], { axis }) => {
    if (!inputs.every(words) || new Set(inputs.map((t) => t.dtype)).size !== 1 || inputs[0].shape.length >= MAX_RANK) return null;
    const ax = axis < 0 ? axis + inputs[0].shape.length + 1 : axis;
    const views = inputs.map((t) => alias(be, t, [...t.shape.slice(0, ax), 1, ...t.shape.slice(ax)]));
    try {
      return KERNELS.Concat(be, views, { axis: ax });
    } finally {
      views.forEach((v) => be.disposeData(v.dataId));
    }
  },
  // Added in order, as tfjs's cpu kernel does.
  AddN: (be, inputs: Info[]) => {
    if (!inputs.every(f32) || inputs[0].shape.length > MAX_RANK) return null;
    if (inputs.length === 1) return alias(be, inputs[0], inputs[0].shape);
    let y = KERNELS.Add(be, { a: inputs[0], b: inputs[1] }, {}) as Info;
    for (const t of inputs.slice(2)) {
      const next = KERNELS.Add(be, { a: y, b: t }, {}) as Info;
      be.disposeData(y.dataId);
      y = next;
    }
    return y;
  },
  Slice: (be, { x }, { begin, size: sz }) => {
    if (!words(x)) return null;
    const [b, s] = tf.slice_util.parseSliceParams(x, begin, sz);
    return slice(be, x, b, s);
  },
  SplitV: (be, { x }, { numOrSizeSplits, axis }) => {
    if (!words(x)) return null;
    const ax = tf.util.parseAxisParam(axis, x.shape)[0];
    const sizes = tf.backend_util.prepareSplitSize(x, numOrSizeSplits, ax);
    let at = 0;
    return sizes.map((n) => {
      const b = x.shape.map((_: number, i: number) => (i === ax ? at : 0));
      const s = x.shape.map((d: number, i: number) => (i === ax ? n : d));
      at += n;
      return slice(be, x, b, s);
    });
  },
  Transpose: (be, { x }, { perm }) => (words(x) ? transpose(be, x, perm) : null),
  PadV2: (be, { x }, { paddings, constantValue }) => {
    if (!f32(x)) return null;
    const shape = x.shape.map((d: number, i: number) => paddings[i][0] + d + paddings[i][1]);
    const y = be.makeTensorInfo(shape, 'float32');
    be.device.fill(be.addr(y), size(shape), constantValue);
    const ys = stridesOf(shape);
    copy(be, be.addr(x), 0, stridesOf(x.shape), be.addr(y), paddings.reduce((o: number, p: number[], i: number) => o + p[0] * ys[i], 0), ys, x.shape);
    return y;
  },
  // Over any axes: those summed are moved last (a copy, unless they are already), then one
  // block sums each row.
  Sum: (be, { x }, { axis, keepDims }) => {
    if (!f32(x)) return null;
    const axes = tf.util.parseAxisParam(axis, x.shape);
    const perm = tf.backend_util.getAxesPermutation(axes, x.shape.length);
    const moved = perm ? transpose(be, x, perm) : x;
    const [outShape, reduceShape] = tf.backend_util.computeOutAndReduceShapes(moved.shape, tf.backend_util.getInnerMostAxes(axes.length, x.shape.length));
    const y = be.makeTensorInfo(keepDims ? tf.backend_util.expandShapeToKeepDim(outShape, axes) : outShape, 'float32');
    be.device.rows('sum_rows', size(outShape), [be.addr(moved), size(reduceShape), be.addr(y)]);
    if (moved !== x) be.disposeData(moved.dataId);
    return y;
  },
  // As tfjs's cpu kernel: each element divided by the count, then summed.
  Mean: (be, { x }, attrs) => {
    if (!f32(x)) return null;
    const axes = tf.util.parseAxisParam(attrs.axis, x.shape);
    const count = be.makeTensorInfo([], 'float32', Float32Array.of(size(tf.backend_util.computeOutAndReduceShapes(x.shape, axes)[1])));
    const scaled = KERNELS.RealDiv(be, { a: x, b: count }, {}) as Info;
    const y = KERNELS.Sum(be, { x: scaled }, attrs) as Info;
    be.disposeData(count.dataId);
    be.disposeData(scaled.dataId);
    return y;
  },
  GatherV2: (be, { x, indices }, { axis, batchDims }) => {
    if (!words(x) || indices.dtype !== 'int32' || batchDims) return null;
    const ax = tf.util.parseAxisParam(axis, x.shape)[0];
    const shape = [...x.shape.slice(0, ax), ...indices.shape, ...x.shape.slice(ax + 1)];
    const y = be.makeTensorInfo(shape, x.dtype);
    const outer = size(x.shape.slice(0, ax));
    const inner = size(x.shape.slice(ax + 1));
    const m = size(indices.shape);
    be.device.each('gather', outer * m * inner, [be.addr(x), be.addr(indices), outer, m, x.shape[ax], inner, be.addr(y)]);
    return y;
  },
  // Batches broadcast like numpy's; one strided product when the operands step evenly.
  BatchMatMul: (be, { a, b }, { transposeA, transposeB }) => {
    const s = f32(a) && f32(b) ? shapesOf(a.shape, b.shape, !!transposeA, !!transposeB) : null;
    if (!s) return null;
    const y = be.makeTensorInfo([...s.batchShape, s.m, s.n], 'float32');
    const { m, n, k, pairs } = s;
    const g = { ta: !!transposeA, tb: !!transposeB, m, n, k };
    const steps = evenSteps(pairs);
    if (steps)
      be.device.gemm({ ...g, batch: pairs.length, a: be.addr(a) + 4 * pairs[0][0] * m * k, sa: steps[0] * m * k, b: be.addr(b) + 4 * pairs[0][1] * k * n, sb: steps[1] * k * n, c: be.addr(y), sc: m * n });
    else pairs.forEach(([ia, ib], o) => be.device.gemm({ ...g, a: be.addr(a) + 4 * ia * m * k, b: be.addr(b) + 4 * ib * k * n, c: be.addr(y) + 4 * o * m * n }));
    return y;
  },
};

/** model/mask.ts's maskTensor on the device (kernels.cu: attention_mask). */
function attentionMask(be: CudaBackend, { valid, segments }: { valid: Info; segments: Info }, { queryLen, window }: { queryLen: number; window: number }): Info {
  const [B, Tk] = valid.shape;
  const y = be.makeTensorInfo([B, 1, queryLen, Tk], 'float32');
  be.device.each('attention_mask', B * queryLen * Tk, [be.addr(valid), be.addr(segments), B, queryLen, Tk, window, be.addr(y)]);
  return y;
}

/** kernels.cu's sample_exps: each row's B·V exps, as doubles, to the address `out`. */
function launchExps(be: CudaBackend, logits: Info, temperature: number, out: number): void {
  const [B, V] = logits.shape;
  be.device.rows('sample_exps', B, [be.addr(logits), V, temperature, out], 1024);
}

/** infer/sampling's exps on the device: only they come down, not the logits. */
function sampleExps(be: CudaBackend, { logits }: { logits: Info }, { temperature }: { temperature: number }): Info {
  const y = be.makeTensorInfo([logits.shape[0], 2 * logits.shape[1]], 'float32');
  launchExps(be, logits, temperature, be.addr(y));
  return y;
}

/**
 * The token of each row drawn on the device from launchExps' exps (kernels.cu: sample_draw, or
 * sample_kept with top-k or top-p): one id per row comes down, and the probabilities of the rows
 * whose filters keep too many tokens (id −1) where the host needs them.
 */
function sampleDraw(be: CudaBackend, { logits }: { logits: Info }, a: { temperature: number; draws: number[]; topK?: number; topP?: number }): Info[] {
  const [topK, topP] = [a.topK ?? 0, a.topP ?? 1];
  const [B, V] = logits.shape;
  const ids = be.makeTensorInfo([B], 'int32');
  const probs = be.makeTensorInfo([B, 2 * V], 'float32');
  const e = be.addr(probs);
  be.device.withTemp([8 * B], ([u]) => {
    launchExps(be, logits, a.temperature, e);
    be.device.upload(u, Float64Array.from(a.draws));
    if (topK > 0 || topP < 1) be.device.rows('sample_kept', B, [e, V, topK > 0 ? Math.min(topK, V) : V, topP, u, be.addr(ids)], 256);
    else be.device.rows('sample_draw', B, [e, V, u, be.addr(ids)], 1024);
  });
  return [ids, probs];
}

let glueRegistered = false;

/**
 * Register the device kernels over the host ones (engine/cuda-backend registers every cpu kernel
 * through onHost); a device kernel that returns null passes the call on to that host one.
 */
export function registerCudaGlue(): void {
  if (glueRegistered) return;
  glueRegistered = true;
  tf.registerKernel({ kernelName: MASK_KERNEL, backendName: CUDA_BACKEND, kernelFunc: ({ inputs, backend, attrs }: any) => attentionMask(backend, inputs, attrs) });
  tf.registerKernel({ kernelName: SAMPLE_EXPS_KERNEL, backendName: CUDA_BACKEND, kernelFunc: ({ inputs, backend, attrs }: any) => sampleExps(backend, inputs, attrs) });
  tf.registerKernel({ kernelName: SAMPLE_DRAW_KERNEL, backendName: CUDA_BACKEND, kernelFunc: ({ inputs, backend, attrs }: any) => sampleDraw(backend, inputs, attrs) });
  for (const [name, run] of Object.entries(KERNELS)) overrideKernel(name, CUDA_BACKEND, (args, onHost) => run(args.backend as CudaBackend, args.inputs, args.attrs ?? {}) ?? onHost(args));
}
