import * as fs from 'node:fs';
import * as path from 'node:path';
import { Rng } from '../util/rng.js';
import { trainBpe } from '../tokenizer/bpe.js';
import { formatChat } from '../tokenizer/chat.js';
import { SPECIAL_TOKENS, writeTokenizerFiles } from '../commands/model.js';
import { writeDirAtomic } from '../util/fsutil.js';
import { toJsonl } from '../data/jsonl.js';
import { Kind, Question, formatAnswer, makeQuestion, rejectedAnswer, twin, wrongValue } from './task.js';
import { PRESETS } from '../model/config.js';
import { UserError } from '../util/errors.js';

/**
 * Generate the embedded default deterministically: SFT conversations in the seed format (a
 * fraction deliberately wrong, so sft-base is imperfect), human-style preference pairs,
 * prompts for the on-policy rounds, a held-out evaluation set, the tokenizer, and the model
 * shape. Evaluation questions never appear in any training split; the same question in the
 * other language does, so held-out accuracy measures whether a skill carries across languages
 * (with single-digit numbers there are only 378 distinct questions, 18 of them "next": holding
 * out unseen number pairs would hold out whole kinds). On-policy prompts come from the training
 * pool, as a real recipe's prompts overlap its SFT data.
 */
export interface MakeDataOptions {
  out: string;
  seed: number;
  sft: number;
  prefs: number;
  prompts: number;
  eval: number;
  noise: number;
  vocabSize: number;
  /** Numbers in questions run from 0 to this. */
  maxNumber: number;
  /** Question kinds to draw from. */
  kinds: Kind[];
}

/**
 * Single-digit numbers, kept whole by the tokenizer: a model trained from scratch for two epochs
 * on 2 CPU cores learns the task partly (measured: held-out answer NLL 2.3 → 1.1 in 400 steps),
 * which leaves room for preference training to show its effect.
 */
export const DEFAULT_MAKE_DATA: Omit<MakeDataOptions, 'out'> = { seed: 0, sft: 3000, prefs: 800, prompts: 128, eval: 100, noise: 0.2, vocabSize: 512, maxNumber: 9, kinds: ['max', 'min', 'next'] };

export async function makeData(o: MakeDataOptions): Promise<Record<string, number>> {
  const rng = new Rng(o.seed, 'quickstart');
  // A question from `draw` whose text is not yet in `taken`, which it joins.
  const distinct = (draw: () => Question, taken: Set<string>, what: string): Question => {
    for (let tries = 0; tries < 10_000; tries++) {
      const q = draw();
      if (!taken.has(q.text)) {
        taken.add(q.text);
        return q;
      }
    }
    throw new UserError(`make-data: not enough distinct questions with numbers up to ${o.maxNumber} for ${what}`);
  };
  const held = new Set<string>();
  const train = (): Question => {
    for (;;) {
      const q = makeQuestion(rng, o.maxNumber, o.kinds);
      if (!held.has(q.text)) return q;
    }
  };
  // Evaluation questions: distinct, each with its other-language twin left to training.
  const evalBlocked = new Set<string>();
  const evalQs = Array.from({ length: o.eval }, () => {
    const q = distinct(() => makeQuestion(rng, o.maxNumber, o.kinds), evalBlocked, `${o.eval} evaluation questions`);
    held.add(q.text);
    evalBlocked.add(twin(q).text);
    return q;
  });
  const promptSeen = new Set<string>();
  const promptQs = Array.from({ length: o.prompts }, () => distinct(train, promptSeen, `${o.prompts} prompts`));
  const sftQs = Array.from({ length: o.sft }, train);
  const prefQs = Array.from({ length: o.prefs }, train);
  let noisy = 0;
  const sft = sftQs.map((q, i) => {
    const wrong = rng.next() < o.noise;
    if (wrong) noisy++;
    return { id: i, conversations: [{ from: 'user', value: q.text }, { from: 'assistant', value: formatAnswer(q.lang, wrong ? wrongValue(q, rng) : q.answer) }] };
  });
  const prefs = prefQs.map((q) => ({
    prompt: [{ role: 'user', content: q.text }],
    chosen: [{ role: 'assistant', content: formatAnswer(q.lang, q.answer) }],
    rejected: [{ role: 'assistant', content: rejectedAnswer(q, rng) }],
  }));
  const promptRow = (q: Question) => ({ prompt: [{ role: 'user', content: q.text }], answer: q.answer, kind: q.kind, lang: q.lang });
  // The tokenizer sees every split's text in its chat form, as the model will.
  const corpus = [
    ...sft.map((c) => formatChat(c.conversations.map((t) => ({ role: t.from, content: t.value })), false)),
    ...prefs.map((p) => formatChat([...p.prompt, p.chosen[0]], false) + p.rejected[0].content),
    ...[...promptQs, ...evalQs].map((q) => formatChat([{ role: 'user', content: q.text }], true)),
  ];
  // Numbers stay whole tokens: the task is about comparing and copying numbers.
  const tok = trainBpe(corpus, { vocabSize: o.vocabSize, specialTokens: SPECIAL_TOKENS, digits: 'grouped' });
  await writeDirAtomic(o.out, (dir) => {
    fs.writeFileSync(path.join(dir, 'sft.json'), '[\n' + sft.map((c) => JSON.stringify(c)).join(',\n') + '\n]\n');
    fs.writeFileSync(path.join(dir, 'prefs.jsonl'), toJsonl(prefs));
    fs.writeFileSync(path.join(dir, 'prompts.jsonl'), toJsonl(promptQs.map(promptRow)));
    fs.writeFileSync(path.join(dir, 'eval.jsonl'), toJsonl(evalQs.map(promptRow)));
    fs.mkdirSync(path.join(dir, 'tokenizer'));
    writeTokenizerFiles(path.join(dir, 'tokenizer'), tok);
    fs.writeFileSync(path.join(dir, 'model.json'), JSON.stringify(PRESETS.tiny, null, 2) + '\n');
    fs.writeFileSync(
      path.join(dir, 'README.md'),
      `# Embedded default data (generated)\n\nMade by \`prefopt make-data --out ${o.out} --seed ${o.seed}\`; do not edit by hand.\n\n` +
        `- sft.json: ${o.sft} conversations in the seed format, ${noisy} of them with a deliberately wrong answer\n` +
        `- prefs.jsonl: ${o.prefs} preference pairs (TRL conversational rows)\n- prompts.jsonl: ${o.prompts} prompts for on-policy rounds, with answers\n` +
        `- eval.jsonl: ${o.eval} held-out prompts with answers (never in a training split; the same question in the other language is)\n- tokenizer/: byte-level BPE, ${Object.keys(tok.model.vocab).length + SPECIAL_TOKENS.length} ids (numbers kept whole)\n- model.json: the tiny model's shape\n`,
    );
  });
  return { sft: sft.length, noisy, prefs: prefs.length, prompts: promptQs.length, eval: evalQs.length };
}
