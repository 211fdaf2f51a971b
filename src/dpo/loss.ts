import * as tf from '@tensorflow/tfjs-core';
import { UserError } from '../util/errors.js';
import { OptionRow, firstViolation, num, str } from '../util/schema.js';

/**
 * DPO losses as TRL computes them (docs/REFERENCE.md §5). Inputs are summed completion log-probs of the
 * policy and the reference for chosen (w) and rejected (l) answers, plus completion lengths for
 * IPO. ℓ_w = π_w − ref_w, ℓ_l = π_l − ref_l, Δ = ℓ_w − ℓ_l, ε = label_smoothing.
 */
export type LossType = 'sigmoid' | 'hinge' | 'ipo' | 'robust';
export const LOSS_TYPES: LossType[] = ['sigmoid', 'hinge', 'ipo', 'robust'];

export interface DpoParams {
  beta: number;
  lossType: LossType;
  labelSmoothing: number;
  /**
   * TRL's rpo_alpha (0 = off): adds α · NLL of the chosen answers (token mean over the batch) to
   * every pair's loss, as in RPO / iterative RPO. Without it DPO can lower the chosen answers'
   * likelihood too, and the policy drifts to text neither answer contained.
   */
  rpoAlpha: number;
}

export const DEFAULT_DPO: DpoParams = { beta: 0.1, lossType: 'sigmoid', labelSmoothing: 0, rpoAlpha: 0 };

/** The chosen answers' negative log-likelihood per token over a batch: −Σ log π(w) / Σ |w|. */
export function chosenNll(policyChosen: tf.Tensor1D, lenChosen: tf.Tensor1D): tf.Scalar {
  return tf.div(tf.neg(tf.sum(policyChosen)), tf.sum(lenChosen)) as tf.Scalar;
}

export interface PairLogps<T> {
  policyChosen: T;
  policyRejected: T;
  refChosen: T;
  refRejected: T;
  lenChosen: T;
  lenRejected: T;
}

/**
 * log σ(x) = min(x, 0) − log(1 + e^(−|x|)), stable for any x. tf.logSigmoid's own gradient
 * reads a tensor it did not save, which fails on wasm inside variableGrads.
 */
export function logSigmoid(x: tf.Tensor): tf.Tensor {
  return tf.sub(tf.minimum(x, 0), tf.log1p(tf.exp(tf.neg(tf.abs(x)))));
}

/** Per-pair losses [P] (differentiable through the policy terms). */
export function dpoLosses(x: PairLogps<tf.Tensor1D>, p: DpoParams): tf.Tensor1D {
  const { beta, labelSmoothing: eps } = p;
  const lw = tf.sub(x.policyChosen, x.refChosen);
  const ll = tf.sub(x.policyRejected, x.refRejected);
  const delta = tf.sub(lw, ll);
  const bd = tf.mul(delta, beta);
  switch (p.lossType) {
    case 'sigmoid':
      return tf.sub(tf.mul(logSigmoid(bd), -(1 - eps)), tf.mul(logSigmoid(tf.neg(bd)), eps)) as tf.Tensor1D;
    case 'robust':
      return tf.div(tf.add(tf.mul(logSigmoid(bd), -(1 - eps)), tf.mul(logSigmoid(tf.neg(bd)), eps)), 1 - 2 * eps) as tf.Tensor1D;
    case 'hinge':
      return tf.relu(tf.sub(1, bd)) as tf.Tensor1D;
    case 'ipo': {
      const h = tf.sub(tf.sub(tf.div(lw, x.lenChosen), tf.div(ll, x.lenRejected)), 1 / (2 * beta));
      return tf.square(h) as tf.Tensor1D;
    }
  }
}

/** TRL's logged metrics, averaged over pairs, from host numbers (`nll` only with rpo_alpha). */
export function dpoMetrics(rows: { pc: number; pr: number; rc: number; rr: number; loss: number; nll?: number }[], beta: number): Record<string, number> {
  const n = rows.length || 1;
  const mean = (f: (r: (typeof rows)[number]) => number) => rows.reduce((a, r) => a + f(r), 0) / n;
  return {
    ...(rows.length && rows[0].nll !== undefined ? { nll_loss: mean((r) => r.nll!) } : {}),
    loss: mean((r) => r.loss),
    'rewards/chosen': mean((r) => beta * (r.pc - r.rc)),
    'rewards/rejected': mean((r) => beta * (r.pr - r.rr)),
    'rewards/accuracies': mean((r) => (r.pc - r.rc > r.pr - r.rr ? 1 : 0)),
    'rewards/margins': mean((r) => beta * (r.pc - r.rc - (r.pr - r.rr))),
    'logps/chosen': mean((r) => r.pc),
    'logps/rejected': mean((r) => r.pr),
  };
}

/** The DPO loss settings, declared once: recipe field, allowed values, help (flags and schema come from here). */
export const DPO_OPTIONS: OptionRow<keyof DpoParams>[] = [
  { key: 'beta', field: 'beta', spec: num({ min: 0, exclusiveMin: true }), help: 'DPO β (default 0.1)' },
  { key: 'lossType', field: 'loss_type', spec: str([...LOSS_TYPES]), help: LOSS_TYPES.join(' | ') },
  // ε = 0.5 makes the conservative loss symmetric in chosen and rejected: nothing is learned.
  { key: 'labelSmoothing', field: 'label_smoothing', spec: num({ min: 0, max: 0.5, exclusiveMax: true }), help: 'ε for cDPO / robust DPO' },
  { key: 'rpoAlpha', field: 'rpo_alpha', spec: num({ min: 0 }), help: "TRL's rpo_alpha: add α × the chosen answers' NLL to the loss (0 = off)" },
];

export function validateDpoParams(p: DpoParams, where = ''): DpoParams {
  const bad = firstViolation(DPO_OPTIONS, p as unknown as Record<keyof DpoParams, unknown>);
  if (bad) throw new UserError(`${where}${bad}`);
  return p;
}
