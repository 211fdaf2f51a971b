import * as tf from '@tensorflow/tfjs-core';
import { createRequire } from 'node:module';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { pathToFileURL } from 'node:url';
import { UserError } from '../util/errors.js';
import { packageRoot } from '../util/package-root.js';
import { NativeReport, loadNative, nativeAllocator, registerNativeKernels } from './native.js';
import { NATIVE_BACKEND, registerNativeBackend } from './native-backend.js';
import { registerZeroCopyKernels } from './wasm.js';
import { cudaReport, cudaEmulated } from './cuda.js';
import { installGradients } from './gradients.js';
import { openCudaDevice } from './cuda-device.js';
import { CUDA_BACKEND, registerCudaBackend } from './cuda-backend.js';
import { registerCudaGlue } from './cuda-glue.js';
import { registerCudaFused } from './cuda-fused.js';
import { cudaAddon } from './native.js';

/**
 * Run-time backend choice. The native TensorFlow bindings are optional dependencies whose
 * install downloads libtensorflow; where that failed they are simply absent, so each candidate
 * is tried in order and the reason it was passed over is kept for `prefopt doctor`.
 */
export const BACKEND_ORDER = ['tensorflow-gpu', 'tensorflow', 'wasm', 'native', 'cpu'] as const;
/** cuda is chosen only by request: it has not yet been checked on a GPU (engine/cuda). */
export type BackendName = (typeof BACKEND_ORDER)[number] | 'cuda';

export interface BackendReport {
  chosen: BackendName;
  tfName: string;
  tried: { name: BackendName; ok: boolean; reason: string }[];
  warning?: string;
  requested?: string;
  /** The native matmul path (wasm and cpu backends only). */
  native: NativeReport;
}

const require = createRequire(import.meta.url);
let current: BackendReport | null = null;
let gradientsLoaded = false;

/**
 * tfjs-core's Node entry registers no gradients; scripts/bundle-gradients.mjs bundles tfjs's own
 * gradient definitions at build time (the @tensorflow/tfjs package would bring 140 MB for this).
 */
async function loadGradients(): Promise<void> {
  if (gradientsLoaded) return;
  const f = path.join(packageRoot(), 'vendor', 'tfjs-gradients.js');
  if (!fs.existsSync(f)) throw new UserError(`${f} is missing: run "npm run build"`);
  await import(pathToFileURL(f).href);
  installGradients();
  gradientsLoaded = true;
}

async function tryBackend(name: BackendName): Promise<string> {
  switch (name) {
    case 'tensorflow-gpu':
      // Registers the 'tensorflow' backend on top of CUDA when libtensorflow_gpu is present.
      await import('@tensorflow/tfjs-node-gpu' as string);
      if (!(await tf.setBackend('tensorflow'))) throw new Error('tensorflow backend failed to initialise');
      return 'tensorflow';
    case 'tensorflow':
      await import('@tensorflow/tfjs-node' as string);
      if (!(await tf.setBackend('tensorflow'))) throw new Error('tensorflow backend failed to initialise');
      return 'tensorflow';
    case 'wasm': {
      const wasm = await import('@tensorflow/tfjs-backend-wasm');
      const dir = path.join(path.dirname(require.resolve('@tensorflow/tfjs-backend-wasm/package.json')), 'dist') + path.sep;
      wasm.setWasmPaths(dir);
      if (!(await tf.setBackend('wasm'))) throw new Error('wasm backend failed to initialise');
      registerZeroCopyKernels();
      return 'wasm';
    }
    case 'native': {
      const mem = nativeAllocator();
      if (!mem) throw new Error(loadNative().reason);
      await import('@tensorflow/tfjs-backend-cpu'); // its kernels serve the glue ops
      registerNativeBackend(mem);
      if (!(await tf.setBackend(NATIVE_BACKEND))) throw new Error('native backend failed to initialise');
      return NATIVE_BACKEND;
    }
    case 'cpu':
      await import('@tensorflow/tfjs-backend-cpu');
      if (!(await tf.setBackend('cpu'))) throw new Error('cpu backend failed to initialise');
      return 'cpu';
    case 'cuda': {
      const r = cudaEmulated() ? null : cudaReport();
      const lib = (l: { path: string | null } | null) => (l?.path ? [l.path] : []);
      const dev = openCudaDevice(r && { driver: lib(r.driver), cublasLt: lib(r.cublasLt), nvrtc: lib(r.nvrtc) });
      await import('@tensorflow/tfjs-backend-cpu'); // its kernels serve what the device lacks, on the host
      registerCudaBackend(dev);
      registerCudaGlue();
      registerCudaFused(dev, (step, count, out) => cudaAddon()!.aleaJumps(step, count, out));
      if (!(await tf.setBackend(CUDA_BACKEND))) throw new Error('cuda backend failed to initialise');
      return CUDA_BACKEND;
    }
  }
}

function normalise(name: string): BackendName {
  const n = name.trim().toLowerCase();
  const alias: Record<string, BackendName> = {
    'node-gpu': 'tensorflow-gpu', gpu: 'tensorflow-gpu', 'tensorflow-gpu': 'tensorflow-gpu',
    node: 'tensorflow', tensorflow: 'tensorflow', wasm: 'wasm', native: 'native', cpu: 'cpu',
  };
  const b = alias[n];
  if (n === 'cuda') {
    const r = cudaEmulated() ? null : cudaReport();
    if (r && r.state === 'unavailable') throw new UserError(`backend "cuda" is not usable here: ${r.reason}`);
    return 'cuda';
  }
  if (!b) throw new UserError(`unknown backend "${name}": expected one of node-gpu, node, wasm, native, cpu, cuda`);
  return b;
}

/**
 * wasm keeps every tensor in one 32-bit heap (4 GiB at most, docs/REFERENCE.md §10). Past this
 * much float32 weight a training step no longer fits beside the weights, so a model that large
 * skips wasm for the native backend, whose tensors are the addon's memory (no ceiling), with the same kernels.
 */
export const WASM_WEIGHT_LIMIT = 2 ** 30;

/**
 * Select a backend: the explicit request (flag or PREFOPT_BACKEND) if given, which must work,
 * else the first that loads in BACKEND_ORDER — passing over wasm when `weightBytes` (the model
 * the command will load, float32) is over WASM_WEIGHT_LIMIT and the native kernels are built.
 * Idempotent within a process.
 */
export async function initBackend(requested?: string, weightBytes = 0): Promise<BackendReport> {
  await loadGradients();
  const req = requested ?? process.env.PREFOPT_BACKEND ?? undefined;
  if (current && (!req || normalise(req) === current.chosen)) return current;
  const order = req ? [normalise(req)] : [...BACKEND_ORDER];
  const tried: BackendReport['tried'] = [];
  if (!req && weightBytes > WASM_WEIGHT_LIMIT && loadNative().active) {
    order.splice(order.indexOf('wasm'), 1);
    tried.push({ name: 'wasm', ok: false, reason: `passed over: the model's ${(weightBytes / 2 ** 30).toFixed(1)} GiB of float32 weights leave too little of wasm's 4 GiB heap` });
  }
  for (const name of order) {
    try {
      const tfName = await tryBackend(name);
      const report: BackendReport = { chosen: name, tfName, tried: [...tried, { name, ok: true, reason: 'loaded' }], requested: req, native: registerNativeKernels(tfName) };
      if (name === 'cpu' && !report.native.active) report.warning = 'using the pure-JS cpu backend, about 25x slower than wasm';
      current = report;
      return report;
    } catch (e: any) {
      const reason = e?.code === 'ERR_MODULE_NOT_FOUND' || e?.code === 'MODULE_NOT_FOUND' ? 'not installed' : String(e?.message ?? e).split('\n')[0];
      tried.push({ name, ok: false, reason });
    }
  }
  const detail = tried.map((t) => `${t.name}: ${t.reason}`).join('; ');
  throw new UserError(req ? `backend "${req}" is not usable here (${detail})` : `no tfjs backend could be loaded (${detail})`);
}

/** The backend initBackend chose in this process, or null before it ran. */
export function currentBackend(): BackendName | null {
  return current?.chosen ?? null;
}

/**
 * Between jobs in one process (a recipe's stages): hand the native backend's pool of freed blocks
 * back to the system. Within a job the pool stays under the job's own peak of live tensors, but
 * after it that memory would sit beside the next job's model.
 */
export function releasePooledMemory(): void {
  if (current?.chosen === 'native') nativeAllocator()?.trimPool();
  if (current?.chosen === 'cuda') cudaAddon()?.cudaTrim();
}

export interface GpuReport {
  /** An NVIDIA kernel driver is loaded (its version), or null. */
  nvidia_driver: string | null;
  /** Whether @tensorflow/tfjs-node-gpu is installed, and whether it loaded in this process. */
  tfjs_node_gpu: 'not installed' | 'installed, not loaded' | 'loaded';
  /** What prefopt can run on a GPU here, in words. */
  status: string;
}

/**
 * Where GPU support stands, for `prefopt doctor`. The only GPU route tfjs offers on Node is
 * @tensorflow/tfjs-node-gpu, whose libtensorflow 2.9.1 is built for CUDA 11.2 / cuDNN 8.1 and
 * compute capability up to 8.0 (+PTX): it does not load against CUDA 12/13 and has no Hopper
 * kernels, and prefopt has never run it.
 */
export function gpuReport(b: BackendReport): GpuReport {
  let driver: string | null = null;
  try {
    const v = fs.readFileSync('/proc/driver/nvidia/version', 'utf8');
    driver = /Kernel Module\s+([\d.]+)/.exec(v)?.[1] ?? v.split('\n')[0].trim();
  } catch {
    driver = null;
  }
  let installed = false;
  try {
    require.resolve('@tensorflow/tfjs-node-gpu/package.json');
    installed = true;
  } catch {
    installed = false;
  }
  const loaded = b.chosen === 'tensorflow-gpu';
  const status = loaded
    ? 'tfjs-node-gpu loaded (libtensorflow 2.9.1: CUDA 11.2 / cuDNN 8.1); untested by prefopt, f32 only'
    : 'no GPU path: tfjs-node-gpu needs CUDA 11.2 + cuDNN 8.1 (it does not load on CUDA 12/13 and has no Hopper kernels) and is untested; ' +
      'prefopt\'s own CUDA backend: see "cuda". Training runs on the CPU.';
  return { nvidia_driver: driver, tfjs_node_gpu: loaded ? 'loaded' : installed ? 'installed, not loaded' : 'not installed', status };
}

