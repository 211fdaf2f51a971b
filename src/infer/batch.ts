import * as tf from '@tensorflow/tfjs-core';
import { Decoder, ForwardBatch } from '../model/decoder.js';
import { embed } from '../engine/ops.js';

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
 * log p(ids[t] | ids[<t]) · weights[t] for t ≥ 1, as [B, T]: column t−1 is token t and the last
 * column is 0. Differentiable; call inside tf.tidy or a gradient function.
 */
export function tokenLogps(model: Decoder, sb: SeqBatch): tf.Tensor2D {
  const { batch: B, len: T } = sb;
  const D = model.cfg.hidden_size;
  // Every position predicts the next token; the last column has weight 0.
  const labels = new Int32Array(B * T);
  const w = new Float32Array(B * T);
  for (let b = 0; b < B; b++) {
    for (let t = 0; t + 1 < T; t++) {
      labels[b * T + t] = sb.ids[b * T + t + 1];
      w[b * T + t] = sb.weights[b * T + t + 1];
    }
  }
  const h = tf.reshape(model.hidden(sb), [B * T, D]) as tf.Tensor2D;
  const scored: number[] = [];
  for (let i = 0; i < B * T; i++) if (w[i] !== 0) scored.push(i);
  if (scored.length === 0 || scored.length === B * T) {
    const lp = model.labelLogps(h, labels);
    return tf.reshape(tf.mul(lp, tf.tensor1d(w)), [B, T]) as tf.Tensor2D;
  }
  // Only positions with a weight go through the LM head and the log-softmax over the vocabulary,
  // the largest per-token cost of a small model and the largest tensor of a big one (prompt
  // tokens in DPO and user turns in SFT have none). Rows are gathered with the embedding
  // lookup's op (a row copy; its gradient adds rows back), and the scores spread back to [B, T]
  // the same way, from a table whose last row is 0 for the unscored positions.
  const S = scored.length;
  const rows = tf.tensor1d(scored, 'int32');
  const lp = model.labelLogps(embed(h, rows) as tf.Tensor2D, Int32Array.from(scored, (i) => labels[i]));
  const weighted = tf.reshape(tf.mul(lp, tf.tensor1d(scored.map((i) => w[i]))), [S, 1]) as tf.Tensor2D;
  const slot = new Int32Array(B * T).fill(S);
  scored.forEach((p, k) => (slot[p] = k));
  const table = tf.concat([weighted, tf.zeros([1, 1])]) as tf.Tensor2D;
  return tf.reshape(embed(table, tf.tensor1d(slot, 'int32')), [B, T]) as tf.Tensor2D;
}

/** Rows from (prompt, completion) token lists: completion tokens are the scored ones. */
export function promptCompletionRow(prompt: number[], completion: number[]): TokenRow {
  return { ids: [...prompt, ...completion], weights: [...prompt.map(() => 0), ...completion.map(() => 1)] };
}
