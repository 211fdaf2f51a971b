import { Rng } from '../util/rng.js';
import { nativeSampleExps } from '../engine/native.js';
import { UserError } from '../util/errors.js';
import { OptionRow, firstViolation, int, num } from '../util/schema.js';

/**
 * Turning one row of logits into the next token, on the host. The processors follow
 * transformers' order: repetition penalty, then OpenAI-style presence/frequency penalties,
 * temperature, top-k, top-p; temperature 0 is greedy.
 */
export interface SamplingParams {
  temperature: number;
  topK: number; // 0 = off
  topP: number; // 1 = off
  repetitionPenalty: number; // 1 = off
  presencePenalty: number;
  frequencyPenalty: number;
}

export const DEFAULT_SAMPLING: SamplingParams = { temperature: 1, topK: 0, topP: 1, repetitionPenalty: 1, presencePenalty: 0, frequencyPenalty: 0 };

/** The sampling settings as flags (generate, chat, serve's defaults, online) and recipe fields, with their ranges. */
export const SAMPLING_OPTIONS: OptionRow<keyof SamplingParams>[] = [
  { key: 'temperature', field: 'temperature', spec: num({ min: 0 }), help: 'sampling temperature; 0 = greedy' },
  { key: 'topK', field: 'top_k', spec: int({ min: 0 }), help: 'keep the k most likely tokens (0 = off)' },
  { key: 'topP', field: 'top_p', spec: num({ min: 0, max: 1, exclusiveMin: true }), help: 'nucleus sampling mass (1 = off)' },
  { key: 'repetitionPenalty', field: 'repetition_penalty', spec: num({ min: 0, exclusiveMin: true }), help: 'transformers-style repetition penalty (1 = off)' },
  { key: 'presencePenalty', field: 'presence_penalty', spec: num(), help: 'OpenAI-style presence penalty' },
  { key: 'frequencyPenalty', field: 'frequency_penalty', spec: num(), help: 'OpenAI-style frequency penalty' },
];

export function validateSampling<T extends SamplingParams>(p: T, where = ''): T {
  const bad = firstViolation(SAMPLING_OPTIONS, p as unknown as Record<keyof SamplingParams, unknown>);
  if (bad) throw new UserError(`${where}${bad}`);
  return p;
}

/** Apply penalties in place. `seen` holds prompt+generated ids; `counts` generated ids only. */
export function applyPenalties(logits: Float32Array, p: SamplingParams, seen: Set<number>, counts: Map<number, number>): void {
  if (p.repetitionPenalty !== 1) {
    for (const id of seen) {
      const v = logits[id];
      logits[id] = v < 0 ? v * p.repetitionPenalty : v / p.repetitionPenalty;
    }
  }
  if (p.presencePenalty !== 0 || p.frequencyPenalty !== 0) {
    for (const [id, c] of counts) logits[id] -= p.frequencyPenalty * c + p.presencePenalty * (c > 0 ? 1 : 0);
  }
}

export function argmax(a: ArrayLike<number>): number {
  let best = 0;
  for (let i = 1; i < a.length; i++) if (a[i] > a[best]) best = i;
  return best;
}

/** Probabilities after temperature, top-k and top-p; zero outside the kept set. */
export function filteredProbs(logits: Float32Array, p: SamplingParams): Float64Array {
  const e = scaledExps(logits, p.temperature);
  const kept = keptTokens(normalise(e), p);
  if (!kept) return e;
  const out = new Float64Array(e.length);
  kept.ids.forEach((id, j) => (out[id] = kept.probs[j]));
  return out;
}

/**
 * exp(x/t − max x/t) for each logit x, in float64: the sampler's first pass, most of its time —
 * the addon's where it is loaded, on every core with Math.exp's bits (a GPU takes it too: generate).
 */
export function scaledExps(logits: Float32Array, t: number, e = new Float64Array(logits.length)): Float64Array {
  const V = logits.length;
  if (nativeSampleExps(logits, t, e)) return e;
  let m = -Infinity;
  for (let i = 0; i < V; i++) {
    e[i] = logits[i] / t;
    if (e[i] > m) m = e[i];
  }
  for (let i = 0; i < V; i++) e[i] = Math.exp(e[i] - m);
  return e;
}

/** e / Σe in place, the sum in index order. */
function normalise(e: Float64Array): Float64Array {
  let z = 0;
  for (let i = 0; i < e.length; i++) z += e[i];
  for (let i = 0; i < e.length; i++) e[i] /= z;
  return e;
}

/**
 * The tokens top-k and top-p keep from probabilities `probs`, ids ascending, with their
 * probabilities renormalised over the kept set; null when neither is on (every token kept).
 */
function keptTokens(probs: Float64Array, p: SamplingParams): { ids: number[]; probs: Float64Array } | null {
  const V = probs.length;
  const keepK = p.topK > 0 && p.topK < V;
  if (!keepK && p.topP >= 1) return null;
  const { order, n } = keptPrefix(probs, keepK ? p.topK : V, p.topP);
  let s = 0;
  for (let i = 0; i < n; i++) s += probs[order[i]];
  const ids = order.slice(0, n).sort((a, b) => a - b);
  return { ids, probs: Float64Array.from(ids, (id) => probs[id] / s) };
}

/**
 * The tokens top-k and top-p keep: the first n of the tokens by probability (descending, ties by
 * id), n = k, cut to the shortest prefix whose mass reaches top_p (at least one token). Only a
 * prefix of that order matters, and the prefix sums over it are the whole sort's bit for bit, so
 * neither form sorts the vocabulary (most of a sampling step's time, where it did): a small k is
 * selected in one pass (topOf); otherwise the tokens with probability ≥ τ are sorted — they
 * precede every other token, so they are the prefix — for a falling τ until they hold k tokens
 * or reach the mass. A peaked distribution is settled on its first few hundred tokens.
 */
export function keptPrefix(probs: Float64Array, k: number, topP: number): { order: number[]; n: number } {
  const cut = (order: number[]) => {
    let n = Math.min(k, order.length);
    let reached = false;
    let cum = 0;
    for (let i = 0; i < n && topP < 1 && !reached; i++) {
      cum += probs[order[i]];
      if (cum >= topP) [n, reached] = [i + 1, true];
    }
    return { order, n, reached };
  };
  if (k <= SELECTED_K) return cut(topOf(probs, k));
  let top = 0;
  for (let i = 0; i < probs.length; i++) if (probs[i] > top) top = probs[i];
  // τ: top/64, top/4096, top/262144, then 0 (every token: the whole sort, a bounded worst case).
  for (let round = 0; ; round++) {
    const tau = round < 3 ? top / 64 ** (round + 1) : 0;
    const order: number[] = [];
    for (let i = 0; i < probs.length; i++) if (probs[i] >= tau) order.push(i);
    const settled = order.length >= k || order.length === probs.length || tau === 0;
    if (!settled && topP >= 1) continue;
    const r = cut(order.sort(byProbability(probs)));
    if (settled || r.reached) return r;
  }
}

/** Largest k that topOf selects with a heap. */
const SELECTED_K = 4096;

/** Descending probability, ties by ascending id: the order top-k and top-p read. */
const byProbability = (probs: Float64Array) => (a: number, b: number) => probs[b] - probs[a] || a - b;

/**
 * The first k ids in byProbability's order, in that order: one pass keeping the best k in a
 * heap whose root is the worst of them.
 */
function topOf(probs: Float64Array, k: number): number[] {
  const cmp = byProbability(probs);
  const heap: number[] = [];
  // a below b in the heap: a comes after b in the order (the root comes last of all).
  const below = (a: number, b: number) => cmp(a, b) > 0;
  const down = (i: number) => {
    for (;;) {
      const l = 2 * i + 1;
      const r = l + 1;
      let w = i;
      if (l < heap.length && below(heap[l], heap[w])) w = l;
      if (r < heap.length && below(heap[r], heap[w])) w = r;
      if (w === i) return;
      [heap[i], heap[w]] = [heap[w], heap[i]];
      i = w;
    }
  };
  for (let id = 0; id < probs.length; id++) {
    if (heap.length < k) {
      heap.push(id);
      for (let i = heap.length - 1; i > 0 && below(heap[i], heap[(i - 1) >> 1]); i = (i - 1) >> 1) [heap[i], heap[(i - 1) >> 1]] = [heap[(i - 1) >> 1], heap[i]];
    } else if (below(heap[0], id)) {
      heap[0] = id;
      down(0);
    }
  }
  return heap.sort(cmp);
}

/** The exps' buffer sampleToken reuses (its rows never escape it). */
let scratch = new Float64Array(0);

export function sampleToken(logits: Float32Array, p: SamplingParams, rng: Rng): number {
  if (p.temperature <= 0) return argmax(logits);
  if (scratch.length !== logits.length) scratch = new Float64Array(logits.length);
  return sampleFromExps(scaledExps(logits, p.temperature, scratch), p, rng);
}

/** sampleToken from scaledExps' values (temperature above 0), which it overwrites. */
export function sampleFromExps(e: Float64Array, p: SamplingParams, rng: Rng): number {
  return sampleFromProbs(normalise(e), p, rng.next());
}

/** The token from normalised probabilities (scaledExps' values over their sum) and the draw's uniform u. */
export function sampleFromProbs(probs: Float64Array, p: SamplingParams, u: number): number {
  const kept = keptTokens(probs, p);
  return kept ? draw(kept.probs, u, kept.ids) : draw(probs, u);
}

/** Whether any penalty changes the logits (then they are needed on the host). */
export function penalises(p: SamplingParams): boolean {
  return p.repetitionPenalty !== 1 || p.presencePenalty !== 0 || p.frequencyPenalty !== 0;
}

/**
 * The first token, in id order, at which u (one uniform draw) minus the probabilities so far falls below
 * 0; else the most probable. With `ids`, probs are those tokens' (ascending ids) and every other
 * token's is 0, which leaves u as it is: the same token as the walk over the whole vocabulary.
 */
function draw(probs: Float64Array, u: number, ids?: number[]): number {
  for (let i = 0; i < probs.length; i++) {
    u -= probs[i];
    if (u < 0) return ids ? ids[i] : i;
  }
  const best = argmax(probs);
  return ids ? ids[best] : best;
}
