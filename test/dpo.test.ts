import { describe, expect, it } from 'vitest';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import * as tf from '@tensorflow/tfjs-core';
import { DpoParams, dpoLosses, dpoMetrics } from '../src/dpo/loss.js';
import { Decoder } from '../src/model/decoder.js';
import { saveModel } from '../src/model/load.js';
import { LoraAdapter, attach, withAdapterOff } from '../src/lora/lora.js';
import { writeSafetensors } from '../src/io/safetensors.js';
import { DEFAULT_DPO_STAGE, runDpo } from '../src/stages/dpo.js';
import { makeBatch } from '../src/infer/batch.js';
import { completionLogprobs } from '../src/infer/logprobs.js';
import { referenceLogits, logSoftmax, W } from './helpers/reference.js';
import { ARCH_SPECS, makeTestModel } from './helpers/models.js';
import { Rng } from '../src/util/rng.js';
import { prefopt } from './helpers/cli.js';

const tmp = () => fs.mkdtempSync(path.join(os.tmpdir(), 'prefopt-dpo-'));
const sig = (x: number) => 1 / (1 + Math.exp(-x));

/** The pairwise loss alone: rpo_alpha's NLL term is 0 here (it is tested with the stage). */
function lossOf(p: Omit<DpoParams, 'rpoAlpha'>, x: { pc: number; pr: number; rc: number; rr: number; lc: number; lr: number }): number {
  const t = tf.tidy(() =>
    dpoLosses({ policyChosen: tf.tensor1d([x.pc]), policyRejected: tf.tensor1d([x.pr]), refChosen: tf.tensor1d([x.rc]), refRejected: tf.tensor1d([x.rr]), lenChosen: tf.tensor1d([x.lc]), lenRejected: tf.tensor1d([x.lr]) }, { ...p, rpoAlpha: 0 }),
  );
  const v = t.dataSync()[0];
  t.dispose();
  return v;
}

describe('DPO losses against hand-computed values', () => {
  // ℓ_w = −10 − (−12) = 2, ℓ_l = −15 − (−14) = −1, Δ = 3.
  const x = { pc: -10, pr: -15, rc: -12, rr: -14, lc: 4, lr: 5 };
  it('sigmoid (DPO) and cDPO', () => {
    expect(lossOf({ beta: 0.1, lossType: 'sigmoid', labelSmoothing: 0 }, x)).toBeCloseTo(-Math.log(sig(0.3)), 5);
    expect(lossOf({ beta: 0.1, lossType: 'sigmoid', labelSmoothing: 0.2 }, x)).toBeCloseTo(-0.8 * Math.log(sig(0.3)) - 0.2 * Math.log(sig(-0.3)), 5);
    // Large margins stay finite (log σ computed stably).
    expect(lossOf({ beta: 1, lossType: 'sigmoid', labelSmoothing: 0 }, { ...x, pc: 400 })).toBeCloseTo(0, 5);
    expect(lossOf({ beta: 1, lossType: 'sigmoid', labelSmoothing: 0 }, { ...x, pc: -400 })).toBeCloseTo(388 - 1, 2);
  });
  it('hinge', () => {
    expect(lossOf({ beta: 0.1, lossType: 'hinge', labelSmoothing: 0 }, x)).toBeCloseTo(0.7, 5);
    expect(lossOf({ beta: 0.5, lossType: 'hinge', labelSmoothing: 0 }, x)).toBe(0);
  });
  it('ipo uses per-token averages', () => {
    expect(lossOf({ beta: 0.1, lossType: 'ipo', labelSmoothing: 0 }, x)).toBeCloseTo((2 / 4 - -1 / 5 - 5) ** 2, 4);
  });
  it('robust', () => {
    const e = 0.1;
    expect(lossOf({ beta: 0.1, lossType: 'robust', labelSmoothing: e }, x)).toBeCloseTo((-(1 - e) * Math.log(sig(0.3)) + e * Math.log(sig(-0.3))) / (1 - 2 * e), 5);
  });
  it('metrics use TRL names and definitions', () => {
    const m = dpoMetrics([{ ...x, loss: 1 }, { pc: -5, pr: -4, rc: -5, rr: -5, loss: 3 }], 0.1);
    expect(Object.keys(m)).toEqual(['loss', 'rewards/chosen', 'rewards/rejected', 'rewards/accuracies', 'rewards/margins', 'logps/chosen', 'logps/rejected']);
    expect(m.loss).toBe(2);
    expect(m['rewards/chosen']).toBeCloseTo((0.2 + 0) / 2, 12);
    expect(m['rewards/rejected']).toBeCloseTo((-0.1 + 0.1) / 2, 12);
    expect(m['rewards/accuracies']).toBe(0.5);
    expect(m['rewards/margins']).toBeCloseTo((0.3 - 0.1) / 2, 12);
    expect(m['logps/chosen']).toBe(-7.5);
  });
});

/** Random non-zero LoRA weights in HF layout for a model (PEFT's A [r, in], B [out, r]). */
function randomLora(model: Decoder, modules: string[], r: number, seed: number) {
  const rng = new Rng(seed);
  const out = new Map<string, { A: Float32Array; B: Float32Array; inDim: number; outDim: number }>();
  for (const m of modules) {
    const [inDim, outDim] = model.p(`${m}.weight`).shape;
    out.set(m, { A: Float32Array.from({ length: r * inDim }, () => rng.normal() * 0.3), B: Float32Array.from({ length: outDim * r }, () => rng.normal() * 0.3), inDim, outDim });
  }
  return out;
}

async function writePeftAdapter(dir: string, weights: ReturnType<typeof randomLora>, r: number, alpha: number, keyStyle: 'plain' | 'default') {
  fs.mkdirSync(dir, { recursive: true });
  const targets = [...new Set([...weights.keys()].map((m) => m.split('.').at(-1)))];
  fs.writeFileSync(path.join(dir, 'adapter_config.json'), JSON.stringify({ peft_type: 'LORA', task_type: 'CAUSAL_LM', r, lora_alpha: alpha, lora_dropout: 0, target_modules: targets, bias: 'none', fan_in_fan_out: false, use_rslora: false }));
  const mid = keyStyle === 'default' ? '.default' : '';
  const entries: { name: string; shape: number[] }[] = [];
  const data = new Map<string, Float32Array>();
  for (const [m, w] of weights) {
    entries.push({ name: `base_model.model.${m}.lora_A${mid}.weight`, shape: [r, w.inDim] });
    data.set(`base_model.model.${m}.lora_A${mid}.weight`, w.A);
    entries.push({ name: `base_model.model.${m}.lora_B${mid}.weight`, shape: [w.outDim, r] });
    data.set(`base_model.model.${m}.lora_B${mid}.weight`, w.B);
  }
  await writeSafetensors(path.join(dir, 'adapter_model.safetensors'), entries, 'F32', (n) => data.get(n)!);
}

/** HF weights with W' = W + s·B·A folded in, in float64, for the reference forward. */
function mergedReferenceWeights(w: W, lora: ReturnType<typeof randomLora>, r: number, scale: number): W {
  const out: W = new Map(w);
  for (const [m, l] of lora) {
    const base = w.get(`${m}.weight`)!;
    const merged = new Float32Array(base.data.length);
    for (let o = 0; o < l.outDim; o++) {
      for (let i = 0; i < l.inDim; i++) {
        let s = 0;
        for (let k = 0; k < r; k++) s += l.B[o * r + k] * l.A[k * l.inDim + i];
        merged[o * l.inDim + i] = base.data[o * l.inDim + i] + scale * s;
      }
    }
    out.set(`${m}.weight`, { shape: base.shape, data: merged });
  }
  return out;
}

describe('LoRA', () => {
  const spec = ARCH_SPECS['zhinao fused qkv GQA'];

  it('a new adapter changes nothing, and switched off gives the base logits exactly', () => {
    const { cfg, w } = makeTestModel(spec, 2);
    const model = Decoder.fromHF(cfg, (n) => w.get(n)!);
    const rows = [{ prompt: [1, 2, 3], completion: [4, 5, 6] }];
    const base = completionLogprobs(model, rows)[0].token_logps;
    const fresh = LoraAdapter.create(model, { r: 4, alpha: 8, dropout: 0, targets: ['qkv_proj', 'o_proj', 'down_proj'], useRslora: false }, 1);
    attach(model, fresh);
    expect(completionLogprobs(model, rows)[0].token_logps).toEqual(base);
    // Give B non-zero values: outputs move; switched off, they are the base again bit for bit.
    for (const { b } of fresh.weights.values()) b.assign(tf.randomNormal(b.shape, 0, 0.5, 'float32', 3));
    expect(completionLogprobs(model, rows)[0].token_logps).not.toEqual(base);
    expect(withAdapterOff(model, () => completionLogprobs(model, rows)[0].token_logps)).toEqual(base);
    fresh.dispose();
    model.dispose();
  });

  it('a PEFT-written adapter loads (both key styles) and matches the float64 merged reference; save/load round trips', async () => {
    const { cfg, w, ref } = makeTestModel(spec, 5);
    const model = Decoder.fromHF(cfg, (n) => w.get(n)!);
    const modules = ['model.layers.0.self_attn.qkv_proj', 'model.layers.1.mlp.up_proj', 'model.layers.1.self_attn.o_proj'];
    const r = 3;
    const lw = randomLora(model, modules, r, 9);
    const d = tmp();
    for (const style of ['plain', 'default'] as const) {
      const dir = path.join(d, style);
      await writePeftAdapter(dir, lw, r, 6, style);
      const ad = LoraAdapter.load(model, dir);
      attach(model, ad);
      const ids = [3, 1, 4, 1, 5, 9, 2];
      const got = completionLogprobs(model, [{ prompt: ids.slice(0, 2), completion: ids.slice(2) }])[0].token_logps;
      const lg = referenceLogits(ref, mergedReferenceWeights(w, lw, r, 6 / r), ids);
      const want = ids.slice(2).map((id, j) => logSoftmax(lg[j + 1])[id]);
      got.forEach((g, j) => expect(Math.abs(g - want[j])).toBeLessThan(2e-4));
      // Our own save → load gives identical tensors and PEFT's key names.
      const again = path.join(d, style + '-resaved');
      await ad.save(again);
      const cfgJson = JSON.parse(fs.readFileSync(path.join(again, 'adapter_config.json'), 'utf8'));
      expect(cfgJson).toMatchObject({ peft_type: 'LORA', task_type: 'CAUSAL_LM', r: 3, lora_alpha: 6, bias: 'none', fan_in_fan_out: false, inference_mode: true, target_modules: ['o_proj', 'qkv_proj', 'up_proj'] });
      const back = LoraAdapter.load(model, again);
      for (const [m, x] of ad.weights) {
        expect(Array.from(back.weights.get(m)!.a.dataSync())).toEqual(Array.from(x.a.dataSync()));
        expect(Array.from(back.weights.get(m)!.b.dataSync())).toEqual(Array.from(x.b.dataSync()));
      }
      back.dispose();
      ad.dispose();
    }
    model.dispose();
  });

  it('adapters that do not fit the model are clear errors', async () => {
    const { cfg, w } = makeTestModel(spec, 5);
    const model = Decoder.fromHF(cfg, (n) => w.get(n)!);
    const d = tmp();
    const lw = randomLora(model, ['model.layers.0.self_attn.o_proj'], 2, 1);
    await writePeftAdapter(path.join(d, 'rank'), lw, 2, 4, 'plain');
    const cfgFile = path.join(d, 'rank', 'adapter_config.json');
    fs.writeFileSync(cfgFile, JSON.stringify({ ...JSON.parse(fs.readFileSync(cfgFile, 'utf8')), r: 4 }));
    expect(() => LoraAdapter.load(model, path.join(d, 'rank'))).toThrow(/lora_A.weight" has shape \[2,48\], expected \[4, 48\] \(r=4\)/);
    const wrong = new Map([['model.layers.0.self_attn.q_proj', { A: new Float32Array(2 * 48), B: new Float32Array(48 * 2), inDim: 48, outDim: 48 }]]);
    await writePeftAdapter(path.join(d, 'target'), wrong, 2, 4, 'plain');
    expect(() => LoraAdapter.load(model, path.join(d, 'target'))).toThrow(/module "model.layers.0.self_attn.q_proj" does not exist in the model \(zhinao\)/);
    expect(() => LoraAdapter.create(model, { r: 2, alpha: 4, dropout: 0, targets: ['q_proj'], useRslora: false }, 0)).toThrow(/"q_proj" matches no module of this zhinao model/);
    model.dispose();
  });

  it('LoRA gradients match finite differences; the base gets none', () => {
    const { cfg, w } = makeTestModel(ARCH_SPECS['llama GQA untied'], 6);
    const model = Decoder.fromHF(cfg, (n) => w.get(n)!);
    const ad = LoraAdapter.create(model, { r: 2, alpha: 4, dropout: 0, targets: ['v_proj', 'gate_proj'], useRslora: false }, 3);
    attach(model, ad);
    for (const { b } of ad.weights.values()) b.assign(tf.randomNormal(b.shape, 0, 0.3, 'float32', 5));
    const sb = makeBatch([{ ids: [1, 5, 9, 2, 7], weights: [0, 0, 1, 1, 1] }]);
    const f = () => tf.neg(tf.sum(model.hidden(sb))) as tf.Scalar;
    const vars = [...ad.params().values()];
    const { grads } = tf.variableGrads(f, [...vars, ...model.params.values()]);
    for (const v of model.params.values()) expect(grads[v.name] ?? null).toBeNull();
    const v = ad.weights.get('model.layers.1.self_attn.v_proj')!.a;
    const g = grads[v.name].dataSync();
    const h = 1e-2;
    const base = v.dataSync().slice();
    for (const i of [0, 7, 20]) {
      const at = (delta: number) => {
        const x = base.slice();
        x[i] += delta;
        v.assign(tf.tensor(x, v.shape));
        return tf.tidy(() => f()).dataSync()[0];
      };
      const fd = (at(h) - at(-h)) / (2 * h);
      expect(Math.abs(g[i] - fd)).toBeLessThan(2e-2 * Math.max(1, Math.abs(fd)));
    }
    Object.values(grads).forEach((t) => t?.dispose());
    ad.dispose();
    model.dispose();
  });
});

describe('DPO stage', () => {
  async function setup() {
    const d = tmp();
    const { cfg, w } = makeTestModel({ arch: 'qwen2', heads: 2, kvHeads: 1, hidden: 16, layers: 1, vocab: 24, tied: true, theta: 10000 }, 3, 0.1);
    const m = Decoder.fromHF(cfg, (n) => w.get(n)!);
    await saveModel(m, path.join(d, 'base'));
    m.dispose();
    // Chosen answers end in token 5, rejected in 6: learnable from the last position alone.
    const rng = new Rng(4);
    const rows = Array.from({ length: 40 }, () => {
      const prompt = [1, 2 + rng.int(8), 2 + rng.int(8)];
      const body = [10 + rng.int(10), 10 + rng.int(10)];
      return { prompt_ids: prompt, chosen_ids: [...body, 5], rejected_ids: [...body, 6] };
    });
    rows.push({ prompt_ids: [1, 2], chosen_ids: [3], rejected_ids: [3] }); // identical → skipped
    rows.push({ prompt_ids: [1, 2], chosen_ids: [], rejected_ids: [3] }); // empty → skipped
    fs.writeFileSync(path.join(d, 'pairs.jsonl'), rows.map((r) => JSON.stringify(r)).join('\n'));
    return d;
  }

  it('raises held-out reward accuracy, hits the reference cache on a second run, and keeps memory flat', async () => {
    const d = await setup();
    const cfg = { ...DEFAULT_DPO_STAGE, model: path.join(d, 'base'), data: path.join(d, 'pairs.jsonl'), out: path.join(d, 'dpo'), evalRatio: 0.25, batchSize: 5, lora: { r: 4, alpha: 8, dropout: 0, targets: ['q_proj', 'v_proj', 'o_proj', 'up_proj', 'down_proj'], useRslora: false }, train: { ...DEFAULT_DPO_STAGE.train, lr: 2e-2, epochs: 6, loggingSteps: 2 } };
    const res = await runDpo(cfg);
    expect(res.skipped).toEqual({ 'chosen identical to rejected': 1, 'empty completion': 1 });
    expect(res.pairs).toBe(30);
    expect(res.evalPairs).toBe(10);
    expect(res.cacheHits).toBe(0);
    expect(res.evalBefore['rewards/accuracies']).toBe(0); // a fresh adapter is the reference: ℓ_w = ℓ_l = 0
    expect(res.evalMetrics['rewards/accuracies']).toBeGreaterThanOrEqual(0.9);
    expect(res.evalMetrics.loss).toBeLessThan(Math.log(2));
    expect(fs.existsSync(path.join(d, 'dpo', 'adapter_model.safetensors'))).toBe(true);
    const res2 = await runDpo({ ...cfg, out: path.join(d, 'dpo2'), cacheDb: path.join(d, 'dpo', 'prefopt.db') });
    expect(res2.cacheHits).toBe(40);
    expect(res2.evalMetrics).toEqual(res.evalMetrics);
    // eval-dpo on the trained adapter agrees with the stage's own final evaluation of the same rows.
    const evalRows = path.join(d, 'eval.jsonl');
    fs.writeFileSync(evalRows, fs.readFileSync(path.join(d, 'pairs.jsonl'), 'utf8').split('\n').slice(0, 40).join('\n'));
    const r = prefopt(['eval-dpo', '--model', path.join(d, 'base'), '--adapter', path.join(d, 'dpo'), '--data', evalRows, '--beta', '0.1', '--loss-type', 'sigmoid', '--json']);
    expect(r.code, r.stderr).toBe(0);
    const m = JSON.parse(r.stdout);
    expect(m.rows).toBe(40);
    expect(m['rewards/accuracies']).toBeGreaterThan(0.8);
    // rpo_alpha adds α × the chosen NLL per token (all 40 rows in one batch; every chosen answer
    // is 3 tokens), TRL's RPO term, to every pair's loss; nothing else changes.
    const evalJson = (extra: string[]) => JSON.parse(prefopt(['eval-dpo', '--model', path.join(d, 'base'), '--adapter', path.join(d, 'dpo'), '--data', evalRows, '--beta', '0.1', '--batch-size', '40', '--json', ...extra]).stdout);
    const plain = evalJson([]);
    const rpo = evalJson(['--rpo-alpha', '0.5']);
    const nll = -plain['logps/chosen'] / 3;
    expect(plain.nll_loss).toBeUndefined();
    expect(rpo.nll_loss).toBeCloseTo(nll, 5);
    expect(rpo.loss).toBeCloseTo(plain.loss + 0.5 * nll, 5);
    expect(rpo['rewards/margins']).toBe(plain['rewards/margins']);
  });

  it('holds the tensor count flat across DPO steps', async () => {
    const d = await setup();
    const before = tf.memory().numTensors;
    await runDpo({ ...DEFAULT_DPO_STAGE, model: path.join(d, 'base'), data: path.join(d, 'pairs.jsonl'), out: path.join(d, 'dpo'), batchSize: 5, train: { ...DEFAULT_DPO_STAGE.train, maxSteps: 3 } });
    const mid = tf.memory().numTensors;
    await runDpo({ ...DEFAULT_DPO_STAGE, model: path.join(d, 'base'), data: path.join(d, 'pairs.jsonl'), out: path.join(d, 'dpo3'), batchSize: 5, train: { ...DEFAULT_DPO_STAGE.train, maxSteps: 9 } });
    expect(mid).toBe(before);
    expect(tf.memory().numTensors).toBe(before);
  });
});
