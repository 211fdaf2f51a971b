import { Rng } from '../util/rng.js';

/**
 * The embedded default's task: small bilingual questions with one checkable answer — the largest
 * or smallest of two or three numbers, a sum of two, or the number after one — answered as
 * "The answer is N." or "答案是 N。" in the question's language. Small enough for a tiny model
 * trained from scratch on a CPU to get partly right, with room for preference training to help.
 */
export type Lang = 'en' | 'zh';
export type Kind = 'max' | 'min' | 'next' | 'max3' | 'min3' | 'add';

export interface Question {
  kind: Kind;
  lang: Lang;
  /** The numbers asked about (one for "next", two for max/min/add, three for max3/min3). */
  nums: number[];
  text: string;
  answer: string;
}

export const KINDS: Kind[] = ['max', 'min', 'next', 'max3', 'min3', 'add'];
const ARITY: Record<Kind, number> = { max: 2, min: 2, next: 1, max3: 3, min3: 3, add: 2 };

/**
 * A question of one of `kinds`, drawn uniformly, or by `weights` (relative; kinds without a weight
 * count 1).
 */
export function makeQuestion(rng: Rng, maxNumber = 99, kinds: Kind[] = KINDS, weights?: Partial<Record<Kind, number>>): Question {
  let kind: Kind = kinds[kinds.length - 1];
  if (!weights) kind = kinds[rng.int(kinds.length)];
  else {
    const w = kinds.map((k) => weights[k] ?? 1);
    let u = rng.next() * w.reduce((a, b) => a + b, 0);
    for (let i = 0; i < kinds.length; i++) if ((u -= w[i]) < 0) {
      kind = kinds[i];
      break;
    }
  }
  const lang: Lang = rng.next() < 0.5 ? 'en' : 'zh';
  const n = maxNumber + 1;
  const nums: number[] = [];
  if (kind === 'next') nums.push(rng.int(n - 1));
  else if (kind === 'add') nums.push(rng.int(n), rng.int(n));
  else {
    // Comparisons ask about distinct numbers.
    while (nums.length < ARITY[kind]) {
      const x = rng.int(n);
      if (!nums.includes(x)) nums.push(x);
    }
  }
  return question(kind, lang, nums);
}

/** The question about `nums` in one language. */
export function question(kind: Kind, lang: Lang, nums: number[]): Question {
  const [a, b, c] = nums;
  const text = {
    max: { en: `Which is larger, ${a} or ${b}?`, zh: `${a} 和 ${b} 哪个更大？` },
    min: { en: `Which is smaller, ${a} or ${b}?`, zh: `${a} 和 ${b} 哪个更小？` },
    next: { en: `What number comes after ${a}?`, zh: `${a} 后面的数是几？` },
    max3: { en: `Which is the largest of ${a}, ${b} and ${c}?`, zh: `${a}、${b}、${c} 中哪个最大？` },
    min3: { en: `Which is the smallest of ${a}, ${b} and ${c}?`, zh: `${a}、${b}、${c} 中哪个最小？` },
    add: { en: `What is ${a} plus ${b}?`, zh: `${a} 加 ${b} 等于几？` },
  }[kind][lang];
  const value = kind === 'max' || kind === 'max3' ? Math.max(...nums) : kind === 'min' || kind === 'min3' ? Math.min(...nums) : kind === 'next' ? a + 1 : a + b;
  return { kind, lang, nums: [...nums], text, answer: String(value) };
}

/** The same question in the other language. */
export function twin(q: Question): Question {
  return question(q.kind, q.lang === 'en' ? 'zh' : 'en', q.nums);
}

export function formatAnswer(lang: Lang, value: string): string {
  return lang === 'en' ? `The answer is ${value}.` : `答案是 ${value}。`;
}

/** A plausible wrong value: another number of the question, or off by one (or two, for sums). */
export function wrongValue(q: Question, rng: Rng): string {
  const v = Number(q.answer);
  if (q.kind === 'next') return String(rng.next() < 0.5 ? q.nums[0] : v + 1);
  if (q.kind === 'add') {
    const d = rng.next() < 0.5 ? 1 : 2;
    return String(v === 0 || rng.next() < 0.5 ? v + d : v - d);
  }
  const others = q.nums.filter((x) => x !== v);
  return rng.next() < 0.7 ? String(others[rng.int(others.length)]) : String(v === 0 || rng.next() < 0.5 ? v + 1 : v - 1);
}

/** A rejected answer of the kinds a human labeller sees: wrong value, wrong language, no format. */
export function rejectedAnswer(q: Question, rng: Rng): string {
  const u = rng.next();
  if (u < 0.6) return formatAnswer(q.lang, wrongValue(q, rng));
  if (u < 0.8) return formatAnswer(q.lang === 'en' ? 'zh' : 'en', q.answer);
  return rng.next() < 0.5 ? q.answer : `${wrongValue(q, rng)}`;
}
