import { expect, it } from 'vitest';
import * as tf from '@tensorflow/tfjs-core';
import { initBackend } from '../../src/engine/backend.js';
import { cudaAddon, loadNative } from '../../src/engine/native.js';
import { Decoder } from '../../src/model/decoder.js';
import { makeBatch, SeqBatch } from '../../src/infer/batch.js';
import { generate } from '../../src/infer/generate.js';
import { sftLoss } from '../../src/stages/sft.js';
import { AdamW } from '../../src/train/adamw.js';
import { openedCudaDevice } from '../../src/engine/cuda-device.js';
import { attentionMask, maskTensor } from '../../src/model/mask.js';
import { HalfWeight } from '../../src/engine/half.js';
import { isLinearWeight } from '../../src/model/config.js';
import { f32ToBf16Bits } from '../../src/io/safetensors.js';
import { Rng } from '../../src/util/rng.js';
import { loraDpoTrace, worstRel } from '../../bench/steps.js';
import { ARCH_SPECS, makeTestModel } from './models.js';
import { dropout } from '../../src/engine/dropout.js';
import { fused } from '../../src/engine/fused.js';
import { SAMPLE_DRAW_KERNEL, SAMPLE_EXPS_KERNEL, SAMPLE_KEPT_MAX } from '../../src/engine/kernels.js';
import { DEFAULT_SAMPLING, SamplingParams, sampleFromExps, sampleFromProbs, scaledExps } from '../../src/infer/sampling.js';
import { DEFAULT_DPO, dpoLosses } from '../../src/dpo/loss.js';
import { dpoBatchLoss, makeDpoBatches } from '../../src/stages/dpo.js';
import { DEFAULT_TRAIN, Trainer } from '../../src/train/trainer.js';
import { LoraAdapter, attach } from '../../src/lora/lora.js';
import type { PrefPair } from '../../src/data/prefs.js';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';

/*
 * The cuda backend's cases (engine/cuda-backend, -glue, -fused), run on whichever device the
 * calling test file opens — the emulated device (test/cuda-backend.test.ts) or the GPU code path
 * over stand-in CUDA libraries (test/cuda-standin.test.ts). Every result is checked against the
 * native backend (the host kernels, another implementation) or tfjs's cpu kernels.
 */
const native = loadNative();
const LINEARS = ['q_proj', 'k_proj', 'v_proj', 'o_proj', 'gate_proj', 'up_proj', 'down_proj'];

/** f on each backend in turn; tensors it returns are read to arrays. */
async function both<T>(f: () => T): Promise<{ native: T; cuda: T }> {
  await initBackend('native');
  const n = f();
  await initBackend('cuda');
  const c = f();
  return { native: n, cuda: c };
}

/** Float32 values as the bf16 bits nearest each. */
function bf16Of(data: Float32Array): Uint16Array {
  const u = new Uint32Array(data.buffer, data.byteOffset, data.length);
  return Uint16Array.from(u, (b) => f32ToBf16Bits(b));
}

function pairBatch(vocab: number, seed: number, lengths = [9, 6, 11, 7]): SeqBatch {
  const rng = new Rng(seed);
  return makeBatch(lengths.map((n) => ({ ids: Array.from({ length: n }, () => 2 + rng.int(vocab - 2)), weights: Array.from({ length: n }, (_, i) => (i < 3 ? 0 : 1)) })));
}

/** LoRA r 4 on every linear (the fused projection for zhinao), two steps at lr 1e-2. */
function loraDpo(model: Decoder, pb: SeqBatch, dropout: number) {
  const targets = model.cfg.arch === 'zhinao' ? ['qkv_proj', ...LINEARS.slice(3)] : LINEARS;
  return loraDpoTrace(model, pb, { dropout, steps: 2, lr: 1e-2, r: 4, targets });
}

function compareLora(r: { native: ReturnType<typeof loraDpo>; cuda: ReturnType<typeof loraDpo> }) {
  r.cuda.loss.forEach((l, i) => expect(Math.abs(l - r.native.loss[i]), `loss ${i}`).toBeLessThan(1e-5));
  for (const k of Object.keys(r.native.grads)) {
    expect(r.native.grads[k].some((g) => g !== 0), k).toBe(true);
    expect(worstRel(r.cuda.grads[k], r.native.grads[k]), `gradient ${k}`).toBeLessThan(2e-5);
  }
  // Not the adapters after the steps: Adam's first update is lr·g/(|g| + eps), the sign of g,
  // so a gradient element within rounding of zero may move either way (the update itself is
  // compared on equal gradients below). The second loss, after the update, must agree.
  for (const k of Object.keys(r.native.adapter)) expect(worstRel(r.cuda.adapter[k], r.native.adapter[k]), `adapter ${k}`).toBeLessThan(0.1);
}


/** The cases, inside the caller's describe. */
export function cudaBackendCases(): void {
  it('glue kernels give tfjs cpu kernels\' values: broadcast arithmetic, concat/stack/slice/split/transpose/pad, sums and addN, gather, batched products', async () => {
    if (!native.active) return;
    const rng = new Rng(1);
    const r = (shape: number[]) => tf.tensor(Float32Array.from({ length: shape.reduce((a, b) => a * b, 1) }, () => rng.normal()), shape);
    const cases: [string, () => tf.Tensor | tf.Tensor[]][] = [
      ['add broadcast', () => tf.add(r([2, 3, 4]), r([3, 1]))],
      ['sub scalar', () => tf.sub(r([5, 7]), tf.scalar(0.5))],
      ['mul', () => tf.mul(r([2, 1, 4]), r([1, 3, 4]))],
      ['div', () => tf.div(r([6, 5]), tf.add(tf.abs(r([5])), 1))],
      ['neg exp', () => tf.exp(tf.neg(r([33])))],
      ['concat axis 1', () => tf.concat([r([2, 3, 4]), r([2, 1, 4]), r([2, 5, 4])], 1)],
      ['concat int32', () => tf.concat([tf.tensor1d([1, 2], 'int32'), tf.tensor1d([3], 'int32')])],
      ['stack axis 1', () => tf.stack([r([2, 3]), r([2, 3]), r([2, 3])], 1)],
      ['stack scalars', () => tf.stack([tf.scalar(1.5), tf.scalar(-2), tf.scalar(3)])],
      ['addN', () => tf.addN([r([4, 5]), r([4, 5]), r([4, 5]), r([4, 5])])],
      ['slice', () => tf.slice(r([4, 6, 5]), [1, 2, 0], [2, -1, 3])],
      ['split', () => tf.split(r([3, 10]), [2, 5, 3], 1)],
      ['transpose', () => tf.transpose(r([2, 3, 4, 5]), [0, 2, 1, 3])],
      ['pad', () => tf.pad(r([2, 3]), [[1, 0], [2, 1]], 0.25)],
      ['sum rows', () => tf.sum(r([7, 9]), 1)],
      ['sum axes 0,2 keepDims', () => tf.sum(r([3, 4, 5]), [0, 2], true)],
      ['gather axis 1', () => tf.gather(r([3, 5, 2]), tf.tensor1d([4, 0, 4], 'int32'), 1)],
      ['matmul transposes', () => tf.matMul(r([5, 3]), r([4, 5]), true, true)],
      ['matmul batch broadcast', () => tf.matMul(r([2, 1, 3, 4]), r([1, 3, 4, 5]))],
      ['zeros fill', () => tf.add(tf.zerosLike(r([3, 3])), tf.fill([3, 3], 2.5))],
      ['ones like, float32 and int32', () => [tf.onesLike(r([2, 3])), tf.onesLike(tf.tensor1d([5, -2], 'int32')), tf.zerosLike(tf.tensor1d([7], 'int32'))]],
      ['reshape shares', () => tf.reshape(r([2, 6]), [3, -1])],
    ];
    // ZerosLike and OnesLike are device fills, not host kernels (a copy each way).
    await initBackend('cuda');
    const dev = openedCudaDevice()!;
    dev.profile(true);
    tf.tidy(() => [tf.onesLike(r([4])), tf.zerosLike(tf.tensor1d([1], 'int32'))].forEach((t) => t.dataSync()));
    expect(Object.keys(dev.profile(false)).filter((k) => k.startsWith('host '))).toEqual([]);
    for (const [name, f] of cases) {
      const res = await both(() => {
        const seed = new Rng(1);
        Object.assign(rng, seed);
        return tf.tidy(() => [f()].flat().map((t) => ({ shape: t.shape, dtype: t.dtype, values: Array.from(t.dataSync()) })));
      });
      expect(res.cuda, name).toEqual(res.native.map((o) => ({ ...o, values: expect.anything() })));
      res.native.forEach((o, i) => expect(worstRel(res.cuda[i].values, o.values), name).toBeLessThan(1e-6));
    }
  });

  it('the losses\' elementwise ops on the device give tfjs cpu kernels\' values, NaN, ±∞ and −0 included (min/max, comparisons, casts, |x|, logs, relu, step, mean); a DPO loss with its gradient and metrics runs no host kernel', async () => {
    if (!native.active) return;
    const special = [NaN, Infinity, -Infinity, 0, -0, 1.5, -2.5, 3e9, -3e9, 5e9, 1e-30, -0.75, 2, 0.5];
    const x = () => tf.tensor1d(special);
    const y = () => tf.tensor1d([...special].reverse());
    const cases: [string, () => tf.Tensor][] = [
      ['minimum', () => tf.minimum(x(), y())],
      ['maximum broadcast', () => tf.maximum(tf.reshape(x(), [2, 7]), tf.tensor1d([0, -0, 1, NaN, -1, 2, 3]))],
      ['minimum −0 +0', () => tf.minimum(tf.tensor1d([0, -0, -0, 0]), tf.tensor1d([-0, 0, -0, 0]))],
      ...(['less', 'lessEqual', 'greater', 'greaterEqual', 'equal', 'notEqual'] as const).map((op): [string, () => tf.Tensor] => [op, () => (tf[op] as any)(x(), tf.tensor1d([NaN, Infinity, 0, -0, 0, 1.5, 2, 3e9, -3e9, 1, 1e-30, -0.75, 2, -1]))]),
      ['abs', () => tf.abs(x())],
      ['log', () => tf.log(x())],
      ['log1p', () => tf.log1p(x())],
      ['relu', () => tf.relu(x())],
      ['square', () => tf.square(x())],
      ['sqrt', () => tf.sqrt(x())],
      ['sigmoid', () => tf.sigmoid(x())],
      ['step alpha −1', () => tf.step(x(), -1)],
      ['cast float32 → int32', () => tf.cast(x(), 'int32')],
      ['cast float32 → bool', () => tf.cast(x(), 'bool')],
      ['cast bool → float32', () => tf.cast(tf.greater(x(), 0), 'float32')],
      ['cast int32 → float32', () => tf.cast(tf.tensor1d([-7, 0, 2147483647, 16777217], 'int32'), 'float32')],
      ['cast bool → int32', () => tf.cast(tf.tensor1d([true, false, true], 'bool'), 'int32')],
      ['mean axis 1', () => tf.mean(tf.tensor2d([[1, 2, 3], [4, 5, 7.5]]), 1)],
      ['mean all keepDims', () => tf.mean(tf.tensor2d([[1, 2, 3], [4, 5, 7.5]]), undefined, true)],
    ];
    for (const [name, f] of cases) {
      const res = await both(() => tf.tidy(() => {
        const t = f();
        return { shape: t.shape, dtype: t.dtype, values: Array.from(t.dataSync()) };
      }));
      expect({ ...res.cuda, values: [] }, name).toEqual({ ...res.native, values: [] });
      res.native.values.forEach((v, i) => {
        const c = res.cuda.values[i];
        if (Object.is(v, c) || (Number.isNaN(v) && Number.isNaN(c))) return;
        expect(v === 0 || !Number.isFinite(v), `${name}[${i}]: ${Object.is(c, -0) ? '-0' : c} for ${Object.is(v, -0) ? '-0' : v}`).toBe(false);
        expect(Math.abs(c - v), `${name}[${i}]: ${c} for ${v}`).toBeLessThanOrEqual(1e-6 * Math.abs(v));
      });
    }
    // The sigmoid DPO loss (log σ through min, |x|, log1p) with label smoothing, its gradient and
    // the stage's metrics, from log-probs on the device: nothing goes to the host.
    await initBackend('cuda');
    const dev = openedCudaDevice()!;
    const lp = tf.variable(tf.tensor1d([-3, -5, -4, -2]));
    dev.profile(true);
    const { value, grads } = tf.variableGrads(() => {
      const l = dpoLosses({ policyChosen: tf.slice(lp, [0], [2]), policyRejected: tf.slice(lp, [2], [2]), refChosen: tf.tensor1d([-3.5, -4]), refRejected: tf.tensor1d([-4, -3]), lenChosen: tf.tensor1d([3, 4]), lenRejected: tf.tensor1d([5, 2]) }, { ...DEFAULT_DPO, labelSmoothing: 0.1 });
      tf.mean(tf.cast(tf.greater(l, 0.5), 'float32')).dispose();
      return tf.mean(l) as tf.Scalar;
    }, [lp]);
    const ops = dev.profile(false);
    expect(Object.keys(ops).filter((k) => k.startsWith('host '))).toEqual([]);
    const g = grads[lp.name].dataSync();
    // d/dΔ of −(1−ε)·log σ(βΔ) − ε·log σ(−βΔ) by hand, Δ = (π_w − ref_w) − (π_l − ref_l) of each
    // pair (β 0.1, ε 0.1), halved by the mean.
    const sig = (t: number) => 1 / (1 + Math.exp(-t));
    [0.5 - 0, -1 - 1].forEach((d, i) => {
      const dl = 0.5 * 0.1 * (-(0.9) * (1 - sig(0.1 * d)) + 0.1 * sig(0.1 * d));
      expect(g[i]).toBeCloseTo(dl, 6);
      expect(g[i + 2]).toBeCloseTo(-dl, 6);
    });
    expect(value.dataSync()[0]).toBeCloseTo(0.5 * [0.5, -2].reduce((s, d) => s - 0.9 * Math.log(sig(0.1 * d)) - 0.1 * Math.log(sig(-0.1 * d)), 0), 6);
    tf.dispose([value, lp, ...Object.values(grads)]);
  });

  it('attention masks made on the device equal the host\'s bit for bit (padding, packed segments, sliding windows, queries after a cache)', async () => {
    if (!native.active) return;
    await initBackend('cuda');
    const dev = openedCudaDevice()!;
    dev.profile(true);
    const rng = new Rng(5);
    for (let trial = 0; trial < 40; trial++) {
      const B = 1 + rng.int(3);
      const Tk = 1 + rng.int(40);
      const T = 1 + rng.int(Tk);
      const spec = {
        batch: B,
        queryLen: T,
        keyLen: Tk,
        keyValid: rng.next() < 0.6 ? Array.from({ length: B * Tk }, () => (rng.next() < 0.8 ? 1 : 0)) : undefined,
        segments: rng.next() < 0.4 ? Array.from({ length: B * Tk }, () => rng.int(3)) : undefined,
        window: rng.next() < 0.4 ? rng.int(6) : undefined,
      };
      const got = tf.tidy(() => maskTensor(spec).dataSync());
      expect(Array.from(got), `trial ${trial}`).toEqual(Array.from(attentionMask(spec)));
    }
    // Made by the device kernel each time, not by the host's loop.
    expect(dev.profile(false).attention_mask?.count).toBe(40);
  });

  it('attention as products (all at once, or in runs of batch entries, of an entry\'s kv groups, of a group\'s query heads) and as flash kernels gives the native backend\'s output and gradients: grouped heads, padded and packed rows, a sliding window, queries after cached keys', async () => {
    if (!native.active) return;
    const shapes = [
      { B: 2, T: 20, Tk: 20, H: 4, KV: 2, hd: 16 },
      { B: 1, T: 17, Tk: 24, H: 3, KV: 3, hd: 8 },
      { B: 3, T: 32, Tk: 32, H: 2, KV: 1, hd: 64 },
    ];
    const runs: Record<string, number> = {};
    try {
      // Smaller budgets, in bytes of scores (a head's: shape 0's 1600, 1's 1632, 2's 4096):
      // entries — shape 2's entries two and one at a time, the others whole (1 + 1 + 2 runs);
      // groups — shape 0's groups one at a time, 1's two then one, 2's heads one at a time (4 + 2 + 6);
      // heads — every query head alone, shape 2's past the budget (8 + 3 + 6).
      const MiB = (n: number) => ({ PREFOPT_CUDA_ATTENTION_MIB: String(n / 2 ** 20) });
      const ways = { products: {}, flash: {}, entries: MiB(16384), groups: MiB(4194), heads: MiB(1700) };
      for (const [way, env] of Object.entries(ways))
        for (const [i, { B, T, Tk, H, KV, hd }] of shapes.entries()) {
          process.env.PREFOPT_CUDA_ATTENTION = way === 'flash' ? 'flash' : 'products';
          Object.assign(process.env, env);
          const rng = new Rng(30 + i);
          const spec = { batch: B, queryLen: T, keyLen: Tk, keyValid: Array.from({ length: B * Tk }, (_, j) => (j % Tk < Tk - (j < Tk ? 3 : 0) ? 1 : 0)), segments: i === 1 ? Array.from({ length: B * Tk }, (_, j) => (j % Tk < 10 ? 0 : 1)) : undefined, window: i === 2 ? 9 : undefined };
          const r = (shape: number[]) => Float32Array.from({ length: shape.reduce((a, b) => a * b, 1) }, () => rng.normal());
          const data = { q: r([B, T, H, hd]), k: r([B, Tk, KV, hd]), v: r([B, Tk, KV, hd]), w: r([B, T, H, hd]) };
          const res = await both(() => tf.tidy(() => {
            const dev = openedCudaDevice();
            if (tf.getBackend() === 'cuda') dev!.profile(true);
            const mask = maskTensor(spec);
            const w = tf.tensor(data.w, [B, T, H, hd]);
            const f = (q: tf.Tensor, k: tf.Tensor, v: tf.Tensor) => tf.sum(tf.mul(fused.attention(q, k, v, mask, 1 / Math.sqrt(hd)), w));
            const { value, grads } = tf.valueAndGrads(f)([tf.tensor(data.q, [B, T, H, hd]), tf.tensor(data.k, [B, Tk, KV, hd]), tf.tensor(data.v, [B, Tk, KV, hd])]);
            const out = [value, ...grads].map((t) => Float32Array.from(t.dataSync()));
            if (tf.getBackend() === 'cuda') for (const [k, t] of Object.entries(dev!.profile(false))) runs[`${way} ${k}`] = (runs[`${way} ${k}`] ?? 0) + t.count;
            return out;
          }));
          res.native.forEach((x, j) => expect(worstRel(res.cuda[j], x), `${way} shape ${i} output ${j}`).toBeLessThan(2e-5));
        }
    } finally {
      delete process.env.PREFOPT_CUDA_ATTENTION;
      delete process.env.PREFOPT_CUDA_ATTENTION_MIB;
    }
    // Each way ran as asked: the products' row kernels, or the flash kernels, never both; in runs,
    // each run's probabilities forward and backward.
    for (const [way, n] of [['entries', 1 + 1 + 2], ['groups', 4 + 2 + 6], ['heads', 8 + 3 + 6]] as const) {
      expect(runs[`${way} softmax_rows`], way).toBe(2 * n);
      expect(runs[`${way} softmax_grad_rows`], way).toBe(n);
    }
    expect(runs['products softmax_rows']).toBe(2 * shapes.length);
    expect(runs['products softmax_grad_rows']).toBe(shapes.length);
    expect(runs['products attention_fwd']).toBeUndefined();
    expect(runs['flash attention_fwd']).toBe(shapes.length);
    expect(runs['flash softmax_rows']).toBeUndefined();
  });

  it('launches are checked against the kernel\'s parameters; device memory is freed with the tensors and cached for reuse', async () => {
    if (!native.active) return;
    await initBackend('cuda');
    const a = cudaAddon()!;
    expect(() => a.cudaLaunch('rms_norm', 1, 32, [0, 0, 4])).toThrow('cudaLaunch rms_norm: 3 arguments given, the kernel takes 8');
    expect(() => a.cudaLaunch('no_such', 1, 32, [])).toThrow('no kernel no_such in native/cuda/kernels.cu');
    expect(() => a.cudaLaunch('fill32', 1, 32, [0, 1.5, 0])).toThrow('argument 1 is not an integer');
    // The addon's argument checks (native/napi_args.h), before any device work.
    expect(() => (a.cudaLaunch as any)('fill32', 1, 32)).toThrow(new TypeError('cudaLaunch: wrong number of arguments'));
    expect(() => a.cudaAlloc(-1)).toThrow(new RangeError('cudaAlloc: an address or size is not a non-negative integer below 2^53'));
    expect(() => a.cudaCopy(0, 2 ** 53, 4)).toThrow(RangeError);
    expect(() => a.cudaUpload(0, [1, 2] as any)).toThrow(new TypeError('cudaUpload: argument 1 must be a typed array'));
    expect(() => (a.cudaGemm as any)([1, 2])).toThrow('cudaGemm: 16 numbers expected');
    const before = a.cudaStats().live;
    const x = tf.randomNormal([300, 300]);
    const y = tf.matMul(x, x);
    expect(a.cudaStats().live).toBeGreaterThanOrEqual(before + 2 * 300 * 300 * 4);
    tf.dispose([x, y]);
    expect(a.cudaStats().live).toBe(before);
    expect(a.cudaStats().cached).toBeGreaterThan(0);
    a.cudaTrim();
    expect(a.cudaStats().cached).toBe(0);
  });

  it('uploads queue behind the device\'s work and arrive in order: 25 MB in small uploads without a wait between (one and a half times the GPU\'s staging ring), 2.4 MB ones a staging segment at a time, a large one after them; only downloads and large uploads wait', async () => {
    if (!native.active) return;
    await initBackend('cuda');
    const a = cudaAddon()!;
    const dev = openedCudaDevice()!;
    const n = 64_000; // 256 KB each: four to a staging segment, so segments fill and are left
    const blocks = Array.from({ length: 100 }, () => dev.alloc(4 * n));
    a.cudaStats(true);
    blocks.forEach((b, i) => dev.upload(b, Float32Array.from({ length: n }, (_, j) => i * n + j)));
    // Uploads over one staging segment (rotary tables of long rows), in segments: no wait either.
    const mid = Array.from({ length: 9 }, (_, i) => Float32Array.from({ length: 600_000 }, (_, j) => i + j / 4));
    const mids = mid.map((m) => dev.alloc(m.byteLength));
    mid.forEach((m, i) => dev.upload(mids[i], m));
    expect(a.cudaStats().waits).toBe(0);
    // A large upload over a block whose small upload may still be queued: the large one is last.
    const big = Float32Array.from({ length: 1_200_000 }, (_, j) => -j);
    const wide = dev.alloc(4 * big.length);
    dev.upload(wide, Float32Array.from({ length: 16 }, () => 7));
    dev.upload(wide, big);
    expect(a.cudaStats().waits).toBe(1);
    const out = new Float32Array(n);
    blocks.forEach((b, i) => {
      dev.download(b, out);
      expect(out[0], `block ${i}`).toBe(i * n);
      expect(out[n - 1], `block ${i}`).toBe(i * n + n - 1);
    });
    const back = new Float32Array(big.length);
    dev.download(wide, back);
    expect(Buffer.from(back.buffer).equals(Buffer.from(big.buffer))).toBe(true);
    mid.forEach((m, i) => {
      const got = new Float32Array(m.length);
      dev.download(mids[i], got);
      expect(Buffer.from(got.buffer).equals(Buffer.from(m.buffer)), `upload ${i} in segments`).toBe(true);
    });
    expect(a.cudaStats().waits).toBe(1 + blocks.length + 1 + mid.length);
    [...blocks, ...mids, wide].forEach((b) => dev.free(b));
  });

  for (const arch of ['qwen2 biases tied rope 1e6', 'qwen3 q/k norms, head_dim 12 apart from hidden / heads, tied', 'zhinao fused qkv GQA', 'mistral sliding window 3', 'llama with attention_bias'])
    it(`LoRA DPO with dropout (${arch}): loss, adapter gradients and two AdamW steps as on the native backend; no tensor or device memory kept`, async () => {
      if (!native.active) return;
      const m = makeTestModel(ARCH_SPECS[arch], 4, 0.2);
      const pb = pairBatch(m.cfg.vocab_size, 2);
      const res = await both(() => {
        const model = Decoder.fromHF(m.cfg, (n) => m.w.get(n)!, false);
        const tensors = tf.memory().numTensors;
        const live = tf.getBackend() === 'cuda' ? cudaAddon()!.cudaStats().live : 0;
        const out = loraDpo(model, pb, 0.1);
        expect(tf.memory().numTensors).toBe(tensors);
        if (tf.getBackend() === 'cuda') expect(cudaAddon()!.cudaStats().live).toBe(live);
        model.dispose();
        return out;
      });
      compareLora(res);
    });

  it('a LoRA DPO training step (the dpo stage\'s loss and metrics, two micro-batches, dropout, clipping, AdamW) waits for the device once, and logs the native backend\'s values', async () => {
    if (!native.active) return;
    const m = makeTestModel(ARCH_SPECS['qwen2 biases tied rope 1e6'], 4, 0.2);
    const rng = new Rng(8);
    const ids = (n: number) => Array.from({ length: n }, () => 2 + rng.int(m.cfg.vocab_size - 2));
    const pairs: PrefPair[] = Array.from({ length: 4 }, (_, i) => ({ prompt: ids(3 + i), chosen: ids(4), rejected: ids(2 + i), where: `pair ${i}` }));
    const batches = makeDpoBatches(pairs, { chosen: [-20, -21, -19, -22], rejected: [-18, -23, -20, -21] }, 2, 0);
    let waits = -1;
    const res = await both(() => {
      const model = Decoder.fromHF(m.cfg, (n) => m.w.get(n)!, false);
      const ad = LoraAdapter.create(model, { r: 4, alpha: 8, dropout: 0.1, targets: LINEARS, useRslora: false }, 0);
      attach(model, ad);
      const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'prefopt-waits-'));
      const tr = new Trainer({ params: ad.params(), model, trainBatches: batches, tokens: () => 1, loss: (b, r, training) => (ad.setTraining(training, r), dpoBatchLoss(model, b, DEFAULT_DPO)) }, { ...DEFAULT_TRAIN, gradAccum: 2, lr: 1e-2, maxGradNorm: 1e-3 }, dir);
      const a = cudaAddon()!;
      if (tf.getBackend() === 'cuda') a.cudaStats(true);
      const logged = tr.trainStep();
      if (tf.getBackend() === 'cuda') waits = a.cudaStats().waits;
      ad.dispose();
      model.dispose();
      return logged;
    });
    expect(waits).toBe(1);
    expect(Object.keys(res.cuda).sort()).toEqual(Object.keys(res.native).sort());
    expect(res.native['rewards/accuracies']).toBeGreaterThanOrEqual(0);
    for (const k of Object.keys(res.native)) expect(Math.abs(res.cuda[k] - res.native[k]), k).toBeLessThanOrEqual(1e-5 * Math.max(1, Math.abs(res.native[k])));
  });

  it('AdamW on the device (weight decay, gradient scale, bias corrections; tensors over several of the kernel\'s chunks) gives the host\'s update on the same gradients', async () => {
    if (!native.active) return;
    const rng = new Rng(11);
    const n = 15000;
    const init = Float32Array.from({ length: n }, () => rng.normal());
    const gs = [0, 1, 2].map(() => Float32Array.from({ length: n }, () => rng.normal() * (rng.next() < 0.1 ? 1e-6 : 1)));
    // Matrices (decayed) around a norm weight (not), as the optimizer tells them apart by name:
    // 9000 and 5800 elements span three and two of the kernel's 4096-element chunks.
    const parts: [string, number[], number][] = [['w', [100, 90], 0], ['layer.norm.weight', [200], 9000], ['w2', [58, 100], 9200]];
    const res = await both(() => {
      const params = new Map(parts.map(([name, shape, at]) => [name, tf.variable(tf.tensor(init.slice(at, at + shape.reduce((a, b) => a * b)), shape), true, `adamw-${name}-${tf.getBackend()}`)]));
      const opt = new AdamW({ beta1: 0.9, beta2: 0.95, eps: 1e-8, weightDecay: 0.1 }, params);
      for (const g of gs) tf.tidy(() => opt.step(new Map(parts.map(([name, shape, at]) => [name, tf.tensor(g.slice(at, at + shape.reduce((a, b) => a * b)), shape)])), 1e-2, 0.7));
      const out = Float32Array.from([...params.values()].flatMap((p) => Array.from(p.dataSync())));
      opt.dispose();
      params.forEach((p) => p.dispose());
      return out;
    });
    // The kernel is the CPU's update, operation for operation: the same bits.
    expect(Array.from(res.cuda)).toEqual(Array.from(res.native));
    expect(worstRel(res.native, init)).toBeGreaterThan(1e-3); // it moved
  });

  /** A llama model whose matrices are bf16 bits, and LoRA DPO on it on both backends. */
  const bf16Base = async (bf16Products: boolean) => {
    const m = makeTestModel(ARCH_SPECS['llama GQA untied'], 4, 0.2);
    const halves = new Map<string, HalfWeight>();
    for (const [name, t] of m.w) {
      if (!/(_proj|lm_head)\.weight$|^model\.embed_tokens\.weight$/.test(name)) continue;
      halves.set(name, new HalfWeight(bf16Of(t.data), 'bf16', [t.shape[0], t.shape[1]], isLinearWeight(name)));
    }
    const pb = pairBatch(m.cfg.vocab_size, 5);
    const before = process.env.PREFOPT_CUDA_BF16;
    process.env.PREFOPT_CUDA_BF16 = bf16Products ? '1' : '0';
    try {
      return await both(() => {
        const model = Decoder.fromHF(m.cfg, (n) => halves.get(n) ?? m.w.get(n)!, false);
        const out = loraDpo(model, pb, 0);
        model.dispose();
        return out;
      });
    } finally {
      if (before === undefined) delete process.env.PREFOPT_CUDA_BF16;
      else process.env.PREFOPT_CUDA_BF16 = before;
    }
  };

  it('LoRA on a bf16 base, weights widened on the device (PREFOPT_CUDA_BF16=0): the native backend\'s gradients', async () => {
    if (!native.active) return;
    compareLora(await bf16Base(false));
  });

  it('LoRA on a bf16 base with bf16 products (the default): within bf16 rounding of the float32 result, and not equal to it', async () => {
    if (!native.active) return;
    const r = await bf16Base(true);
    r.cuda.loss.forEach((l, i) => expect(Math.abs(l - r.native.loss[i]), `loss ${i}`).toBeLessThan(2e-2 * Math.max(1, Math.abs(r.native.loss[i]))));
    let rounded = 0;
    for (const k of Object.keys(r.native.grads)) {
      const rel = worstRel(r.cuda.grads[k], r.native.grads[k]);
      expect(rel, `gradient ${k}`).toBeLessThan(5e-2);
      rounded = Math.max(rounded, rel);
    }
    expect(rounded).toBeGreaterThan(1e-5); // the activations really went through bf16
  });

  it('dropout masks drawn on the device are tf.dropout\'s (the CPU kernel\'s) bit for bit, forward and backward; a mask over 16M elements grows the jump table', async () => {
    if (!native.active) return;
    // Sizes: under one chunk; 300,001 (not a multiple of a word or of the 256-draw chunk);
    // 17M (past the 16,384 chunks made at start). Seeds give unrelated generator states.
    for (const [n, seed, rate] of [[200, 5, 0.5], [300_001, 11, 0.05], [17_000_003, 3, 0.3]] as const) {
      const res = await both(() => {
        const x = tf.fill([n], 1.5);
        const [y, g] = tf.tidy(() => {
          const f = (t: tf.Tensor) => tf.sum(tf.mul(dropout(t, rate, seed), tf.mod(tf.range(0, n), 7)));
          return [dropout(x, rate, seed), tf.grad(f)(x)];
        });
        const out = { y: y.dataSync() as Float32Array, g: g.dataSync() as Float32Array };
        tf.dispose([x, y, g]);
        return out;
      });
      let diff = 0;
      let kept = 0;
      for (let i = 0; i < n; i++) {
        if (res.cuda.y[i] !== res.native.y[i] || res.cuda.g[i] !== res.native.g[i]) diff++;
        if (res.native.y[i] !== 0) kept++;
      }
      expect(diff, `n ${n}`).toBe(0);
      expect(Math.abs(kept / n - (1 - rate))).toBeLessThan(n > 10_000 ? 0.01 : 0.06); // a mask, not all or nothing
    }
    // A mask kept as host bits (the path of devices that keep masks) applied on this device.
    await initBackend('cuda');
    const n = 1000;
    const rng = new Rng(4);
    const bits = Uint32Array.from({ length: Math.ceil(n / 32) }, () => (rng.next() * 2 ** 32) >>> 0);
    const x = tf.tensor1d(Float32Array.from({ length: n }, (_, i) => i - 500));
    const y = tf.engine().runKernel('PrefoptDropoutBits', { x }, { bits, keep: 0.8 }) as tf.Tensor;
    const want = Float32Array.from({ length: n }, (_, i) => ((bits[i >> 5] >>> (i & 31)) & 1 ? Math.fround((i - 500) * Math.fround(1 / 0.8)) : 0));
    expect([...(y.dataSync() as Float32Array)].map((v) => v + 0)).toEqual([...want]);
    tf.dispose([x, y]);
  }, 120_000);

  it('to_bf16 rounds as the checkpoint writer does: to nearest, ties to even, NaN kept, overflow to infinity', async () => {
    if (!native.active) return;
    await initBackend('cuda');
    const a = cudaAddon()!;
    const rng = new Rng(5);
    const u = new Uint32Array([0x3f808000, 0x3f818000, 0x3f80ffff, 0x7f7fffff, 0xff7fffff, 0x7fc00001, 0xffa00000, 0x80000000, 0x00000001, 0x7f800000, ...Array.from({ length: 1000 }, () => (rng.next() * 2 ** 32) >>> 0)]);
    const x = new Float32Array(u.buffer);
    const dx = a.cudaAlloc(4 * x.length);
    const dy = a.cudaAlloc(2 * x.length);
    a.cudaUpload(dx, x);
    a.cudaLaunch('to_bf16', 1, 256, [dx, x.length, dy]);
    const got = new Uint16Array(x.length);
    a.cudaDownload(dy, got);
    a.cudaFree(dx);
    a.cudaFree(dy);
    expect(Array.from(got)).toEqual(Array.from(u, (b) => f32ToBf16Bits(b)));
    expect(got[0]).toBe(0x3f80); // a tie, to even
    expect(got[1]).toBe(0x3f82); // a tie, up to even
    expect(got[3]).toBe(0x7f80); // past bf16's largest: +Inf
  });

  it('sampling\'s exps on the device are Math.exp\'s bits (fdlibm\'s exp in double), and sampled decoding draws the native backend\'s tokens: drawn on the device with or without top-k/top-p (a row keeping more tokens than the device sorts drawn on the host), exps for a prompt\'s repeated samples; penalties keep the host\'s path', async () => {
    if (!native.active) return;
    await initBackend('cuda');
    const rng = new Rng(21);
    // Logits spread over every branch of exp: |x| under 2⁻²⁸, under 3·ln2/2, large, underflowing.
    const V = 3000;
    const rows = [
      Float32Array.from({ length: V }, () => rng.normal() * 3),
      Float32Array.from({ length: V }, (_, i) => (i % 5 === 0 ? -800 - i : i % 7 === 0 ? 1e-9 * rng.normal() : rng.normal() * 0.4)),
      Float32Array.from({ length: V }, (_, i) => (i === 17 ? 3e4 : rng.normal() * 1e3)),
    ];
    for (const t of [1, 0.7, 0.013]) {
      const x = tf.tensor2d(Float32Array.from(rows.flatMap((r) => Array.from(r))), [rows.length, V]);
      const y = tf.engine().runKernel(SAMPLE_EXPS_KERNEL, { logits: x }, { temperature: t }) as tf.Tensor;
      const got = new Float64Array((y.dataSync() as Float32Array).buffer);
      tf.dispose([x, y]);
      rows.forEach((r, i) => {
        const want = scaledExps(r, t);
        expect(Buffer.from(got.buffer, i * V * 8, V * 8).equals(Buffer.from(want.buffer)), `row ${i}, t ${t}`).toBe(true);
      });
    }
    // The draw itself: 64 rows, each row's uniform also handed to the host's draw.
    {
      const R = 64;
      const logits = Float32Array.from({ length: R * V }, (_, i) => rng.normal() * (1 + (i % 3)) + (i % 97 === 0 ? 6 : 0));
      const draws = Array.from({ length: R }, (_, i) => (i === 0 ? 0.9999999999999999 : i === 1 ? 0 : rng.next()));
      const x = tf.tensor2d(logits, [R, V]);
      const y = tf.engine().runKernel(SAMPLE_DRAW_KERNEL, { logits: x }, { temperature: 0.8, draws }) as tf.Tensor[];
      const got = Array.from(y[0].dataSync());
      tf.dispose([x, ...y]);
      const want = draws.map((u, r) => sampleFromExps(scaledExps(logits.subarray(r * V, (r + 1) * V), 0.8), DEFAULT_SAMPLING, { next: () => u } as Rng));
      expect(got).toEqual(want);
      expect(new Set(want).size).toBeGreaterThan(20);
      // With top-k and top-p (sample_kept): rows peaked, flat, and of ties with zeros, so that cuts
      // fall inside runs of ties; a row keeping more than the device sorts comes back as −1 with
      // its probabilities, the host's bit for bit.
      const tied = Float32Array.from({ length: V }, (_, i) => (i % 3 ? -1e4 : -(i % 24) / 8));
      const rowsK = Array.from({ length: R }, (_, r) => (r % 4 === 3 ? tied : r % 4 === 2 ? logits.subarray(r * V, (r + 1) * V).map((v) => v * 0.05) : logits.subarray(r * V, (r + 1) * V)));
      const xk = tf.tensor2d(Float32Array.from(rowsK.flatMap((r) => Array.from(r))), [R, V]);
      let unsettled = 0;
      for (const f of [{ topK: 20, topP: 1 }, { topK: 20, topP: 0.8 }, { topK: 0, topP: 0.95 }, { topK: 0, topP: 0.6 }, { topK: 2500, topP: 1 }, { topK: 1, topP: 1 }]) {
        const [yi, yp] = tf.engine().runKernel(SAMPLE_DRAW_KERNEL, { logits: xk }, { temperature: 0.8, draws, ...f }) as tf.Tensor[];
        const ids = Array.from(yi.dataSync());
        const probs = new Float64Array((yp.dataSync() as Float32Array).slice().buffer);
        tf.dispose([yi, yp]);
        const p = { ...DEFAULT_SAMPLING, temperature: 0.8, ...f };
        rowsK.forEach((row, r) => {
          const e = scaledExps(row, 0.8);
          const z = e.reduce((a, b) => a + b, 0);
          const mine = Float64Array.from(e, (v) => v / z);
          const want = sampleFromExps(e, p, { next: () => draws[r] } as Rng);
          if (ids[r] >= 0) expect(ids[r], `row ${r}, ${JSON.stringify(f)}`).toBe(want);
          else {
            unsettled++;
            expect(Buffer.from(probs.buffer, r * V * 8, V * 8).equals(Buffer.from(mine.buffer)), `row ${r} probs`).toBe(true);
            expect(sampleFromProbs(mine, p, draws[r])).toBe(want);
          }
        });
        if (f.topK === 2500) expect(ids.every((id) => id === -1)).toBe(true);
        if (f.topK === 20) expect(ids.every((id) => id >= 0)).toBe(true);
      }
      expect(unsettled).toBeGreaterThan(R); // top_k 2500's rows, and top_p 0.95's flat rows
      expect(unsettled).toBeLessThan(3 * R);
      xk.dispose();
    }
    const small = makeTestModel(ARCH_SPECS['qwen2 biases tied rope 1e6'], 2, 0.3);
    const dev = openedCudaDevice()!;
    const decode = (p: Partial<SamplingParams>, seeds = [[1, 2, 3], [4, 5, 6]], m = small) =>
      both(() => {
        const model = Decoder.fromHF(m.cfg, (n) => m.w.get(n)!, false);
        if (tf.getBackend() === 'cuda') dev.profile(true);
        const gen = generate(model, [{ prompt: [5, 6, 7, 8], seeds: seeds[0] }, { prompt: [9, 3], seeds: seeds[1] }], { ...DEFAULT_SAMPLING, ...p, maxNewTokens: 12, stopIds: [] });
        const ops = tf.getBackend() === 'cuda' ? dev.profile(false) : {};
        model.dispose();
        return { ids: gen.map((r) => r.map((s) => s.ids)), exps: ops.sample_exps?.count ?? 0, drawn: ops.sample_draw?.count ?? 0, kept: ops.sample_kept?.count ?? 0 };
      });
    // Top-p: every step's tokens are drawn on the device, the prefill's too (each prompt's logits
    // repeated there for its three samples).
    const filtered = await decode({ temperature: 0.9, topP: 0.95 });
    expect(filtered.cuda.ids).toEqual(filtered.native.ids);
    expect([filtered.cuda.exps, filtered.cuda.drawn, filtered.cuda.kept]).toEqual([12, 0, 12]);
    expect(new Set(filtered.native.ids.flat(2)).size).toBeGreaterThan(5);
    // Top-k past what the device sorts: every step's exps come down (the prefill's, a prompt's
    // row, repeated on the host).
    const wide = await decode({ temperature: 0.9, topK: SAMPLE_KEPT_MAX + 1, topP: 1 });
    expect(wide.cuda.ids).toEqual(wide.native.ids);
    expect([wide.cuda.exps, wide.cuda.kept]).toEqual([12, 0]);
    // A vocabulary of 3000 nearly flat logits: top-p 0.99 keeps more tokens than the device sorts,
    // and those rows are drawn on the host from the probabilities that come back with the ids
    // (the prefill's rows, two samples a prompt, repeated on the device).
    const flat = makeTestModel({ ...ARCH_SPECS['qwen2 biases tied rope 1e6'], vocab: 3000 }, 2, 0.05);
    const many = await decode({ temperature: 1, topP: 0.99 }, [[1, 2], [3, 4]], flat);
    expect(many.cuda.ids).toEqual(many.native.ids);
    expect([many.cuda.exps, many.cuda.kept]).toEqual([12, 12]);
    expect(new Set(many.native.ids.flat(2)).size).toBeGreaterThan(15);
    // Nothing filtered: the same, by sample_draw; prompts with samples of their own too.
    const plain = await decode({ temperature: 0.9 });
    expect(plain.cuda.ids).toEqual(plain.native.ids);
    expect([plain.cuda.exps, plain.cuda.drawn]).toEqual([12, 12]);
    const apart = await decode({ temperature: 1.3 }, [[7], [8, 9]]);
    expect(apart.cuda.ids).toEqual(apart.native.ids);
    expect([apart.cuda.exps, apart.cuda.drawn]).toEqual([12, 12]);
    const penalised = await decode({ temperature: 0.9, repetitionPenalty: 1.3 });
    expect(penalised.cuda.ids).toEqual(penalised.native.ids);
    expect([penalised.cuda.exps, penalised.cuda.drawn]).toEqual([0, 0]);
  });

  it('a full SFT step (every weight trains) and greedy decoding with the KV cache match the native backend', async () => {
    if (!native.active) return;
    const m = makeTestModel(ARCH_SPECS['qwen2 biases tied rope 1e6'], 2, 0.3);
    // 3 × 31 tokens: the device's column sums (RMSNorm weights, biases) take two chunks of rows,
    // and a small vocabulary repeats ids (the embedding gradient's groups).
    const sb = pairBatch(m.cfg.vocab_size, 9, [31, 30, 25]);
    const res = await both(() => {
      // A copy each: a trainable weight may be the tensor's own memory, updated in place.
      const model = Decoder.fromHF(m.cfg, (n) => ({ ...m.w.get(n)!, data: m.w.get(n)!.data.slice() }), true);
      const opt = new AdamW({ beta1: 0.9, beta2: 0.95, eps: 1e-8, weightDecay: 0.1 }, model.params);
      const { value, grads } = tf.variableGrads(() => sftLoss(model, sb), [...model.params.values()]);
      const loss = value.dataSync()[0];
      opt.step(new Map([...model.params].map(([n, v]) => [n, grads[v.name]])), 1e-3);
      tf.dispose([value, ...Object.values(grads)]);
      const after = Object.fromEntries([...model.params].map(([n, v]) => [n, v.dataSync() as Float32Array]));
      const gen = generate(model, [{ prompt: [5, 6, 7, 8], seeds: [1] }, { prompt: [9, 3], seeds: [2, 3] }], { maxNewTokens: 8, stopIds: [], temperature: 0, topK: 0, topP: 1, repetitionPenalty: 1, presencePenalty: 0, frequencyPenalty: 0 });
      opt.dispose();
      model.dispose();
      return { loss, after, gen: gen.map((r) => r.map((s) => s.ids)) };
    });
    expect(Math.abs(res.cuda.loss - res.native.loss)).toBeLessThan(1e-5);
    for (const k of Object.keys(res.native.after)) expect(worstRel(res.cuda.after[k], res.native.after[k]), k).toBeLessThan(1e-5);
    expect(res.cuda.gen).toEqual(res.native.gen);
    expect(new Set(res.native.gen.flat(2)).size).toBeGreaterThan(1); // not a constant stream
  });
}
