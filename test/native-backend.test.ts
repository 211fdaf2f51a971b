import { describe, expect, it } from 'vitest';
import * as tf from '@tensorflow/tfjs-core';
import { initBackend } from '../src/engine/backend.js';
import { loadNative, nativeAllocator } from '../src/engine/native.js';
import { Decoder } from '../src/model/decoder.js';
import { LoraAdapter, attach } from '../src/lora/lora.js';
import { makeBatch } from '../src/infer/batch.js';
import { sftLoss } from '../src/stages/sft.js';
import { Rng } from '../src/util/rng.js';
import { ARCH_SPECS, makeTestModel } from './helpers/models.js';
import { logSoftmax, referenceLogits } from './helpers/reference.js';

/*
 * The native backend (engine/native-backend): the cpu backend's kernels with prefopt's kernels'
 * outputs in memory the addon owns, freed on dispose. Each check runs the same computation on
 * the wasm backend (the suite's default) and on the native one, from the same host arrays.
 */
const native = loadNative();
const nativeBytes = () => (tf.memory() as any).nativeBytes as number;

async function on<T>(backend: 'wasm' | 'native', f: () => T): Promise<T> {
  await initBackend(backend);
  return f();
}

function rand(rng: Rng, n: number): Float32Array {
  return Float32Array.from({ length: n }, () => rng.normal());
}

describe('native backend', () => {
  it('products in every transpose layout equal wasm\'s and the float64 product; outputs are native memory, freed on dispose', async () => {
    if (!native.active) return;
    const rng = new Rng(4);
    const [M, K, N] = [37, 70, 129];
    const a = rand(rng, M * K);
    const b = rand(rng, K * N);
    for (const [ta, tb] of [[false, false], [false, true], [true, false], [true, true]] as const) {
      const run = () => tf.tidy(() => tf.matMul(tf.tensor2d(a, ta ? [K, M] : [M, K]), tf.tensor2d(b, tb ? [N, K] : [K, N]), ta, tb).dataSync() as Float32Array);
      const w = await on('wasm', run);
      const n = await on('native', run);
      expect(Array.from(n)).toEqual(Array.from(w));
      let worst = 0;
      for (let i = 0; i < M; i++)
        for (let j = 0; j < N; j++) {
          let s = 0;
          for (let k = 0; k < K; k++) s += (ta ? a[k * M + i] : a[i * K + k]) * (tb ? b[j * K + k] : b[k * N + j]);
          worst = Math.max(worst, Math.abs(n[i * N + j] - s));
        }
      expect(worst, `ta ${ta} tb ${tb}`).toBeLessThan(1e-4);
    }
    await initBackend('native');
    const before = nativeBytes();
    const x = tf.matMul(tf.tensor2d(a, [M, K]), tf.tensor2d(b, [K, N]));
    expect(nativeBytes() - before).toBe(4 * M * N);
    const kept = x.dataSync();
    const view = tf.reshape(x, [N, M]); // shares x's memory
    x.dispose();
    expect(nativeBytes() - before).toBe(4 * M * N); // still read by the reshape
    view.dispose();
    expect(nativeBytes()).toBe(before); // freed now, without a garbage collection
    expect(kept[5]).toBeCloseTo(Array.from({ length: K }, (_, k) => a[k] * b[k * N + 5]).reduce((s, v) => s + v, 0), 3); // a copy, still readable
  });

  for (const name of ['llama GQA untied', 'zhinao fused qkv GQA', 'qwen3 q/k norms, head_dim 12 apart from hidden / heads, tied'])
    it(`${name}: logits equal wasm's and the float64 reference`, async () => {
      if (!native.active) return;
      const { cfg, w, ref } = makeTestModel(ARCH_SPECS[name], 6, 0.2);
      const ids = [3, 9, 1, 4, 7, 2, 8, 5];
      const logits = () => {
        const m = Decoder.fromHF(cfg, (n) => w.get(n)!, false);
        const out = tf.tidy(() => m.logits(tf.reshape(m.hidden({ ids, batch: 1, len: ids.length }), [ids.length, -1]) as tf.Tensor2D).dataSync() as Float32Array);
        m.dispose();
        return out;
      };
      const a = await on('wasm', logits);
      const b = await on('native', logits);
      expect(Array.from(b)).toEqual(Array.from(a));
      const V = cfg.vocab_size;
      let worst = 0;
      referenceLogits(ref, w, ids).forEach((row, t) => {
        const got = logSoftmax(Array.from(b.subarray(t * V, (t + 1) * V)));
        logSoftmax(row).forEach((v, j) => (worst = Math.max(worst, Math.abs(v - got[j]))));
      });
      expect(worst).toBeLessThan(1e-4);
    });

  it('a LoRA step (dropout, checkpointed layers): wasm\'s loss and gradients; tensors and native bytes flat across steps, and all returned when the model goes', async () => {
    if (!native.active) return;
    const { cfg, w } = makeTestModel(ARCH_SPECS['llama GQA untied'], 6, 0.2);
    const rng = new Rng(3);
    const batch = makeBatch([9, 6, 11].map((n) => ({ ids: Array.from({ length: n }, () => 2 + rng.int(cfg.vocab_size - 2)), weights: Array(n).fill(1) })));
    const step = async (backend: 'wasm' | 'native') => {
      await initBackend(backend);
      const base = backend === 'native' ? nativeBytes() : 0;
      const model = Decoder.fromHF(cfg, (n) => w.get(n)!, false);
      model.checkpointLayers = true;
      const ad = LoraAdapter.create(model, { r: 4, alpha: 8, dropout: 0.1, targets: ['q_proj', 'v_proj', 'down_proj'], useRslora: false }, 5);
      for (const v of ad.weights.values()) v.b.assign(tf.randomNormal(v.b.shape, 0, 0.3, 'float32', 6));
      attach(model, ad);
      const vars = [...ad.params().values()];
      const run = () => {
        ad.setTraining(true, new Rng(11));
        const { value, grads } = tf.variableGrads(() => sftLoss(model, batch), vars);
        const out = { loss: value.dataSync()[0], grads: vars.map((v) => Array.from(grads[v.name].dataSync())) };
        tf.dispose([value, ...Object.values(grads)]);
        return out;
      };
      const first = run();
      const tensors = tf.memory().numTensors;
      const bytes = backend === 'native' ? nativeBytes() : 0;
      run();
      expect(tf.memory().numTensors).toBe(tensors);
      if (backend === 'native') expect(nativeBytes()).toBe(bytes);
      ad.dispose();
      model.dispose();
      if (backend === 'native') expect(nativeBytes()).toBe(base);
      return first;
    };
    const a = await step('wasm');
    const b = await step('native');
    expect(b.loss).toBe(a.loss);
    b.grads.forEach((g, i) => g.forEach((v, j) => expect(Math.abs(v - a.grads[i][j])).toBeLessThan(1e-6)));
  });

  it('the allocator reuses freed blocks of the same size, and live + pooled never passes the high-water mark of live blocks', () => {
    const mem = nativeAllocator();
    if (!mem) return;
    const PAGE = 4096;
    const check = (what: string) => {
      const s = mem.poolStats();
      expect(s.live + s.pooled, what).toBeLessThanOrEqual(s.highWater);
    };
    // Reuse: a block freed and asked for again comes from the pool, with no new mapping.
    const size = 3 * 2 ** 20 + 7 * PAGE; // a size nothing else in the suite asks for
    mem.free(mem.alloc(size));
    const s0 = mem.poolStats();
    const again = mem.alloc(size);
    const s1 = mem.poolStats();
    expect(s1.pooled).toBe(s0.pooled - size);
    expect(s1.live).toBe(s0.live + size);
    expect(s1.highWater).toBe(s0.highWater);
    mem.free(again);
    // A request the pool cannot serve, sized past the mark's room, unmaps pooled blocks first.
    const s2 = mem.poolStats();
    const room = s2.highWater - s2.live - s2.pooled;
    const odd = room + PAGE * (1 + Math.floor(s2.pooled / PAGE / 2)); // needs half the pool
    const big = mem.alloc(odd);
    const s3 = mem.poolStats();
    expect(s3.pooled).toBeLessThan(s2.pooled);
    expect(s3.live + s3.pooled).toBeLessThanOrEqual(Math.max(s2.highWater, s3.live));
    mem.free(big);
    check('after the eviction');
    // Random sizes (from a few, so some are reused) and frees, in any order.
    const rng = new Rng(9);
    const held: ArrayBuffer[] = [];
    for (let i = 0; i < 400; i++) {
      if (held.length && rng.next() < 0.45) mem.free(held.splice(rng.int(held.length), 1)[0]);
      else held.push(mem.alloc((1 + rng.int(6)) * 37 * PAGE + rng.int(2) * 11));
      check(`operation ${i}`);
    }
    for (const b of held) mem.free(b);
    check('all freed');
    // Between jobs everything pooled goes back, and the mark starts again from what is live.
    const kept = mem.alloc(5 * PAGE);
    mem.trimPool();
    const t = mem.poolStats();
    expect(t.pooled).toBe(0);
    expect(t.highWater).toBe(t.live);
    mem.free(kept);
  });
});
