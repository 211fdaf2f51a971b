import { Rng } from '../util/rng.js';
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
  const V = logits.length;
  const t = p.temperature;
  const scaled = new Float64Array(V);
  let m = -Infinity;
  for (let i = 0; i < V; i++) {
    scaled[i] = logits[i] / t;
    if (scaled[i] > m) m = scaled[i];
  }
  let z = 0;
  for (let i = 0; i < V; i++) z += (scaled[i] = Math.exp(scaled[i] - m));
  for (let i = 0; i < V; i++) scaled[i] /= z;
  const keepK = p.topK > 0 && p.topK < V;
  const keepP = p.topP < 1;
  if (!keepK && !keepP) return scaled;
  const order = Array.from({ length: V }, (_, i) => i).sort((a, b) => scaled[b] - scaled[a] || a - b);
  let n = keepK ? p.topK : V;
  if (keepP) {
    // Keep the smallest prefix whose mass reaches top_p (always at least one token).
    let cum = 0;
    for (let i = 0; i < n; i++) {
      cum += scaled[order[i]];
      if (cum >= p.topP) {
        n = i + 1;
        break;
      }
    }
  }
  const out = new Float64Array(V);
  let s = 0;
  for (let i = 0; i < n; i++) s += scaled[order[i]];
  for (let i = 0; i < n; i++) out[order[i]] = scaled[order[i]] / s;
  return out;
}

export function sampleToken(logits: Float32Array, p: SamplingParams, rng: Rng): number {
  if (p.temperature <= 0) return argmax(logits);
  const probs = filteredProbs(logits, p);
  let u = rng.next();
  for (let i = 0; i < probs.length; i++) {
    u -= probs[i];
    if (u < 0) return i;
  }
  return argmax(probs);
}
