import * as fs from 'node:fs';
import * as path from 'node:path';
import { packageRoot } from '../util/package-root.js';
import { CudaAddon, ProfileTiming, cudaAddon } from './native.js';
import { cudaEmulation, kernelCachePath } from './cuda.js';
import { envOff } from '../util/env.js';

/**
 * The `cuda` backend's device (native/cuda_device.cc, docs/REFERENCE.md §11): a GPU through the
 * driver API, NVRTC and cuBLASLt, or the host emulation of the same device that the tests run
 * (PREFOPT_CUDA_DEVICE=emulate). Addresses are numbers; launches name a kernel of
 * native/cuda/kernels.cu and pass its arguments in order, checked against its parameter types.
 */
export class CudaDevice {
  readonly name: string;
  private readonly maxGrid: number;

  constructor(readonly addon: CudaAddon, opened: { name: string; maxGrid: number }, readonly emulated: boolean) {
    this.name = opened.name;
    this.maxGrid = opened.maxGrid;
  }

  alloc(bytes: number): number {
    return this.addon.cudaAlloc(bytes);
  }

  free(addr: number): void {
    this.mirrors.delete(addr);
    const c = this.companions.get(addr);
    if (c !== undefined) {
      this.companions.delete(addr);
      this.addon.cudaFree(c);
    }
    this.addon.cudaFree(addr);
  }

  /** Memory that lives as long as the allocation at `owner` (see companion), by owner. */
  private readonly companions = new Map<number, number>();

  /**
   * `bytes` allocated for as long as `owner` is: what a kernel leaves beside its output for that
   * output's gradient (attention's row statistics), freed with it.
   */
  allocCompanion(owner: number, bytes: number): number {
    const addr = this.alloc(bytes);
    const old = this.companions.get(owner);
    if (old !== undefined) this.addon.cudaFree(old);
    this.companions.set(owner, addr);
    return addr;
  }

  /** The memory allocCompanion gave `owner`, if it is still allocated. */
  companion(owner: number): number | undefined {
    return this.companions.get(owner);
  }

  /**
   * Host copies of memory that nothing writes while it is allocated (the backend's int32 and bool
   * tensors made from host values: token ids, positions, gather indices), by address: reading one
   * back (the embedding gradient groups rows by id on the host) then costs no wait for the device.
   */
  private readonly mirrors = new Map<number, Uint8Array>();

  /** src's bytes to addr; `immutable`: nothing will write there until it is freed, so reads are answered from a host copy. */
  upload(addr: number, src: ArrayBufferView, immutable = false): void {
    if (!src.byteLength) return;
    this.addon.cudaUpload(addr, src);
    if (immutable) this.mirrors.set(addr, new Uint8Array(src.buffer, src.byteOffset, src.byteLength).slice());
  }

  download(addr: number, dst: ArrayBufferView): void {
    if (!dst.byteLength) return;
    const m = this.mirrors.get(addr);
    if (m && m.byteLength === dst.byteLength) new Uint8Array(dst.buffer, dst.byteOffset, dst.byteLength).set(m);
    else this.addon.cudaDownload(addr, dst);
  }

  copy(dst: number, src: number, bytes: number): void {
    if (bytes) this.addon.cudaCopy(dst, src, bytes);
  }

  /** A kernel with one block per row (block: a power of two, 32 to 1024). */
  rows(kernel: string, rows: number, args: (number | number[])[], block = 256): void {
    if (rows > 0) this.addon.cudaLaunch(kernel, rows, block, args);
  }

  /** A grid-stride kernel over n items. */
  each(kernel: string, n: number, args: (number | number[])[], block = 256): void {
    if (n > 0) this.addon.cudaLaunch(kernel, Math.max(1, Math.min(Math.ceil(n / block), this.maxGrid)), block, args);
  }

  /** A kernel with one warp per row (blocks of `block` threads, a multiple of 32). */
  warps(kernel: string, rows: number, args: (number | number[])[], block = 128): void {
    if (rows > 0) this.addon.cudaLaunch(kernel, Math.max(1, Math.min(Math.ceil(rows / (block / 32)), this.maxGrid)), block, args);
  }

  /** A kernel that takes `jobs` jobs a block at a time (as many blocks as there are jobs, up to the grid limit). */
  blocks(kernel: string, jobs: number, args: (number | number[])[], block = 128): void {
    if (jobs > 0) this.addon.cudaLaunch(kernel, Math.min(jobs, this.maxGrid), block, args);
  }

  /** One block (reductions to a single value). */
  single(kernel: string, args: (number | number[])[], block = 1024): void {
    this.addon.cudaLaunch(kernel, 1, block, args);
  }

  /**
   * c = alpha·op(a)·op(b) + beta·c, row-major, c float32; a and b float32, or both bf16 (half:
   * accumulated in float32); strides in elements (0: broadcast).
   */
  gemm(o: { ta?: boolean; tb?: boolean; batch?: number; m: number; n: number; k: number; a: number; b: number; c: number; sa?: number; sb?: number; sc?: number; alpha?: number; beta?: number; half?: boolean }): void {
    if (o.m === 0 || o.n === 0) return;
    if (o.k === 0) {
      if (!o.beta) this.fill(o.c, (o.batch ?? 1) * o.m * o.n, 0);
      return;
    }
    this.addon.cudaGemm([+!!o.ta, +!!o.tb, o.batch ?? 1, o.m, o.n, o.k, o.a, o.sa ?? 0, o.b, o.sb ?? 0, o.c, o.sc ?? o.m * o.n, o.alpha ?? 1, o.beta ?? 0, +!!o.half, +!!o.half]);
  }

  /** n 4-byte words set to the float value v (or, with asInt, the int32 v). */
  fill(addr: number, n: number, v: number, asInt = false): void {
    const w = new Uint32Array(asInt ? Int32Array.of(v).buffer : Float32Array.of(v).buffer)[0];
    this.each('fill32', n, [addr, n, w]);
  }

  /** Scratch memory for the length of f. */
  withTemp<T>(bytes: number[], f: (addrs: number[]) => T): T {
    const addrs = bytes.map((b) => this.alloc(b));
    try {
      return f(addrs);
    } finally {
      addrs.forEach((a) => this.free(a));
    }
  }

  /** What a job may use on the device: its free memory and the blocks prefopt keeps for reuse; null when emulated (host memory). */
  available(): { bytes: number; total: number } | null {
    if (this.emulated) return null;
    const s = this.stats();
    return { bytes: s.free + s.cached, total: s.total };
  }

  stats(resetPeak = false) {
    return this.addon.cudaStats(resetPeak);
  }

  trim(): void {
    this.addon.cudaTrim();
  }

  /** Host kernels' timings while profiling (the backend's onHost), else null. */
  hostProfile: Map<string, ProfileTiming> | null = null;

  /**
   * Time every device operation alone (synchronized before and after) and every host kernel;
   * profile(false) stops and returns what was timed, keyed by kernel, product shape, copy, or
   * "host <kernel>" — where a step's time goes, not its speed (nothing overlaps while profiling).
   */
  profile(on: boolean): Record<string, ProfileTiming> {
    const out = this.addon.cudaProfile(on);
    for (const [k, t] of this.hostProfile ?? []) out[`host ${k}`] = t;
    this.hostProfile = on ? new Map() : null;
    return out;
  }

  sync(): void {
    this.addon.cudaSync();
  }
}

/** kernels.cu's Dims (PREFOPT_MAX_RANK): a launch's shape, then two operands' strides, each padded to MAX_RANK. */
export const MAX_RANK = 6;
export const dims = (shape: number[], a: number[], b: number[]): number[] => {
  const pad = (v: number[]) => [...v, ...new Array(MAX_RANK - v.length).fill(0)];
  return [...pad(shape), ...pad(a), ...pad(b)];
};

let device: CudaDevice | null = null;

/** The device if the cuda backend opened one in this process. */
export function openedCudaDevice(): CudaDevice | null {
  return device;
}

/**
 * Open the device (once per process): the host emulation when PREFOPT_CUDA_DEVICE=emulate (or dry), else
 * the GPU with the libraries engine/cuda found. Throws with the reason it cannot.
 */
export function openCudaDevice(libs: { driver: string[]; cublasLt: string[]; nvrtc: string[] } | null): CudaDevice {
  if (device) return device;
  const addon = cudaAddon();
  if (!addon) throw new Error('the native addon is not loaded; it is what drives the CUDA device');
  const emulation = cudaEmulation();
  if (emulation) return (device = new CudaDevice(addon, addon.cudaOpen(emulation), true));
  if (!libs) throw new Error('no CUDA libraries');
  const source = fs.readFileSync(path.join(packageRoot(), 'native', 'cuda', 'kernels.cu'), 'utf8');
  // TF32 tensor-core products unless PREFOPT_CUDA_TF32=0 asks for exact float32 ones.
  return (device = new CudaDevice(addon, addon.cudaOpen('gpu', libs.driver, libs.cublasLt, libs.nvrtc, source, !envOff('PREFOPT_CUDA_TF32'), kernelCacheDir()), false));
}

/**
 * Where compiled kernels are kept between processes (NVRTC takes seconds per process):
 * PREFOPT_CUDA_CACHE, else ~/.cache/prefopt (XDG_CACHE_HOME's when set); '' (none) when it cannot
 * be made or PREFOPT_CUDA_CACHE is empty.
 */
export function kernelCacheDir(env: NodeJS.ProcessEnv = process.env): string {
  const dir = kernelCachePath(env);
  if (!dir) return '';
  try {
    fs.mkdirSync(dir, { recursive: true });
    return dir;
  } catch {
    return '';
  }
}
