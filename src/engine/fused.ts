import * as tf from '@tensorflow/tfjs-core';
import { overrideKernel, runInPlace, tensorView } from './kernels.js';
import type { AleaState, MaskStore } from './dropout.js';
import { DT_CODE, HalfWeight, Weight, isHalf } from './half.js';
import { envOff } from '../util/env.js';

/**
 * The native addon's fused kernels (native/fused.cc, native/lora.cc) as tfjs kernels of the
 * wasm and cpu backends, each with its gradient. A kernel reads its inputs and writes its
 * outputs in place (wasm heap views, or the cpu backend's arrays): no copies through
 * JavaScript. Callers go through engine/ops, which falls back to plain tfjs ops where these are
 * not registered (the TensorFlow backends, or no addon).
 */
export interface FusedAddon {
  labelLogProbs(x: Float32Array, n: number, v: number, labels: Int32Array, out: Float32Array): void;
  labelLogProbsGrad(x: Float32Array, n: number, v: number, labels: Int32Array, out: Float32Array, dy: Float32Array, dx: Float32Array): void;
  rmsNorm(x: Float32Array, w: Float32Array, n: number, d: number, eps: number, y: Float32Array, res: Float32Array | null, sum: Float32Array | null): void;
  rmsNormGrad(x: Float32Array, w: Float32Array, dy: Float32Array, n: number, d: number, eps: number, dx: Float32Array | null, dw: Float32Array | null, dres: Float32Array | null): void;
  swiglu(g: Float32Array, u: Float32Array, n: number, y: Float32Array): void;
  swigluGrad(g: Float32Array, u: Float32Array, dy: Float32Array, n: number, dg: Float32Array | null, du: Float32Array | null): void;
  rope(x: Float32Array, cos: Float32Array, sin: Float32Array, rows: number, heads: number, hd: number, inverse: boolean, y: Float32Array): void;
  attention(q: Float32Array, k: Float32Array, v: Float32Array, mask: Float32Array, scale: number, b: number, t: number, tk: number, h: number, kv: number, hd: number, o: Float32Array): void;
  /** o: the forward pass's output where savesAttentionOutput, else null. */
  attentionGrad(q: Float32Array, k: Float32Array, v: Float32Array, mask: Float32Array, scale: number, b: number, t: number, tk: number, h: number, kv: number, hd: number, dout: Float32Array, dq: Float32Array, dk: Float32Array, dv: Float32Array, o: Float32Array | null): void;
  biasAdd(x: Float32Array, b: Float32Array, n: number, d: number, y: Float32Array): void;
  columnSum(dy: Float32Array, n: number, d: number, out: Float32Array): void;
  add(a: Float32Array, b: Float32Array, n: number, y: Float32Array): void;
  loraForward(m: number, din: number, dout: number, r: number, x: Float32Array, xd: Float32Array, w: Float32Array | Uint16Array, a: Float32Array, b: Float32Array, scale: number, wdt: number, whf: boolean, y: Float32Array, u: Float32Array, bias: Float32Array | null): void;
  loraBackward(m: number, din: number, dout: number, r: number, dy: Float32Array, xd: Float32Array, w: Float32Array | Uint16Array, a: Float32Array, b: Float32Array, u: Float32Array, scale: number, wdt: number, whf: boolean, dx: Float32Array, dxd: Float32Array | null, da: Float32Array, db: Float32Array): void;
  matmulWeight(tb: boolean, m: number, n: number, k: number, a: Float32Array, b: Float32Array | Uint16Array, bdt: number, c: Float32Array): void;
  adamwInPlace(ps: Float32Array[], gs: Float32Array[], ms: Float32Array[], vs: Float32Array[], scalars: Float32Array): void;
  sumSquares(x: Float32Array, n: number, out: Float32Array): void;
  splitQkv(qkv: Float32Array, n: number, kv: number, g: number, hd: number, q: Float32Array, k: Float32Array, v: Float32Array, merge: boolean): void;
  embed(table: Float32Array | Uint16Array, v: number, d: number, ids: Int32Array, n: number, out: Float32Array, dt: number): void;
  embedGrad(ids: Int32Array, n: number, dy: Float32Array, v: number, d: number, dtable: Float32Array): void;
  dropoutAlea(x: Float32Array, n: number, s0: number, s1: number, s2: number, c: number, keep: number, y: Float32Array, bits: Uint32Array | null): void;
  dropoutBits(x: Float32Array, n: number, bits: Uint32Array, keep: number, y: Float32Array): void;
  /**
   * Drawing a mask again costs less than keeping it (a GPU: the draw is a kernel, a kept mask a
   * host round trip): dropout then draws at each use and records nothing.
   */
  readonly drawsMasks?: boolean;
  /**
   * Whether attention of these sizes (q [b, t, h, ·], k [b, tk, kv, ·]) keeps its output for its
   * backward pass, which then reuses it and what the forward kept with it (a GPU's flash kernels:
   * each query row's softmax statistics) instead of running the forward pass again. Absent: never —
   * where that pass is cheap next to its backward (the host), or has nothing to reuse (a GPU's
   * products), keeping the output costs memory for nothing.
   */
  savesAttentionOutput?(b: number, t: number, tk: number, h: number, kv: number): boolean;
}

/** Input views: Float32Array, or Int32Array for int32 inputs (labels). */
type Arr = any;
type Info = tf.TensorInfo;
type Run = (addon: FusedAddon, ins: Arr[], outs: Arr[], inputs: Info[], attrs: any) => void;

interface Def {
  inputs: string[];
  /** Output shapes from the input shapes. */
  outputs: (inputs: Info[], attrs: any) => number[][];
  run: Run;
}

const size = (s: number[]) => tf.util.sizeFromShape(s);
const last = (t: Info) => t.shape[t.shape.length - 1];
const same = (i: number) => (ins: Info[]) => [ins[i].shape as number[]];

/** A frozen weight's storage for the addon: a 16-bit one from attrs.hw (then no `w` input), or the float32 view. */
const weightArgs = (w: Arr, attrs: any): [Arr, number, boolean] => (attrs.hw ? [(attrs.hw as HalfWeight).bits, (attrs.hw as HalfWeight).code, true] : [w, DT_CODE.f32, false]);

const DEFS: Record<string, Def> = {
  // LoRA's layer: x, xd [M, in], w [in, out], a [in, r], b [r, out] → y = x·w + u·b, u = s·(xd·a)
  // [M, r], plus a frozen bias [out] when one is given. With attrs.dropout, xd is a separate
  // input; without, it is x. A 16-bit w comes as attrs.hw instead (engine/half), [out, in].
  PrefoptLora: {
    inputs: ['x', 'xd', 'w', 'a', 'b', 'bias'],
    outputs: ([x, , , a, b]) => [[x.shape[0], b.shape[1]], [x.shape[0], a.shape[1]]],
    run: (k, [x, xd, w, a, b, bias], [y, u], [xi, , , ai, bi], attrs) => {
      const [wv, wdt, whf] = weightArgs(w, attrs);
      k.loraForward(xi.shape[0], xi.shape[1], bi.shape[1], ai.shape[1], x, xd, wv, a, b, attrs.scale, wdt, whf, y, u, bias);
    },
  },
  // → dx, [dxd when attrs.dropout], da, db.
  PrefoptLoraGrad: {
    inputs: ['dy', 'xd', 'w', 'a', 'b', 'u'],
    outputs: ([dy, xd, , a, b], { dropout }) => [xd.shape, ...(dropout ? [xd.shape] : []), a.shape, b.shape],
    run: (k, [dy, xd, w, a, b, u], outs, [dyi, xdi, , ai], attrs) => {
      const [dx, dxd, da, db] = attrs.dropout ? outs : [outs[0], null, outs[1], outs[2]];
      const [wv, wdt, whf] = weightArgs(w, attrs);
      k.loraBackward(dyi.shape[0], xdi.shape[1], dyi.shape[1], ai.shape[1], dy, xd, wv, a, b, u, attrs.scale, wdt, whf, dx, dxd, da, db);
    },
  },
  // x [M, K] · op(W) for a 16-bit frozen W (attrs.hw; op transposes its storage when attrs.tb).
  PrefoptHalfMatmul: {
    inputs: ['x'],
    outputs: ([x], { hw, tb }) => [[x.shape[0], tb ? hw.stored[0] : hw.stored[1]]],
    run: (k, [x], [y], [xi], { hw, tb }) => k.matmulWeight(tb, xi.shape[0], tb ? hw.stored[0] : hw.stored[1], xi.shape[1], x, hw.bits, hw.code, y),
  },
  // Rows ids [N] of a 16-bit table (attrs.hw [V, D]) → [N, D]; the table has no gradient.
  PrefoptHalfEmbed: {
    inputs: ['ids'],
    outputs: ([ids], { hw }) => [[ids.shape[0], hw.stored[1]]],
    run: (a, [ids], [out], [idsi], { hw }) => a.embed(hw.bits, hw.stored[0], hw.stored[1], ids, idsi.shape[0], out, hw.code),
  },
  PrefoptSumSquares: {
    inputs: ['x'],
    outputs: () => [[]],
    run: (a, [x], [out], ins) => a.sumSquares(x, size(ins[0].shape), out),
  },
  // x [..., D] + b [D].
  PrefoptBiasAdd: {
    inputs: ['x', 'b'],
    outputs: same(0),
    run: (a, [x, b], [y], ins) => a.biasAdd(x, b, size(ins[0].shape) / last(ins[0]), last(ins[0]), y),
  },
  // Σ over every axis but the last.
  PrefoptColumnSum: {
    inputs: ['dy'],
    outputs: (ins) => [[last(ins[0])]],
    run: (a, [dy], [out], ins) => a.columnSum(dy, size(ins[0].shape) / last(ins[0]), last(ins[0]), out),
  },
  // tf.dropout's mask from alea state attrs.state, applied to x; the kept elements also go to
  // attrs.bits when given (one bit each).
  PrefoptDropout: {
    inputs: ['x'],
    outputs: same(0),
    run: (a, [x], [y], ins, { state, keep, bits }) => a.dropoutAlea(x, size(ins[0].shape), state.s0, state.s1, state.s2, state.c, keep, y, bits ?? null),
  },
  // A mask PrefoptDropout recorded (attrs.bits), applied to x again.
  PrefoptDropoutBits: {
    inputs: ['x'],
    outputs: same(0),
    run: (a, [x], [y], ins, { bits, keep }) => a.dropoutBits(x, size(ins[0].shape), bits, keep, y),
  },
  // table [V, D], ids [N] → [N, D].
  PrefoptEmbed: {
    inputs: ['table', 'ids'],
    outputs: (ins) => [[ins[1].shape[0], ins[0].shape[1]]],
    run: (a, [t, ids], [out], ins) => a.embed(t, ins[0].shape[0], ins[0].shape[1], ids, ins[1].shape[0], out, DT_CODE.f32),
  },
  PrefoptEmbedGrad: {
    inputs: ['ids', 'dy'],
    outputs: (_ins, { vocab, dim }) => [[vocab, dim]],
    run: (a, [ids, dy], [dt], ins, { vocab, dim }) => a.embedGrad(ids, ins[0].shape[0], dy, vocab, dim, dt),
  },
  PrefoptLabelLogProbs: {
    inputs: ['logits', 'labels'],
    outputs: (ins) => [[ins[0].shape[0]]],
    run: (a, [x, y], [out], ins) => a.labelLogProbs(x, ins[0].shape[0], ins[0].shape[1], y, out),
  },
  PrefoptLabelLogProbsGrad: {
    inputs: ['logits', 'labels', 'out', 'dy'],
    outputs: same(0),
    run: (a, [x, y, out, dy], [dx], ins) => a.labelLogProbsGrad(x, ins[0].shape[0], ins[0].shape[1], y, out, dy, dx),
  },
  PrefoptRmsNorm: {
    inputs: ['x', 'w'],
    outputs: same(0),
    run: (a, [x, w], [y], ins, { eps }) => a.rmsNorm(x, w, size(ins[0].shape) / last(ins[0]), last(ins[0]), eps, y, null, null),
  },
  // The gradient with respect to input `wrt` (0: x, 1: w).
  PrefoptRmsNormGrad: {
    inputs: ['x', 'w', 'dy'],
    outputs: (ins, { wrt }) => [ins[wrt].shape],
    run: (a, [x, w, dy], [d], ins, { eps, wrt }) => a.rmsNormGrad(x, w, dy, size(ins[0].shape) / last(ins[0]), last(ins[0]), eps, wrt === 0 ? d : null, wrt === 1 ? d : null, null),
  },
  // A residual connection and the norm after it: x, r → [s = x + r, rmsnorm(s)·w].
  PrefoptAddRmsNorm: {
    inputs: ['x', 'r', 'w'],
    outputs: (ins) => [ins[0].shape, ins[0].shape],
    run: (a, [x, r, w], [s, y], ins, { eps }) => a.rmsNorm(x, w, size(ins[0].shape) / last(ins[0]), last(ins[0]), eps, y, r, s),
  },
  // The gradient of s (both x's and r's): ds + the norm's gradient for its input s.
  PrefoptAddRmsNormGrad: {
    inputs: ['s', 'w', 'dy', 'ds'],
    outputs: same(0),
    run: (a, [s, w, dy, ds], [d], ins, { eps }) => a.rmsNormGrad(s, w, dy, size(ins[0].shape) / last(ins[0]), last(ins[0]), eps, d, null, ds),
  },
  PrefoptSwiglu: {
    inputs: ['g', 'u'],
    outputs: same(0),
    run: (a, [g, u], [y], ins) => a.swiglu(g, u, size(ins[0].shape), y),
  },
  // Both gradients in one pass: they share σ(g) and the reads of g and dy (0.63 against 1.0 ms
  // for two calls at 1024×704), and both are always wanted (g and u are activations).
  PrefoptSwigluGrad: {
    inputs: ['g', 'u', 'dy'],
    outputs: (ins) => [ins[0].shape, ins[0].shape],
    run: (a, [g, u, dy], [dg, du], ins) => a.swigluGrad(g, u, dy, size(ins[0].shape), dg, du),
  },
  // qkv [N, KV, G+2, hd] → q [N, KV·G, hd], k, v [N, KV, hd] (360Zhinao's fused projection).
  PrefoptSplitQkv: {
    inputs: ['qkv'],
    outputs: (ins, { g }) => {
      const [N, KV, , hd] = ins[0].shape;
      return [[N, KV * g, hd], [N, KV, hd], [N, KV, hd]];
    },
    run: (a, [qkv], [q, k, v], ins, { g }) => a.splitQkv(qkv, ins[0].shape[0], ins[0].shape[1], g, ins[0].shape[3], q, k, v, false),
  },
  PrefoptMergeQkv: {
    inputs: ['q', 'k', 'v'],
    outputs: (ins, { g }) => [[ins[1].shape[0], ins[1].shape[1], g + 2, ins[1].shape[2]]],
    run: (a, [q, k, v], [qkv], ins, { g }) => a.splitQkv(qkv, ins[1].shape[0], ins[1].shape[1], g, ins[1].shape[2], q, k, v, true),
  },
  // x [B, T, H, hd]; cos, sin [B, T, 1, hd].
  PrefoptRope: {
    inputs: ['x', 'cos', 'sin'],
    outputs: same(0),
    run: (a, [x, c, s], [y], ins, { inverse }) => {
      const [B, T, H, hd] = ins[0].shape;
      a.rope(x, c, s, B * T, H, hd, !!inverse, y);
    },
  },
  // q [B, T, H, hd]; k, v [B, Tk, KV, hd]; mask [B, 1, T, Tk] → [B, T, H, hd].
  PrefoptAttention: {
    inputs: ['q', 'k', 'v', 'mask'],
    outputs: same(0),
    run: (a, [q, k, v, m], [o], ins, { scale }) => {
      const [B, T, H, hd] = ins[0].shape;
      const [, Tk, KV] = ins[1].shape;
      a.attention(q, k, v, m, scale, B, T, Tk, H, KV, hd, o);
    },
  },
  PrefoptAttentionGrad: {
    inputs: ['q', 'k', 'v', 'mask', 'dy', 'o'],
    outputs: (ins) => [ins[0].shape, ins[1].shape, ins[2].shape],
    run: (a, [q, k, v, m, dy, o], [dq, dk, dv], ins, { scale }) => {
      const [B, T, H, hd] = ins[0].shape;
      const [, Tk, KV] = ins[1].shape;
      a.attentionGrad(q, k, v, m, scale, B, T, Tk, H, KV, hd, dy, dq, dk, dv, o);
    },
  },
};

/**
 * tfjs kernels replaced where the native form covers the inputs (the original runs otherwise);
 * their gradients stay tfjs's. Add: residual connections and gradient accumulation, ~100 per
 * DPO step, single-threaded in tfjs-wasm.
 */
const OVERRIDES: Record<string, { covers: (ins: Info[]) => boolean; def: Def }> = {
  Add: {
    covers: ([a, b]) => a.dtype === 'float32' && b.dtype === 'float32' && a.shape.length === b.shape.length && a.shape.every((d, i) => d === b.shape[i]) && size(a.shape) >= 4096,
    def: { inputs: ['a', 'b'], outputs: same(0), run: (x, [a, b], [y], ins) => x.add(a, b, size(ins[0].shape), y) },
  },
};

const run = (name: string, inputs: Record<string, tf.Tensor>, attrs: Record<string, unknown> = {}) =>
  tf.engine().runKernel(name, inputs as any, attrs as any) as tf.Tensor | tf.Tensor[];

const GRADS: tf.GradConfig[] = [
  // dx = dy · op(W)ᵀ: the same product with the other transpose of W's storage.
  {
    kernelName: 'PrefoptHalfMatmul',
    gradFunc: (dy, _saved, attrs: any) => ({ x: () => run('PrefoptHalfMatmul', { x: dy as tf.Tensor }, { hw: attrs.hw, tb: !attrs.tb }) as tf.Tensor }),
  },
  {
    kernelName: 'PrefoptBiasAdd',
    gradFunc: (dy) => ({
      x: () => tf.clone(dy as tf.Tensor),
      b: () => run('PrefoptColumnSum', { dy: dy as tf.Tensor }) as tf.Tensor,
    }),
  },
  {
    kernelName: 'PrefoptEmbed',
    inputsToSave: ['table', 'ids'],
    gradFunc: (dy, [table, ids]) => ({
      table: () => run('PrefoptEmbedGrad', { ids, dy: dy as tf.Tensor }, { vocab: table.shape[0], dim: table.shape[1] }) as tf.Tensor,
      ids: () => tf.zerosLike(ids),
    }),
  },
  {
    kernelName: 'PrefoptLabelLogProbs',
    inputsToSave: ['logits', 'labels'],
    outputsToSave: [true],
    gradFunc: (dy, [logits, labels, out]) => ({
      logits: () => run('PrefoptLabelLogProbsGrad', { logits, labels, out, dy: dy as tf.Tensor }) as tf.Tensor,
      labels: () => tf.zerosLike(labels),
    }),
  },
  // Each input's gradient is its own kernel call: tfjs asks only for the inputs that lead to
  // what is being differentiated (a frozen norm weight under LoRA), each inside its own tidy.
  {
    kernelName: 'PrefoptRmsNorm',
    inputsToSave: ['x', 'w'],
    gradFunc: (dy, [x, w], attrs: any) => {
      const grad = (wrt: number) => () => run('PrefoptRmsNormGrad', { x, w, dy: dy as tf.Tensor }, { eps: attrs.eps, wrt }) as tf.Tensor;
      return { x: grad(0), w: grad(1) };
    },
  },
  // x and r get the same gradient: computed once, the second asked gets a (zero-copy) clone.
  {
    kernelName: 'PrefoptAddRmsNorm',
    inputsToSave: ['w'],
    outputsToSave: [true, false],
    gradFunc: (dys, [w, s], attrs: any) => {
      const [ds, dy] = dys as tf.Tensor[];
      let done: tf.Tensor | null = null;
      const sum = () => (done ? tf.clone(done) : (done = run('PrefoptAddRmsNormGrad', { s, w, dy, ds }, { eps: attrs.eps }) as tf.Tensor));
      return { x: sum, r: sum, w: () => run('PrefoptRmsNormGrad', { x: s, w, dy }, { eps: attrs.eps, wrt: 1 }) as tf.Tensor };
    },
  },
  {
    kernelName: 'PrefoptSplitQkv',
    gradFunc: (dys, _saved, attrs: any) => {
      const [dq, dk, dv] = dys as tf.Tensor[];
      return { qkv: () => run('PrefoptMergeQkv', { q: dq, k: dk, v: dv }, { g: attrs.g }) as tf.Tensor };
    },
  },
  {
    kernelName: 'PrefoptRope',
    inputsToSave: ['cos', 'sin'],
    gradFunc: (dy, [cos, sin]) => ({
      x: () => run('PrefoptRope', { x: dy as tf.Tensor, cos, sin }, { inverse: true }) as tf.Tensor,
      cos: () => tf.zerosLike(cos),
      sin: () => tf.zerosLike(sin),
    }),
  },
];

/**
 * Where a backend's tensors live, for the kernels: `run` allocates the outputs and calls fill with
 * the inputs' and outputs' storage (typed arrays on the host; device addresses for the cuda
 * backend), `view` gives one tensor's storage (for adamwInPlace).
 */
export interface Placement {
  run(be: any, inputs: Info[], shapes: number[][], fill: (ins: any[], outs: any[]) => void): Info[];
  view(be: any, t: Info): any;
}

const hostPlacement = (backend: string): Placement => ({
  run: (be, inputs, shapes, fill) => runInPlace(backend, be, inputs, shapes, fill),
  view: (be, t) => tensorView(backend, be, t),
});

/** Each registered backend's kernel set and placement. */
const registered = new Map<string, { addon: FusedAddon; place: Placement }>();
let gradsRegistered = false;
// PREFOPT_FUSED=0 keeps the native matmul but runs the plain tfjs compositions (to compare).
let enabled = !envOff('PREFOPT_FUSED');

/**
 * Register every fused kernel for `backend` ('wasm', 'cpu' or 'native'). DEFS says what each kernel
 * takes and gives, independent of where tensors live; `addon` is the kernel set for the device
 * that backend's memory is on (the host: native/). A backend on another device registers the same
 * table with its own kernel set behind the FusedAddon interface and its own placement (the cuda
 * backend: engine/cuda-kernels).
 */
export function registerFusedKernels(backend: string, addon: FusedAddon, place: Placement = hostPlacement(backend)): void {
  if (registered.has(backend)) return;
  const native = (def: Def) => ({ inputs, backend: be, attrs }: any) => {
    const ins: Info[] = def.inputs.map((n) => inputs[n]);
    const outs = place.run(be, ins, def.outputs(ins, attrs), (views, outViews) => def.run(addon, views, outViews, ins, attrs));
    return outs.length === 1 ? outs[0] : outs;
  };
  for (const [name, def] of Object.entries(DEFS)) tf.registerKernel({ kernelName: name, backendName: backend, kernelFunc: native(def) });
  for (const [name, { covers, def }] of Object.entries(OVERRIDES)) {
    const fast = native(def);
    overrideKernel(name, backend, (args, original) => (enabled && covers(def.inputs.map((n) => args.inputs[n])) ? fast(args) : original(args)));
  }
  if (!gradsRegistered) for (const g of GRADS) tf.registerGradient(g);
  gradsRegistered = true;
  registered.set(backend, { addon, place });
}

/** Whether the fused kernels serve the current backend. */
export function fusedActive(): boolean {
  return enabled && registered.has(tf.getBackend());
}

/** Turn the fused kernels off or on (tests and the bench compare both paths in one process). */
export function setFused(on: boolean): void {
  enabled = on;
}

/**
 * Kernel `name` with a custom gradient: kernel `grad` returns the gradients of every input of
 * `xs` from one call (registered gradients are asked for each input separately, each its own
 * call). `extra` holds inputs that are not differentiated but the backward pass reads (the
 * attention mask), kept alive with the rest.
 */
function withJointGrad(name: string, grad: string, xs: Record<string, tf.Tensor>, attrs: Record<string, unknown> = {}, extra: Record<string, tf.Tensor> = {}, outputAs?: string): tf.Tensor {
  const names = [...Object.keys(xs), ...Object.keys(extra), ...(outputAs ? [outputAs] : [])];
  const named = (ts: tf.Tensor[]) => Object.fromEntries(names.map((n, i) => [n, ts[i]]));
  const n = Object.keys(xs).length;
  const f = tf.customGrad(((...args: any[]) => {
    const ins = [...(args.slice(0, n) as tf.Tensor[]), ...Object.values(extra)];
    const value = run(name, named(ins), attrs) as tf.Tensor;
    (args[n] as tf.GradSaveFunc)(outputAs ? [...ins, value] : ins);
    return {
      value,
      gradFunc: (dy: tf.Tensor, saved: tf.Tensor[]) => run(grad, { ...named(saved), dy }, attrs) as tf.Tensor[],
    };
  }) as any) as (...ts: tf.Tensor[]) => tf.Tensor;
  return f(...Object.values(xs));
}

const f32 = (t: tf.Tensor) => (t.dtype === 'float32' ? t : tf.cast(t, 'float32'));
const i32 = (t: tf.Tensor) => (t.dtype === 'int32' ? t : tf.cast(t, 'int32'));

/** The fused forms; only while fusedActive(). */
export const fused = {
  /**
   * x·w + s·(xd·a)·b (+ bias) for a frozen w and bias (not differentiated), from one kernel call
   * each way; xd null means xd = x. Gradients for x (and xd), a and b. a and b are read by the
   * backward pass from here, not saved: they are the adapter's variables, alive until the
   * optimizer step, and saving takes a tape clone each (84 in the bench's LoRA DPO step).
   */
  lora: (x: tf.Tensor2D, w: Weight, a: tf.Tensor2D, b: tf.Tensor2D, scale: number, xd: tf.Tensor2D | null, bias: tf.Tensor | null) => {
    const dropout = xd !== null;
    // A 16-bit w is an attribute; a float32 one an input (kernels read inputs in place).
    const wIn: Record<string, tf.Tensor> = isHalf(w) ? {} : { w };
    const hw = isHalf(w) ? w : undefined;
    const f = tf.customGrad(((...args: any[]) => {
      const save = args.pop() as tf.GradSaveFunc;
      const [xi, xdi, ai, bi] = (dropout ? args : [args[0], args[0], args[1], args[2]]) as tf.Tensor[];
      const [y, u] = run('PrefoptLora', { x: xi, xd: xdi, ...wIn, a: ai, b: bi, ...(bias ? { bias } : {}) }, { scale, hw }) as tf.Tensor[];
      save([xdi, u]);
      return {
        value: y,
        gradFunc: (dy: tf.Tensor, [sxd, su]: tf.Tensor[]) => run('PrefoptLoraGrad', { dy, xd: sxd, ...wIn, a: ai, b: bi, u: su }, { scale, dropout, hw }) as tf.Tensor[],
      };
    }) as any) as (...t: tf.Tensor[]) => tf.Tensor2D;
    return dropout ? f(f32(x), f32(xd!), f32(a), f32(b)) : f(f32(x), f32(a), f32(b));
  },
  /**
   * AdamW on many parameters at once, in place (p, m and v overwritten), one native call for
   * all: an optimizer step was one kernel per parameter (74 in the bench's SFT step), each
   * allocating three new tensors. False, with nothing changed, when some p's memory is shared
   * with another tensor (a clone still alive): then its update must not be seen through it.
   * scalars per parameter as train/adamw computes them (gscale, β1, 1−β1, β2, 1−β2, √bc2, eps, lr/bc1, lr·wd); the kernel rounds them to float32 as tfjs would. m and v are the optimizer's own.
   */
  adamwInPlace: (ps: tf.Tensor[], gs: tf.Tensor[], ms: tf.Tensor[], vs: tf.Tensor[], scalars: number[][]): boolean => {
    const reg = registered.get(tf.getBackend());
    const be = tf.backend() as any;
    if (!reg || gs.some((g) => g.dtype !== 'float32') || ps.some((p) => be.refCount(p.dataId) !== 1)) return false;
    const view = (ts: tf.Tensor[]) => ts.map((t) => reg.place.view(be, t));
    reg.addon.adamwInPlace(view(ps), view(gs), view(ms), view(vs), Float32Array.from(scalars.flat()));
    return true;
  },
  sumSquares: (x: tf.Tensor) => run('PrefoptSumSquares', { x: f32(x) }) as tf.Scalar,
  biasAdd: (x: tf.Tensor, b: tf.Tensor) => run('PrefoptBiasAdd', { x: f32(x), b: f32(b) }) as tf.Tensor,
  embed: (table: Weight, ids: tf.Tensor1D) =>
    (isHalf(table) ? run('PrefoptHalfEmbed', { ids: i32(ids) }, { hw: table }) : run('PrefoptEmbed', { table: f32(table), ids: i32(ids) })) as tf.Tensor2D,
  /** x [M, K] · op(W) for a 16-bit W (op: its stored layout transposed when tb); differentiable in x. */
  halfMatmul: (x: tf.Tensor2D, w: HalfWeight, tb: boolean) => run('PrefoptHalfMatmul', { x: f32(x) }, { hw: w, tb }) as tf.Tensor2D,
  labelLogProbs: (logits: tf.Tensor2D, labels: tf.Tensor1D) => run('PrefoptLabelLogProbs', { logits: f32(logits), labels: i32(labels) }) as tf.Tensor1D,
  labelLogProbsGrad: (logits: tf.Tensor2D, labels: tf.Tensor1D, out: tf.Tensor1D, dy: tf.Tensor1D) =>
    run('PrefoptLabelLogProbsGrad', { logits: f32(logits), labels: i32(labels), out, dy }) as tf.Tensor2D,
  /**
   * x·mask with tf.dropout's mask for alea `state`; the gradient is dy·mask. The mask is drawn
   * once and its bits kept in `store` (engine/dropout): later uses apply the bits; the backward
   * pass, the last use, retires them.
   */
  dropout: (x: tf.Tensor, state: AleaState, keep: number, store: MaskStore) => {
    const draws = registered.get(tf.getBackend())?.addon.drawsMasks;
    const apply = (t: tf.Tensor) => {
      if (draws) return run('PrefoptDropout', { x: t }, { state, keep }) as tf.Tensor;
      const have = store.get();
      if (have) return run('PrefoptDropoutBits', { x: t }, { keep, bits: have }) as tf.Tensor;
      const bits = new Uint32Array(Math.ceil(t.size / 32));
      const y = run('PrefoptDropout', { x: t }, { state, keep, bits }) as tf.Tensor;
      store.set(bits);
      return y;
    };
    const f = tf.customGrad(((xi: tf.Tensor) => ({
      value: apply(xi),
      gradFunc: (dy: tf.Tensor) => {
        const g = apply(dy);
        store.retire();
        return g;
      },
    })) as any) as (x: tf.Tensor) => tf.Tensor;
    return f(f32(x));
  },
  rmsNorm: (x: tf.Tensor, w: tf.Tensor, eps: number) => run('PrefoptRmsNorm', { x: f32(x), w: f32(w) }, { eps }) as tf.Tensor,
  /** [x + r, rmsnorm(x + r)·w]. */
  addRmsNorm: (x: tf.Tensor, r: tf.Tensor, w: tf.Tensor, eps: number) => run('PrefoptAddRmsNorm', { x: f32(x), r: f32(r), w: f32(w) }, { eps }) as tf.Tensor[],
  /** y = silu(g)·u; dg and du come from one kernel call. */
  swiglu: (g: tf.Tensor, u: tf.Tensor) => withJointGrad('PrefoptSwiglu', 'PrefoptSwigluGrad', { g: f32(g), u: f32(u) }),
  /** qkv [N, KV, G+2, hd] → [q [N, KV·G, hd], k [N, KV, hd], v [N, KV, hd]]. */
  splitQkv: (qkv: tf.Tensor, g: number) => run('PrefoptSplitQkv', { qkv: f32(qkv) }, { g }) as tf.Tensor[],
  rope: (x: tf.Tensor, cos: tf.Tensor, sin: tf.Tensor) => run('PrefoptRope', { x: f32(x), cos, sin }, { inverse: false }) as tf.Tensor,
  /** dq, dk and dv come from one kernel call. */
  attention: (q: tf.Tensor, k: tf.Tensor, v: tf.Tensor, mask: tf.Tensor, scale: number) => {
    const [b, t, h] = q.shape;
    const [, tk, kv] = k.shape;
    const saves = registered.get(tf.getBackend())?.addon.savesAttentionOutput?.(b, t, tk, h, kv);
    return withJointGrad('PrefoptAttention', 'PrefoptAttentionGrad', { q: f32(q), k: f32(k), v: f32(v) }, { scale }, { mask }, saves ? 'o' : undefined);
  },
};
