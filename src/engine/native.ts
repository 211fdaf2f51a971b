import * as tf from '@tensorflow/tfjs-core';
import { createRequire } from 'node:module';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { packageRoot } from '../util/package-root.js';
import { FusedAddon, registerFusedKernels } from './fused.js';
import { overrideKernel, runInPlace } from './kernels.js';
import { DT_CODE, HalfWeight, isHalf } from './half.js';
import { NATIVE_BACKEND, NativeAllocator, PoolStats } from './native-backend.js';
import { envOff } from '../util/env.js';

/**
 * The native addon (native/, built at install by node-gyp): its matmul registered as the
 * BatchMatMul kernel of the wasm and cpu backends, and its fused kernels (engine/fused). It
 * reads and writes tensor memory in place (the wasm heap or the cpu backend's arrays) with its
 * own AVX-512/AVX2 kernels on every core, or a system CBLAS where those cannot run. Where the
 * addon did not build, nothing is registered and tfjs's own kernels run. PREFOPT_NATIVE=0 turns
 * it off; PREFOPT_BLAS=builtin skips the system BLAS.
 */
interface Addon extends FusedAddon {
  matmul(ta: boolean, tb: boolean, batch: number, m: number, n: number, k: number, a: Float32Array, sa: number, b: Float32Array, sb: number, c: Float32Array, useBlas: boolean): void;
  info(): { blas: string; threads: number; isa: string };
  transpose(a: Float32Array, rows: number, cols: number, out: Float32Array): void;
  firstNonFinite(x: Float32Array | Uint16Array, n: number, dt: number): number;
  sampleExps(logits: Float32Array, v: number, t: number, out: Float64Array): void;
  matmulWeight(tb: boolean, m: number, n: number, k: number, a: Float32Array, b: Float32Array | Uint16Array, bdt: number, c: Float32Array): void;
  widen(src: Uint16Array, n: number, dt: number, out: Float32Array): void;
  mapFile(path: string): ArrayBuffer | null;
  unmapFile(buffer: ArrayBuffer): boolean;
  alloc(bytes: number): ArrayBuffer;
  free(buffer: ArrayBuffer): boolean;
  nativeBytes(): number;
  poolStats(): PoolStats;
  trimPool(): void;
  probeCuda(driver: string[], cublasLt: string[], nvrtc: string[]): CudaProbeResult;
  /** The alea multipliers of jumps of 0, step, 2·step, … draws (count; two words each, low first). */
  aleaJumps(step: number, count: number, out: BigUint64Array): void;
}

/** One operation's profile: how many, their seconds, their flops (products) or bytes (copies). */
export interface ProfileTiming {
  count: number;
  seconds: number;
  work: number;
}

/** The addon's CUDA device (native/cuda_addon.cc): addresses are numbers, sizes in bytes. */
export interface CudaAddon {
  cudaOpen(mode: 'emulate' | 'dry' | 'gpu', driver?: string[], cublasLt?: string[], nvrtc?: string[], source?: string, tf32?: boolean, cacheDir?: string): { name: string; maxGrid: number };
  cudaAlloc(bytes: number): number;
  cudaFree(addr: number): boolean;
  cudaUpload(addr: number, src: ArrayBufferView): void;
  cudaDownload(addr: number, dst: ArrayBufferView): void;
  cudaCopy(dst: number, src: number, bytes: number): void;
  cudaLaunch(kernel: string, grid: number, block: number, args: (number | number[])[]): void;
  /** [ta, tb, batch, m, n, k, a, sa, b, sb, c, sc, alpha, beta, adt, bdt] (strides in elements; dt 1: bf16). */
  cudaGemm(args: number[]): void;
  cudaSync(): void;
  cudaStats(resetPeak?: boolean): { live: number; cached: number; peak: number; free: number; total: number; waits: number };
  cudaTrim(): void;
  cudaKernels(): Record<string, string>;
  /** Rows of one head an attention block of `block` threads covers (kernels.cu: attn_group); 0 where head_dim is past what it holds. */
  cudaAttentionRows(hd: number, block: number): number;
  /** The profile so far (then cleared); on starts or stops timing each device operation. */
  cudaProfile(on: boolean): Record<string, ProfileTiming>;
}

/** One library the CUDA probe looked for: the file that loaded and its version, or why none did. */
export interface CudaLib {
  path: string | null;
  version: string | null;
  error: string | null;
}

export interface CudaProbeResult {
  driver: CudaLib;
  cublasLt: CudaLib;
  nvrtc: CudaLib;
  devices: { name: string; major: number; minor: number; memory: number }[];
}

export interface NativeReport {
  active: boolean;
  /** 'blas' (a system CBLAS), 'builtin' (prefopt's kernel) or null when inactive. */
  kernel: 'blas' | 'builtin' | null;
  library?: string;
  threads?: number;
  /** The vector instructions the kernels use: AVX-512, AVX2/FMA or portable (PREFOPT_ISA caps it). */
  isa?: string;
  reason: string;
}

const require = createRequire(import.meta.url);
let addon: Addon | null = null;
let report: NativeReport | null = null;
const registered = new Set<string>();

export function loadNative(): NativeReport {
  if (report) return report;
  const off = envOff('PREFOPT_NATIVE');
  if (off) return (report = { active: false, kernel: null, reason: 'disabled by PREFOPT_NATIVE' });
  const file = path.join(packageRoot(), 'build', 'Release', 'prefopt_native.node');
  if (!fs.existsSync(file)) return (report = { active: false, kernel: null, reason: 'the native addon is not built (npm install builds it with node-gyp when a C++ compiler is present)' });
  try {
    addon = require(file) as Addon;
  } catch (e: any) {
    return (report = { active: false, kernel: null, reason: `the native addon does not load: ${String(e?.message ?? e).split('\n')[0]}` });
  }
  const i = addon.info();
  return (report = { active: true, kernel: i.blas ? 'blas' : 'builtin', library: i.blas || undefined, threads: i.threads, isa: i.isa, reason: i.blas ? `system BLAS ${i.blas}` : `built-in kernel (${i.isa})` });
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

/** A·B for row-major A [m, k] and B [k, n]: the addon's kernel when it is loaded, plain loops otherwise. */
export function hostMatmul(a: Float32Array, b: Float32Array, m: number, k: number, n: number): Float32Array {
  const c = new Float32Array(m * n);
  if (loadNative().active && addon) {
    addon.matmul(false, false, 1, m, n, k, a, 0, b, 0, c, true);
    return c;
  }
  for (let i = 0; i < m; i++) {
    for (let j = 0; j < k; j++) {
      const x = a[i * k + j];
      if (x === 0) continue;
      for (let t = 0; t < n; t++) c[i * n + t] += x * b[j * n + t];
    }
  }
  return c;
}

/** aᵀ for a [rows, cols] (row-major), on every core when the addon is loaded. */
export function transpose2d(a: Float32Array, rows: number, cols: number, out: Float32Array = new Float32Array(a.length)): Float32Array {
  if (loadNative().active && addon) addon.transpose(a, rows, cols, out);
  else for (let r = 0; r < rows; r++) for (let c = 0; c < cols; c++) out[c * rows + r] = a[r * cols + c];
  return out;
}

/** The index of the first NaN or ±Inf in x, or −1. */
export function firstNonFinite(x: Float32Array): number {
  if (loadNative().active && addon) return addon.firstNonFinite(x, x.length, DT_CODE.f32);
  for (let i = 0; i < x.length; i++) if (!Number.isFinite(x[i])) return i;
  return -1;
}

/**
 * out[i] = exp(x_i/t − max x/t) over a row of logits (infer/sampling's first pass) on every core,
 * with Math.exp's bits (native/kernels.h: host_sample_exps); false where the addon is not loaded.
 */
export function nativeSampleExps(logits: Float32Array, t: number, out: Float64Array): boolean {
  if (!(loadNative().active && addon)) return false;
  addon.sampleExps(logits, logits.length, t, out);
  return true;
}

// 16-bit weights exist only where the native kernels serve the backend (model/load), so these
// need the addon.
function loaded(): Addon {
  if (!addon) throw new Error('16-bit weights need the native addon, which is not loaded');
  return addon;
}

/** The same for a 16-bit weight: the index of its first NaN or ±Inf, or −1. */
export function firstNonFiniteHalf(w: HalfWeight): number {
  return loaded().firstNonFinite(w.bits, w.size, w.code);
}

/** The addon's tensor memory allocator (for the native backend), or null where it is not loaded. */
export function nativeAllocator(): NativeAllocator | null {
  return loadNative().active && addon ? { alloc: (n) => addon!.alloc(n), free: (b) => addon!.free(b), nativeBytes: () => addon!.nativeBytes(), poolStats: () => addon!.poolStats(), trimPool: () => addon!.trimPool() } : null;
}

/** The addon's CUDA device functions and the alea jumps its dropout masks start from, or null where the addon is not loaded. */
export function cudaAddon(): (CudaAddon & Pick<Addon, 'aleaJumps'>) | null {
  return loadNative().active && addon ? (addon as unknown as CudaAddon & Pick<Addon, 'aleaJumps'>) : null;
}

/** Open the CUDA libraries from these candidates (engine/cuda); null with the reason where the addon is not loaded. */
export function cudaProbe(driver: string[], cublasLt: string[], nvrtc: string[]): { result: CudaProbeResult | null; reason: string } {
  const r = loadNative();
  return r.active && addon ? { result: addon.probeCuda(driver, cublasLt, nvrtc), reason: '' } : { result: null, reason: r.reason };
}

/**
 * The whole file as a memory-mapped ArrayBuffer (copy-on-write; unmapped when collected), or null
 * where it cannot be mapped or the addon is not loaded: then read it.
 */
export function mapFile(file: string): ArrayBuffer | null {
  return loadNative().active && addon ? addon.mapFile(file) : null;
}

/** Unmap a mapFile buffer now; its views then read as empty. False where it was not one. */
export function unmapFile(buffer: ArrayBuffer): boolean {
  return loadNative().active && addon ? addon.unmapFile(buffer) : false;
}

/** A 16-bit weight widened to float32, in its stored layout. */
export function widenHalf(w: HalfWeight, out: Float32Array = new Float32Array(w.size)): Float32Array {
  loaded().widen(w.bits, w.size, w.code, out);
  return out;
}

/** c [m, n] = a [m, k] · op(B) for B float32 or 16-bit (the built-in kernel, whatever BLAS is in use). */
export function matmulWeight(a: Float32Array, m: number, k: number, b: Float32Array | HalfWeight, n: number, tb: boolean): Float32Array {
  const c = new Float32Array(m * n);
  if (isHalf(b)) loaded().matmulWeight(tb, m, n, k, a, b.bits, b.code, c);
  else loaded().matmulWeight(tb, m, n, k, a, b, DT_CODE.f32, c);
  return c;
}

export interface Shapes {
  batchShape: number[];
  m: number;
  n: number;
  k: number;
  /** Offsets (in matrices) of A and B for each output batch entry, by numpy broadcasting. */
  pairs: [number, number][];
}

/** The product's shape and operand pairing; batch dimensions broadcast like numpy's. */
export function shapesOf(a: number[], b: number[], ta: boolean, tb: boolean): Shapes | null {
  const m = ta ? a[a.length - 1] : a[a.length - 2];
  const k = ta ? a[a.length - 2] : a[a.length - 1];
  const n = tb ? b[b.length - 2] : b[b.length - 1];
  const rank = Math.max(a.length, b.length) - 2;
  const pad = (s: number[]) => [...new Array(rank - (s.length - 2)).fill(1), ...s.slice(0, -2)];
  const ba = pad(a);
  const bb = pad(b);
  const batchShape: number[] = [];
  for (let i = 0; i < rank; i++) {
    if (ba[i] !== bb[i] && ba[i] !== 1 && bb[i] !== 1) return null;
    batchShape.push(Math.max(ba[i], bb[i]));
  }
  const total = batchShape.reduce((x, y) => x * y, 1);
  const pairs: [number, number][] = [];
  for (let o = 0; o < total; o++) {
    let rest = o;
    let ia = 0;
    let ib = 0;
    let sa = 1;
    let sb = 1;
    for (let i = rank - 1; i >= 0; i--) {
      const idx = rest % batchShape[i];
      rest = Math.floor(rest / batchShape[i]);
      ia += (ba[i] === 1 ? 0 : idx) * sa;
      ib += (bb[i] === 1 ? 0 : idx) * sb;
      sa *= ba[i];
      sb *= bb[i];
    }
    pairs.push([ia, ib]);
  }
  return { batchShape, m, n, k, pairs };
}

/**
 * When the pairs' offsets advance evenly (by 0 or 1 matrix each), the steps of A and B: then the
 * whole batch is one strided call. Null otherwise.
 */
export function evenSteps(pairs: [number, number][]): [number, number] | null {
  const even = (j: 0 | 1) => {
    const d = pairs.length > 1 ? pairs[1][j] - pairs[0][j] : 0;
    return (d === 0 || d === 1) && pairs.every((p, i) => p[j] === pairs[0][j] + i * d) ? d : -1;
  };
  const da = even(0);
  const db = even(1);
  return da >= 0 && db >= 0 ? [da, db] : null;
}

/** Run the pairs as few kernel calls as possible: one when the offsets advance evenly. */
function runPairs(s: Shapes, ta: boolean, tb: boolean, A: Float32Array, B: Float32Array, C: Float32Array, useBlas: boolean): void {
  const { m, n, k, pairs } = s;
  const steps = evenSteps(pairs);
  if (steps) {
    const [da, db] = steps;
    addon!.matmul(ta, tb, pairs.length, m, n, k, A.subarray(pairs[0][0] * m * k), da * m * k, B.subarray(pairs[0][1] * k * n), db * k * n, C, useBlas);
    return;
  }
  pairs.forEach(([ia, ib], o) => addon!.matmul(ta, tb, 1, m, n, k, A.subarray(ia * m * k, (ia + 1) * m * k), 0, B.subarray(ib * k * n, (ib + 1) * k * n), 0, C.subarray(o * m * n, (o + 1) * m * n), useBlas));
}

/**
 * Register the native BatchMatMul for `backend` ('wasm', 'cpu' or 'native'), keeping tfjs's own kernel
 * for what it does not cover (non-float32 inputs, shapes that do not broadcast). Two-sided
 * batch broadcasts ([2,1,…] against [1,3,…]) come out right here, unlike tfjs 4.22's kernels.
 */
export function registerNativeKernels(backend: string): NativeReport {
  const r = loadNative();
  if (!r.active || registered.has(backend) || (backend !== 'wasm' && backend !== 'cpu' && backend !== NATIVE_BACKEND)) return r;
  const useBlas = r.kernel === 'blas';
  const matmul = (args: any, original: tf.KernelFunc) => {
    const { inputs, backend: be, attrs } = args;
    const { a, b } = inputs;
    const ta = !!attrs.transposeA;
    const tb = !!attrs.transposeB;
    const s = a.dtype === 'float32' && b.dtype === 'float32' ? shapesOf(a.shape, b.shape, ta, tb) : null;
    if (!s) return original(args);
    return runInPlace(backend, be, [a, b], [[...s.batchShape, s.m, s.n]], ([A, B], [C]) => {
      if (C.length) runPairs(s, ta, tb, A, B, C, useBlas);
    })[0];
  };
  if (!overrideKernel('BatchMatMul', backend, matmul)) return r;
  registerFusedKernels(backend, addon!);
  registered.add(backend);
  return r;
}
