import * as tf from '@tensorflow/tfjs-core';
import { Decoder, ForwardBatch } from '../model/decoder.js';
import { labelLogProbs } from '../engine/ops.js';

/**
 * Right-padded token batches and the per-token log-probabilities every stage scores with:
 * logprobs, SFT's loss, DPO's policy and reference passes, and the KL estimate.
 */
export interface TokenRow {
  ids: number[];
  /** 1 where ids[t] is a scored token (predicted from ids[<t]); same length as ids. */
  weights: number[];
  /** Segment ids when several sequences are packed into one row. */
  segments?: number[];
  positions?: number[];
}

export interface SeqBatch extends ForwardBatch {
  weights: Float32Array;
}

export function makeBatch(rows: TokenRow[], padId = 0): SeqBatch {
  const B = rows.length;
  const T = Math.max(2, ...rows.map((r) => r.ids.length));
  const ids = new Int32Array(B * T).fill(padId);
  const valid = new Uint8Array(B * T);
  const weights = new Float32Array(B * T);
  const packed = rows.some((r) => r.segments);
  const segments = packed ? new Int32Array(B * T).fill(-1) : undefined;
  const positions = new Int32Array(B * T);
  rows.forEach((r, b) => {
    for (let t = 0; t < T; t++) positions[b * T + t] = t;
    r.ids.forEach((id, t) => {
      ids[b * T + t] = id;
      valid[b * T + t] = 1;
      weights[b * T + t] = r.weights[t] ?? 0;
      if (segments) segments[b * T + t] = r.segments ? r.segments[t] : 0;
      if (r.positions) positions[b * T + t] = r.positions[t];
    });
  });
  return { ids, batch: B, len: T, valid, weights, segments, positions };
}

/**
 * log p(ids[t] | ids[<t]) · weights[t] for t ≥ 1, as [B, T−1] (column t−1 is token t).
 * Differentiable; call inside tf.tidy or a gradient function.
 */
export function tokenLogps(model: Decoder, sb: SeqBatch): tf.Tensor2D {
  const { batch: B, len: T } = sb;
  const D = model.cfg.hidden_size;
  const h = model.hidden(sb);
  const hPrev = tf.reshape(tf.slice(h, [0, 0, 0], [B, T - 1, D]), [B * (T - 1), D]) as tf.Tensor2D;
  const labels = new Int32Array(B * (T - 1));
  const w = new Float32Array(B * (T - 1));
  for (let b = 0; b < B; b++) {
    for (let t = 1; t < T; t++) {
      labels[b * (T - 1) + t - 1] = sb.ids[b * T + t];
      w[b * (T - 1) + t - 1] = sb.weights[b * T + t];
    }
  }
  const lp = labelLogProbs(model.logits(hPrev), tf.tensor1d(labels, 'int32'));
  return tf.reshape(tf.mul(lp, tf.tensor1d(w)), [B, T - 1]) as tf.Tensor2D;
}

/** Rows from (prompt, completion) token lists: completion tokens are the scored ones. */
export function promptCompletionRow(prompt: number[], completion: number[]): TokenRow {
  return { ids: [...prompt, ...completion], weights: [...prompt.map(() => 0), ...completion.map(() => 1)] };
}
