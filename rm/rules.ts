import type { Prompt, PromptRow, Scorer } from './scorer.js';
import { UserError } from '../src/util/errors.js';

/**
 * Built-in rule scorers (`builtin:NAME`). `exact_answer` checks the number or phrase after
 * "answer is" / "答案是" against the prompt row's `answer`, with partial credit for the
 * answer in the wrong format and for the right format with a wrong answer.
 */
const EN = /The answer is (.+?)\.\s*$/;
const ZH = /答案是\s*(.+?)。\s*$/;

export function extractAnswer(text: string): { value: string | null; formatted: boolean } {
  const t = text.trim();
  const m = EN.exec(t) ?? ZH.exec(t);
  if (m) return { value: m[1].trim(), formatted: true };
  const nums = t.match(/-?\d+(?:\.\d+)?/g);
  return { value: nums ? nums[nums.length - 1] : null, formatted: false };
}

/** True when the text's script (CJK or not) matches the prompt's. */
function sameLanguage(prompt: string, completion: string): boolean {
  const cjk = (s: string) => /[\u4e00-\u9fff]/.test(s);
  return cjk(prompt) === cjk(completion);
}

export function exactAnswerReward(promptText: string, completion: string, answer: string): number {
  const { value, formatted } = extractAnswer(completion);
  const right = value !== null && value === answer.trim();
  if (right && formatted) return sameLanguage(promptText, completion) ? 1 : 0.8;
  if (right) return 0.5;
  if (formatted) return 0.1;
  return 0;
}

function text(p: Prompt): string {
  return typeof p === 'string' ? p : p.map((m) => m.content).join('\n');
}

export const BUILTINS: Record<string, () => Scorer> = {
  exact_answer: () => ({
    name: 'builtin:exact_answer',
    version: '1',
    async score(prompt: Prompt, completions: string[], row?: PromptRow) {
      const answer = row?.answer;
      if (answer === undefined || answer === null) throw new UserError(`builtin:exact_answer needs an "answer" field in the prompt row (${JSON.stringify(text(prompt)).slice(0, 60)})`);
      return completions.map((c) => exactAnswerReward(text(prompt), c, String(answer)));
    },
  }),
  length: () => ({
    name: 'builtin:length',
    version: '1',
    async score(_p: Prompt, completions: string[]) {
      return completions.map((c) => -Math.abs(c.length - 40) / 40);
    },
  }),
};
