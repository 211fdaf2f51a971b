import { Decoder } from '../model/decoder.js';
import { TextTokenizer } from '../tokenizer/tokenizer.js';
import { generate } from '../infer/generate.js';
import { DEFAULT_SAMPLING } from '../infer/sampling.js';
import { PromptItem } from '../data/prompts.js';
import { Scorer } from '../../rm/scorer.js';
import { extractAnswer } from '../../rm/rules.js';

/**
 * Held-out evaluation: greedy answers to every prompt, scored by the stage's scorer (mean reward)
 * and, where rows carry an "answer", exact-answer accuracy.
 */
export interface EvalResult {
  accuracy: number | null;
  mean_reward: number | null;
  n: number;
  samples: { prompt: string; answer?: string; output: string; reward?: number; correct?: boolean }[];
}

export async function evaluatePolicy(
  model: Decoder,
  tok: TextTokenizer,
  prompts: PromptItem[],
  opts: { scorer?: Scorer | null; maxNewTokens: number; stopIds: number[]; padId: number; batch?: number },
): Promise<EvalResult> {
  const reqs = prompts.map((p) => ({ prompt: tok.encode(tok.applyChat(p.messages, true)), seeds: [0] }));
  const gens = generate(model, reqs, { ...DEFAULT_SAMPLING, temperature: 0, maxNewTokens: opts.maxNewTokens, stopIds: opts.stopIds, padId: opts.padId, decode: (ids) => tok.decode(ids, true), maxBatch: opts.batch ?? 64 });
  const samples: EvalResult['samples'] = [];
  let correct = 0;
  let withAnswer = 0;
  let rewardSum = 0;
  for (let i = 0; i < prompts.length; i++) {
    const out = gens[i][0].text ?? '';
    const s: EvalResult['samples'][number] = { prompt: prompts[i].messages.at(-1)!.content, output: out };
    const ans = prompts[i].row.answer;
    if (ans !== undefined && ans !== null) {
      withAnswer++;
      s.answer = String(ans);
      s.correct = extractAnswer(out).value === String(ans).trim();
      if (s.correct) correct++;
    }
    if (opts.scorer) {
      s.reward = (await opts.scorer.score(prompts[i].messages, [out], prompts[i].row))[0];
      rewardSum += s.reward;
    }
    samples.push(s);
  }
  return { accuracy: withAnswer ? correct / withAnswer : null, mean_reward: opts.scorer ? rewardSum / prompts.length : null, n: prompts.length, samples };
}
