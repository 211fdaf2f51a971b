import * as tf from '@tensorflow/tfjs-core';
import { Decoder } from '../model/decoder.js';
import { makeBatch, promptCompletionRow, tokenLogps } from './batch.js';

export interface LogpResult {
  logp: number;
  n_tokens: number;
  token_logps: number[];
}

/**
 * Σ log p(completion | prompt) per row, in input order. Rows are sorted by length into batches
 * of at most `batchTokens` padded tokens so padding stays small.
 */
export function completionLogprobs(
  model: Decoder,
  rows: { prompt: number[]; completion: number[] }[],
  opts: { batchSize?: number; padId?: number } = {},
): LogpResult[] {
  const bs = opts.batchSize ?? 8;
  const order = rows.map((_, i) => i).sort((a, b) => rows[a].prompt.length + rows[a].completion.length - (rows[b].prompt.length + rows[b].completion.length));
  const out = new Array<LogpResult>(rows.length);
  for (let s = 0; s < order.length; s += bs) {
    const idx = order.slice(s, s + bs);
    const sb = makeBatch(idx.map((i) => promptCompletionRow(rows[i].prompt, rows[i].completion)), opts.padId ?? 0);
    const lp = tf.tidy(() => tokenLogps(model, sb));
    const data = lp.dataSync();
    lp.dispose();
    const T1 = sb.len;
    idx.forEach((i, b) => {
      const P = rows[i].prompt.length;
      const C = rows[i].completion.length;
      const tl: number[] = [];
      for (let j = 0; j < C; j++) tl.push(data[b * T1 + P + j - 1]);
      out[i] = { logp: tl.reduce((a, x) => a + x, 0), n_tokens: C, token_logps: tl };
    });
  }
  return out;
}
