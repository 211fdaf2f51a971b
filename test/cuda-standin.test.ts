import { describe, expect, it } from 'vitest';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { spawnSync } from 'node:child_process';
import { cudaAddon, loadNative } from '../src/engine/native.js';
import { cudaReport } from '../src/engine/cuda.js';
import { initBackend } from '../src/engine/backend.js';
import { onlineFixture } from './helpers/online-fixture.js';
import { prefopt } from './helpers/cli.js';
import { cudaBackendCases } from './helpers/cuda-cases.js';
import { buildCudaStandIns } from './helpers/cuda-standins.js';

/*
 * The cuda backend's GPU code path (native/cuda_device.cc's Gpu: driver API, NVRTC, cuBLASLt)
 * over stand-in libraries (test/helpers/cuda-standins.ts): what a GPU machine would run, short of
 * the GPU. Products in exact float32 here (PREFOPT_CUDA_TF32=0) for the shared cases.
 */
const native = loadNative();
const libs = native.active && !fs.existsSync('/proc/driver/nvidia/version') ? buildCudaStandIns() : null;
if (libs) {
  process.env.PREFOPT_CUDA_LIBS = libs;
  process.env.PREFOPT_CUDA_TF32 = '0';
  process.env.PREFOPT_CUDA_CACHE = fs.mkdtempSync(path.join(os.tmpdir(), 'prefopt-kcache-')); // not the user's
  delete process.env.PREFOPT_CUDA_DEVICE;
}

describe('the cuda backend over stand-in CUDA libraries', () => {
  it('the probe finds them and the backend opens the device: NVRTC compiles kernels.cu for its sm_90, the module has every kernel', async () => {
    if (!libs) return;
    const r = cudaReport();
    expect(r.state).toBe('available');
    expect(cudaReport()).toBe(r); // probed once per process and search path
    expect(r.driver?.path).toBe(path.join(libs, 'libcuda.so.1'));
    const b = await initBackend('cuda');
    expect(b.chosen).toBe('cuda');
    expect(cudaAddon()!.cudaOpen('gpu').name).toBe('Stand-in GPU (sm_90)');
  });

  if (libs) cudaBackendCases();
});

describe('TF32 products from the command line', () => {
  it('eval-dpo on the stand-in GPU: exact float32 products give the native backend\'s metrics; TF32 ones (the default) differ, within TF32\'s rounding', async () => {
    if (!libs) return;
    const f = await onlineFixture();
    const data = path.join(f.d, 'pairs.jsonl');
    fs.writeFileSync(data, Array.from({ length: 6 }, (_, i) => JSON.stringify({ prompt: `What is ${i} plus 2?`, chosen: `The answer is ${i + 2}.`, rejected: `The answer is ${i}.` })).join('\n') + '\n');
    const metrics = (backend: string, tf32: string) => {
      const r = prefopt(['--quiet', '--backend', backend, 'eval-dpo', '--model', f.base, '--data', data], { env: { PREFOPT_CUDA_LIBS: libs, PREFOPT_CUDA_TF32: tf32 } });
      expect(r.code, r.stderr).toBe(0);
      return JSON.parse(r.stdout);
    };
    const n = metrics('native', '0');
    const exact = metrics('cuda', '0');
    const tf32 = metrics('cuda', '');
    for (const k of ['logps/chosen', 'logps/rejected']) {
      expect(Math.abs(exact[k] - n[k]), k).toBeLessThanOrEqual(1e-4 * Math.abs(n[k]));
      expect(Math.abs(tf32[k] - n[k]), k).toBeGreaterThan(1e-6 * Math.abs(n[k]));
      expect(Math.abs(tf32[k] - n[k]), k).toBeLessThanOrEqual(2e-2 * Math.abs(n[k]));
    }
  }, 300_000);
});

describe('GPU memory, checked before a job starts', () => {
  it('a dpo job over the device\'s free memory (the stand-in has 512 MiB) stops before loading, naming the need and the device\'s room; the host would hold it', async () => {
    if (!libs) return;
    const f = await onlineFixture();
    const data = path.join(f.d, 'pairs.jsonl');
    fs.writeFileSync(data, JSON.stringify({ prompt: 'What is 1 plus 2?', chosen: 'The answer is 3.', rejected: 'no' }) + '\n');
    const out = path.join(f.d, 'big');
    const args = ['dpo', '--model', f.base, '--data', data, '--out', out, '--max-steps', '1', '--batch-size', '256', '--max-length', '256', '--gradient-checkpointing', 'off'];
    const r = prefopt(['--backend', 'cuda', ...args], { env: { PREFOPT_CUDA_LIBS: libs } });
    expect(r.code).toBe(2);
    expect(r.stderr).toMatch(/dpo on .*base needs about [\d.]+ GiB \(weights .*\) of GPU memory, more than the 0\.50 GiB free on the device \(of 1\.00 GiB\)/);
    expect(fs.existsSync(out)).toBe(false);
    const host = prefopt(['--backend', 'native', ...args, '--max-steps', '0']);
    expect(host.stderr).not.toMatch(/needs about/);
    // doctor --model holds the jobs to the same budget
    const doc = prefopt(['--json', '--backend', 'cuda', 'doctor', '--model', f.base, '--batch-size', '256', '--max-length', '256'], { env: { PREFOPT_CUDA_LIBS: libs } });
    expect(doc.code, doc.stderr).toBe(0);
    const mem = JSON.parse(doc.stdout.trim().split('\n').at(-1)!).memory;
    expect(mem.limit).toBe(2 ** 29);
    expect(mem.limitSource).toBe('GPU memory free on the device (of 1.00 GiB)');
    expect(mem.jobs.find((j: any) => j.job.startsWith('lora dpo')).fits).toBe(false);
    expect(mem.jobs[0].parts.runtime).toBeUndefined(); // the host's runtime is not on the GPU
  }, 120_000);
});

describe("the GPU check's product cases (bench/cuda-check.ts gemm) over the stand-in cuBLASLt", () => {
  it('every case within tolerance: transposes, broadcast batches, bf16 and float32, alpha and beta, operands off a word boundary', () => {
    if (!libs) return;
    const env: Record<string, string> = { ...(process.env as Record<string, string>), PREFOPT_CUDA_LIBS: libs };
    delete env.PREFOPT_CUDA_DEVICE;
    const r = spawnSync(process.execPath, ['dist/bench/cuda-check.js', 'gemm', '--tiny'], { encoding: 'utf8', env });
    const cases = r.stdout.trim().split('\n').filter((l) => l.startsWith('{')).map((l) => JSON.parse(l));
    expect(r.status, r.stderr.slice(-1500) + r.stdout.slice(-1500)).toBe(0);
    expect(cases.length).toBe(14);
    expect(cases.every((c) => c.step === 'cuda_gemm' && c.ok)).toBe(true);
    // A bf16 operand 2 bytes into a word: cuBLASLt must be told so (it was told 4, and refused).
    expect(cases.some((c) => c.half && c.shift === 1)).toBe(true);
  }, 120_000);
});

describe('gradient checkpointing on a GPU', () => {
  it('auto checkpoints the layers only when the job would not fit the device without it (the host keeps its rule); on and off are taken as asked', async () => {
    if (!libs) return;
    // 16 layers of width 32: each layer's activations are 4.5 times the residual stream
    // checkpointing keeps, so at 32 pairs of 256 tokens the job fits the stand-in's 512 MiB only
    // with checkpointing, and at 8 pairs without it too.
    const f = await onlineFixture(16);
    const data = path.join(f.d, 'pairs.jsonl');
    fs.writeFileSync(data, JSON.stringify({ prompt: 'What is 1 plus 2?', chosen: 'The answer is 3.', rejected: 'no' }) + '\n');
    const run = (backend: string, pairs: number, mode: string) => {
      const out = path.join(fs.mkdtempSync(path.join(os.tmpdir(), 'ck-')), 'o');
      const r = prefopt(['--json', '--backend', backend, 'dpo', '--model', f.base, '--data', data, '--out', out, '--max-steps', '1', '--batch-size', String(pairs), '--max-length', '256', '--gradient-checkpointing', mode], { env: { PREFOPT_CUDA_LIBS: libs } });
      const events = r.stderr.split('\n').filter((l) => l.startsWith('{')).map((l) => JSON.parse(l));
      return { code: r.code, checkpointing: events.find((e) => e.event === 'train-start')?.gradient_checkpointing, stderr: r.stderr };
    };
    expect(run('cuda', 32, 'auto')).toMatchObject({ code: 0, checkpointing: 'on' });
    const off = run('cuda', 32, 'off');
    expect(off.code).toBe(2);
    expect(off.stderr).toMatch(/of GPU memory, more than the 0\.50 GiB free on the device/);
    expect(run('cuda', 8, 'auto')).toMatchObject({ code: 0, checkpointing: 'off' });
    expect(run('cuda', 8, 'on')).toMatchObject({ code: 0, checkpointing: 'on' });
    // The host: auto is on from 100M parameters, so off for this model whatever the batch.
    expect(run('native', 32, 'auto')).toMatchObject({ code: 0, checkpointing: 'off' });
  }, 300_000);
});

describe('compiled kernels kept between processes', () => {
  it('the second process loads the cached CUBIN instead of compiling; a damaged file is rebuilt; an empty PREFOPT_CUDA_CACHE keeps none', () => {
    if (!libs) return;
    const cache = fs.mkdtempSync(path.join(os.tmpdir(), 'prefopt-kcache-'));
    const log = path.join(os.tmpdir(), `prefopt-nvrtc-${process.pid}.log`);
    fs.rmSync(log, { force: true });
    const open = (dir: string) => {
      const r = prefopt(['--backend', 'cuda', 'doctor'], { env: { PREFOPT_CUDA_LIBS: libs, PREFOPT_CUDA_CACHE: dir, STANDIN_NVRTC_LOG: log } });
      expect(r.code, r.stderr).toBe(0);
      return fs.existsSync(log) ? fs.readFileSync(log, 'utf8').split('\n').filter(Boolean).length : 0;
    };
    expect(open(cache)).toBe(1);
    const files = fs.readdirSync(cache).filter((f) => /^kernels-[0-9a-f]{16}\.cubin$/.test(f));
    expect(files.length).toBe(1);
    expect(open(cache)).toBe(1); // loaded, not compiled
    fs.writeFileSync(path.join(cache, files[0]), 'damaged');
    expect(open(cache)).toBe(2);
    expect(fs.readFileSync(path.join(cache, files[0]), 'utf8')).toMatch(/^STANDIN-CUBIN sm_90\n/);
    expect(open('')).toBe(3);
    expect(open('')).toBe(4);
    // doctor names the place
    const r = prefopt(['--json', 'doctor'], { env: { PREFOPT_CUDA_LIBS: libs, PREFOPT_CUDA_CACHE: cache } });
    expect(JSON.parse(r.stdout.trim().split('\n').at(-1)!).cuda.kernel_cache).toBe(cache);
  });
});
