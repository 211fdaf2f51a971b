import * as fs from 'node:fs';
import * as path from 'node:path';
import * as tf from '@tensorflow/tfjs-core';
import { AdamW, AdamWConfig, DEFAULT_ADAMW, clipFactor } from './adamw.js';
import { sumSquares } from '../engine/ops.js';
import { SchedulerName, lrMultiplier, warmupSteps } from './schedule.js';
import { writeSafetensors, readHeader, readTensor } from '../io/safetensors.js';
import { readJson, removeDir, writeDirAtomic, writeFileAtomic } from '../util/fsutil.js';
import { Rng } from '../util/rng.js';
import type { Decoder } from '../model/decoder.js';
import { UserError } from '../util/errors.js';
import { Progress, log } from '../util/log.js';

/**
 * The training loop every stage shares (SFT, DPO, reward model, on-policy rounds). A stage
 * supplies a TrainTask — its trainable parameters, its micro-batches and a loss over one — and
 * the trainer owns the rest: AdamW, the schedule, accumulation, clipping, logging, evaluation,
 * atomic checkpoints and exact resumption.
 */
export interface TrainConfig extends AdamWConfig {
  lr: number;
  epochs: number;
  /** > 0 overrides epochs. */
  maxSteps: number;
  gradAccum: number;
  warmupRatio: number;
  scheduler: SchedulerName;
  maxGradNorm: number;
  loggingSteps: number;
  saveSteps: number;
  saveTotalLimit: number;
  evalSteps: number;
  seed: number;
  /** Shuffle micro-batch order each epoch. */
  shuffle: boolean;
  /**
   * Check every gradient after each micro-batch and every weight after each update, naming the
   * first non-finite tensor (torch.autograd's detect_anomaly, at parameter granularity). Costs
   * one extra reduction per tensor.
   */
  detectAnomaly: boolean;
  /** Recompute each decoder layer in the backward pass (engine/checkpoint); auto: on from CHECKPOINT_AUTO_PARAMS parameters. */
  gradientCheckpointing: CheckpointMode;
}

export const CHECKPOINT_MODES = ['auto', 'on', 'off'] as const;
export type CheckpointMode = (typeof CHECKPOINT_MODES)[number];
/**
 * Below this size a micro-batch's activations are small beside the weights and the recompute
 * (about a third more compute) buys nothing; above it they dominate the peak (docs/REFERENCE.md §10).
 */
const CHECKPOINT_AUTO_PARAMS = 100e6;

export function checkpointingOn(mode: CheckpointMode, params: number): boolean {
  return mode === 'on' || (mode === 'auto' && params >= CHECKPOINT_AUTO_PARAMS);
}

export const DEFAULT_TRAIN: TrainConfig = {
  ...DEFAULT_ADAMW,
  lr: 1e-4,
  epochs: 1,
  maxSteps: 0,
  gradAccum: 1,
  warmupRatio: 0,
  scheduler: 'cosine',
  maxGradNorm: 1.0,
  loggingSteps: 10,
  saveSteps: 0,
  saveTotalLimit: 2,
  evalSteps: 0,
  seed: 0,
  shuffle: true,
  detectAnomaly: false,
  gradientCheckpointing: 'auto',
};

/**
 * The names of the tensors holding a NaN or ±Inf, in order. x·0 is 0 for every finite x and NaN
 * otherwise, so one sum per tensor decides it exactly (a sum of squares could overflow).
 */
export function nonFinite(tensors: [string, tf.Tensor][]): string[] {
  if (tensors.length === 0) return [];
  const flags = tf.tidy(() => tf.stack(tensors.map(([, t]) => tf.sum(tf.mul(t, 0)))).dataSync());
  return tensors.filter((_, k) => !Number.isFinite(flags[k])).map(([n]) => n);
}

export interface LossOut {
  loss: tf.Scalar;
  /** Extra scalars to log (averaged over micro-batches). */
  metrics?: Record<string, tf.Scalar>;
}

export interface TrainTask<B> {
  params: Map<string, tf.Variable>;
  /** The model the loss runs, which the trainer switches to checkpointed layers when configured. */
  model?: Decoder;
  trainBatches: B[];
  evalBatches?: B[];
  tokens(b: B): number;
  /** Called inside a gradient tape; `rng` drives dropout for this micro-batch. */
  loss(b: B, rng: Rng, training: boolean): LossOut;
  /** Extra evaluation (e.g. DPO metrics on held-out pairs), merged into eval logs. */
  evaluate?(): Record<string, number>;
}

export interface TrainState {
  step: number;
  totalSteps: number;
  optimizerT: number;
  seed: number;
  microPerEpoch: number;
  lastLoss: number | null;
}

export interface TrainResult {
  steps: number;
  lastLoss: number | null;
  evalLoss: number | null;
  history: Record<string, number>[];
}

const CKPT_RE = /^checkpoint-(\d+)$/;

export function listCheckpoints(dir: string): { step: number; dir: string }[] {
  if (!fs.existsSync(dir)) return [];
  return fs
    .readdirSync(dir)
    .map((n) => ({ m: CKPT_RE.exec(n), n }))
    .filter((x) => x.m && fs.existsSync(path.join(dir, x.n, 'trainer_state.json')))
    .map((x) => ({ step: Number(x.m![1]), dir: path.join(dir, x.n) }))
    .sort((a, b) => a.step - b.step);
}

/**
 * The rows of a metrics.jsonl. A process killed in the middle of an append leaves a torn last
 * line: it is dropped (the row was never complete); a bad line anywhere else is an error.
 */
export function readMetricsFile(file: string): Record<string, unknown>[] {
  if (!fs.existsSync(file)) return [];
  const lines = fs.readFileSync(file, 'utf8').split('\n');
  const rows: Record<string, unknown>[] = [];
  lines.forEach((l, i) => {
    if (!l.trim()) return;
    try {
      rows.push(JSON.parse(l));
    } catch {
      const last = lines.slice(i + 1).every((x) => !x.trim());
      if (!last) throw new UserError(`${file}:${i + 1}: invalid JSON in the metrics log`);
    }
  });
  return rows;
}

export class Trainer<B> {
  readonly opt: AdamW;
  readonly totalSteps: number;
  readonly micro: number;
  step = 0;
  history: Record<string, number>[] = [];
  private metricsFile: string;

  constructor(
    readonly task: TrainTask<B>,
    readonly cfg: TrainConfig,
    readonly workDir: string,
  ) {
    if (task.trainBatches.length === 0) throw new UserError('no training data: every row was filtered out or the file is empty');
    this.micro = task.trainBatches.length;
    const perEpoch = Math.max(1, Math.floor(this.micro / cfg.gradAccum));
    this.totalSteps = cfg.maxSteps > 0 ? cfg.maxSteps : perEpoch * cfg.epochs;
    this.opt = new AdamW(cfg, task.params);
    if (task.model) task.model.checkpointLayers = checkpointingOn(cfg.gradientCheckpointing, task.model.paramCount());
    log('train-start', { steps: this.totalSteps, micro_batches: this.micro, gradient_checkpointing: task.model?.checkpointLayers ? 'on' : 'off' });
    this.metricsFile = path.join(workDir, 'metrics.jsonl');
    fs.mkdirSync(workDir, { recursive: true });
  }

  /** The micro-batch index for global micro-step i: a fresh seeded permutation per epoch. */
  private orderCache = new Map<number, number[]>();
  batchAt(i: number): B {
    const epoch = Math.floor(i / this.micro);
    let order = this.orderCache.get(epoch);
    if (!order) {
      order = Array.from({ length: this.micro }, (_, k) => k);
      if (this.cfg.shuffle) new Rng(this.cfg.seed, 'order', epoch).shuffle(order);
      this.orderCache.clear();
      this.orderCache.set(epoch, order);
    }
    return this.task.trainBatches[order[i % this.micro]];
  }

  lrAt(step: number): number {
    return this.cfg.lr * lrMultiplier(this.cfg.scheduler, step, this.totalSteps, warmupSteps(this.totalSteps, this.cfg.warmupRatio));
  }

  /**
   * One optimizer step over gradAccum micro-batches; returns the logged scalars. The micro-batches'
   * losses and metrics and the gradients' norm are read together, once all are queued: on a GPU a
   * read waits for the device to finish what was queued before it, and one wait a step, where the
   * update needs the norm, keeps it busy. --detect-anomaly reads each micro-batch as it comes.
   */
  trainStep(): Record<string, number> {
    const names = [...this.task.params.keys()];
    const vars = names.map((n) => this.task.params.get(n)!);
    const sums = new Map<string, tf.Tensor>();
    /** Per micro-batch: its loss, then its metrics in metricNames' order. */
    const scalars: tf.Tensor[] = [];
    let metricNames: string[] = [];
    let tokens = 0;
    const A = this.cfg.gradAccum;
    const first = this.step * A;
    const stop = (what: string, i: number, grads: tf.Tensor[] = []) => {
      tf.dispose([...grads, ...sums.values(), ...scalars]);
      return new UserError(`${what} at step ${this.step + 1}, micro-batch ${i} (epoch ${Math.floor(i / this.micro)}); stopped before the update, the last good checkpoint is kept`);
    };
    /** The first non-finite loss or metric in a micro-batch's read scalars, as stop's words. */
    const badScalar = (v: ArrayLike<number>): string | null => {
      if (!Number.isFinite(v[0])) return `non-finite loss (${v[0]})`;
      const m = metricNames.findIndex((_, k) => !Number.isFinite(v[1 + k]));
      return m < 0 ? null : `non-finite metric ${metricNames[m]} (${v[1 + m]})`;
    };
    for (let a = 0; a < A; a++) {
      const i = first + a;
      const b = this.batchAt(i);
      tokens += this.task.tokens(b);
      const rng = new Rng(this.cfg.seed, 'dropout', i);
      let metrics: Record<string, tf.Scalar> = {};
      const { value, grads } = tf.variableGrads(() => {
        const out = this.task.loss(b, rng, true);
        metrics = Object.fromEntries(Object.entries(out.metrics ?? {}).map(([k, v]) => [k, tf.keep(v)]));
        return out.loss;
      }, vars);
      metricNames = Object.keys(metrics);
      scalars.push(tf.stack([value, ...metricNames.map((k) => metrics[k])]));
      tf.dispose([value, ...Object.values(metrics)]);
      if (this.cfg.detectAnomaly) {
        const bad = badScalar(scalars[a].dataSync());
        if (bad) throw stop(bad, i, Object.values(grads));
        const badGrads = nonFinite(names.flatMap((n, k) => (grads[vars[k].name] ? [[n, grads[vars[k].name]] as [string, tf.Tensor]] : [])));
        if (badGrads.length) throw stop(`non-finite gradient of ${badGrads[0]}${badGrads.length > 1 ? ` (and ${badGrads.length - 1} more tensors)` : ''}`, i, Object.values(grads));
      }
      names.forEach((n, k) => {
        const g = grads[vars[k].name];
        if (!g) return;
        const prev = sums.get(n);
        if (prev) {
          sums.set(n, tf.add(prev, g));
          prev.dispose();
          g.dispose();
        } else sums.set(n, g);
      });
    }
    // Average over micro-batches, then clip by the global norm.
    const read = tf.tidy(() => tf.concat([...scalars, tf.reshape(tf.addN([...sums.values()].map((g) => sumSquares(g))), [1])]).dataSync());
    const width = 1 + metricNames.length;
    for (let a = 0; a < A; a++) {
      const bad = badScalar(read.subarray(a * width, (a + 1) * width));
      if (bad) throw stop(bad, first + a);
    }
    tf.dispose(scalars);
    const norm = Math.sqrt(read[A * width]) / A;
    const mean = (k: number) => Array.from({ length: A }, (_, a) => read[a * width + k]).reduce((x, y) => x + y / A, 0);
    const lossSum = mean(0);
    const metricSums = Object.fromEntries(metricNames.map((n, m) => [n, mean(1 + m)]));
    if (!Number.isFinite(norm)) {
      for (const g of sums.values()) g.dispose();
      throw new UserError(`non-finite gradient norm at step ${this.step + 1}, micro-batch${A > 1 ? `es ${first}–${first + A - 1}` : ` ${first}`}; stopped before the update, the last good checkpoint is kept (--detect-anomaly names the tensor)`);
    }
    const scale = clipFactor(norm, this.cfg.maxGradNorm) / A;
    const lr = this.lrAt(this.step);
    this.opt.step(sums, lr, scale);
    for (const g of sums.values()) g.dispose();
    if (this.cfg.detectAnomaly) {
      const bad = nonFinite(names.map((n, k) => [n, vars[k]]));
      if (bad.length) throw new UserError(`non-finite weight ${bad[0]} after the update of step ${this.step + 1} (lr ${lr}); stopped, the last good checkpoint is kept`);
    }
    this.step += 1;
    return { loss: lossSum, lr, grad_norm: norm, tokens, ...metricSums };
  }

  evalLoss(): number | null {
    const eb = this.task.evalBatches;
    if (!eb?.length) return null;
    let s = 0;
    let n = 0;
    for (const b of eb) {
      const v = tf.tidy(() => this.task.loss(b, new Rng(0), false).loss);
      s += v.dataSync()[0];
      v.dispose();
      n++;
    }
    return s / n;
  }

  appendMetrics(row: Record<string, unknown>): void {
    fs.appendFileSync(this.metricsFile, JSON.stringify(row) + '\n');
  }

  async fit(opts: { resume?: boolean; saveState: (dir: string) => Promise<void>; loadState: (dir: string) => void; label?: string }): Promise<TrainResult> {
    const last = opts.resume ? listCheckpoints(this.workDir).at(-1) : undefined;
    if (last) {
      this.restore(last.dir, opts.loadState);
      log('resume', { from: last.dir, step: this.step });
    } else {
      // A fresh start (or a resume with nothing to resume from): earlier rows describe a run
      // that is being redone.
      for (const c of listCheckpoints(this.workDir)) removeDir(c.dir);
      fs.rmSync(this.metricsFile, { force: true });
    }
    const bar = new Progress(opts.label ?? 'train', this.totalSteps);
    let lastLoss: number | null = null;
    let evalLoss: number | null = null;
    let window: Record<string, number>[] = [];
    let t0 = Date.now();
    while (this.step < this.totalSteps) {
      const m = this.trainStep();
      lastLoss = m.loss;
      window.push(m);
      bar.tick(this.step, `loss ${m.loss.toFixed(4)}`);
      const atEnd = this.step === this.totalSteps;
      if (this.step % this.cfg.loggingSteps === 0 || atEnd) {
        const dt = (Date.now() - t0) / 1000;
        const avg: Record<string, number> = {};
        for (const k of Object.keys(window[0])) avg[k] = window.reduce((a, r) => a + (r[k] ?? 0), 0) / window.length;
        const row = { step: this.step, epoch: +((this.step * this.cfg.gradAccum) / this.micro).toFixed(4), ...avg, lr: m.lr, tokens_per_s: (avg.tokens * window.length) / Math.max(dt, 1e-9) };
        delete (row as any).tokens;
        this.appendMetrics({ split: 'train', ...row });
        this.history.push(row);
        log('train', row);
        window = [];
        t0 = Date.now();
      }
      if ((this.cfg.evalSteps > 0 && this.step % this.cfg.evalSteps === 0) || atEnd) {
        evalLoss = this.evalLoss();
        const extra = this.task.evaluate?.() ?? {};
        if (evalLoss !== null || Object.keys(extra).length) {
          const row = { split: 'eval', step: this.step, ...(evalLoss !== null ? { loss: evalLoss } : {}), ...extra };
          this.appendMetrics(row);
          log('eval', row);
        }
      }
      if (this.cfg.saveSteps > 0 && this.step % this.cfg.saveSteps === 0 && !atEnd) await this.checkpoint(opts.saveState, lastLoss);
    }
    bar.done();
    return { steps: this.step, lastLoss, evalLoss, history: this.history };
  }

  async checkpoint(saveState: (dir: string) => Promise<void>, lastLoss: number | null): Promise<void> {
    const dir = path.join(this.workDir, `checkpoint-${this.step}`);
    await writeDirAtomic(dir, async (tmp) => {
      await saveState(path.join(tmp, 'weights'));
      const entries: { name: string; shape: number[] }[] = [];
      const data = new Map<string, Float32Array>();
      for (const [n, v] of this.opt.m) {
        entries.push({ name: `${n}.exp_avg`, shape: v.shape });
        data.set(`${n}.exp_avg`, v.dataSync() as Float32Array);
        const s = this.opt.v.get(n)!;
        entries.push({ name: `${n}.exp_avg_sq`, shape: s.shape });
        data.set(`${n}.exp_avg_sq`, s.dataSync() as Float32Array);
      }
      await writeSafetensors(path.join(tmp, 'optimizer.safetensors'), entries, 'F32', (n) => data.get(n)!);
      const state: TrainState = { step: this.step, totalSteps: this.totalSteps, optimizerT: this.opt.t, seed: this.cfg.seed, microPerEpoch: this.micro, lastLoss };
      writeFileAtomic(path.join(tmp, 'trainer_state.json'), JSON.stringify(state, null, 2));
    });
    const all = listCheckpoints(this.workDir);
    if (this.cfg.saveTotalLimit > 0) for (const c of all.slice(0, Math.max(0, all.length - this.cfg.saveTotalLimit))) removeDir(c.dir);
    log('checkpoint', { dir, step: this.step });
  }

  restore(dir: string, loadState: (dir: string) => void): void {
    const state: TrainState = readJson(path.join(dir, 'trainer_state.json'));
    if (state.microPerEpoch !== this.micro || state.seed !== this.cfg.seed) {
      throw new UserError(`${dir}: checkpoint was made with ${state.microPerEpoch} micro-batches per epoch and seed ${state.seed}; this run has ${this.micro} and ${this.cfg.seed}. Resume with the same data and settings, or start fresh`);
    }
    loadState(path.join(dir, 'weights'));
    const st = readHeader(path.join(dir, 'optimizer.safetensors'));
    for (const [n, m] of this.opt.m) {
      const a = tf.tensor(readTensor(st, `${n}.exp_avg`), m.shape);
      const b = tf.tensor(readTensor(st, `${n}.exp_avg_sq`), m.shape);
      m.assign(a);
      this.opt.v.get(n)!.assign(b);
      a.dispose();
      b.dispose();
    }
    this.opt.t = state.optimizerT;
    this.step = state.step;
    // Metrics logged after this checkpoint belong to the lost part of the run: drop them.
    if (fs.existsSync(this.metricsFile)) {
      const keep = readMetricsFile(this.metricsFile).filter((r) => (r.step as number) <= this.step);
      writeFileAtomic(this.metricsFile, keep.map((r) => JSON.stringify(r) + '\n').join(''));
    }
  }

  dispose(): void {
    this.opt.dispose();
  }
}
