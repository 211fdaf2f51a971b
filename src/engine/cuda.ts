import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { cudaProbe, CudaLib, CudaProbeResult } from './native.js';

/**
 * Where a CUDA backend stands on this machine (docs/REFERENCE.md §11), for `prefopt doctor` and
 * `--backend cuda`. It needs the NVIDIA driver (libcuda), cuBLASLt for the products and NVRTC to
 * compile its kernels at run time — not nvcc — from a CUDA install or the `nvidia-*` wheels a
 * PyTorch install brings. Each is found by opening it (native/cuda_probe.cc), so a file that is
 * there but cannot load is reported with the loader's reason. With everything found the backend
 * is available by request (`--backend cuda`); it is not chosen on its own until it has been
 * checked on a GPU (bench/gpu-check.sh). PREFOPT_CUDA_DEVICE=emulate runs it on the host.
 */
export type CudaState = 'unavailable' | 'available' | 'emulated';

/**
 * PREFOPT_CUDA_DEVICE=emulate: the backend's device emulated on the host (tests, no GPU needed);
 * =dry: the same device with its kernels and products not run — a step's host side alone
 * (bench/cuda-check.ts's host floor); null: the GPU.
 */
export function cudaEmulation(env: NodeJS.ProcessEnv = process.env): 'emulate' | 'dry' | null {
  const v = (env.PREFOPT_CUDA_DEVICE ?? '').toLowerCase();
  return v === 'emulate' || v === 'dry' ? v : null;
}

export const cudaEmulated = (env: NodeJS.ProcessEnv = process.env): boolean => cudaEmulation(env) !== null;

export interface CudaReport {
  state: CudaState;
  /** One line: what is missing, or what was found. */
  reason: string;
  driver: CudaLib | null;
  devices: { name: string; compute_capability: string; memory_gb: number }[];
  cublasLt: CudaLib | null;
  nvrtc: CudaLib | null;
  /** Directories searched before the loader's own path (ld.so.cache, LD_LIBRARY_PATH). */
  searched: string[];
  /** Where NVRTC's build of native/cuda/kernels.cu is kept between processes ('' : nowhere). */
  kernel_cache: string;
}

/** PREFOPT_CUDA_CACHE, else ~/.cache/prefopt (XDG_CACHE_HOME's when set); '' when set empty. */
export function kernelCachePath(env: NodeJS.ProcessEnv = process.env): string {
  return env.PREFOPT_CUDA_CACHE ?? path.join(env.XDG_CACHE_HOME || path.join(os.homedir(), '.cache'), 'prefopt');
}

/** Sonames, newest CUDA first: 13 (the H100/H200 machines' toolkit), then 12. */
export const CUDA_LIBS = {
  driver: ['libcuda.so.1'],
  cublasLt: ['libcublasLt.so.13', 'libcublasLt.so.12'],
  nvrtc: ['libnvrtc.so.13', 'libnvrtc.so.12'],
};

const glob1 = (dir: string, re: RegExp): string[] => {
  try {
    return fs.readdirSync(dir).filter((n) => re.test(n)).map((n) => path.join(dir, n));
  } catch {
    return [];
  }
};

/**
 * Where CUDA libraries live besides the loader's path: PREFOPT_CUDA_LIBS (':'-separated), the
 * toolkit (CUDA_HOME, CUDA_PATH, /usr/local/cuda), and the lib folders of Python's `nvidia`
 * packages (site-packages/nvidia/{cublas,cuda_nvrtc,cu13,…}/lib) in the system's, the user's, an
 * active virtual environment's and the PATH's python3's environment.
 */
export function cudaSearchDirs(env: NodeJS.ProcessEnv = process.env): string[] {
  const dirs = (env.PREFOPT_CUDA_LIBS ?? '').split(path.delimiter).filter(Boolean);
  for (const root of [env.CUDA_HOME, env.CUDA_PATH, '/usr/local/cuda'].filter(Boolean) as string[]) dirs.push(path.join(root, 'lib64'), path.join(root, 'targets', 'x86_64-linux', 'lib'));
  // The environment of the python3 on PATH too (PyTorch's virtual environment, active or not).
  const pathPython = (env.PATH ?? '').split(path.delimiter).filter((d) => d && fs.existsSync(path.join(d, 'python3'))).map((d) => path.join(path.dirname(d), 'lib'));
  const libRoots = ['/usr/lib', '/usr/local/lib', path.join(os.homedir(), '.local', 'lib'), ...(env.VIRTUAL_ENV ? [path.join(env.VIRTUAL_ENV, 'lib')] : []), ...pathPython];
  for (const lib of libRoots)
    for (const py of glob1(lib, /^python3(\.\d+)?$/))
      for (const pkgs of ['site-packages', 'dist-packages'])
        for (const pkg of glob1(path.join(py, pkgs, 'nvidia'), /^[\w.-]+$/)) dirs.push(path.join(pkg, 'lib'));
  return [...new Set(dirs)].filter((d) => fs.existsSync(d));
}

/** Candidates for one library: each name in each directory where the file exists, then the bare names. */
export function candidates(names: string[], dirs: string[]): string[] {
  return [...dirs.flatMap((d) => names.map((n) => path.join(d, n)).filter((f) => fs.existsSync(f))), ...names];
}

// A file that failed to load is named by the loader's own message; one that loaded but is
// unusable (a missing entry point) is named here.
const what = (lib: CudaLib, names: string[]) => (lib.error === 'not found' ? `${names.join(' or ')} not found` : lib.path ? `${lib.path}: ${lib.error}` : lib.error);

/** The report from a probe's result (pure: the tests feed it results). */
export function cudaReportOf(p: CudaProbeResult | null, searched: string[], addonReason = ''): CudaReport {
  const base = { searched, driver: p?.driver ?? null, cublasLt: p?.cublasLt ?? null, nvrtc: p?.nvrtc ?? null, kernel_cache: kernelCachePath() };
  const devices = (p?.devices ?? []).map((d) => ({ name: d.name, compute_capability: `${d.major}.${d.minor}`, memory_gb: +(d.memory / 2 ** 30).toFixed(1) }));
  const unavailable = (why: string): CudaReport => ({ state: 'unavailable', reason: `not available: ${why}`, devices, ...base });
  if (!p) return unavailable(`the native addon is not loaded (${addonReason}); it is what opens the CUDA libraries`);
  if (p.driver.error) return unavailable(p.driver.error === 'not found' ? 'libcuda.so.1 not found (no NVIDIA driver)' : `NVIDIA driver ${what(p.driver, CUDA_LIBS.driver)}`);
  const where = searched.length ? `searched ${searched.join(', ')} and the loader's path` : "searched the loader's path; PREFOPT_CUDA_LIBS adds directories";
  if (p.cublasLt.error) return unavailable(`${what(p.cublasLt, CUDA_LIBS.cublasLt)} (${where})`);
  if (p.nvrtc.error) return unavailable(`${what(p.nvrtc, CUDA_LIBS.nvrtc)} (${where})`);
  const gpus = devices.map((d) => `${d.name} (sm_${d.compute_capability.replace('.', '')}, ${d.memory_gb} GiB)`).join(', ');
  return {
    state: 'available',
    reason: `driver ${p.driver.version} with ${gpus}; cuBLASLt ${p.cublasLt.version} and NVRTC ${p.nvrtc.version} found — \`--backend cuda\` runs on it (not yet checked on a GPU by prefopt's tests, so never chosen on its own)`,
    devices,
    ...base,
  };
}

export function cudaReport(): CudaReport {
  const emulation = cudaEmulation();
  const emulatedHow = {
    emulate: "PREFOPT_CUDA_DEVICE=emulate: the CUDA backend runs on the host (kernels.cu compiled for the CPU, the addon's GEMM)",
    dry: "PREFOPT_CUDA_DEVICE=dry: the CUDA backend on the host with its kernels and products not run (results meaningless; what it times is the host's own work)",
  };
  if (emulation) return { state: 'emulated', reason: emulatedHow[emulation], driver: null, devices: [], cublasLt: null, nvrtc: null, searched: [], kernel_cache: '' };
  const dirs = cudaSearchDirs();
  // Probing opens the libraries (cuBLASLt alone is hundreds of MB): once per process and search
  // path, though choosing the backend and opening it both ask.
  const key = dirs.join('\0');
  let report = probed.get(key);
  if (!report) {
    const probe = cudaProbe(candidates(CUDA_LIBS.driver, dirs), candidates(CUDA_LIBS.cublasLt, dirs), candidates(CUDA_LIBS.nvrtc, dirs));
    report = cudaReportOf(probe.result, dirs, probe.reason);
    probed.set(key, report);
  }
  return report;
}

const probed = new Map<string, CudaReport>();
