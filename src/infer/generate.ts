import * as tf from '@tensorflow/tfjs-core';
import { Decoder, KVCache } from '../model/decoder.js';
import { Rng } from '../util/rng.js';
import { SamplingParams, applyPenalties, penalises, sampleFromExps, sampleFromProbs, sampleToken } from './sampling.js';
import { SAMPLE_DRAW_KERNEL, SAMPLE_EXPS_KERNEL, SAMPLE_KEPT_MAX } from '../engine/kernels.js';

/**
 * Batched sampling with the KV cache. Prompts are left-padded so every row decodes its next
 * token in the same column; each prompt is prefilled once and its cache repeated for its
 * `n` samples. Every sample has its own RNG seed, so a sample's text does not depend on which
 * other samples share its batch — resumed runs regenerate exactly what they lost.
 */
export interface GenRequest {
  prompt: number[];
  /** One seed per sample; the number of seeds is the number of samples. */
  seeds: number[];
}

export interface GenOptions extends SamplingParams {
  maxNewTokens: number;
  stopIds: number[];
  /** Stop strings, checked on decoded text (needs decode). */
  stop?: string[];
  decode?: (ids: number[]) => string;
  padId?: number;
  /** Called with (request index, sample index, new token id) as tokens are produced. */
  onToken?: (req: number, sample: number, id: number) => void;
  /** Upper bound on rows decoded together. */
  maxBatch?: number;
}

export interface GenSample {
  ids: number[];
  text?: string;
  finishReason: 'stop' | 'length';
  /** The stop token that ended the sample, when one did (not part of ids/text). */
  stopId?: number;
}

export function generate(model: Decoder, reqs: GenRequest[], opts: GenOptions): GenSample[][] {
  const it = generateSteps(model, reqs, opts);
  for (;;) {
    const r = it.next();
    if (r.done) return r.value;
  }
}

/**
 * The same, one decode step at a time: yields after every step so a server or a chat can
 * stream tokens (through `onToken`) and let other work run in between.
 */
export function* generateSteps(model: Decoder, reqs: GenRequest[], opts: GenOptions): Generator<void, GenSample[][], void> {
  const out: GenSample[][] = reqs.map(() => []);
  const maxBatch = opts.maxBatch ?? 32;
  // Group whole prompts so that a prompt's samples share one prefill.
  let i = 0;
  while (i < reqs.length) {
    const group: number[] = [];
    let rows = 0;
    while (i < reqs.length && (group.length === 0 || rows + reqs[i].seeds.length <= maxBatch)) {
      group.push(i);
      rows += reqs[i].seeds.length;
      i++;
    }
    const res = yield* generateGroup(model, group.map((g) => reqs[g]), opts, group);
    group.forEach((g, k) => (out[g] = res[k]));
  }
  return out;
}

function* generateGroup(model: Decoder, reqs: GenRequest[], opts: GenOptions, globalIdx: number[]): Generator<void, GenSample[][], void> {
  const cfg = model.cfg;
  const padId = opts.padId ?? 0;
  const P = Math.max(...reqs.map((r) => r.prompt.length));
  const nSamples = reqs[0].seeds.length;
  const uniform = reqs.every((r) => r.seeds.length === nSamples);
  // Prefill each distinct prompt once; repeat the cache when every prompt has the same n.
  const prefillRows = uniform ? reqs.map((r) => r.prompt) : reqs.flatMap((r) => r.seeds.map(() => r.prompt));
  const B0 = prefillRows.length;
  const ids: number[] = [];
  const valid: number[] = [];
  const positions: number[] = [];
  for (const p of prefillRows) {
    const pad = P - p.length;
    for (let t = 0; t < P; t++) {
      ids.push(t < pad ? padId : p[t - pad]);
      valid.push(t < pad ? 0 : 1);
      positions.push(Math.max(0, t - pad));
    }
  }
  const cache = new KVCache(cfg.num_hidden_layers, B0);
  const rows: { req: number; sample: number; rng: Rng; gen: number[]; seen: Set<number>; counts: Map<number, number>; done: boolean; finish: 'stop' | 'length'; pos: number; stopId: number | undefined }[] = [];
  reqs.forEach((r, k) => r.seeds.forEach((seed, s) => rows.push({ req: k, sample: s, rng: new Rng(seed), gen: [], seen: new Set(r.prompt), counts: new Map(), done: false, finish: 'length', pos: r.prompt.length, stopId: undefined })));
  const B = rows.length;
  try {
    const V = cfg.vocab_size;
    // Each prompt's row stands for its samples' rows (`repeat`): then the cache is repeated, and
    // the scores too where they came back (the tokens drawn on the device already are the rows').
    const repeat = uniform ? nSamples : 1;
    let scores = lastScores(model, { ids, batch: B0, len: P, valid, positions }, cache, opts, rows.map((r) => r.rng), repeat);
    if (repeat > 1) {
      cache.repeatRows(repeat);
      if (!(scores instanceof Int32Array)) {
        const from = scores;
        const rep = from instanceof Float32Array ? new Float32Array(B * V) : new Float64Array(B * V);
        for (let b = 0; b < B; b++) rep.set(from.subarray(Math.floor(b / repeat) * V, (Math.floor(b / repeat) + 1) * V), b * V);
        scores = rep;
      }
    }
    const stopSet = new Set(opts.stopIds);
    for (let step = 0; step < opts.maxNewTokens; step++) {
      const next: number[] = [];
      for (let b = 0; b < B; b++) {
        const r = rows[b];
        if (r.done) {
          next.push(padId);
          continue;
        }
        let tok: number;
        if (scores instanceof Int32Array) tok = scores[b];
        else if (scores instanceof Float64Array) tok = sampleFromExps(scores.subarray(b * V, (b + 1) * V), opts, r.rng);
        else {
          const lg = scores.slice(b * V, (b + 1) * V);
          applyPenalties(lg, opts, r.seen, r.counts);
          tok = sampleToken(lg, opts, r.rng);
        }
        next.push(tok);
        if (stopSet.has(tok)) {
          r.done = true;
          r.finish = 'stop';
          r.stopId = tok;
          continue;
        }
        r.gen.push(tok);
        r.seen.add(tok);
        r.counts.set(tok, (r.counts.get(tok) ?? 0) + 1);
        opts.onToken?.(globalIdx[r.req], r.sample, tok);
        if (opts.stop?.length && opts.decode) {
          const text = opts.decode(r.gen);
          if (opts.stop.some((s) => s && text.includes(s))) {
            r.done = true;
            r.finish = 'stop';
          }
        }
      }
      if (rows.every((r) => r.done) || step === opts.maxNewTokens - 1) break;
      yield;
      scores = lastScores(model, { ids: next, batch: B, len: 1, valid: rows.map((r) => (r.done ? 0 : 1)), positions: rows.map((r) => r.pos + step) }, cache, opts, rows.map((r) => (r.done ? null : r.rng)));
    }
  } finally {
    cache.dispose();
  }
  const res: GenSample[][] = reqs.map(() => []);
  for (const r of rows) {
    const s: GenSample = { ids: r.gen, finishReason: r.finish, ...(r.stopId !== undefined ? { stopId: r.stopId } : {}) };
    if (opts.decode) {
      let text = opts.decode(r.gen);
      for (const st of opts.stop ?? []) {
        const at = st ? text.indexOf(st) : -1;
        if (at >= 0) text = text.slice(0, at);
      }
      s.text = text;
    }
    res[r.req][r.sample] = s;
  }
  return res;
}

/**
 * What the sampler needs of the last position of each row, where the backend can take part of it
 * (engine/kernels): the tokens themselves, drawn on the device with each row's stream (`rngs`,
 * `repeat` rows for each of the batch's; null for a finished row, which draws nothing) —
 * SAMPLE_DRAW_KERNEL: one id a row comes back; a row whose top-p keeps more tokens than the
 * device sorts is drawn here from its probabilities; with a top-k the device does not take, the
 * exps of the sampler's first pass, [B·V] float64 (SAMPLE_EXPS_KERNEL); else, or with penalties
 * or greedy decoding (they read the logits), the logits [B·V]. The last two are the batch's rows,
 * not repeated. Each gives the host sampler's tokens bit for bit: on a GPU a decoding step's host
 * work was mostly its exps over the vocabulary, then its sort.
 */
function lastScores(model: Decoder, batch: { ids: number[]; batch: number; len: number; valid: number[]; positions: number[] }, cache: KVCache, opts: SamplingParams, rngs: (Rng | null)[], repeat = 1): Float32Array | Float64Array | Int32Array {
  const has = (k: string) => tf.getKernel(k, tf.getBackend()) !== undefined;
  const sampled = opts.temperature > 0 && !penalises(opts);
  const drawable = opts.topP < 1 || opts.topK <= SAMPLE_KEPT_MAX;
  const mode = sampled && drawable && has(SAMPLE_DRAW_KERNEL) ? 'ids' : sampled && has(SAMPLE_EXPS_KERNEL) ? 'exps' : 'logits';
  // A row's uniform, taken from its stream in the order the host's draw takes it.
  const draws = mode === 'ids' ? rngs.map((r) => (r ? r.next() : 0)) : [];
  const out = tf.tidy(() => {
    const h = model.hidden(batch, cache);
    const last = tf.reshape(tf.slice(h, [0, batch.len - 1, 0], [batch.batch, 1, model.cfg.hidden_size]), [batch.batch, model.cfg.hidden_size]) as tf.Tensor2D;
    const logits = model.logits(last);
    if (mode === 'ids') {
      const rows = repeat > 1 ? tf.gather(logits, Array.from({ length: batch.batch * repeat }, (_, b) => Math.floor(b / repeat))) : logits;
      return tf.engine().runKernel(SAMPLE_DRAW_KERNEL, { logits: rows }, { temperature: opts.temperature, draws, topK: opts.topK, topP: opts.topP }) as tf.Tensor[];
    }
    return [mode === 'exps' ? (tf.engine().runKernel(SAMPLE_EXPS_KERNEL, { logits }, { temperature: opts.temperature }) as tf.Tensor) : logits];
  });
  try {
    const d = out[0].dataSync() as Float32Array | Int32Array;
    if (mode === 'exps') return new Float64Array(d.buffer, d.byteOffset, d.length / 2);
    if (mode === 'logits') return d;
    const ids = Int32Array.from(d);
    if (ids.some((id) => id < 0)) {
      const V = model.cfg.vocab_size;
      const p = out[1].dataSync() as Float32Array;
      const probs = new Float64Array(p.buffer, p.byteOffset, p.length / 2);
      ids.forEach((id, b) => id < 0 && (ids[b] = sampleFromProbs(probs.subarray(b * V, (b + 1) * V), opts, draws[b])));
    }
    return ids;
  } finally {
    tf.dispose(out);
  }
}
