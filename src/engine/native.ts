import * as tf from '@tensorflow/tfjs-core';
import { createRequire } from 'node:module';
import * as fs from 'node:fs';
import * as path from 'node:path';

/**
 * The native matmul (native/gemm.cc, built at install by node-gyp) registered as the
 * BatchMatMul kernel of the wasm and cpu backends. It reads and writes tensor memory in place
 * (the wasm heap or the cpu backend's arrays) and calls a system CBLAS when one can be opened,
 * else its own AVX2 kernel, on every core. Where the addon did not build, nothing is registered
 * and tfjs's own kernels run. PREFOPT_NATIVE=0 turns it off; PREFOPT_BLAS=builtin skips the
 * system BLAS.
 */
interface Addon {
  matmul(ta: boolean, tb: boolean, batch: number, m: number, n: number, k: number, a: Float32Array, sa: number, b: Float32Array, sb: number, c: Float32Array, useBlas: boolean): void;
  info(): { blas: string; threads: number; avx2: boolean };
}

export interface NativeReport {
  active: boolean;
  /** 'blas' (a system CBLAS), 'builtin' (prefopt's kernel) or null when inactive. */
  kernel: 'blas' | 'builtin' | null;
  library?: string;
  threads?: number;
  avx2?: boolean;
  reason: string;
}

const require = createRequire(import.meta.url);
let addon: Addon | null = null;
let report: NativeReport | null = null;
const registered = new Set<string>();

function findAddon(): string | null {
  let d = path.dirname(new URL(import.meta.url).pathname);
  for (;;) {
    const f = path.join(d, 'build', 'Release', 'prefopt_native.node');
    if (fs.existsSync(f)) return f;
    if (fs.existsSync(path.join(d, 'package.json'))) return null;
    const up = path.dirname(d);
    if (up === d) return null;
    d = up;
  }
}

export function loadNative(): NativeReport {
  if (report) return report;
  const off = ['0', 'off', 'false', 'no'].includes(String(process.env.PREFOPT_NATIVE ?? '').toLowerCase());
  if (off) return (report = { active: false, kernel: null, reason: 'disabled by PREFOPT_NATIVE' });
  const file = findAddon();
  if (!file) return (report = { active: false, kernel: null, reason: 'the native addon is not built (npm install builds it with node-gyp when a C++ compiler is present)' });
  try {
    addon = require(file) as Addon;
  } catch (e: any) {
    return (report = { active: false, kernel: null, reason: `the native addon does not load: ${String(e?.message ?? e).split('\n')[0]}` });
  }
  const i = addon.info();
  return (report = { active: true, kernel: i.blas ? 'blas' : 'builtin', library: i.blas || undefined, threads: i.threads, avx2: i.avx2, reason: i.blas ? `system BLAS ${i.blas}` : `built-in kernel (${i.avx2 ? 'AVX2/FMA' : 'portable'})` });
}

/** Whether BatchMatMul on the current backend runs natively (any transpose, any batch). */
export function nativeMatmulActive(): boolean {
  return registered.has(tf.getBackend());
}

/** C = op(A)·op(B) over a batch, straight on Float32Arrays (for tests and the bench). */
export function nativeMatmul(ta: boolean, tb: boolean, batch: number, m: number, n: number, k: number, a: Float32Array, sa: number, b: Float32Array, sb: number, c: Float32Array, useBlas = true): void {
  if (!addon) throw new Error('the native addon is not loaded');
  addon.matmul(ta, tb, batch, m, n, k, a, sa, b, sb, c, useBlas);
}

interface Shapes {
  batchShape: number[];
  batch: number;
  m: number;
  n: number;
  k: number;
  sa: number;
  sb: number;
}

/** The product's shape, or null for a batch broadcast the kernel does not cover. */
function shapesOf(a: number[], b: number[], ta: boolean, tb: boolean): Shapes | null {
  const m = ta ? a[a.length - 1] : a[a.length - 2];
  const k = ta ? a[a.length - 2] : a[a.length - 1];
  const n = tb ? b[b.length - 2] : b[b.length - 1];
  const ba = a.slice(0, -2);
  const bb = b.slice(0, -2);
  const na = ba.reduce((x, y) => x * y, 1);
  const nb = bb.reduce((x, y) => x * y, 1);
  if (na !== nb && na !== 1 && nb !== 1) return null;
  const batchShape = na >= nb ? (ba.length >= bb.length ? ba : bb) : bb;
  if (na === nb && ba.length !== bb.length) return null;
  return { batchShape, batch: Math.max(na, nb), m, n, k, sa: na === 1 ? 0 : m * k, sb: nb === 1 ? 0 : k * n };
}

/**
 * Register the native BatchMatMul for `backend` ('wasm' or 'cpu'), keeping tfjs's own kernel
 * for what it does not cover (non-float32 inputs, general broadcasting).
 */
export function registerNativeKernels(backend: string): NativeReport {
  const r = loadNative();
  if (!r.active || registered.has(backend) || (backend !== 'wasm' && backend !== 'cpu')) return r;
  const original = tf.getKernel('BatchMatMul', backend);
  if (!original) return r;
  const useBlas = r.kernel === 'blas';
  const kernelFunc = (args: any) => {
    const { inputs, backend: be, attrs } = args;
    const { a, b } = inputs;
    const ta = !!attrs.transposeA;
    const tb = !!attrs.transposeB;
    const s = a.dtype === 'float32' && b.dtype === 'float32' ? shapesOf(a.shape, b.shape, ta, tb) : null;
    if (!s) return original.kernelFunc(args);
    const outShape = [...s.batchShape, s.m, s.n];
    if (backend === 'wasm') {
      const out = be.makeOutput(outShape, 'float32');
      // Views are taken after the output is allocated: allocation may grow (and move) the heap.
      const C = be.typedArrayFromHeap(out) as Float32Array;
      if (C.length) addon!.matmul(ta, tb, s.batch, s.m, s.n, s.k, be.typedArrayFromHeap(a), s.sa, be.typedArrayFromHeap(b), s.sb, C, useBlas);
      return out;
    }
    const C = new Float32Array(s.batch * s.m * s.n);
    if (C.length) addon!.matmul(ta, tb, s.batch, s.m, s.n, s.k, be.data.get(a.dataId).values, s.sa, be.data.get(b.dataId).values, s.sb, C, useBlas);
    return be.makeTensorInfo(outShape, 'float32', C);
  };
  tf.unregisterKernel('BatchMatMul', backend);
  tf.registerKernel({ kernelName: 'BatchMatMul', backendName: backend, kernelFunc, setupFunc: original.setupFunc, disposeFunc: original.disposeFunc });
  registered.add(backend);
  return r;
}
