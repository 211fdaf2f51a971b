import { Rng } from '../util/rng.js';

/**
 * The embedded default's task: small bilingual questions with one checkable answer — the larger
 * or smaller of two numbers, or the number after one — answered as "The answer is N." or
 * "答案是 N。" in the question's language. Small enough for a tiny model trained from scratch
 * on a CPU to get partly right, with room for preference training to help.
 */
export type Lang = 'en' | 'zh';
export type Kind = 'max' | 'min' | 'next';

export interface Question {
  kind: Kind;
  lang: Lang;
  a: number;
  b: number;
  text: string;
  answer: string;
}

export const KINDS: Kind[] = ['max', 'min', 'next'];

export function makeQuestion(rng: Rng, maxNumber = 99, kinds: Kind[] = KINDS): Question {
  const kind: Kind = kinds[rng.int(kinds.length)];
  const lang: Lang = rng.next() < 0.5 ? 'en' : 'zh';
  const n = maxNumber + 1;
  let a = rng.int(n);
  let b = rng.int(n);
  while (b === a) b = rng.int(n);
  if (kind === 'next') a = rng.int(n - 1);
  return question(kind, lang, a, b);
}

/** The question about a and b (b unused by "next") in one language. */
export function question(kind: Kind, lang: Lang, a: number, b: number): Question {
  const text = {
    max: { en: `Which is larger, ${a} or ${b}?`, zh: `${a} 和 ${b} 哪个更大？` },
    min: { en: `Which is smaller, ${a} or ${b}?`, zh: `${a} 和 ${b} 哪个更小？` },
    next: { en: `What number comes after ${a}?`, zh: `${a} 后面的数是几？` },
  }[kind][lang];
  const answer = String(kind === 'max' ? Math.max(a, b) : kind === 'min' ? Math.min(a, b) : a + 1);
  return { kind, lang, a, b, text, answer };
}

/** The same question in the other language. */
export function twin(q: Question): Question {
  return question(q.kind, q.lang === 'en' ? 'zh' : 'en', q.a, q.b);
}

export function formatAnswer(lang: Lang, value: string): string {
  return lang === 'en' ? `The answer is ${value}.` : `答案是 ${value}。`;
}

/** A plausible wrong value: the other number, or off by one. */
export function wrongValue(q: Question, rng: Rng): string {
  if (q.kind === 'next') return String(rng.next() < 0.5 ? q.a : q.a + 2);
  const other = q.answer === String(q.a) ? q.b : q.a;
  return rng.next() < 0.7 ? String(other) : String(Number(q.answer) + (rng.next() < 0.5 ? 1 : -1));
}

/** A rejected answer of the kinds a human labeller sees: wrong value, wrong language, no format. */
export function rejectedAnswer(q: Question, rng: Rng): string {
  const u = rng.next();
  if (u < 0.6) return formatAnswer(q.lang, wrongValue(q, rng));
  if (u < 0.8) return formatAnswer(q.lang === 'en' ? 'zh' : 'en', q.answer);
  return rng.next() < 0.5 ? q.answer : `${wrongValue(q, rng)}`;
}
