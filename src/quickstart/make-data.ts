import * as fs from 'node:fs';
import * as path from 'node:path';
import { Rng } from '../util/rng.js';
import { trainBpe } from '../tokenizer/bpe.js';
import { formatChat } from '../tokenizer/chat.js';
import { SPECIAL_TOKENS, writeTokenizerFiles } from '../tokenizer/files.js';
import { writeDirAtomic } from '../util/fsutil.js';
import { toJsonl } from '../data/jsonl.js';
import { KINDS, Kind, Question, formatAnswer, makeQuestion, rejectedAnswer, twin, wrongValue } from './task.js';
import { PRESETS } from '../model/config.js';
import { UserError } from '../util/errors.js';

/**
 * Generate the embedded default deterministically: SFT conversations in the seed format, as an
 * imperfect labelling produced them (a fraction of the two-number answers wrong; the rarer
 * three-number questions answered with a random one of their numbers), human-style preference
 * pairs on the two-number questions, prompts for the on-policy rounds and a held-out evaluation
 * set over every kind, the tokenizer, and the model shape. sft-base thus lacks a skill that the
 * rounds, scored by a rule, can teach (README, "The embedded task"). Evaluation questions never
 * appear in any training split; a two-number question's other-language version nearly always does.
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
  /** Kinds the human preference pairs cover (a subset of `kinds`; default all). */
  prefKinds?: Kind[];
  /** Relative frequency of each kind in the SFT data (default 1 each); prompts and evaluation stay uniform. */
  sftWeights?: Partial<Record<Kind, number>>;
  /** Kinds whose SFT answers come from a careless labeller: one of the question's numbers, at random. */
  careless?: Kind[];
  /** Kinds in the SFT data only (never prompted or evaluated): "next" teaches the order of numbers. */
  sftOnly?: Kind[];
}

/**
 * Single-digit numbers, kept whole by the tokenizer: a model trained from scratch for two epochs
 * on 2 CPU cores learns the task partly (measured: held-out answer NLL 2.3 → 1.1 in 400 steps),
 * which leaves room for preference training to show its effect.
 */
export const DEFAULT_MAKE_DATA: Omit<MakeDataOptions, 'out'> = {
  seed: 0,
  sft: 3000,
  prefs: 800,
  prompts: 384,
  eval: 100,
  noise: 0.2,
  careless: ['max3', 'min3'],
  sftWeights: { max3: 0.25, min3: 0.25 },
  sftOnly: ['next'],
  vocabSize: 512,
  maxNumber: 9,
  kinds: ['max', 'min', 'max3', 'min3'],
  prefKinds: ['max', 'min'],
};

export async function makeData(o: MakeDataOptions): Promise<Record<string, number>> {
  const lists: [string, Kind[] | undefined][] = [['kinds', o.kinds], ['pref-kinds', o.prefKinds], ['careless', o.careless], ['sft-only', o.sftOnly]];
  for (const [name, list] of lists) {
    const bad = (list ?? []).find((k) => !KINDS.includes(k));
    if (bad !== undefined) throw new UserError(`make-data: ${name}: unknown question kind "${bad}" (expected ${KINDS.join(', ')})`);
  }
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
  const train = (kinds = o.kinds, weights?: Partial<Record<Kind, number>>): Question => {
    for (;;) {
      const q = makeQuestion(rng, o.maxNumber, kinds, weights);
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
  const promptQs = Array.from({ length: o.prompts }, () => distinct(() => train(), promptSeen, `${o.prompts} prompts`));
  const sftQs = Array.from({ length: o.sft }, () => train([...o.kinds, ...(o.sftOnly ?? [])], o.sftWeights));
  const prefQs = Array.from({ length: o.prefs }, () => train(o.prefKinds ?? o.kinds));
  let noisy = 0;
  let careless = 0;
  const sft = sftQs.map((q, i) => {
    let value = q.answer;
    if (o.careless?.includes(q.kind)) {
      value = String(q.nums[rng.int(q.nums.length)]);
      if (value !== q.answer) careless++;
    } else if (rng.next() < o.noise) {
      value = wrongValue(q, rng);
      noisy++;
    }
    return { id: i, conversations: [{ from: 'user', value: q.text }, { from: 'assistant', value: formatAnswer(q.lang, value) }] };
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
        `- sft.json: ${o.sft} conversations in the seed format: ${noisy} with a deliberately wrong answer, ${careless} more answered wrongly by the careless labeller of ${(o.careless ?? []).join('/') || 'no'} questions\n` +
        `- prefs.jsonl: ${o.prefs} preference pairs (TRL conversational rows)\n- prompts.jsonl: ${o.prompts} prompts for on-policy rounds, with answers\n` +
        `- eval.jsonl: ${o.eval} held-out prompts with answers (never in a training split; a two-number question's other-language version nearly always is)\n- tokenizer/: byte-level BPE, ${Object.keys(tok.model.vocab).length + SPECIAL_TOKENS.length} ids (numbers kept whole)\n- model.json: the tiny model's shape\n`,
    );
  });
  return { sft: sft.length, noisy, careless, prefs: prefs.length, prompts: promptQs.length, eval: evalQs.length };
}
