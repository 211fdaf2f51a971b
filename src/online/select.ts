import { Rng } from '../util/rng.js';

/**
 * Pair selection for on-policy rounds (docs/REFERENCE.md §6): from one prompt's scored samples pick a
 * chosen (the best) and a rejected answer. A prompt whose best and worst rewards tie is dropped
 * — never trained on chosen == rejected — and so is one below `minMargin`.
 */
export type SelectionRule = 'max_min' | 'max_random' | 'max_second' | 'max_min_length_penalty';
export const SELECTION_RULES: SelectionRule[] = ['max_min', 'max_random', 'max_second', 'max_min_length_penalty'];

export interface ScoredSample {
  id: number;
  k: number;
  reward: number;
  nTokens: number;
  /** Token ids, to refuse identical answers even when their rewards differ. */
  key: string;
}

export interface SelectOptions {
  rule: SelectionRule;
  /** Reward subtracted per completion token under max_min_length_penalty. */
  lengthPenalty: number;
  minMargin: number;
}

export type Selection = { chosen: ScoredSample; rejected: ScoredSample; margin: number } | { dropped: 'tie' | 'below_margin' | 'too_few' };

export function selectPair(samples: ScoredSample[], o: SelectOptions, rng: Rng): Selection {
  if (samples.length < 2) return { dropped: 'too_few' };
  const byK = [...samples].sort((a, b) => a.k - b.k);
  const adj = (s: ScoredSample) => (o.rule === 'max_min_length_penalty' ? s.reward - o.lengthPenalty * s.nTokens : s.reward);
  // Highest adjusted reward, first k on ties; lowest, last k on ties (deterministic).
  let best = byK[0];
  for (const s of byK) if (adj(s) > adj(best)) best = s;
  let rejected: ScoredSample | undefined;
  switch (o.rule) {
    case 'max_min':
    case 'max_min_length_penalty': {
      let worst = byK[0];
      for (const s of byK) if (adj(s) <= adj(worst)) worst = s;
      if (adj(worst) < adj(best)) rejected = worst;
      break;
    }
    case 'max_second': {
      for (const s of byK) if (adj(s) < adj(best) && (!rejected || adj(s) > adj(rejected))) rejected = s;
      break;
    }
    case 'max_random': {
      const lower = byK.filter((s) => adj(s) < adj(best));
      if (lower.length) rejected = lower[rng.int(lower.length)];
      break;
    }
  }
  if (!rejected || rejected.key === best.key) return { dropped: 'tie' };
  const margin = adj(best) - adj(rejected);
  if (margin < o.minMargin) return { dropped: 'below_margin' };
  return { chosen: best, rejected, margin };
}
