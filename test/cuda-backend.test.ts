import { describe, expect, it } from 'vitest';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { loadNative } from '../src/engine/native.js';
import { onlineFixture } from './helpers/online-fixture.js';
import { prefopt } from './helpers/cli.js';
import { cudaBackendCases } from './helpers/cuda-cases.js';

/*
 * The cuda backend on its emulated device: the same host code that drives a GPU — allocation,
 * launches with their arguments checked against the kernels' parameters, products through the
 * device's GEMM — with kernels.cu compiled for the CPU.
 */
process.env.PREFOPT_CUDA_DEVICE = 'emulate';
const native = loadNative();

describe('the cuda backend on its emulated device', () => cudaBackendCases());

describe('the cuda backend from the command line (emulated device)', () => {
  const EMU = { PREFOPT_CUDA_DEVICE: 'emulate' };

  it('doctor names the emulated device; `prefopt --backend cuda dpo` trains an adapter whose eval-dpo metrics are the native backend\'s', async () => {
    if (!native.active) return;
    const doctor = prefopt(['--json', 'doctor'], { env: EMU });
    expect(doctor.code, doctor.stderr).toBe(0);
    expect(JSON.parse(doctor.stdout.trim().split('\n').at(-1)!).cuda.state).toBe('emulated');
    const f = await onlineFixture();
    const data = path.join(f.d, 'pairs.jsonl');
    fs.writeFileSync(data, Array.from({ length: 8 }, (_, i) => JSON.stringify({ prompt: `What is ${i} plus 2?`, chosen: `The answer is ${i + 2}.`, rejected: `The answer is ${i}.` })).join('\n') + '\n');
    const train = (backend: string) => {
      const out = path.join(f.d, `dpo-${backend}`);
      const r = prefopt(['--backend', backend, 'dpo', '--model', f.base, '--data', data, '--out', out, '--max-steps', '3', '--batch-size', '2', '--eval-ratio', '0', '--lr', '0.01', '--lora-r', '4', '--lora-dropout', '0.1', '--seed', '3'], { env: EMU });
      expect(r.code, r.stderr.slice(-2000)).toBe(0);
      const m = prefopt(['--quiet', '--backend', backend, 'eval-dpo', '--model', f.base, '--adapter', out, '--data', data], { env: EMU });
      expect(m.code, m.stderr).toBe(0);
      return JSON.parse(m.stdout);
    };
    const [n, c] = [train('native'), train('cuda')];
    expect(Object.keys(c).sort()).toEqual(Object.keys(n).sort());
    // Aggregates of the trained adapter: an element of a gradient within rounding of zero may take
    // either sign of Adam's first step, so not bit for bit.
    for (const k of Object.keys(n)) expect(Math.abs(c[k] - n[k]), k).toBeLessThanOrEqual(1e-4 * Math.max(1, Math.abs(n[k])));
    expect(n.loss).toBeLessThan(Math.log(2) - 0.01); // it trained: an untrained adapter gives ln 2
  }, 300_000);
});
