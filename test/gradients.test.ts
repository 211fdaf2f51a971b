import { describe, expect, it } from 'vitest';
import * as tf from '@tensorflow/tfjs-core';
import { Decoder } from '../src/model/decoder.js';
import { makeBatch } from '../src/infer/batch.js';
import { sftLoss } from '../src/stages/sft.js';
import { LoraAdapter, attach } from '../src/lora/lora.js';
import { Rng } from '../src/util/rng.js';
import { ARCH_SPECS, makeTestModel } from './helpers/models.js';

/*
 * prefopt's backward pass (engine/gradients, installed by initBackend in test/setup) against
 * tfjs's own (Engine.prototype.gradients, still there under the instance's): the same gradients
 * bit for bit, a lower peak, every tensor freed, and tfjs's behaviour at the edges.
 */
const engine = tf.engine() as any;
const ours = engine.gradients;
/** f run under tfjs's own backward pass. */
function withTfjs<T>(f: () => T): T {
  engine.gradients = Object.getPrototypeOf(engine).gradients;
  try {
    return f();
  } finally {
    engine.gradients = ours;
  }
}

const bits = (a: ArrayLike<number>) => Array.from(new Uint32Array(Float32Array.from(a).buffer));

function loraModel(checkpointed: boolean) {
  const { cfg, w } = makeTestModel(ARCH_SPECS['qwen2 biases tied rope 1e6'], 3, 0.2);
  const model = Decoder.fromHF(cfg, (n) => w.get(n)!, true);
  model.setTrainable(false);
  const ad = LoraAdapter.create(model, { r: 4, alpha: 8, dropout: 0.2, targets: ['q_proj', 'k_proj', 'v_proj', 'o_proj', 'gate_proj', 'up_proj', 'down_proj'], useRslora: false }, 5);
  for (const x of ad.weights.values()) x.b.assign(tf.randomNormal(x.b.shape, 0, 0.3, 'float32', 9));
  attach(model, ad);
  model.checkpointLayers = checkpointed;
  const rng = new Rng(7);
  const sb = makeBatch(
    [9, 6, 11].map((n) => {
      const ids = Array.from({ length: n }, () => 2 + Math.floor(rng.next() * (cfg.vocab_size - 2)));
      return { ids, weights: ids.map((_, t) => (t >= 3 ? 1 : 0)) };
    }),
    0,
  );
  const vars = [...ad.params().values()];
  const step = () => {
    ad.setTraining(true, new Rng(99));
    const { value, grads } = tf.variableGrads(() => sftLoss(model, sb), vars);
    const out = { loss: value.dataSync()[0], grads: vars.map((v) => bits(grads[v.name].dataSync())) };
    value.dispose();
    Object.values(grads).forEach((g) => g.dispose());
    ad.setTraining(false);
    return out;
  };
  return { step, dispose: () => (model.dispose(), ad.dispose()) };
}

describe('the backward pass (engine/gradients)', () => {
  for (const checkpointed of [false, true])
    it(`a LoRA step's loss and gradients (dropout on, every linear${checkpointed ? ', checkpointed layers' : ''}) are tfjs's bit for bit, and no tensor is left behind`, () => {
      const m = loraModel(checkpointed);
      const before = tf.memory().numTensors;
      const mine = m.step();
      expect(tf.memory().numTensors).toBe(before);
      const theirs = withTfjs(m.step);
      expect(tf.memory().numTensors).toBe(before);
      expect(mine.loss).toBe(theirs.loss);
      expect(mine.grads.length).toBe(2 * 7 * 2);
      mine.grads.forEach((g, i) => expect(g, `gradient ${i}`).toEqual(theirs.grads[i]));
      // Not an empty comparison: the gradients are there and not zero.
      expect(mine.grads.every((g) => g.some((b) => (b & 0x7fffffff) !== 0))).toBe(true);
      m.dispose();
    });

  it("a deep chain's backward pass holds a few gradients at once: its memory never grows past the forward pass's (tfjs's grows by a gradient a layer)", () => {
    const x = tf.variable(tf.randomNormal([64, 64], 0, 1, 'float32', 1));
    const ws = Array.from({ length: 24 }, (_, i) => tf.randomNormal([64, 64], 0, 0.1, 'float32', 2 + i));
    const block = 64 * 64 * 4;
    /** Bytes the backward pass adds at its peak over what the forward pass left, in blocks; and x's gradient. */
    const growth = () => {
      let atForwardEnd = 0;
      let top = 0;
      const f = () => {
        let h: tf.Tensor = x;
        // Each layer in its own tidy, as the decoder's: what a layer's gradients do not need goes at once.
        for (const w of ws) h = tf.tidy(() => tf.tanh(tf.matMul(h, w)));
        const y = tf.sum(h) as tf.Scalar;
        atForwardEnd = top = tf.memory().numBytes;
        return y;
      };
      const orig = engine.runKernel.bind(engine);
      engine.runKernel = (...a: any[]) => {
        const r = orig(...a);
        top = Math.max(top, tf.memory().numBytes);
        return r;
      };
      try {
        const g = tf.tidy(() => Array.from(tf.variableGrads(f, [x]).grads[x.name].dataSync()));
        return { blocks: (top - atForwardEnd) / block, g };
      } finally {
        engine.runKernel = orig;
      }
    };
    const mine = growth();
    const theirs = withTfjs(growth);
    expect(bits(mine.g)).toEqual(bits(theirs.g));
    expect(mine.blocks).toBeLessThanOrEqual(3);
    expect(theirs.blocks).toBeGreaterThanOrEqual(24);
    ws.forEach((w) => w.dispose());
    x.dispose();
  });

  it('a gradient function that hands dy on unchanged to two inputs: both get it, nothing freed twice; a given dy stays alive', () => {
    const pass = tf.customGrad(((a: tf.Tensor, b: tf.Tensor, save: tf.GradSaveFunc) => {
      save([]);
      return { value: tf.add(a, b), gradFunc: (dy: tf.Tensor) => [dy, dy] };
    }) as any) as (a: tf.Tensor, b: tf.Tensor) => tf.Tensor;
    const a = tf.tensor1d([1, 2]);
    const b = tf.tensor1d([3, 4]);
    const dy = tf.tensor1d([0.5, -2]);
    const before = tf.memory().numTensors;
    const [ga, gb] = tf.grads((p: tf.Tensor, q: tf.Tensor) => tf.mul(pass(tf.square(p), q), 3))([a, b], dy);
    expect(Array.from(ga.dataSync())).toEqual([3, -24]); // 3·dy·2a
    expect(Array.from(gb.dataSync())).toEqual([1.5, -6]); // 3·dy
    expect(Array.from(dy.dataSync())).toEqual([0.5, -2]);
    ga.dispose();
    gb.dispose();
    expect(tf.memory().numTensors).toBe(before);
  });

  it("tfjs's errors: no path from x to y, a wrong dy dtype, an empty xs", () => {
    const x = tf.scalar(2);
    const y = tf.scalar(3);
    const msg = (f: () => void) => {
      try {
        f();
      } catch (e: any) {
        return String(e.message);
      }
      return 'no error';
    };
    for (const f of [() => tf.grad(() => tf.mul(y, 2))(x), () => tf.grad((t: tf.Tensor) => tf.mul(t, 2))(x, tf.scalar(1, 'int32')), () => engine.gradients(() => x, [])])
      expect(msg(f)).toBe(withTfjs(() => msg(f)));
    expect(msg(() => tf.grad(() => tf.mul(y, 2))(x))).toMatch(/Cannot compute gradient of y=f\(x\)/);
  });
});
