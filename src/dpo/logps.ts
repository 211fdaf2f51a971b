import * as tf from '@tensorflow/tfjs-core';
import { createHash } from 'node:crypto';
import * as fs from 'node:fs';
import { Decoder } from '../model/decoder.js';
import { SeqBatch, makeBatch, promptCompletionRow, tokenLogps } from '../infer/batch.js';
import { PrefPair } from '../data/prefs.js';
import { DB } from '../store/db.js';
import { refLogps, storeRefLogps } from '../store/run.js';

/**
 * Summed completion log-probs for preference pairs, chosen and rejected in ONE batch
 * ([chosen₀…chosen_{B−1}, rejected₀…rejected_{B−1}]), and the reference-side cache.
 */
export function pairBatch(pairs: PrefPair[], padId: number): SeqBatch {
  return makeBatch([...pairs.map((p) => promptCompletionRow(p.prompt, p.chosen)), ...pairs.map((p) => promptCompletionRow(p.prompt, p.rejected))], padId);
}

/** [2B] summed log-probs (differentiable). */
export function sequenceLogps(model: Decoder, sb: SeqBatch): tf.Tensor1D {
  return tf.sum(tokenLogps(model, sb), 1) as tf.Tensor1D;
}

export function pairLogpsHost(model: Decoder, pairs: PrefPair[], batchSize: number, padId: number): { chosen: number[]; rejected: number[] } {
  const chosen: number[] = [];
  const rejected: number[] = [];
  for (let i = 0; i < pairs.length; i += batchSize) {
    const part = pairs.slice(i, i + batchSize);
    const t = tf.tidy(() => sequenceLogps(model, pairBatch(part, padId)));
    const d = t.dataSync();
    t.dispose();
    chosen.push(...Array.from(d.subarray(0, part.length)));
    rejected.push(...Array.from(d.subarray(part.length)));
  }
  return { chosen, rejected };
}

export function pairHash(p: PrefPair): string {
  return createHash('sha256').update(JSON.stringify([p.prompt, p.chosen, p.rejected])).digest('hex');
}

/**
 * sha256 over the files that define a reference model (weights and adapter), streamed. A file
 * unchanged since it was last hashed in this process (same size and mtime) is not read again:
 * every on-policy round asks for the same multi-gigabyte base weights.
 */
export function filesHash(files: string[]): string {
  const key = [...files].sort().map((f) => {
    const st = fs.statSync(f);
    return `${f}\0${st.size}\0${st.mtimeMs}`;
  }).join('\n');
  let h = hashCache.get(key);
  if (!h) {
    h = hashFiles([...files].sort());
    hashCache.set(key, h);
  }
  return h;
}

const hashCache = new Map<string, string>();

function hashFiles(files: string[]): string {
  const h = createHash('sha256');
  const buf = Buffer.alloc(1 << 20);
  for (const f of files) {
    h.update(f.split('/').at(-1)! + '\0');
    const fd = fs.openSync(f, 'r');
    try {
      let n: number;
      while ((n = fs.readSync(fd, buf, 0, buf.length, null)) > 0) h.update(buf.subarray(0, n));
    } finally {
      fs.closeSync(fd);
    }
  }
  return h.digest('hex');
}

/**
 * Reference log-probs for every pair: cached rows are read back, missing ones computed in batches
 * and committed batch by batch, so an interrupted run keeps what it computed.
 */
export function referenceLogps(
  db: DB,
  refHash: string,
  pairs: PrefPair[],
  compute: (part: PrefPair[]) => { chosen: number[]; rejected: number[] },
  batchSize: number,
): { chosen: number[]; rejected: number[]; hits: number } {
  const hashes = pairs.map(pairHash);
  const chosen = new Array<number>(pairs.length);
  const rejected = new Array<number>(pairs.length);
  const missing: number[] = [];
  hashes.forEach((h, i) => {
    const row = refLogps(db, refHash, h);
    if (row) {
      chosen[i] = row.chosen;
      rejected[i] = row.rejected;
    } else missing.push(i);
  });
  for (let s = 0; s < missing.length; s += batchSize) {
    const idx = missing.slice(s, s + batchSize);
    const r = compute(idx.map((i) => pairs[i]));
    storeRefLogps(db, refHash, idx.map((i, k) => ({ pairHash: hashes[i], chosen: r.chosen[k], rejected: r.rejected[k] })));
    idx.forEach((i, k) => {
      chosen[i] = r.chosen[k];
      rejected[i] = r.rejected[k];
    });
  }
  return { chosen, rejected, hits: pairs.length - missing.length };
}
