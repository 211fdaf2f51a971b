import type { Message } from '../src/tokenizer/chat.js';
import { UserError } from '../src/util/errors.js';

/**
 * One interface for every reward source — a trained Bradley–Terry model, a rule module, a
 * remote server, a built-in. Scores are stored with the scorer's name and version, so a stored
 * reward always says what produced it.
 */
export type Prompt = string | Message[];

/** The prompt's row as given (e.g. with an "answer" field for rule scorers). */
export type PromptRow = Record<string, unknown>;

export interface Scorer {
  readonly name: string;
  readonly version: string;
  score(prompt: Prompt, completions: string[], row?: PromptRow): Promise<number[]>;
  close?(): Promise<void> | void;
}

/** Scores must be one finite number per completion. */
export function checkScores(x: unknown, n: number, source: string, sample: string): number[] {
  if (!Array.isArray(x)) throw new UserError(`${source}: expected an array of ${n} numbers for ${sample}, got ${describe(x)}`);
  if (x.length !== n) throw new UserError(`${source}: returned ${x.length} scores for ${n} completions (${sample})`);
  x.forEach((v, i) => {
    if (typeof v !== 'number' || !Number.isFinite(v)) throw new UserError(`${source}: score ${i} for ${sample} is ${describe(v)}, not a finite number`);
  });
  return x as number[];
}

function describe(x: unknown): string {
  if (typeof x === 'number') return String(x); // JSON would print NaN and ±Infinity as null
  const s = JSON.stringify(x);
  return s === undefined ? String(x) : s.length > 60 ? s.slice(0, 57) + '...' : s;
}

export function promptLabel(p: Prompt): string {
  const s = typeof p === 'string' ? p : p.map((m) => `${m.role}: ${m.content}`).join(' | ');
  return JSON.stringify(s.length > 50 ? s.slice(0, 47) + '...' : s);
}
