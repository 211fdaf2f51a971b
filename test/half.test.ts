import { describe, expect, it } from 'vitest';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import * as tf from '@tensorflow/tfjs-core';
import { Decoder, KVCache } from '../src/model/decoder.js';
import { HalfDtype, HalfWeight } from '../src/engine/half.js';
import { firstNonFiniteHalf, loadNative, matmulWeight, unmapFile, widenHalf } from '../src/engine/native.js';
import { fusedActive } from '../src/engine/fused.js';
import { f16ToF32, f32ToBf16Bits, f32ToF16, readHalfBits, readHeader } from '../src/io/safetensors.js';
import { TensorSource, writeCheckpointFiles } from '../src/io/checkpoint.js';
import { loadModel, saveModel } from '../src/model/load.js';
import { isLinearWeight } from '../src/model/config.js';
import { LoraAdapter, attach, mergeInto } from '../src/lora/lora.js';
import { makeBatch } from '../src/infer/batch.js';
import { sftLoss } from '../src/stages/sft.js';
import { Rng } from '../src/util/rng.js';
import { ARCH_SPECS, makeTestModel } from './helpers/models.js';
import { logSoftmax, referenceLogits } from './helpers/reference.js';

/*
 * Frozen weights kept in the checkpoint's bf16/f16 (engine/half): the kernels widen them while
 * packing, so every product, and so the whole model, must give what the same model gives on a
 * float32 copy of those values — bit for bit on the built-in kernel — and what the float64
 * reference gives.
 */
const native = loadNative();
const u32 = new Uint32Array(1);
const f32v = new Float32Array(u32.buffer);

/** The 16-bit bits nearest each value, and those bits' exact float32 values. */
function toHalf(data: Float32Array, dtype: HalfDtype): { bits: Uint16Array; values: Float32Array } {
  const bits = new Uint16Array(data.length);
  for (let i = 0; i < data.length; i++) {
    f32v[0] = data[i];
    bits[i] = dtype === 'bf16' ? f32ToBf16Bits(u32[0]) : f32ToF16(data[i]);
  }
  return { bits, values: Float32Array.from(bits, (h) => decodeHalf(h, dtype)) };
}

function decodeHalf(h: number, dtype: HalfDtype): number {
  if (dtype === 'f16') return f16ToF32(h);
  u32[0] = h << 16;
  return f32v[0];
}

const MATRIX = /(_proj|lm_head)\.weight$|^model\.embed_tokens\.weight$/;

/**
 * A test model whose weights are exactly representable in `dtype`, as a float32 decoder and as
 * one holding its matrices in 16 bits.
 */
function pair(spec: (typeof ARCH_SPECS)[string], dtype: HalfDtype) {
  const m = makeTestModel(spec, 4, 0.2);
  const halves = new Map<string, HalfWeight>();
  for (const [name, t] of m.w) {
    const { bits, values } = toHalf(t.data, dtype);
    t.data = values;
    if (MATRIX.test(name)) halves.set(name, new HalfWeight(bits, dtype, [t.shape[0], t.shape[1]], isLinearWeight(name)));
  }
  const full = Decoder.fromHF(m.cfg, (n) => m.w.get(n)!, false);
  const half = Decoder.fromHF(m.cfg, (n) => halves.get(n) ?? m.w.get(n)!, false);
  return { ...m, full, half };
}

function randoms(rng: Rng, n: number, scale = 1): Float32Array {
  return Float32Array.from({ length: n }, () => rng.normal() * scale);
}

describe('16-bit frozen weights', () => {
  it('widen: every bf16 and f16 bit pattern to the float32 the file reader decodes (subnormals, ±0, ±Inf, NaN), vector body and scalar tail; the first non-finite index', () => {
    if (!native.active) return;
    for (const dtype of ['bf16', 'f16'] as const) {
      const all = Uint16Array.from({ length: 65536 }, (_, i) => i);
      for (const n of [65536, 7, 23]) {
        const got = widenHalf(new HalfWeight(all.subarray(0, n), dtype, [1, n], false));
        for (let h = 0; h < n; h++) {
          const want = decodeHalf(h, dtype);
          if (Number.isNaN(want)) expect(Number.isNaN(got[h]), `${dtype} ${h.toString(16)}`).toBe(true);
          else if (got[h] !== want || Object.is(got[h], -0) !== Object.is(want, -0)) expect(got[h], `${dtype} ${h.toString(16)}`).toBe(want);
        }
      }
      const first = dtype === 'bf16' ? 0x7f80 : 0x7c00; // +Inf: the lowest pattern with every exponent bit set
      expect(firstNonFiniteHalf(new HalfWeight(all, dtype, [256, 256], false))).toBe(first);
      expect(firstNonFiniteHalf(new HalfWeight(all.subarray(0, first), dtype, [1, first], false))).toBe(-1);
    }
  });

  it('a product with a 16-bit B equals the product with its float32 copy (bit for bit on the tiled kernel; in float32 rounding for decoding\'s few rows, which take dot products), either transpose, any tile remainder, and the float64 product', () => {
    if (!native.active) return;
    const rng = new Rng(21);
    for (const dtype of ['bf16', 'f16'] as const)
      for (const [M, K, N] of [[1, 37, 45], [3, 100, 33], [4, 300, 70], [5, 64, 40], [13, 64, 129], [40, 513, 33]])
        for (const tb of [false, true]) {
          const a = randoms(rng, M * K);
          const { bits, values } = toHalf(randoms(rng, K * N, 0.5), dtype);
          const hw = new HalfWeight(bits, dtype, tb ? [N, K] : [K, N], false);
          const got = matmulWeight(a, M, K, hw, N, tb);
          const copy = matmulWeight(a, M, K, values, N, tb);
          const what = `${dtype} ${M}×${K}×${N}${tb ? ' Bᵀ' : ''}`;
          if (M > 4 || !tb) expect(Buffer.from(got.buffer).equals(Buffer.from(copy.buffer)), what).toBe(true);
          else got.forEach((v, i) => expect(Math.abs(v - copy[i]), what).toBeLessThanOrEqual(1e-5 * (1 + Math.abs(copy[i]))));
          let worst = 0;
          for (let i = 0; i < M; i++)
            for (let j = 0; j < N; j++) {
              let s = 0;
              for (let k = 0; k < K; k++) s += a[i * K + k] * (tb ? values[j * K + k] : values[k * N + j]);
              worst = Math.max(worst, Math.abs(got[i * N + j] - s) / (1 + Math.abs(s)));
            }
          expect(worst, what).toBeLessThan(2e-5);
        }
  });

  const specs = ['llama GQA untied', 'qwen2 biases tied rope 1e6', 'zhinao fused qkv GQA', 'qwen3 q/k norms, head_dim 12 apart from hidden / heads, tied'];
  for (const name of specs)
    it(`${name}: logits from 16-bit matrices equal those of the float32 copy, and the float64 reference`, () => {
      if (!native.active || !fusedActive()) return;
      const dtype: HalfDtype = name.startsWith('qwen2') ? 'f16' : 'bf16';
      const { full, half, w, ref, cfg } = pair(ARCH_SPECS[name], dtype);
      expect(half.half.size).toBe([...w.keys()].filter((n) => MATRIX.test(n)).length);
      expect(half.paramCount()).toBe(full.paramCount());
      const ids = [3, 9, 1, 4, 7, 2, 8, 5];
      const logits = (m: Decoder) => tf.tidy(() => m.logits(tf.reshape(m.hidden({ ids, batch: 1, len: ids.length }), [ids.length, -1]) as tf.Tensor2D).dataSync() as Float32Array);
      const a = logits(half);
      const b = logits(full);
      expect(Buffer.from(a.buffer).equals(Buffer.from(b.buffer))).toBe(true);
      const want = referenceLogits(ref, w, ids);
      let worst = 0;
      want.forEach((row, t) => logSoftmax(row).forEach((v, j) => (worst = Math.max(worst, Math.abs(v - (a[t * cfg.vocab_size + j] - logsumexp(a as Float32Array, t, cfg.vocab_size)))))));
      expect(worst).toBeLessThan(1e-4);
      full.dispose();
      half.dispose();
    });

  it('decoding with the KV cache (rows of one token: the dot-product path) gives the float32 copy\'s logits to float32 rounding', () => {
    if (!native.active || !fusedActive()) return;
    const { full, half, cfg } = pair(ARCH_SPECS['qwen3 q/k norms, head_dim 12 apart from hidden / heads, tied'], 'bf16');
    const steps = (m: Decoder) => {
      const cache = new KVCache(cfg.num_hidden_layers, 2);
      const out: Float32Array[] = [];
      for (const ids of [[3, 9, 1, 4, 7, 2], [8, 5], [6, 1], [2, 2]]) {
        const T = ids.length / 2;
        out.push(tf.tidy(() => m.logits(tf.reshape(m.hidden({ ids, batch: 2, len: T }, cache), [ids.length, -1]) as tf.Tensor2D).dataSync() as Float32Array));
      }
      cache.dispose();
      return out;
    };
    const a = steps(half);
    const b = steps(full);
    a.forEach((x, s) => x.forEach((v, i) => expect(Math.abs(v - b[s][i]), `step ${s}`).toBeLessThanOrEqual(1e-5 * (1 + Math.abs(b[s][i])))));
    full.dispose();
    half.dispose();
  });

  it('LoRA on a 16-bit base (all seven linears, dropout, checkpointed layers): the loss and the adapter\'s gradients of the float32 copy, no tensor leaked', () => {
    if (!native.active || !fusedActive()) return;
    const { full, half, cfg } = pair(ARCH_SPECS['llama GQA untied'], 'bf16');
    const rng = new Rng(3);
    const batch = makeBatch([9, 6, 11].map((n) => ({ ids: Array.from({ length: n }, () => 2 + rng.int(cfg.vocab_size - 2)), weights: Array(n).fill(1) })));
    const step = (model: Decoder, checkpointed: boolean) => {
      const ad = LoraAdapter.create(model, { r: 4, alpha: 8, dropout: 0.1, targets: ['q_proj', 'k_proj', 'v_proj', 'o_proj', 'gate_proj', 'up_proj', 'down_proj'], useRslora: false }, 5);
      for (const w of ad.weights.values()) w.b.assign(tf.randomNormal(w.b.shape, 0, 0.3, 'float32', 6));
      attach(model, ad);
      model.checkpointLayers = checkpointed;
      const vars = [...ad.params().values()];
      const run = () => {
        ad.setTraining(true, new Rng(11));
        const { value, grads } = tf.variableGrads(() => sftLoss(model, batch), vars);
        const out = { loss: value.dataSync()[0], grads: vars.map((v) => grads[v.name].dataSync()) };
        tf.dispose([value, ...Object.values(grads)]);
        return out;
      };
      run();
      const before = tf.memory().numTensors;
      const out = run();
      expect(tf.memory().numTensors).toBe(before);
      ad.dispose();
      return out;
    };
    const want = step(full, false);
    for (const checkpointed of [false, true]) {
      const got = step(half, checkpointed);
      expect(got.loss).toBe(want.loss);
      got.grads.forEach((g, i) => expect(Buffer.from(g.buffer).equals(Buffer.from(want.grads[i].buffer)), `gradient ${i}${checkpointed ? ', checkpointed' : ''}`).toBe(true));
    }
    full.dispose();
    half.dispose();
  });

  it('loadModel keeps a bf16/f16 checkpoint\'s matrices in 16 bits when frozen (half the bytes), widens them when trainable or asked; saving gives the file\'s bits back; a NaN is refused by name', async () => {
    if (!native.active || !fusedActive()) return;
    const root = fs.mkdtempSync(path.join(os.tmpdir(), 'prefopt-half-'));
    try {
      for (const dtype of ['BF16', 'F16'] as const) {
        const m = makeTestModel(ARCH_SPECS['qwen2 biases tied rope 1e6'], 2, 0.2);
        const dir = path.join(root, dtype);
        await writeCheckpointFiles(dir, m.raw, [...m.w].map(([name, t]) => ({ name, shape: t.shape })), (n) => m.w.get(n)!.data, { dtype });
        const t0 = tf.memory().numBytes;
        const frozen = loadModel(dir);
        const halfBytes = tf.memory().numBytes - t0;
        const wide = loadModel(dir, { half: false });
        const wideBytes = tf.memory().numBytes - t0 - halfBytes;
        const trained = loadModel(dir, { trainable: true });
        const matrices = [...m.w.keys()].filter((n) => MATRIX.test(n));
        expect([...frozen.half.keys()].sort()).toEqual(matrices.sort());
        // The bits are views of the memory-mapped file, not copies.
        for (const h of frozen.half.values()) expect(h.bits.buffer.byteLength).toBe(fs.statSync(path.join(dir, 'model.safetensors')).size);
        expect(wide.half.size + trained.half.size).toBe(0);
        const matrixValues = matrices.reduce((s, n) => s + m.w.get(n)!.data.length, 0);
        expect(wideBytes - halfBytes).toBe(4 * matrixValues); // the matrices are not tfjs tensors …
        expect([...frozen.half.values()].reduce((s, h) => s + h.bytes, 0)).toBe(2 * matrixValues); // … but 2 bytes a value
        const ids = [5, 1, 7, 3, 2, 6]; // more rows than decoding's dot-product path takes: the tiled kernel, bit for bit
        const logits = (d: Decoder) => tf.tidy(() => d.logits(tf.reshape(d.hidden({ ids, batch: 1, len: 6 }), [6, -1]) as tf.Tensor2D).dataSync());
        expect(Array.from(logits(frozen))).toEqual(Array.from(logits(wide)));
        // Loaded to train: widened from the mapped bits straight into float32 parameters, the
        // same values as the float32 path, and the file unmapped once they are.
        for (const n of trained.names()) expect(Array.from(trained.p(n).dataSync()), n).toEqual(Array.from(wide.p(n).dataSync()));
        const st = TensorSource.open(dir);
        const view = st.halfBits(matrices[0]);
        expect(view.length).toBeGreaterThan(0);
        st.unmap();
        expect(view.length).toBe(0); // detached: reads as empty, never as unmapped memory
        expect(unmapFile(view.buffer as ArrayBuffer)).toBe(false); // and only once
        const out = path.join(root, dtype + '-saved');
        await saveModel(frozen, out, { dtype });
        const a = readHeader(path.join(dir, 'model.safetensors'));
        const b = readHeader(path.join(out, 'model.safetensors'));
        for (const n of matrices) expect(Buffer.from(readHalfBits(b, n).buffer).equals(Buffer.from(readHalfBits(a, n).buffer)), n).toBe(true);
        // Widening on demand (training it, or folding an adapter in) keeps the values.
        frozen.setTrainable(true);
        expect(frozen.half.size).toBe(0);
        expect(Array.from(logits(frozen))).toEqual(Array.from(logits(wide)));
        for (const d of [frozen, wide, trained]) d.dispose();
      }
      // A NaN in a bf16 matrix: refused, naming the file and the tensor.
      const m = makeTestModel(ARCH_SPECS['llama GQA untied'], 2, 0.2);
      m.w.get('model.layers.1.mlp.up_proj.weight')!.data[17] = NaN;
      const bad = path.join(root, 'nan');
      await writeCheckpointFiles(bad, m.raw, [...m.w].map(([name, t]) => ({ name, shape: t.shape })), (n) => m.w.get(n)!.data, { dtype: 'BF16' });
      expect(() => loadModel(bad)).toThrow(/model\.safetensors: tensor "model\.layers\.1\.mlp\.up_proj\.weight" holds a non-finite value at index 17/);
    } finally {
      fs.rmSync(root, { recursive: true, force: true });
    }
  });

  it('folding an adapter into a 16-bit base widens just the weights it touches, and equals folding it into the float32 copy', () => {
    if (!native.active || !fusedActive()) return;
    const { full, half } = pair(ARCH_SPECS['zhinao fused qkv GQA'], 'bf16');
    for (const model of [full, half]) {
      const ad = LoraAdapter.create(model, { r: 2, alpha: 4, dropout: 0, targets: ['qkv_proj'], useRslora: false }, 8);
      for (const w of ad.weights.values()) w.b.assign(tf.randomNormal(w.b.shape, 0, 0.3, 'float32', 9));
      mergeInto(model, ad);
      ad.dispose();
    }
    expect([...half.half.keys()].some((n) => n.includes('qkv_proj'))).toBe(false);
    expect(half.half.has('model.layers.0.mlp.up_proj.weight')).toBe(true);
    for (const n of full.names()) expect(Array.from(half.hfData(n)), n).toEqual(Array.from(full.hfData(n)));
    full.dispose();
    half.dispose();
  });
});

function logsumexp(x: Float32Array, row: number, V: number): number {
  let m = -Infinity;
  for (let j = 0; j < V; j++) m = Math.max(m, x[row * V + j]);
  let s = 0;
  for (let j = 0; j < V; j++) s += Math.exp(x[row * V + j] - m);
  return m + Math.log(s);
}
