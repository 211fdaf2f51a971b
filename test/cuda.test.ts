import { describe, expect, it } from 'vitest';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { spawnSync } from 'node:child_process';
import { prefopt } from './helpers/cli.js';
import { cudaAddon, loadNative } from '../src/engine/native.js';
import { candidates, cudaReportOf, cudaSearchDirs } from '../src/engine/cuda.js';

/*
 * Where the CUDA backend stands (engine/cuda, native/cuda_probe.cc). On a machine without a GPU
 * the libraries are stand-ins compiled here: shared objects with the CUDA entry points the probe
 * calls, so the probe's opening, symbol lookup and calls run for real.
 */
const native = loadNative();
const hasCompiler = spawnSync('cc', ['--version']).status === 0;

function sharedLib(dir: string, name: string, source: string): void {
  const c = path.join(dir, `${name}.c`);
  fs.writeFileSync(c, source);
  const r = spawnSync('cc', ['-shared', '-fPIC', '-o', path.join(dir, name), c], { encoding: 'utf8' });
  if (r.status !== 0) throw new Error(r.stderr);
}

const driver = (initResult: number) => `
#include <string.h>
#include <stddef.h>
int cuInit(unsigned f) { return ${initResult}; }
int cuDriverGetVersion(int* v) { *v = 13000; return 0; }
int cuDeviceGetCount(int* n) { *n = 1; return 0; }
int cuDeviceGet(int* d, int i) { *d = i; return 0; }
int cuDeviceGetName(char* s, int n, int d) { strncpy(s, "Stand-in H100", n); return 0; }
int cuDeviceGetAttribute(int* v, int a, int d) { *v = a == 75 ? 9 : 0; return 0; }
int cuDeviceTotalMem_v2(size_t* b, int d) { *b = (size_t)80 << 30; return 0; }
int cuGetErrorString(int e, const char** s) { *s = e == 100 ? "no CUDA-capable device is detected" : "unknown error"; return 0; }
`;
const CUBLASLT = '#include <stddef.h>\nsize_t cublasLtGetVersion(void) { return 130100; }\n';
const NVRTC = 'int nvrtcVersion(int* a, int* b) { *a = 13; *b = 0; return 0; }\n';

const doctor = (libs: string) => {
  const r = prefopt(['--json', 'doctor'], { env: { PREFOPT_CUDA_LIBS: libs } });
  expect(r.code, r.stderr).toBe(0);
  return JSON.parse(r.stdout.trim().split('\n').at(-1)!).cuda;
};

describe('the CUDA backend\'s state', () => {
  it('doctor --json names it and the reason on this machine; --backend cuda stops with that reason', () => {
    const cuda = doctor('');
    expect(['unavailable', 'not implemented']).toContain(cuda.state);
    if (!fs.existsSync('/proc/driver/nvidia/version')) {
      expect(cuda.state).toBe('unavailable');
      expect(cuda.reason).toEqual(native.active ? 'not available: libcuda.so.1 not found (no NVIDIA driver)' : expect.stringMatching(/native addon is not loaded/));
    }
    const r = prefopt(['--backend', 'cuda', 'doctor']);
    expect(r.code).toBe(2);
    expect(r.stderr).toContain(`backend "cuda" is not usable here: ${cuda.reason}`);
  });

  it('opens stand-in libraries: a driver that sees no device, a file that is not a library, then everything found', () => {
    if (!native.active || !hasCompiler || fs.existsSync('/proc/driver/nvidia/version')) return;
    const noDevice = fs.mkdtempSync(path.join(os.tmpdir(), 'prefopt-cuda-'));
    sharedLib(noDevice, 'libcuda.so.1', driver(100));
    let cuda = doctor(noDevice);
    expect(cuda.reason).toBe(`not available: NVIDIA driver ${path.join(noDevice, 'libcuda.so.1')}: cuInit failed: no CUDA-capable device is detected`);
    expect(cuda.driver.version).toBe('13.0');

    const libs = fs.mkdtempSync(path.join(os.tmpdir(), 'prefopt-cuda-'));
    sharedLib(libs, 'libcuda.so.1', driver(0));
    cuda = doctor(libs);
    expect(cuda.reason).toMatch(new RegExp(`^not available: libcublasLt\\.so\\.13 or libcublasLt\\.so\\.12 not found \\(searched ${libs}`));
    sharedLib(libs, 'libcublasLt.so.13', CUBLASLT);
    fs.writeFileSync(path.join(libs, 'libnvrtc.so.13'), 'not a shared object');
    cuda = doctor(libs);
    expect(cuda.reason).toMatch(new RegExp(`^not available: ${path.join(libs, 'libnvrtc.so.13')}: .*(invalid ELF header|file too short)`));
    sharedLib(libs, 'libnvrtc.so.13', NVRTC);
    cuda = doctor(libs);
    expect(cuda.state).toBe('available');
    expect(cuda.devices).toEqual([{ name: 'Stand-in H100', compute_capability: '9.0', memory_gb: 80 }]);
    expect(cuda.cublasLt).toEqual({ path: path.join(libs, 'libcublasLt.so.13'), version: '13.1.0', error: null });
    expect(cuda.reason).toBe("driver 13.0 with Stand-in H100 (sm_90, 80 GiB); cuBLASLt 13.1.0 and NVRTC 13.0 found — `--backend cuda` runs on it (not yet checked on a GPU by prefopt's tests, so never chosen on its own)");
    // Opening the device needs more of each library than the probe: the first entry point the
    // stand-in driver lacks is named, and nothing runs.
    const r = prefopt(['--backend', 'cuda', 'doctor'], { env: { PREFOPT_CUDA_LIBS: libs } });
    expect(r.code).toBe(2);
    expect(r.stderr).toContain('backend "cuda" is not usable here (cuda: has no cuDevicePrimaryCtxRetain)');
  });

  it('searches PREFOPT_CUDA_LIBS, the toolkit and Python\'s nvidia packages; files before sonames', () => {
    const home = fs.mkdtempSync(path.join(os.tmpdir(), 'prefopt-cuda-'));
    const wheel = path.join(home, 'venv', 'lib', 'python3.12', 'site-packages', 'nvidia', 'cublas', 'lib');
    const toolkit = path.join(home, 'cuda', 'lib64');
    const own = path.join(home, 'own');
    for (const d of [wheel, toolkit, own]) fs.mkdirSync(d, { recursive: true });
    const dirs = cudaSearchDirs({ PREFOPT_CUDA_LIBS: `${own}:${path.join(home, 'missing')}`, CUDA_HOME: path.join(home, 'cuda'), VIRTUAL_ENV: path.join(home, 'venv') });
    expect(dirs.slice(0, 2)).toEqual([own, toolkit]);
    expect(dirs).toContain(wheel);
    expect(dirs).not.toContain(path.join(home, 'missing'));
    fs.writeFileSync(path.join(wheel, 'libcublasLt.so.12'), '');
    expect(candidates(['libcublasLt.so.13', 'libcublasLt.so.12'], dirs)).toEqual([path.join(wheel, 'libcublasLt.so.12'), 'libcublasLt.so.13', 'libcublasLt.so.12']);
    // A virtual environment that is not active but whose python3 is on PATH (PyTorch's, say).
    const torchEnv = path.join(home, 'torch-env');
    const torchWheel = path.join(torchEnv, 'lib', 'python3.12', 'site-packages', 'nvidia', 'cu13', 'lib');
    fs.mkdirSync(torchWheel, { recursive: true });
    fs.mkdirSync(path.join(torchEnv, 'bin'));
    fs.writeFileSync(path.join(torchEnv, 'bin', 'python3'), '');
    expect(cudaSearchDirs({ PATH: `/nonexistent:${path.join(torchEnv, 'bin')}` })).toContain(torchWheel);
    expect(cudaSearchDirs({ PATH: '/nonexistent' })).not.toContain(torchWheel);
    expect(cudaReportOf(null, dirs, 'turned off by PREFOPT_NATIVE=0').reason).toBe('not available: the native addon is not loaded (turned off by PREFOPT_NATIVE=0); it is what opens the CUDA libraries');
  });

  it('the kernel sources compile with nvcc (sm_80, sm_90) as NVRTC input, and the device check builds and runs where a GPU is', () => {
    const nvcc = ['/usr/local/cuda/bin/nvcc', 'nvcc'].find((c) => spawnSync(c, ['--version']).status === 0);
    if (!nvcc) return; // no CUDA toolkit: nothing to compile with
    const src = fs.readFileSync('native/cuda/kernels.cu', 'utf8');
    expect(src).not.toMatch(/^\s*#\s*include/m); // NVRTC gets the file alone
    const d = fs.mkdtempSync(path.join(os.tmpdir(), 'prefopt-nvcc-'));
    const names = [...src.matchAll(/__global__ void (\w+)\(/g)].map((m) => m[1]);
    // Every kernel is in the addon's launch table (native/cuda_emulated.cc), which is how the
    // backend reaches it, and the table names nothing else.
    if (native.active) expect([...names].sort()).toEqual(Object.keys(cudaAddon()!.cudaKernels()).sort());
    // How the host sizes attention's grids, from kernels.cu's own rule: a row in 1, 2, 4 or 8
    // threads of at most 32 dimensions each, so a block of 128 threads covers 128 / P rows.
    if (native.active) {
      const rowsOf = (hd: number) => cudaAddon()!.cudaAttentionRows(hd, 128);
      expect([12, 32, 33, 64, 80, 128, 129, 256, 257, 512].map(rowsOf)).toEqual([128, 128, 64, 64, 32, 32, 16, 16, 0, 0]);
    }
    expect(names.length).toBe(40);
    for (const arch of ['sm_80', 'sm_90']) {
      const cubin = path.join(d, `${arch}.cubin`);
      const r = spawnSync(nvcc, ['--cubin', `-arch=${arch}`, '--fmad=false', '-o', cubin, 'native/cuda/kernels.cu'], { encoding: 'utf8' });
      expect(r.status, r.stderr).toBe(0);
      // extern "C": the names cuModuleGetFunction will look up, unmangled.
      const bin = fs.readFileSync(cubin).toString('latin1');
      for (const n of names) expect(bin.includes(`.text.${n}\0`) || bin.includes(`${n}\0`), n).toBe(true);
    }
    const exe = path.join(d, 'check');
    const build = spawnSync(nvcc, ['-O2', '--fmad=false', '-arch=sm_90', '-Xcompiler', '-ffp-contract=off', '-o', exe, 'native/cuda/check.cu'], { encoding: 'utf8' });
    expect(build.status, build.stderr).toBe(0);
    const run = spawnSync(exe, [], { encoding: 'utf8' });
    if (fs.existsSync('/proc/driver/nvidia/version')) expect(run.status, run.stdout).toBe(0);
    else {
      expect(run.status).toBe(2);
      expect(run.stdout).toMatch(/^\{"error":"no CUDA device: /);
    }
  }, 300_000);

  it('the device kernels, run on the CPU with a block\'s threads as coroutines, match float64 (and the CPU kernels\' bits for rope, AdamW, widening)', () => {
    if (!hasCompiler) return;
    const exe = path.join(fs.mkdtempSync(path.join(os.tmpdir(), 'prefopt-emu-')), 'check');
    const build = spawnSync('c++', ['-std=c++20', '-O2', '-ffp-contract=off', '-pthread', '-x', 'c++', '-DPREFOPT_CUDA_EMULATE', '-o', exe, 'native/cuda/check.cu'], { encoding: 'utf8' });
    expect(build.status, build.stderr).toBe(0);
    const run = spawnSync(exe, [], { encoding: 'utf8' });
    const lines = run.stdout.trim().split('\n').map((l) => JSON.parse(l));
    const checked = lines.filter((l) => 'ok' in l);
    expect(checked.map((l) => l.kernel)).toEqual(['widen(bf16)', 'widen(f16)', 'rms_norm', 'rms_norm_grad_x', 'rms_norm_grad_w', 'swiglu', 'swiglu_grad(g)', 'swiglu_grad(u)', 'rope', 'rope(inverse)', 'label_logprobs', 'label_logprobs_grad', 'softmax_rows', 'softmax_grad_rows', 'sample_exps', 'sample_draw', 'sample_kept', ...[64, 12, 80, 256].flatMap((hd) => ['attention_fwd', 'attention_bwd(dq)', 'attention_bwd(dk)', 'attention_bwd(dv)'].map((k) => `${k}(hd ${hd})`)), 'alea_bits', 'adamw(1 tensor)', 'adamw(3 tensors)']);
    for (const l of checked) expect(l.ok, JSON.stringify(l)).toBe(true);
    for (const k of ['rope', 'adamw(1 tensor)', 'adamw(3 tensors)', 'widen(f16)', 'sample_exps', 'sample_draw', 'sample_kept']) expect(checked.find((l) => l.kernel === k).cpu_bits_equal).toBe(true);
    expect(run.status).toBe(0);
    // Attention passes over the tiles a causal mask hides (kernels.cu: tile_masked); built to
    // compute every tile, it must give the same bits.
    const every = path.join(path.dirname(exe), 'check-every-tile');
    expect(spawnSync('c++', ['-std=c++20', '-O2', '-ffp-contract=off', '-pthread', '-x', 'c++', '-DPREFOPT_CUDA_EMULATE', '-DPREFOPT_ATTN_NO_SKIP', '-o', every, 'native/cuda/check.cu']).status).toBe(0);
    const all = spawnSync(every, [], { encoding: 'utf8' }).stdout.trim().split('\n').map((l) => JSON.parse(l)).filter((l) => String(l.kernel).startsWith('attention'));
    expect(all.length).toBe(16);
    for (const l of all) expect(checked.find((c) => c.kernel === l.kernel).bits, l.kernel).toBe(l.bits);
  }, 120_000);
});
