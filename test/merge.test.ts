import { describe, expect, it } from 'vitest';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import * as tf from '@tensorflow/tfjs-core';
import { MERGE_METHODS, MergeInput, slerpVectors, tiesConsensus, trimTopK } from '../src/merge/methods.js';
import { mergeLora, runMerge, validateMergeConfig } from '../src/merge/merge.js';
import { Decoder } from '../src/model/decoder.js';
import { loadModel, saveModel } from '../src/model/load.js';
import { LoraAdapter, attach } from '../src/lora/lora.js';
import { completionLogprobs } from '../src/infer/logprobs.js';
import { Rng } from '../src/util/rng.js';
import { readHalfBits, readHeader } from '../src/io/safetensors.js';
import { writeCheckpointFiles } from '../src/io/checkpoint.js';
import { ARCH_SPECS, makeTestModel } from './helpers/models.js';

const tmp = () => fs.mkdtempSync(path.join(os.tmpdir(), 'prefopt-merge-'));
const f32 = (xs: number[]) => Float32Array.from(xs);
const input = (o: Partial<MergeInput>): MergeInput => ({ base: null, models: [], weights: [], densities: [], lambda: 1, normalize: true, t: 0.5, rng: (m) => new Rng(1, m), ...o });
const close = (a: ArrayLike<number>, b: number[], tol = 1e-6) => b.forEach((v, i) => expect(Math.abs(a[i] - v)).toBeLessThan(tol));

describe('merge methods on hand-sized tensors', () => {
  const base = f32([1, 1, 1, 1]);
  const m1 = f32([3, 0, 1, 2]); // δ1 = [2, −1, 0, 1]
  const m2 = f32([0, 2, 1, 4]); // δ2 = [−1, 1, 0, 3]

  it('linear: weighted mean; identical models give the model', () => {
    close(MERGE_METHODS.linear.merge(input({ models: [m1, m2], weights: [1, 3] })), [(3 + 0) / 4, (0 + 6) / 4, 1, (2 + 12) / 4]);
    close(MERGE_METHODS.linear.merge(input({ models: [m1, m1, m1], weights: [0.2, 0.5, 0.3] })), Array.from(m1));
  });

  it('task_arithmetic: base + λ·Σ wᵢδᵢ', () => {
    close(MERGE_METHODS.task_arithmetic.merge(input({ base, models: [m1, m2], weights: [1, 0.5], lambda: 0.5, normalize: false })), [1 + 0.5 * (2 - 0.5), 1 + 0.5 * (-1 + 0.5), 1, 1 + 0.5 * (1 + 1.5)]);
  });

  it('ties: trimming keeps the largest |δ|, the sign election keeps agreeing entries, normalised', () => {
    expect(Array.from(trimTopK(Float32Array.from([2, -1, 0, 1]), 0.5))).toEqual([2, -1, 0, 0].map((x, i) => (i === 1 ? -1 : x)));
    expect(Array.from(trimTopK(Float32Array.from([-1, 1, 0, 3]), 0.5))).toEqual([0, 0, 0, 3].map((x, i) => (i === 0 ? -1 : x)));
    // Full density: signs Σwδ = [1, 0, 0, 4] → [+, + (tie), +, +]; entry 0 keeps only δ1=2,
    // entry 1 keeps only δ2=1, entry 3 keeps both: (1 + 3)/2.
    close(MERGE_METHODS.ties.merge(input({ base, models: [m1, m2], weights: [1, 1], densities: [1, 1] })), [1 + 2, 1 + 1, 1, 1 + 2]);
    // Density 0.5 trims δ1 to [2, −1, 0, 0] and δ2 to [−1, 0, 0, 3] (ties broken by position).
    close(MERGE_METHODS.ties.merge(input({ base, models: [m1, m2], weights: [1, 1], densities: [0.5, 0.5] })), [1 + 2, 1 - 1, 1, 1 + 3]);
    // Unnormalised: the masked sum.
    close(Array.from(tiesConsensus([Float32Array.from([2, -1]), Float32Array.from([3, -2])], [1, 1], false)), [5, -3]);
  });

  it('DARE with density 1 equals task arithmetic; density < 1 drops and rescales, seeded', () => {
    const ta = MERGE_METHODS.task_arithmetic.merge(input({ base, models: [m1, m2], weights: [1, 0.5], normalize: false }));
    const dl = MERGE_METHODS.dare_linear.merge(input({ base, models: [m1, m2], weights: [1, 0.5], densities: [1, 1], normalize: false }));
    expect(Array.from(dl)).toEqual(Array.from(ta));
    const big = Float32Array.from({ length: 4000 }, () => 2);
    const zero = new Float32Array(4000);
    const d = MERGE_METHODS.dare_linear.merge(input({ base: zero, models: [big], weights: [1], densities: [0.25], normalize: false }));
    const kept = Array.from(d).filter((x) => x !== 0);
    expect(kept.every((x) => Math.abs(x - 8) < 1e-6)).toBe(true); // survivors rescaled by 1/density
    expect(kept.length / 4000).toBeGreaterThan(0.22);
    expect(kept.length / 4000).toBeLessThan(0.28);
    const again = MERGE_METHODS.dare_linear.merge(input({ base: zero, models: [big], weights: [1], densities: [0.25], normalize: false }));
    expect(Array.from(again)).toEqual(Array.from(d));
  });

  it('slerp: t = 0 is the base, t = 1 the other, and it follows the arc', () => {
    const a = f32([1, 0]);
    const b = f32([0, 1]);
    close(slerpVectors(0, a, b), [1, 0]);
    close(slerpVectors(1, a, b), [0, 1]);
    close(slerpVectors(0.5, a, b), [Math.SQRT1_2, Math.SQRT1_2]);
    close(slerpVectors(0.5, f32([1, 1]), f32([1, 1.0001])), [1, 1.00005], 1e-5); // nearly parallel: linear
  });

  it('rejects bad configs with clear messages', () => {
    expect(() => validateMergeConfig({ merge_method: 'ties', base_model: 'b', models: [{ model: 'x', parameters: { density: 1.5 } }] })).toThrow(/models\[0\].parameters.density: expected a number in \(0, 1\]/);
    expect(() => validateMergeConfig({ merge_method: 'slerp', base_model: 'b', models: [{ model: 'x' }, { model: 'y' }] })).toThrow(/slerp merges exactly two models/);
    expect(() => validateMergeConfig({ merge_method: 'magic', models: [{ model: 'x' }] })).toThrow(/merge_method: expected one of/);
    expect(() => validateMergeConfig({ merge_method: 'ties', models: [{ model: 'x' }] })).toThrow(/needs a base_model/);
  });
});

describe('merging checkpoints', () => {
  const cases: [string, string[]][] = [
    ['zhinao fused qkv GQA', ['qkv_proj', 'o_proj', 'down_proj']],
    ['qwen3 q/k norms, head_dim 12 apart from hidden / heads, tied', ['q_proj', 'k_proj', 'v_proj', 'o_proj', 'gate_proj', 'up_proj', 'down_proj']],
  ];
  for (const [spec, targets] of cases) it(`merge-lora logits equal the adapter-applied logits, PEFT keys as PEFT names them (${spec}: ${targets.join(', ')})`, async () => {
    const d = tmp();
    const { cfg, w } = makeTestModel(ARCH_SPECS[spec], 3);
    const model = Decoder.fromHF(cfg, (n) => w.get(n)!);
    await saveModel(model, path.join(d, 'base'));
    const ad = LoraAdapter.create(model, { r: 4, alpha: 8, dropout: 0, targets, useRslora: false }, 2);
    for (const { b } of ad.weights.values()) b.assign(tf.randomNormal(b.shape, 0, 0.3, 'float32', 9));
    await ad.save(path.join(d, 'adapter'));
    const keys = [...readHeader(path.join(d, 'adapter', 'adapter_model.safetensors')).tensors.keys()];
    const mod = cfg.arch === 'zhinao' ? 'self_attn.qkv_proj' : 'self_attn.q_proj';
    expect(keys).toContain(`base_model.model.model.layers.1.${mod}.lora_A.weight`);
    expect(keys).toHaveLength(cfg.num_hidden_layers * targets.length * 2);
    attach(model, ad);
    const rows = [{ prompt: [1, 2, 3], completion: [4, 5, 6, 7] }];
    const want = completionLogprobs(model, rows)[0].token_logps;
    await mergeLora(path.join(d, 'base'), path.join(d, 'adapter'), path.join(d, 'merged'));
    const merged = loadModel(path.join(d, 'merged'));
    const got = completionLogprobs(merged, rows)[0].token_logps;
    got.forEach((g, i) => expect(Math.abs(g - want[i])).toBeLessThan(1e-4));
    merged.dispose();
    ad.dispose();
    model.dispose();
  });

  it('merge-lora of a bf16 checkpoint to bf16: tensors the adapter does not touch are copied byte for byte; folded ones are W + s·B·A rounded once to bf16', async () => {
    const d = tmp();
    const { cfg, w, raw } = makeTestModel(ARCH_SPECS['llama GQA untied'], 3);
    await writeCheckpointFiles(path.join(d, 'base'), raw, [...w].map(([name, t]) => ({ name, shape: t.shape })), (n) => w.get(n)!.data, { dtype: 'BF16' });
    const base = loadModel(path.join(d, 'base'));
    const ad = LoraAdapter.create(base, { r: 4, alpha: 8, dropout: 0, targets: ['q_proj', 'down_proj'], useRslora: false }, 2);
    for (const { b } of ad.weights.values()) b.assign(tf.randomNormal(b.shape, 0, 0.3, 'float32', 9));
    await ad.save(path.join(d, 'adapter'));
    await mergeLora(path.join(d, 'base'), path.join(d, 'adapter'), path.join(d, 'merged'), 'bf16');
    const src = readHeader(path.join(d, 'base', 'model.safetensors'));
    const out = readHeader(path.join(d, 'merged', 'model.safetensors'));
    const u32 = new Uint32Array(1);
    const f = new Float32Array(u32.buffer);
    const widen = (bits: Uint16Array) => Float32Array.from(bits, (h) => ((u32[0] = h << 16), f[0]));
    let folded = 0;
    for (const name of src.tensors.keys()) {
      expect(out.tensors.get(name)!.dtype, name).toBe('BF16');
      const before = readHalfBits(src, name);
      const after = readHalfBits(out, name);
      const mod = name.replace(/\.weight$/, '');
      const lw = ad.weights.get(mod);
      if (!lw) {
        expect(Buffer.from(after.buffer).equals(Buffer.from(before.buffer)), name).toBe(true);
        continue;
      }
      folded++;
      // W [out, in] + s·(Aᵀ [in, r] · Bᵀ [r, out])ᵀ in float64, against the bf16 written: within one rounding.
      const [outDim, inDim] = out.tensors.get(name)!.shape;
      const A = lw.a.dataSync();
      const B = lw.b.dataSync();
      const W = widen(before);
      const got = widen(after);
      for (let o = 0; o < outDim; o++)
        for (let i = 0; i < inDim; i++) {
          let s = 0;
          for (let k = 0; k < 4; k++) s += A[i * 4 + k] * B[k * outDim + o];
          const want = W[o * inDim + i] + ad.scale * s;
          expect(Math.abs(got[o * inDim + i] - want), name).toBeLessThanOrEqual(Math.abs(want) * 2 ** -8 + 1e-30);
        }
    }
    expect(folded).toBe(2 * cfg.num_hidden_layers);
    ad.dispose();
    base.dispose();
  });

  it('streams a TIES merge of three checkpoints; mismatched models and zero weights are refused with nothing left behind', async () => {
    const d = tmp();
    const dirs: string[] = [];
    for (const seed of [1, 2, 3]) {
      const { cfg, w } = makeTestModel(ARCH_SPECS['llama GQA untied'], seed);
      const m = Decoder.fromHF(cfg, (n) => w.get(n)!);
      dirs.push(path.join(d, `m${seed}`));
      await saveModel(m, dirs.at(-1)!);
      m.dispose();
    }
    const r = await runMerge({ merge_method: 'ties', base_model: dirs[0], models: [{ model: dirs[1], parameters: { weight: 1, density: 0.5 } }, { model: dirs[2], parameters: { weight: 0.5, density: 0.5 } }] }, path.join(d, 'out'));
    expect(r.models).toBe(3);
    const out = loadModel(path.join(d, 'out'));
    const name = 'model.layers.0.mlp.up_proj.weight';
    const [b, x, y] = dirs.map((dir) => {
      const m = loadModel(dir);
      const v = m.hfData(name);
      m.dispose();
      return v;
    });
    const want = MERGE_METHODS.ties.merge(input({ base: b, models: [x, y], weights: [1, 0.5], densities: [0.5, 0.5] }));
    expect(Array.from(out.hfData(name))).toEqual(Array.from(want));
    out.dispose();
    const { cfg: other, w: ow } = makeTestModel(ARCH_SPECS['qwen2 biases tied rope 1e6'], 1);
    const om = Decoder.fromHF(other, (n) => ow.get(n)!);
    await saveModel(om, path.join(d, 'other'));
    om.dispose();
    await expect(runMerge({ merge_method: 'linear', models: [{ model: dirs[0] }, { model: path.join(d, 'other') }] }, path.join(d, 'bad'))).rejects.toThrow(/architecture .* differs/);
    await expect(runMerge({ merge_method: 'linear', models: [{ model: dirs[0], parameters: { weight: 1 } }, { model: dirs[1], parameters: { weight: -1 } }] }, path.join(d, 'bad'))).rejects.toThrow(/weights sum to zero/);
    expect(fs.existsSync(path.join(d, 'bad'))).toBe(false);
    expect(fs.readdirSync(d).filter((f) => f.includes('.tmp'))).toEqual([]);
  });
});
