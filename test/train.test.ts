import { describe, expect, it } from 'vitest';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import * as tf from '@tensorflow/tfjs-core';
import { AdamW, clipFactor } from '../src/train/adamw.js';
import { setFused } from '../src/engine/fused.js';
import { loadNative } from '../src/engine/native.js';
import { lrMultiplier, warmupSteps } from '../src/train/schedule.js';
import { DEFAULT_TRAIN, Trainer, TrainTask, nonFinite, readMetricsFile } from '../src/train/trainer.js';
import { loadParams, saveParams } from '../src/train/params-io.js';
import { mm, embed, labelLogProbs } from '../src/engine/ops.js';
import { Rng } from '../src/util/rng.js';

const tmp = () => fs.mkdtempSync(path.join(os.tmpdir(), 'prefopt-train-'));

/** Runs `f` with the fused kernels on (where the addon is built) and off. */
function bothPaths(f: (path: string) => void) {
  const paths = loadNative().active ? [true, false] : [false];
  try {
    for (const on of paths) {
      setFused(on);
      f(on ? 'fused' : 'tfjs');
    }
  } finally {
    setFused(true);
  }
}

describe('AdamW', () => {
  it('one step equals the hand-computed torch update on a 2-parameter problem', () => bothPaths(() => {
    // loss = (w0·x0 + w1·x1 − y)², w = [0.5, −0.3] as a [1,2] matrix (decayed), b = 0.2 as a bias (not decayed).
    const w = tf.variable(tf.tensor2d([[0.5, -0.3]]));
    const b = tf.variable(tf.tensor1d([0.2]));
    const params = new Map<string, tf.Variable>([['lin.weight', w], ['lin.bias', b]]);
    const opt = new AdamW({ beta1: 0.9, beta2: 0.95, eps: 1e-8, weightDecay: 0.1 }, params);
    const gw = tf.tensor2d([[0.4, -0.8]]);
    const gb = tf.tensor1d([0.25]);
    const lr = 0.01;
    opt.step(new Map<string, tf.Tensor>([['lin.weight', gw], ['lin.bias', gb]]), lr);
    // Step 1: m = 0.1 g, v = 0.05 g², m̂ = g, v̂ = g², update = lr · g/(|g| + ε) = lr·sign(g).
    const want = (p: number, g: number, decay: boolean) => p - lr * (decay ? 0.1 * p : 0) - (lr * g) / (Math.abs(g) + 1e-8);
    const W = w.dataSync();
    expect(W[0]).toBeCloseTo(want(0.5, 0.4, true), 7);
    expect(W[1]).toBeCloseTo(want(-0.3, -0.8, true), 7);
    expect(b.dataSync()[0]).toBeCloseTo(want(0.2, 0.25, false), 7);
    // Step 2 with another gradient: moments and bias corrections by hand.
    opt.step(new Map<string, tf.Tensor>([['lin.weight', tf.tensor2d([[0.1, 0.2]])], ['lin.bias', tf.tensor1d([-0.5])]]), lr);
    const p1 = want(0.2, 0.25, false);
    const m = 0.9 * 0.025 + 0.1 * -0.5;
    const v = 0.95 * (0.05 * 0.0625) + 0.05 * 0.25;
    const mh = m / (1 - 0.81);
    const vh = v / (1 - 0.95 ** 2);
    expect(b.dataSync()[0]).toBeCloseTo(p1 - (lr * mh) / (Math.sqrt(vh) + 1e-8), 6);
    opt.dispose();
  }));

  it('the fused kernel computes the tfjs form bit for bit: decay, no decay, a gradient scale, several steps; in place, or per tensor while a clone shares a parameter', () => {
    if (!loadNative().active) return;
    const rng = new Rng(3);
    const rand = (n: number) => Float32Array.from({ length: n }, () => rng.normal());
    const shapes: [string, number[]][] = [['layer.weight', [37, 29]], ['layer.bias', [29]], ['norm.weight', [300]]];
    const init = shapes.map(([, s]) => rand(s.reduce((a, b) => a * b, 1)));
    const grads = [1, 2, 3].map(() => shapes.map(([, s]) => rand(s.reduce((a, b) => a * b, 1))));
    // holdClone: a clone of the weight (sharing its memory) is alive across each step, so the
    // update may not be written in place: the clone must keep the values it was taken with.
    const run = (on: boolean, holdClone = false) => {
      setFused(on);
      const params = new Map(shapes.map(([n, s], i) => [n, tf.variable(tf.tensor(init[i], s))]));
      const opt = new AdamW({ beta1: 0.9, beta2: 0.95, eps: 1e-8, weightDecay: 0.1 }, params);
      grads.forEach((gs, k) => {
        const g = new Map(shapes.map(([n, s], i) => [n, tf.tensor(gs[i], s)]));
        const clone = holdClone ? tf.clone(params.get('layer.weight')!) : null;
        const before = clone ? Array.from(clone.dataSync()) : null;
        opt.step(g, 3e-3 * (k + 1), k === 1 ? 0.37 : 1);
        if (clone) {
          expect(Array.from(clone.dataSync()), 'the clone after a step').toEqual(before);
          expect(Array.from(params.get('layer.weight')!.dataSync())).not.toEqual(before);
          clone.dispose();
        }
        g.forEach((t) => t.dispose());
      });
      const out = [...params.values(), ...opt.m.values(), ...opt.v.values()].map((t) => Array.from(t.dataSync()));
      params.forEach((p) => p.dispose());
      opt.dispose();
      setFused(true);
      return out;
    };
    const a = run(true);
    const b = run(false);
    const c = run(true, true);
    a.forEach((x, i) => expect(x, `tensor ${i}`).toEqual(b[i]));
    c.forEach((x, i) => expect(x, `tensor ${i} (a clone alive)`).toEqual(b[i]));
  });

  it('clips like clip_grad_norm_', () => {
    expect(clipFactor(2, 1)).toBeCloseTo(1 / (2 + 1e-6), 9);
    expect(clipFactor(0.5, 1)).toBe(1);
    expect(clipFactor(5, 0)).toBe(1);
  });
});

describe('schedules', () => {
  it('match transformers at chosen steps', () => {
    const total = 100;
    const wu = warmupSteps(total, 0.1);
    expect(wu).toBe(10);
    expect(lrMultiplier('cosine', 0, total, wu)).toBe(0);
    expect(lrMultiplier('cosine', 5, total, wu)).toBeCloseTo(0.5, 12);
    expect(lrMultiplier('cosine', 10, total, wu)).toBeCloseTo(1, 12);
    expect(lrMultiplier('cosine', 55, total, wu)).toBeCloseTo(0.5, 12); // halfway through the decay: cos(π/2)
    expect(lrMultiplier('cosine', 100, total, wu)).toBeCloseTo(0, 12);
    expect(lrMultiplier('linear', 55, total, wu)).toBeCloseTo(0.5, 12);
    expect(lrMultiplier('linear', 32.5, total, wu)).toBeCloseTo(0.75, 12);
    expect(lrMultiplier('constant_with_warmup', 3, total, wu)).toBeCloseTo(0.3, 12);
    expect(lrMultiplier('constant_with_warmup', 80, total, wu)).toBe(1);
    expect(lrMultiplier('constant', 0, total, wu)).toBe(1);
    expect(warmupSteps(1000, 0.01)).toBe(10);
  });
});

describe('custom gradients', () => {
  it('mm and embed gradients match central finite differences (float64 by hand)', () => {
    const rng = new Rng(3);
    const A = Array.from({ length: 6 }, () => rng.normal());
    const B = Array.from({ length: 12 }, () => rng.normal());
    const E = Array.from({ length: 8 }, () => rng.normal()); // vocab 4 × dim 2
    const ids = [2, 0, 2];
    // f = Σ sin(A·B) + Σ (embed(E, ids) ⊙ c)
    const c = [0.3, -0.7, 1.1, 0.2, -0.4, 0.9];
    const f64 = (a: number[], bb: number[], e: number[]) => {
      let s = 0;
      for (let i = 0; i < 2; i++) for (let j = 0; j < 4; j++) {
        let d = 0;
        for (let k = 0; k < 3; k++) d += a[i * 3 + k] * bb[k * 4 + j];
        s += Math.sin(d);
      }
      ids.forEach((id, r) => (s += e[id * 2] * c[r * 2] + e[id * 2 + 1] * c[r * 2 + 1]));
      return s;
    };
    const g = tf.grads((a: tf.Tensor, bb: tf.Tensor, e: tf.Tensor) =>
      tf.add(tf.sum(tf.sin(mm(a as tf.Tensor2D, bb as tf.Tensor2D))), tf.sum(tf.mul(embed(e as tf.Tensor2D, tf.tensor1d(ids, 'int32')), tf.tensor2d(c, [3, 2])))),
    )([tf.tensor2d(A, [2, 3]), tf.tensor2d(B, [3, 4]), tf.tensor2d(E, [4, 2])]);
    const got = g.map((t) => Array.from(t.dataSync()));
    const h = 1e-5;
    const args = [A, B, E];
    args.forEach((arr, which) => {
      arr.forEach((_, i) => {
        const plus = args.map((x) => [...x]);
        const minus = args.map((x) => [...x]);
        plus[which][i] += h;
        minus[which][i] -= h;
        const fd = (f64(plus[0], plus[1], plus[2]) - f64(minus[0], minus[1], minus[2])) / (2 * h);
        expect(Math.abs(got[which][i] - fd)).toBeLessThan(1e-4);
      });
    });
  });

  it('labelLogProbs picks log-softmax at the label', () => {
    const lp = labelLogProbs(tf.tensor2d([[1, 2, 3], [0, 0, 0]]), tf.tensor1d([2, 1], 'int32')).dataSync();
    expect(lp[0]).toBeCloseTo(3 - Math.log(Math.exp(1) + Math.exp(2) + Math.exp(3)), 5);
    expect(lp[1]).toBeCloseTo(-Math.log(3), 5);
  });
});

/** A linear-regression task on the shared trainer: small, exact, and deterministic. */
function regressionTask(seed: number, nanAt = -1, infGradAt = -1): TrainTask<{ x: number[][]; y: number[]; i: number }> {
  const rng = new Rng(seed, 'data');
  const trueW = [1.5, -2, 0.5];
  const batches = Array.from({ length: 12 }, (_, i) => {
    const x = Array.from({ length: 4 }, () => trueW.map(() => rng.normal()));
    return { x, y: x.map((r) => r.reduce((a, v, k) => a + v * trueW[k], 0) + 0.3), i };
  });
  const w = tf.variable(tf.zeros([3, 1]));
  const b = tf.variable(tf.zeros([1]));
  // A parameter at 0 whose loss term √z is finite (0) while its gradient 1/(2√z) is +Inf.
  const z = tf.variable(tf.zeros([2]));
  return {
    params: new Map([['w.weight', w], ['w.bias', b], ['z.weight', z]]),
    trainBatches: batches,
    evalBatches: batches.slice(0, 2),
    tokens: (bt) => bt.x.length,
    loss: (bt) => {
      const pred = tf.add(mm(tf.tensor2d(bt.x), w as unknown as tf.Tensor2D), b);
      let l = tf.mean(tf.square(tf.sub(tf.reshape(pred, [-1]), tf.tensor1d(bt.y)))) as tf.Scalar;
      if (bt.i === nanAt) l = tf.mul(l, NaN) as tf.Scalar;
      l = tf.add(l, bt.i === infGradAt ? tf.sum(tf.sqrt(z)) : tf.mul(tf.sum(z), 0)) as tf.Scalar;
      return { loss: l };
    },
  };
}

describe('Trainer', () => {
  const cfg = { ...DEFAULT_TRAIN, lr: 0.3, epochs: 3, gradAccum: 2, warmupRatio: 0.1, loggingSteps: 1, saveSteps: 4, saveTotalLimit: 2, seed: 9, weightDecay: 0 };
  const io = (task: TrainTask<any>) => ({
    saveState: async (d: string) => {
      fs.mkdirSync(d, { recursive: true });
      await saveParams(task.params, path.join(d, 'p.safetensors'));
    },
    loadState: (d: string) => loadParams(task.params, path.join(d, 'p.safetensors')),
  });

  it('learns, keeps save_total_limit checkpoints and writes metrics.jsonl', async () => {
    const dir = tmp();
    const task = regressionTask(1);
    const tr = new Trainer(task, cfg, dir);
    const res = await tr.fit({ ...io(task) });
    expect(res.steps).toBe(18); // 12 micro-batches / 2 × 3 epochs
    expect(res.history[0].loss).toBeGreaterThan(res.history.at(-1)!.loss * 2);
    expect(fs.readdirSync(dir).filter((n) => n.startsWith('checkpoint-')).sort()).toEqual(['checkpoint-12', 'checkpoint-16']);
    const lines = fs.readFileSync(path.join(dir, 'metrics.jsonl'), 'utf8').trim().split('\n').map((l) => JSON.parse(l));
    expect(lines.filter((l) => l.split === 'train')).toHaveLength(18);
    expect(lines.at(-1).split).toBe('eval');
    expect(Object.keys(lines[0])).toEqual(expect.arrayContaining(['loss', 'lr', 'grad_norm', 'tokens_per_s']));
    tr.dispose();
  });

  it('resumed after an interruption, it produces the same losses as an uninterrupted run', async () => {
    const full = regressionTask(2);
    const t1 = new Trainer(full, cfg, tmp());
    const r1 = await t1.fit(io(full));
    // Interrupted run: stop after 9 steps (checkpoint at 8), then a new process state resumes.
    const dir = tmp();
    const a = regressionTask(2);
    const ta = new Trainer(a, { ...cfg, maxSteps: 0 }, dir);
    for (let s = 0; s < 9; s++) {
      ta.trainStep();
      if (ta.step % cfg.saveSteps === 0) await ta.checkpoint(io(a).saveState, null);
    }
    const b = regressionTask(2); // fresh weights: everything must come from the checkpoint
    const tb = new Trainer(b, cfg, dir);
    const r2 = await tb.fit({ resume: true, ...io(b) });
    const losses1 = r1.history.slice(8).map((h) => h.loss);
    const losses2 = r2.history.map((h) => h.loss);
    expect(losses2).toEqual(losses1);
    expect(Array.from(b.params.get('w.weight')!.dataSync())).toEqual(Array.from(full.params.get('w.weight')!.dataSync()));
    [t1, ta, tb].forEach((t) => t.dispose());
  });

  it('stops on a non-finite loss, naming the step, and keeps the last good checkpoint', async () => {
    const dir = tmp();
    const task = regressionTask(3, 7);
    const tr = new Trainer(task, { ...cfg, shuffle: false }, dir);
    await expect(tr.fit(io(task))).rejects.toThrow(/non-finite loss \(NaN\) at step 4, micro-batch 7/);
    expect(fs.existsSync(path.join(dir, 'checkpoint-4'))).toBe(false);
    tr.dispose();
  });

  it('a finite loss with an infinite gradient stops before the update; --detect-anomaly names the tensor and micro-batch', async () => {
    for (const detectAnomaly of [false, true]) {
      const dir = tmp();
      const task = regressionTask(3, -1, 7);
      const tr = new Trainer(task, { ...cfg, shuffle: false, detectAnomaly }, dir);
      await expect(tr.fit(io(task))).rejects.toThrow(
        detectAnomaly ? /^non-finite gradient of z\.weight at step 4, micro-batch 7 \(epoch 0\); stopped before the update/ : /^non-finite gradient norm at step 4, micro-batches 6–7; stopped before the update.*--detect-anomaly/,
      );
      expect(tr.step).toBe(3);
      // The weights are those after step 3 (no partial update), and so is nothing on disk beyond it.
      for (const v of task.params.values()) expect(Array.from(v.dataSync()).every(Number.isFinite)).toBe(true);
      expect(fs.readdirSync(dir).filter((n) => n.startsWith('checkpoint-'))).toEqual([]);
      tr.dispose();
    }
  });

  it('nonFinite names exactly the tensors holding NaN or ±Inf (huge finite values pass)', () => {
    const ts: [string, tf.Tensor][] = [['a', tf.tensor1d([1, 3e38, 3e38])], ['b', tf.tensor1d([0, -Infinity])], ['c', tf.tensor2d([[NaN, 1]])], ['d', tf.tensor1d([-3e38, 2])]];
    expect(nonFinite(ts)).toEqual(['b', 'c']);
    ts.forEach(([, t]) => t.dispose());
  });

  it('metrics.jsonl: a torn last line (killed mid-append) is dropped, a bad line elsewhere names file and line', () => {
    const f = path.join(tmp(), 'metrics.jsonl');
    fs.writeFileSync(f, '{"step":1,"loss":2}\n{"step":2,"loss":1.5}\n{"step":3,"lo');
    expect(readMetricsFile(f)).toEqual([{ step: 1, loss: 2 }, { step: 2, loss: 1.5 }]);
    fs.writeFileSync(f, '{"step":1}\n{"st\n{"step":3}\n');
    expect(() => readMetricsFile(f)).toThrow(new RegExp(`${f}:2: invalid JSON in the metrics log`));
  });

  it('holds tensor count flat across steps', () => {
    const task = regressionTask(4);
    const tr = new Trainer(task, cfg, tmp());
    tr.trainStep();
    const before = tf.memory().numTensors;
    for (let i = 0; i < 5; i++) tr.trainStep();
    expect(tf.memory().numTensors).toBe(before);
    tr.dispose();
  });
});
