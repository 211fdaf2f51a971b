import * as tf from '@tensorflow/tfjs-core';
import { fused, fusedActive } from '../engine/fused.js';

/**
 * AdamW as torch.optim.AdamW computes it: decoupled weight decay θ ← θ·(1 − lr·λ), then
 * θ ← θ − lr·m̂/(√v̂ + ε) with bias-corrected moments. Parameters named as norms or biases
 * (and all 1-D tensors) get no decay, as in the 360Zhinao / HF recipes.
 */
export interface AdamWConfig {
  beta1: number;
  beta2: number;
  eps: number;
  weightDecay: number;
}

export const DEFAULT_ADAMW: AdamWConfig = { beta1: 0.9, beta2: 0.95, eps: 1e-8, weightDecay: 0.1 };

export function decays(name: string, shape: number[]): boolean {
  return shape.length > 1 && !/norm|\.bias$/.test(name);
}

export class AdamW {
  /** Number of updates applied so far (torch's `step` in the state). */
  t = 0;
  readonly m = new Map<string, tf.Variable>();
  readonly v = new Map<string, tf.Variable>();

  constructor(
    readonly cfg: AdamWConfig,
    readonly params: Map<string, tf.Variable>,
  ) {
    for (const [name, p] of params) {
      this.m.set(name, zerosVar(p));
      this.v.set(name, zerosVar(p));
    }
  }

  /**
   * One update with learning rate `lr` from gradients keyed by parameter name, each multiplied
   * by `gradScale` first (gradient clipping and micro-batch averaging, folded in). Two forms: the
   * native update of every tensor in place, in one call, and the tfjs form below where the addon
   * is absent or a parameter's memory is shared with a live clone (an in-place write would show
   * through it). Both compute the same float32 operations in the same order.
   */
  step(grads: Map<string, tf.Tensor>, lr: number, gradScale = 1): void {
    this.t += 1;
    const { beta1, beta2, eps, weightDecay } = this.cfg;
    const bc1 = 1 - Math.pow(beta1, this.t);
    const bc2 = 1 - Math.pow(beta2, this.t);
    const decayOf = (name: string, p: tf.Tensor) => (weightDecay > 0 && decays(name, p.shape) ? lr * weightDecay : 0);
    // The fused kernels' scalars, each rounded to float32 as tfjs rounds them.
    const scalars = (name: string, p: tf.Tensor) => [gradScale, beta1, 1 - beta1, beta2, 1 - beta2, Math.sqrt(bc2), eps, lr / bc1, decayOf(name, p)];
    if (fusedActive()) {
      const names = [...this.params.keys()].filter((n) => grads.has(n));
      const ps = names.map((n) => this.params.get(n)!);
      const inPlace = fused.adamwInPlace(ps, names.map((n) => grads.get(n)!), names.map((n) => this.m.get(n)!), names.map((n) => this.v.get(n)!), names.map((n, i) => scalars(n, ps[i])));
      if (inPlace) return;
    }
    tf.tidy(() => {
      for (const [name, p] of this.params) {
        const graw = grads.get(name);
        if (!graw) continue;
        const m = this.m.get(name)!;
        const v = this.v.get(name)!;
        const decay = decayOf(name, p);
        const g = gradScale === 1 ? graw : tf.mul(graw, gradScale);
        const m2 = tf.add(tf.mul(m, beta1), tf.mul(g, 1 - beta1));
        const v2 = tf.add(tf.mul(v, beta2), tf.mul(tf.square(g), 1 - beta2));
        m.assign(m2);
        v.assign(v2);
        const denom = tf.add(tf.div(tf.sqrt(v2), Math.sqrt(bc2)), eps);
        let next = tf.sub(p, tf.mul(tf.div(m2, denom), lr / bc1));
        if (decay) next = tf.sub(next, tf.mul(p, decay));
        p.assign(next);
      }
    });
  }

  dispose(): void {
    for (const t of [...this.m.values(), ...this.v.values()]) t.dispose();
  }
}

/** tf.variable keeps its initial tensor alive as a separate handle: dispose it. */
function zerosVar(p: tf.Tensor): tf.Variable {
  const z = tf.zerosLike(p);
  const v = tf.variable(z, false);
  z.dispose();
  return v;
}

/** Global L2 norm of the gradients, and the factor that clips it to `maxNorm` (torch's clip_grad_norm_). */
export function clipFactor(norm: number, maxNorm: number): number {
  if (!(maxNorm > 0)) return 1;
  const c = maxNorm / (norm + 1e-6);
  return c < 1 ? c : 1;
}
