import { describe, expect, it } from 'vitest';
import * as fs from 'node:fs';
import * as path from 'node:path';
import * as os from 'node:os';
import { spawnSync } from 'node:child_process';
import { loadNative } from '../src/engine/native.js';
import { onlineFixture } from './helpers/online-fixture.js';
import { prefopt } from './helpers/cli.js';
import { cudaBackendCases } from './helpers/cuda-cases.js';
import { attentionPath, rowsById, scoreRuns, scoresBudget } from '../src/engine/cuda-fused.js';
import { Rng } from '../src/util/rng.js';

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
    const typo = prefopt(['--backend', 'cuda', 'doctor'], { env: { ...EMU, PREFOPT_CUDA_ATTENTION: 'fast' } });
    expect(typo.code).toBe(2);
    expect(typo.stderr).toMatch(/PREFOPT_CUDA_ATTENTION: expected products, flash or auto, found "fast"/);
    const budget = prefopt(['--backend', 'cuda', 'doctor'], { env: { ...EMU, PREFOPT_CUDA_ATTENTION_MIB: '0' } });
    expect(budget.code).toBe(2);
    expect(budget.stderr).toMatch(/PREFOPT_CUDA_ATTENTION_MIB: expected a positive number of MiB, found "0"/);
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

describe('the embedded default\'s stages on the cuda backend (emulated device)', () => {
  it('init → SFT → LoRA DPO (dropout) → online rounds → TIES merge → GGUF → eval: every logged metric is the native backend\'s', async () => {
    if (!native.active) return;
    // The quickstart's data and model shape, cut to a few rows and steps.
    const d = fs.mkdtempSync(path.join(os.tmpdir(), 'prefopt-qs-cuda-'));
    const q = path.resolve('data/quickstart');
    fs.writeFileSync(path.join(d, 'sft.json'), JSON.stringify(JSON.parse(fs.readFileSync(path.join(q, 'sft.json'), 'utf8')).slice(0, 16)));
    for (const [f, n] of [['prefs.jsonl', 10], ['prompts.jsonl', 3], ['eval.jsonl', 3]] as const) fs.writeFileSync(path.join(d, f), fs.readFileSync(path.join(q, f), 'utf8').split('\n').slice(0, n).join('\n') + '\n');
    // Rewards from the text (varied, so that every round has pairs to train on).
    fs.writeFileSync(path.join(d, 'scorer.mjs'), 'export default (p, cs) => cs.map((c) => (c.match(/[aeiou]/g) || []).length % 4);\n');
    const lora = { r: 4, alpha: 8, targets: ['qkv_proj', 'o_proj', 'gate_proj', 'up_proj', 'down_proj'] };
    const stages = [
      { name: 'base', type: 'init', arch: 'zhinao', config: path.join(q, 'model.json'), tokenizer: path.join(q, 'tokenizer') },
      { name: 'sft', type: 'sft', model: 'base.output', data: path.join(d, 'sft.json'), lr: 2e-3, max_steps: 2, batch_size: 4, max_len: 48, eval_ratio: 0.1 },
      { name: 'dpo', type: 'dpo', model: 'sft.output', data: path.join(d, 'prefs.jsonl'), rpo_alpha: 1, lora: { ...lora, dropout: 0.1 }, max_steps: 2, batch_size: 2, eval_ratio: 0.2 },
      { name: 'online', type: 'online_dpo', model: 'sft.output', adapter: 'dpo.output', prompts: path.join(d, 'prompts.jsonl'), scorer: `module:${path.join(d, 'scorer.mjs')}`, rounds: 2, samples_per_prompt: 4, max_new_tokens: 4, lora: { ...lora, dropout: 0 }, batch_size: 2 },
      { name: 'merged', type: 'merge', merge_method: 'ties', base_model: 'sft.output', models: [{ model: 'sft.output+online.output', parameters: { weight: 1, density: 0.8 } }, { model: 'sft.output+dpo.output', parameters: { weight: 0.25, density: 0.8 } }], parameters: { normalize: true, lambda: 1 }, dtype: 'float32' },
      { name: 'gguf', type: 'export_gguf', model: 'merged.output', dtype: 'f32' },
      { name: 'eval', type: 'eval', prompts: path.join(d, 'eval.jsonl'), scorer: 'builtin:exact_answer', max_new_tokens: 4, models: { 'sft-base': 'sft.output', 'round-2': 'sft.output+online.round-2', merged: 'merged.output' } },
    ];
    const events = (backend: string) => {
      const rf = path.join(d, `${backend}.yaml`);
      fs.writeFileSync(rf, JSON.stringify({ name: backend, seed: 0, workdir: path.join(d, backend), stages }));
      const r = prefopt(['--json', '--backend', backend, 'run', rf], { env: { PREFOPT_CUDA_DEVICE: 'emulate' } });
      expect(r.code, r.stderr.slice(-2000)).toBe(0);
      return r.stderr.split('\n').filter((l) => l.startsWith('{')).map((l) => JSON.parse(l)).filter((e) => ['train', 'eval', 'round-done'].includes(e.event));
    };
    const [n, c] = [events('native'), events('cuda')];
    expect(c.map((e) => e.event)).toEqual(n.map((e) => e.event));
    // sft, dpo and each round trained
    expect(n.filter((e) => e.event === 'train').length).toBeGreaterThanOrEqual(4);
    expect(n.filter((e) => e.event === 'round-done').map((e) => e.pairs > 0)).toEqual([true, true]);
    n.forEach((e, i) => {
      for (const [k, v] of Object.entries(e)) {
        if (typeof v !== 'number' || ['tokens_per_s', 'seconds'].includes(k)) continue;
        expect(Math.abs(c[i][k] - v), `${e.event} ${i} ${k}`).toBeLessThanOrEqual(1e-4 * Math.max(1, Math.abs(v)));
      }
    });
  }, 400_000);
});

describe("the GPU check's node part (bench/cuda-check.ts) on the emulated device, --tiny", () => {
  const run = (mode: string, env: Record<string, string> = {}) => {
    const r = spawnSync(process.execPath, ['dist/bench/cuda-check.js', mode, '--tiny'], { encoding: 'utf8', env: { ...process.env, PREFOPT_CUDA_DEVICE: 'emulate', ...env } });
    expect(r.status, r.stderr.slice(-2000) + r.stdout.slice(-2000)).toBe(0);
    return r.stdout.trim().split('\n').filter((l) => l.startsWith('{')).map((l) => JSON.parse(l));
  };

  it('gemm: every product case matches float64 within its tolerance', () => {
    if (!native.active) return;
    const cases = run('gemm');
    expect(cases.length).toBe(14);
    for (const c of cases) expect(c, JSON.stringify(c)).toMatchObject({ step: 'cuda_gemm', ok: true });
  }, 120_000);

  it('compare: the cuda step matches the CPU path within float32 tolerance with exact products, within bf16 tolerance with the defaults', () => {
    if (!native.active) return;
    const [exact] = run('compare', { PREFOPT_CUDA_TF32: '0', PREFOPT_CUDA_BF16: '0' });
    expect(exact).toMatchObject({ step: 'cuda_compare', device: 'host emulation', tf32: false, bf16: false, tolerance: 1e-4, ok: true });
    expect(exact.worst_grad_rel).toBeLessThan(1e-4);
    const [def] = run('compare');
    expect(def).toMatchObject({ tf32: true, bf16: true, tolerance: 5e-2, ok: true });
    // bf16 products are not float32 ones: the defaults' gradients differ more, the check must see it
    expect(def.worst_grad_rel).toBeGreaterThan(exact.worst_grad_rel);
  }, 120_000);

  it('time and profile: tokens/s and device peak per job; the profile accounts every operation of a step (attention as products or flash kernels, products with their flops); the dry device issues the same operations without running them', () => {
    if (!native.active) return;
    const times = run('time');
    expect(times.map((t) => t.job)).toEqual(['lora_dpo', 'lora_dpo_2k', 'logprobs', 'generate', 'generate_filtered']);
    for (const t of times) {
      expect(t.tokens_per_s).toBeGreaterThan(0);
      expect(t.peak_device_bytes).toBeGreaterThan(0);
    }
    const [head, ...ops] = run('profile');
    expect(head).toMatchObject({ step: 'cuda_profile', layers: 2, tokens: 8 * 32 });
    const byKey = new Map(ops.map((o) => [o.key, o]));
    expect(ops.reduce((s, o) => s + o.count, 0)).toBe(head.operations);
    expect(ops.reduce((s, o) => s + o.ms, 0) / 1000).toBeCloseTo(head.timed_seconds, 2);
    expect(ops.reduce((s, o) => s + o.share, 0)).toBeCloseTo(1, 2);
    // Attention as products at these lengths (32-token rows): per layer, the probabilities once
    // forward (the reference is cached) and again backward, their gradient once; the tiny model's
    // grouped heads (4 query heads, 2 kv heads) summed by the products themselves.
    expect(byKey.get('softmax_rows')?.count).toBe(4);
    expect(byKey.get('softmax_grad_rows')?.count).toBe(2);
    expect(byKey.has('attention_fwd') || byKey.has('head_group_sum')).toBe(false);
    // With the flash kernels: one forward pass per layer, the backward pass starting from its
    // output and row statistics; dk and dv summed per group after.
    const flash = new Map(run('profile', { PREFOPT_CUDA_ATTENTION: 'flash' }).slice(1).map((o) => [o.key, o]));
    expect(flash.get('attention_fwd')?.count).toBe(2);
    expect(flash.get('attention_bwd_dkdv')?.count).toBe(2);
    expect(flash.get('head_group_sum')?.count).toBe(4);
    // A product's rate is its 2·m·n·k flops per launch over its time.
    const gemm = ops.find((o) => o.key.startsWith('gemm bf16 NT'))!;
    const [m, n, k] = gemm.key.split(' ')[3].split('x').map(Number);
    expect(Math.abs(gemm.tflops / ((2 * m * n * k * gemm.count) / (gemm.ms / 1000) / 1e12) - 1)).toBeLessThan(0.01);
    // The step runs no tfjs kernel on the host, and reads the device once (bench/steps: the cached reference).
    expect(ops.filter((o) => o.key.startsWith('host '))).toEqual([]);
    expect(byKey.get('download')?.count).toBe(1);
    expect(times[0].waits_per_call).toBe(1);
    expect(byKey.get('upload')?.gb_per_s).toBeGreaterThan(0);
    // The dry device (the host floor's) issues the very same operations, none of them run.
    const [dryHead, ...dryOps] = run('profile', { PREFOPT_CUDA_DEVICE: 'dry' });
    expect(dryHead).toMatchObject({ device: 'host emulation, kernels not run', operations: head.operations });
    const counts = (list: any[]) => Object.fromEntries(list.map((o) => [o.key, o.count]));
    expect(counts(dryOps)).toEqual(counts(ops));
    const kernelMs = (list: any[]) => list.filter((o) => o.key === 'attention_fwd' || o.key.startsWith('gemm')).reduce((s, o) => s + o.ms, 0);
    expect(kernelMs(dryOps)).toBeLessThan(kernelMs(ops) / 5);
  }, 120_000);
});

describe('attentionPath (products or flash kernels) and scoreRuns (the products\' runs)', () => {
  it('products for training and prefill rows where one query head\'s scores fit in the budget (256 MiB, or PREFOPT_CUDA_ATTENTION_MIB); flash for decoding, short rows and longer ones; the variables force either, and values they do not know are refused', () => {
    expect(attentionPath(8, 256, 256, 14, 2, {})).toBe('products'); // the 0.5B bench step
    expect(attentionPath(8, 2048, 2048, 14, 2, {})).toBe('products'); // 16 MiB a head, in runs
    expect(attentionPath(4, 1, 300, 14, 2, {})).toBe('flash'); // a decoding step
    expect(attentionPath(2, 15, 15, 8, 8, {})).toBe('flash');
    expect(attentionPath(1, 8192, 8192, 16, 1, {})).toBe('products'); // exactly 256 MiB a head
    expect(attentionPath(1, 8192, 8193, 16, 1, {})).toBe('flash');
    expect(attentionPath(8, 2048, 2048, 14, 2, { PREFOPT_CUDA_ATTENTION_MIB: '15' })).toBe('flash');
    expect(attentionPath(8, 2048, 2048, 14, 2, { PREFOPT_CUDA_ATTENTION_MIB: ' 16 ' })).toBe('products');
    expect(attentionPath(8, 256, 256, 14, 2, { PREFOPT_CUDA_ATTENTION: 'flash' })).toBe('flash');
    expect(attentionPath(4, 1, 300, 14, 2, { PREFOPT_CUDA_ATTENTION: 'Products' })).toBe('products');
    expect(attentionPath(4, 1, 300, 14, 2, { PREFOPT_CUDA_ATTENTION: 'auto' })).toBe('flash');
    expect(() => attentionPath(8, 256, 256, 14, 2, { PREFOPT_CUDA_ATTENTION: 'fast' })).toThrow('PREFOPT_CUDA_ATTENTION: expected products, flash or auto, found "fast"');
    for (const bad of ['0', '-5', 'lots', 'Infinity']) expect(() => scoresBudget({ PREFOPT_CUDA_ATTENTION_MIB: bad })).toThrow(`PREFOPT_CUDA_ATTENTION_MIB: expected a positive number of MiB, found "${bad}"`);
    expect(scoresBudget({})).toBe(256 * 2 ** 20);
  });

  it('runs take whole batch entries where they fit, else one entry\'s kv groups, else one group\'s query heads; every query head once, in order', () => {
    const whole = (group: number, groups: number) => ({ group, groups, head: 0, heads: 2 });
    // 3 entries of 2 kv groups of 2 query heads, whose scores (4 × 4) are 64 bytes a head.
    expect(scoreRuns(3, 2, 2, 4, 4, 512)).toEqual([whole(0, 4), whole(4, 2)]);
    expect(scoreRuns(3, 2, 2, 4, 4, 4096)).toEqual([whole(0, 6)]);
    expect(scoreRuns(3, 2, 2, 4, 4, 300)).toEqual([whole(0, 2), whole(2, 2), whole(4, 2)]);
    expect(scoreRuns(3, 2, 2, 4, 4, 200)).toEqual([0, 1, 2, 3, 4, 5].map((g) => whole(g, 1)));
    expect(scoreRuns(3, 2, 2, 4, 4, 100)).toEqual([0, 1, 2, 3, 4, 5].flatMap((group) => [0, 1].map((head) => ({ group, groups: 1, head, heads: 1 }))));
    expect(scoreRuns(3, 2, 2, 4, 4, 10)).toEqual(scoreRuns(3, 2, 2, 4, 4, 100)); // one head even past the budget
    // 2 entries of 3 groups, two groups' worth of budget: 2 + 1 in each entry, none across.
    expect(scoreRuns(2, 3, 1, 4, 4, 128)).toEqual([{ group: 0, groups: 2 }, { group: 2, groups: 1 }, { group: 3, groups: 2 }, { group: 5, groups: 1 }].map((r) => ({ ...r, head: 0, heads: 1 })));
    // one group of 7 heads, three heads' worth: 3 + 3 + 1
    expect(scoreRuns(1, 1, 7, 4, 4, 200).map((r) => [r.head, r.heads])).toEqual([[0, 3], [3, 3], [6, 1]]);
    const rng = new Rng(3);
    for (let trial = 0; trial < 300; trial++) {
      const [b, kv, g, t, tk] = [1 + rng.int(5), 1 + rng.int(4), 1 + rng.int(4), 1 + rng.int(9), 1 + rng.int(9)];
      const budget = 1 + rng.int(4 * b * kv * g * t * tk * 2);
      const runs = scoreRuns(b, kv, g, t, tk, budget);
      const heads = runs.flatMap((r) => Array.from({ length: r.groups }, (_, j) => Array.from({ length: r.heads }, (_, i) => (r.group + j) * g + r.head + i)).flat());
      expect(heads).toEqual(Array.from({ length: b * kv * g }, (_, j) => j));
      for (const r of runs) {
        if (r.heads > 1 || r.groups > 1) expect(4 * r.groups * r.heads * t * tk).toBeLessThanOrEqual(budget);
        expect(r.groups === 1 || r.heads === g).toBe(true); // heads are split only within one group
        // within one entry, or whole entries
        expect(Math.floor(r.group / kv) === Math.floor((r.group + r.groups - 1) / kv) || (r.group % kv === 0 && r.groups % kv === 0)).toBe(true);
      }
    }
  });
});

describe('rowsById (the embedding gradient\'s grouping)', () => {
  it('groups rows by id, ids and rows ascending, dropping ids outside the table', () => {
    const g = rowsById(Int32Array.from([3, -1, 3, 0, 7, 0, 4]), 5);
    expect([...g.ids]).toEqual([0, 3, 4]);
    expect([...g.starts]).toEqual([0, 2, 4, 5]);
    expect([...g.rows]).toEqual([3, 5, 0, 2, 6]);
    expect([...rowsById(Int32Array.from([9, -2]), 5).starts]).toEqual([0]);
  });
});
