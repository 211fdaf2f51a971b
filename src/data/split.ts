import { Rng } from '../util/rng.js';

/**
 * A seeded held-out split: `ratio` of the items (at least one) go to evaluation, the rest to
 * training, both in their original order. Used when a stage has no separate eval file.
 */
export function holdOut<T>(items: T[], ratio: number, seed: number): { train: T[]; held: T[] } {
  if (!(ratio > 0) || items.length < 2) return { train: items, held: [] };
  const order = new Rng(seed, 'eval-split').shuffle(items.map((_, i) => i));
  const held = new Set(order.slice(0, Math.max(1, Math.round(items.length * ratio))));
  return { train: items.filter((_, i) => !held.has(i)), held: items.filter((_, i) => held.has(i)) };
}
