import * as fs from 'node:fs';
import * as path from 'node:path';
import { createHash } from 'node:crypto';
import { DB, openDb, tx } from '../store/db.js';
import {
  RoundPrompt, RoundRow, RoundStep, bothScores, ensureRound, fixRoundPrompts, getRound, pairScores, promptsSampled, recordCheckpoint, roundPairs, roundPrompts,
  roundSampleIds, scoredSamples, setRoundPolicy, setRoundStep, setStageFingerprint, stageFingerprint, storePair, storePrompts, storeSamples, storeScores, unscoredSamples,
} from '../store/rounds.js';
import { ensureRun, ensureStage, getMetrics, logEvent, putMetrics, setStage } from '../store/run.js';
import { Policy, needTokenizer, openPolicy, stopIdsOf } from '../model/policy.js';
import { DEFAULT_LORA, LoraAdapter, LoraConfig, attach, withAdapterOff } from '../lora/lora.js';
import { DEFAULT_DPO, DpoParams } from '../dpo/loss.js';
import { PAIR_SHAPE_OPTIONS, PrefPair } from '../data/prefs.js';
import { PromptItem, loadPrompts, rowMessages } from '../data/prompts.js';
import { completionLogprobs } from '../infer/logprobs.js';
import { DEFAULT_SAMPLING, SAMPLING_OPTIONS, validateSampling } from '../infer/sampling.js';
import { OptionRow, firstViolation, int, num, str, valuesFrom } from '../util/schema.js';
import { LocalSampler, OpenAISampler, OpenAISamplerConfig, SampleSettings, Sampler } from '../online/sampler.js';
import { SELECTION_RULES, ScoredSample, SelectOptions, selectPair } from '../online/select.js';
import { DEFAULT_TRAIN, TrainConfig } from '../train/trainer.js';
import { DEFAULT_DPO_STAGE } from './dpo.js';
import { TrainerSpec, trainDpo } from './command-trainer.js';
import { evaluatePolicy } from './evaluate.js';
import { makeScorer } from '../../rm/spec.js';
import { Scorer } from '../../rm/scorer.js';
import { deriveSeed, Rng } from '../util/rng.js';
import { UserError } from '../util/errors.js';
import { Progress, log } from '../util/log.js';

/**
 * Stage 3: iterative on-policy DPO. Each round: sample K answers per prompt from the current
 * policy → score them → pick (best, worst) pairs → DPO on the LoRA adapter → evaluate. Every
 * unit of work commits in a transaction under a unique key and the round's `step` advances in
 * the same transaction as the work that finishes it, so a run killed at any instant resumes
 * where it stopped, redoing only uncommitted work. Sampling seeds derive from
 * (run seed, round, prompt, k): resumed sampling reproduces the same answers.
 */
export type SamplerConfig = { type: 'local'; maxBatch?: number } | ({ type: 'openai' } & OpenAISamplerConfig);

export interface OnlineConfig {
  model: string;
  adapter?: string;
  prompts: string;
  evalPrompts?: string;
  scorer: string;
  /**
   * A second scorer that only watches: it scores every sample too, and each round records how
   * often it ranks the selected pairs as `scorer` does (e.g. a trained reward model beside the
   * rule that drives the rounds).
   */
  auditScorer?: string;
  rounds: number;
  samplesPerPrompt: number;
  promptsPerRound: number;
  promptMode: 'slice' | 'resample';
  sampling: SampleSettings;
  sampler: SamplerConfig;
  selection: SelectOptions;
  reference: 'sft' | 'previous';
  dpo: DpoParams;
  lora: LoraConfig;
  maxLength: number;
  maxPromptLength: number;
  batchSize: number;
  train: TrainConfig;
  /** Who trains each round's adapter: prefopt, or a command (stages/command-trainer). */
  trainer?: TrainerSpec;
  workdir: string;
  seed: number;
  evalMaxNewTokens: number;
  /** Recipe integration: which run and stage this is in the run database. */
  runName?: string;
  stageName?: string;
  /** Scorer files resolve relative to this directory (the recipe's). */
  baseDir?: string;
}

export const DEFAULT_ONLINE: Omit<OnlineConfig, 'model' | 'prompts' | 'scorer' | 'workdir'> = {
  rounds: 3,
  samplesPerPrompt: 4,
  promptsPerRound: 0,
  promptMode: 'slice',
  sampling: { ...DEFAULT_SAMPLING, temperature: 1.0, maxNewTokens: 64 },
  sampler: { type: 'local' },
  selection: { rule: 'max_min', lengthPenalty: 0, minMargin: 0 },
  reference: 'sft',
  dpo: DEFAULT_DPO,
  lora: DEFAULT_LORA,
  maxLength: 512,
  maxPromptLength: 256,
  batchSize: 8,
  train: { ...DEFAULT_TRAIN, lr: 5e-4, epochs: 1, scheduler: 'linear', warmupRatio: 0.1, weightDecay: 0 },
  seed: 0,
  evalMaxNewTokens: 32,
};


export function roundDir(workdir: string, r: number): string {
  return path.join(workdir, `round-${r}`);
}

/**
 * The stage's own settings, flat, as flags and recipe fields (sampling, DPO, LoRA and training
 * have tables of their own); `onlineSettingsFrom` puts them where OnlineConfig keeps them.
 */
interface OnlineSettings {
  rounds: number;
  samplesPerPrompt: number;
  promptsPerRound: number;
  promptMode: OnlineConfig['promptMode'];
  selection: string;
  lengthPenalty: number;
  minMargin: number;
  reference: OnlineConfig['reference'];
  maxNewTokens: number;
  evalMaxNewTokens: number;
  maxLength: number;
  maxPromptLength: number;
  batchSize: number;
}

export const ONLINE_OPTIONS: OptionRow<keyof OnlineSettings>[] = [
  { key: 'rounds', field: 'rounds', spec: int({ min: 1 }), help: `rounds (default ${DEFAULT_ONLINE.rounds})` },
  { key: 'samplesPerPrompt', field: 'samples_per_prompt', spec: int({ min: 2 }), help: `answers sampled per prompt (default ${DEFAULT_ONLINE.samplesPerPrompt})` },
  { key: 'promptsPerRound', field: 'prompts_per_round', spec: int({ min: 0 }), help: 'prompts per round (0 = all)' },
  { key: 'promptMode', field: 'prompt_mode', spec: str(['slice', 'resample']), help: 'slice (consecutive slices) | resample (seeded)' },
  { key: 'selection', field: 'selection', spec: str([...SELECTION_RULES]), help: SELECTION_RULES.join(' | ') },
  { key: 'lengthPenalty', field: 'length_penalty', spec: num({ min: 0 }), help: 'reward per completion token subtracted by max_min_length_penalty' },
  { key: 'minMargin', field: 'min_margin', spec: num({ min: 0 }), help: 'drop pairs whose reward margin is below this' },
  { key: 'reference', field: 'reference', spec: str(['sft', 'previous']), help: 'sft (fixed) | previous (last round’s policy)' },
  { key: 'maxNewTokens', field: 'max_new_tokens', spec: int({ min: 1 }), help: `sampled tokens at most (default ${DEFAULT_ONLINE.sampling.maxNewTokens})` },
  { key: 'evalMaxNewTokens', field: 'eval_max_new_tokens', spec: int({ min: 1 }), help: `tokens at most in the held-out evaluation (default ${DEFAULT_ONLINE.evalMaxNewTokens})` },
  ...PAIR_SHAPE_OPTIONS,
];

/** The flat settings of a config (the inverse of onlineSettingsFrom's reshaping). */
function flatSettings(c: Omit<OnlineConfig, 'model' | 'prompts' | 'scorer' | 'workdir'>): OnlineSettings {
  return {
    rounds: c.rounds, samplesPerPrompt: c.samplesPerPrompt, promptsPerRound: c.promptsPerRound, promptMode: c.promptMode,
    selection: c.selection.rule, lengthPenalty: c.selection.lengthPenalty, minMargin: c.selection.minMargin, reference: c.reference,
    maxNewTokens: c.sampling.maxNewTokens, evalMaxNewTokens: c.evalMaxNewTokens, maxLength: c.maxLength, maxPromptLength: c.maxPromptLength, batchSize: c.batchSize,
  };
}

function checkSettings(s: OnlineSettings, where: string): void {
  const bad = firstViolation(ONLINE_OPTIONS, s);
  if (bad) throw new UserError(`${where}${bad}`);
}

/** The stage's settings and sampling from CLI flags or recipe fields, range-checked, in OnlineConfig's shape. */
export function onlineSettingsFrom(o: Record<string, any>, from: 'flags' | 'recipe', where = '') {
  const sampling = validateSampling(valuesFrom(SAMPLING_OPTIONS, o, DEFAULT_ONLINE.sampling, from), where);
  const s = valuesFrom(ONLINE_OPTIONS, o, flatSettings(DEFAULT_ONLINE), from);
  checkSettings(s, where);
  return {
    rounds: s.rounds, samplesPerPrompt: s.samplesPerPrompt, promptsPerRound: s.promptsPerRound, promptMode: s.promptMode,
    sampling: { ...sampling, maxNewTokens: s.maxNewTokens },
    selection: { rule: s.selection as SelectOptions['rule'], lengthPenalty: s.lengthPenalty, minMargin: s.minMargin },
    reference: s.reference, maxLength: s.maxLength, maxPromptLength: s.maxPromptLength, batchSize: s.batchSize, evalMaxNewTokens: s.evalMaxNewTokens,
  };
}

/** Range checks of a whole OnlineConfig (library callers build one directly). */
export function validateOnline(c: OnlineConfig): void {
  checkSettings(flatSettings(c), '');
  validateSampling(c.sampling);
}

function sha256File(f: string): string {
  return createHash('sha256').update(fs.readFileSync(f)).digest('hex');
}

/** Which prompts a round uses: consecutive slices (wrapping), or a seeded resample. */
export function roundPromptIndices(n: number, perRound: number, mode: 'slice' | 'resample', seed: number, r: number): number[] {
  const P = perRound > 0 ? Math.min(perRound, n) : n;
  if (mode === 'resample') return new Rng(seed, 'round-prompts', r).shuffle(Array.from({ length: n }, (_, i) => i)).slice(0, P);
  return Array.from({ length: P }, (_, i) => ((r - 1) * P + i) % n);
}

export interface OnlineResult {
  adapter: string | null;
  rounds: Record<string, number | null>[];
}

export async function runOnline(c: OnlineConfig, dbIn?: DB): Promise<OnlineResult> {
  validateOnline(c);
  fs.mkdirSync(c.workdir, { recursive: true });
  const db = dbIn ?? openDb(path.join(c.workdir, 'prefopt.db'));
  const dbFile = db.name;
  const scorers: Scorer[] = [];
  try {
    const runId = ensureRun(db, c.runName ?? 'online', c.seed);
    const stage = ensureStage(db, runId, c.stageName ?? 'online_dpo', 'online_dpo', configKey(c));
    // The settings that shaped the stored rounds; a resumed run must use the same ones.
    const fp = JSON.stringify(configKey(c));
    const stored = stageFingerprint(db, stage.id);
    if (stored === null) setStageFingerprint(db, stage.id, fp);
    else if (stored !== fp) {
      throw new UserError(`${dbFile}: this workdir holds an online stage with other settings (${diffKeys(JSON.parse(stored), configKey(c)).join(', ')}); use a new --workdir`);
    }
    if (stage.status === 'done') return JSON.parse(stage.result_json!);
    setStage(db, stage.id, 'running');
    const prompts = loadPrompts(c.prompts);
    const evalPrompts = c.evalPrompts ? loadPrompts(c.evalPrompts) : [];
    const probe = openPolicy(c.model);
    const tok = needTokenizer(probe, 'on-policy sampling');
    probe.model.dispose();
    // Prompts are stored once; their ids are what every round samples from.
    storePrompts(db, stage.id, prompts.map((p) => ({ idx: p.idx, json: JSON.stringify(p.row), ids: tok.encode(tok.applyChat(p.messages, true)), answer: p.row.answer === undefined ? null : String(p.row.answer) })));
    const made = new Map<string, Scorer>();
    const scorerFor = (spec: string) => async () => {
      let sc = made.get(spec);
      if (!sc) {
        sc = await makeScorer(spec, { baseDir: c.baseDir });
        made.set(spec, sc);
        scorers.push(sc);
      }
      return sc;
    };
    const getScorer = scorerFor(c.scorer);
    const getAudit = c.auditScorer ? scorerFor(c.auditScorer) : null;
    const rounds: Record<string, number | null>[] = [];
    let adapter: string | null = c.adapter ?? null;
    for (let r = 1; r <= c.rounds; r++) {
      const res = await runRound(c, db, stage.id, r, adapter, prompts, evalPrompts, getScorer, getAudit);
      adapter = res.adapter;
      rounds.push(getMetrics(db, stage.id, r));
    }
    const result: OnlineResult = { adapter, rounds };
    setStage(db, stage.id, 'done', { output: adapter ?? undefined, result });
    return result;
  } finally {
    for (const s of scorers) await s.close?.();
    if (!dbIn) db.close();
  }
}

/** The settings that define the stage's results; a resumed run must match them. */
function configKey(c: OnlineConfig): Record<string, unknown> {
  const { runName: _a, stageName: _b, baseDir: _c, ...rest } = c;
  return JSON.parse(JSON.stringify(rest));
}

function diffKeys(a: Record<string, unknown>, b: Record<string, unknown>): string[] {
  return [...new Set([...Object.keys(a), ...Object.keys(b)])].filter((k) => JSON.stringify(a[k]) !== JSON.stringify(b[k]));
}


/** What every step of a round reads: the stage's settings, the round's rows, the policy loaded on demand. */
interface RoundContext {
  c: OnlineConfig;
  db: DB;
  stageId: number;
  r: number;
  roundId: number;
  /** The round's prompts, in order. */
  rp: RoundPrompt[];
  evalPrompts: PromptItem[];
  /** The adapter the round started from (its sampling policy). */
  startAdapter: string | null;
  /** The adapter policy() attaches: the sampling policy, then the round's new one for evaluation. */
  prevAdapter: string | null;
  getScorer: () => Promise<Scorer>;
  getAudit: (() => Promise<Scorer>) | null;
  times: Record<string, number>;
  round(): RoundRow;
  advance(from: RoundStep, to: RoundStep, extra?: () => void): void;
  policy(): Policy;
  release(): void;
}

/** A round as its steps, in order; the round's row in the database says which are left. */
const ROUND_STEPS: [RoundStep, (ctx: RoundContext) => Promise<void>][] = [
  ['sample', sampleStep],
  ['score', scoreStep],
  ['select', selectStep],
  ['train', trainStep],
  ['evaluate', evaluateStep],
];

async function runRound(
  c: OnlineConfig,
  db: DB,
  stageId: number,
  r: number,
  prevAdapter: string | null,
  prompts: PromptItem[],
  evalPrompts: PromptItem[],
  getScorer: () => Promise<Scorer>,
  getAudit: (() => Promise<Scorer>) | null,
): Promise<{ adapter: string | null }> {
  ensureRound(db, stageId, r, c.reference);
  const round = () => getRound(db, stageId, r);
  const roundId = round().id;
  if (round().step === 'done') return { adapter: round().policy_path };
  log('round', { round: r, step: round().step, policy: prevAdapter ?? '(base)' });

  // The prompt list of this round is fixed once, in one transaction.
  fixRoundPrompts(db, stageId, roundId, () => roundPromptIndices(prompts.length, c.promptsPerRound, c.promptMode, c.seed, r));
  const rp = roundPrompts(db, roundId);

  let loaded: Policy | null = null;
  const ctx: RoundContext = {
    c, db, stageId, r, roundId, rp, evalPrompts, startAdapter: prevAdapter, prevAdapter, getScorer, getAudit, times: {},
    round,
    advance: (from, to, extra) => {
      tx(db, () => {
        if (round().step !== from) throw new Error(`round ${r}: expected step ${from}`);
        extra?.();
        setRoundStep(db, roundId, to);
      });
      // Logged after the commit: a reader of the log never sees a step the database does not have.
      log('step', { round: r, step: to });
    },
    policy: () => {
      if (!loaded) {
        loaded = openPolicy(c.model);
        if (ctx.prevAdapter) attach(loaded.model, LoraAdapter.load(loaded.model, ctx.prevAdapter));
      }
      return loaded;
    },
    release: () => {
      if (loaded) {
        (loaded.model.adapter as LoraAdapter | null)?.dispose();
        loaded.model.dispose();
        loaded = null;
      }
    },
  };
  try {
    for (const [step, run] of ROUND_STEPS) if (round().step === step) await run(ctx);
    return { adapter: round().policy_path };
  } finally {
    ctx.release();
  }
}

/** K samples per prompt of the round from the policy (or vLLM servers), committed a group of prompts at a time. */
async function sampleStep(ctx: RoundContext): Promise<void> {
  const t0 = Date.now();
  const p = ctx.policy();
  const tok = p.tok!;
  const sampler: Sampler =
    ctx.c.sampler.type === 'openai'
      ? new OpenAISampler({ ...ctx.c.sampler, model: ctx.c.sampler.model.replace('{round}', String(ctx.r)) }, tok, tok.id('<|im_end|>'))
      : new LocalSampler(p.model, tok, stopIdsOf(p), p.padId, ctx.c.sampler.maxBatch ?? 64);
  const done = promptsSampled(ctx.db, ctx.roundId, ctx.c.samplesPerPrompt);
  const todo = ctx.rp.filter((x) => !done.has(x.id));
  const settings = JSON.stringify({ sampler: ctx.c.sampler.type, ...ctx.c.sampling });
  const group = Math.max(1, Math.floor((ctx.c.sampler.type === 'local' ? ctx.c.sampler.maxBatch ?? 64 : 64) / ctx.c.samplesPerPrompt));
  const bar = new Progress(`round ${ctx.r} sample`, ctx.rp.length);
  for (let i = 0; i < todo.length; i += group) {
    const part = todo.slice(i, i + group);
    const reqs = part.map((x) => ({
      messages: rowMessages(JSON.parse(x.prompt_json)),
      promptIds: JSON.parse(x.prompt_ids) as number[],
      seeds: Array.from({ length: ctx.c.samplesPerPrompt }, (_, k) => deriveSeed(ctx.c.seed, 'sample', ctx.r, x.idx, k)),
    }));
    const out = await sampler.sample(reqs, ctx.c.sampling);
    storeSamples(ctx.db, ctx.roundId, part.flatMap((x, j) => out[j].map((s, k) => ({ promptId: x.id, k, text: s.text, ids: s.ids, finishReason: s.finishReason, settings, seed: reqs[j].seeds[k] }))));
    bar.tick(done.size + i + part.length);
  }
  bar.done();
  ctx.times['time/sample_s'] = (Date.now() - t0) / 1000;
  ctx.advance('sample', 'score', () => putMetrics(ctx.db, ctx.stageId, ctx.r, ctx.times));
}

/** Rewards from the scorer (and the audit scorer) for every sample. */
async function scoreStep(ctx: RoundContext): Promise<void> {
  const t0 = Date.now();
  for (const get of ctx.getAudit ? [ctx.getScorer, ctx.getAudit] : [ctx.getScorer]) await scoreRound(ctx.db, ctx.roundId, await get());
  ctx.times['time/score_s'] = (Date.now() - t0) / 1000;
  ctx.advance('score', 'select', () => putMetrics(ctx.db, ctx.stageId, ctx.r, { 'time/score_s': ctx.times['time/score_s'] }));
}

/** A chosen/rejected pair per prompt by the selection rule, with the round's reward metrics. */
async function selectStep(ctx: RoundContext): Promise<void> {
  const sc = await ctx.getScorer();
  const audit = ctx.getAudit ? await ctx.getAudit() : null;
  const scored = scoredSamples(ctx.db, ctx.roundId, sc.name, sc.version);
  const byPrompt = new Map<number, ScoredSample[]>();
  for (const x of scored) {
    const ids = JSON.parse(x.token_ids) as number[];
    byPrompt.set(x.prompt_id, [...(byPrompt.get(x.prompt_id) ?? []), { id: x.id, k: x.k, reward: x.reward, nTokens: ids.length, key: x.token_ids }]);
  }
  ctx.advance('select', 'train', () => {
    const dropped: Record<string, number> = { tie: 0, below_margin: 0, too_few: 0 };
    let margin = 0;
    let n = 0;
    const rewards = scored.map((x) => x.reward);
    for (const x of ctx.rp) {
      const sel = selectPair(byPrompt.get(x.id) ?? [], ctx.c.selection, new Rng(ctx.c.seed, 'select', ctx.r, x.idx));
      if ('dropped' in sel) dropped[sel.dropped]++;
      else {
        storePair(ctx.db, ctx.roundId, { promptId: x.id, chosen: sel.chosen.id, rejected: sel.rejected.id, margin: sel.margin, rule: ctx.c.selection.rule });
        margin += sel.margin;
        n++;
      }
    }
    // Best-of-K: the mean over prompts of their best sample's reward (pass@K for a 0/1 rule).
    const best = [...byPrompt.values()].map((g) => Math.max(...g.map((x) => x.reward)));
    if (audit) putMetrics(ctx.db, ctx.stageId, ctx.r, auditAgreement(ctx.db, ctx.roundId, sc, audit));
    putMetrics(ctx.db, ctx.stageId, ctx.r, {
      'reward/mean': rewards.reduce((a, b) => a + b, 0) / Math.max(rewards.length, 1),
      'reward/best_of_k': best.reduce((a, b) => a + b, 0) / Math.max(best.length, 1),
      'reward/max': Math.max(...rewards),
      'reward/min': Math.min(...rewards),
      samples: rewards.length,
      pairs: n,
      'dropped/tie': dropped.tie,
      'dropped/below_margin': dropped.below_margin,
      'margin/mean': n ? margin / n : null,
    });
  });
}

/** DPO on the round's pairs, continuing the adapter; the new adapter is recorded as the round's policy. */
async function trainStep(ctx: RoundContext): Promise<void> {
  ctx.release();
  const t0 = Date.now();
  const pairs = roundPairs(ctx.db, ctx.roundId);
  const out = roundDir(ctx.c.workdir, ctx.r);
  let adapterOut: string | null = ctx.prevAdapter;
  let dpo: Record<string, number> = {};
  if (pairs.length) {
    const data: PrefPair[] = pairs.map((x) => ({ prompt: JSON.parse(x.prompt_ids), chosen: JSON.parse(x.chosen), rejected: JSON.parse(x.rejected), where: `round ${ctx.r} prompt ${x.idx}` }));
    const res = await trainDpo({
      ...DEFAULT_DPO_STAGE,
      model: ctx.c.model,
      data,
      out,
      evalRatio: 0,
      adapter: ctx.prevAdapter ?? undefined,
      refIsStartAdapter: ctx.c.reference === 'previous',
      dpo: ctx.c.dpo,
      lora: ctx.c.lora,
      maxLength: ctx.c.maxLength,
      maxPromptLength: ctx.c.maxPromptLength,
      batchSize: ctx.c.batchSize,
      train: { ...ctx.c.train, seed: deriveSeed(ctx.c.seed, 'train', ctx.r) },
      cacheDb: ctx.db.name,
      resume: true,
    }, ctx.c.trainer, `round ${ctx.r}`);
    adapterOut = out;
    dpo = Object.fromEntries(Object.entries(res.trainMetrics).filter(([k]) => k === 'loss' || k.includes('/')).map(([k, v]) => [`dpo/${k}`, v]));
  } else log('round', { round: ctx.r, note: 'no pairs: every prompt tied; the policy is unchanged' });
  ctx.times['time/train_s'] = (Date.now() - t0) / 1000;
  ctx.advance('train', 'evaluate', () => {
    setRoundPolicy(ctx.db, ctx.roundId, adapterOut);
    if (adapterOut && adapterOut === out) recordCheckpoint(ctx.db, ctx.stageId, ctx.r, 'adapter', out, sha256File(path.join(out, 'adapter_model.safetensors')));
    putMetrics(ctx.db, ctx.stageId, ctx.r, { ...dpo, 'time/train_s': ctx.times['time/train_s'] });
  });
}

/** KL of the sampling policy to the reference and to sft-base, held-out accuracy of the new policy. */
async function evaluateStep(ctx: RoundContext): Promise<void> {
  const t0 = Date.now();
  const adapterPath = ctx.round().policy_path;
  ctx.release();
  ctx.prevAdapter = adapterPath;
  const p = ctx.policy();
  // KL(π‖ref) of the policy that sampled this round: E_{y~π} log π(y) − log ref(y), over the
  // round's own samples (an unbiased estimate, since they were drawn from π).
  const samples = roundSampleIds(ctx.db, ctx.roundId);
  const rows = samples.map((x) => ({ prompt: JSON.parse(x.prompt_ids), completion: JSON.parse(x.token_ids) })).filter((x) => x.completion.length);
  let kl: number | null = null;
  let klSft: number | null = null;
  if (rows.length) {
    const lp = () => completionLogprobs(p.model, rows, { batchSize: ctx.c.batchSize * 2, padId: p.padId });
    const withAdapter = <T>(dir: string | null, f: () => T): T => {
      if (!dir) return withAdapterOff(p.model, f);
      const current = p.model.adapter;
      const a = LoraAdapter.load(p.model, dir);
      p.model.adapter = a;
      p.model.adapterEnabled = true;
      try {
        return f();
      } finally {
        p.model.adapter = current;
        a.dispose();
      }
    };
    const sampler = withAdapter(ctx.startAdapter, lp);
    // The reference: sft-base (adapter off), or the previous round's policy — which is the
    // sampling policy itself, so KL is 0 by construction there; the drift from sft-base is
    // recorded either way.
    const sft = withAdapterOff(p.model, lp);
    const ref = ctx.c.reference === 'previous' ? sampler : sft;
    kl = sampler.reduce((a, x, i) => a + x.logp - ref[i].logp, 0) / rows.length;
    klSft = sampler.reduce((a, x, i) => a + x.logp - sft[i].logp, 0) / rows.length;
  }
  let evalM: Record<string, number | null> = {};
  if (ctx.evalPrompts.length) {
    const e = await evaluatePolicy(p.model, p.tok!, ctx.evalPrompts, { scorer: await ctx.getScorer(), maxNewTokens: ctx.c.evalMaxNewTokens, stopIds: stopIdsOf(p), padId: p.padId });
    evalM = { 'eval/accuracy': e.accuracy, 'eval/mean_reward': e.mean_reward };
  }
  ctx.times['time/evaluate_s'] = (Date.now() - t0) / 1000;
  ctx.advance('evaluate', 'done', () => {
    putMetrics(ctx.db, ctx.stageId, ctx.r, { kl, 'kl/sft': klSft, ...evalM, 'time/evaluate_s': ctx.times['time/evaluate_s'] });
    logEvent(ctx.db, ctx.stageId, 'round_done', { round: ctx.r });
  });
  const m = getMetrics(ctx.db, ctx.stageId, ctx.r);
  log('round-done', { round: ctx.r, reward: m['reward/mean'], pairs: m.pairs, ties: m['dropped/tie'], kl: m.kl, accuracy: m['eval/accuracy'] });
}

/** Score the round's samples that `sc` has not scored yet, one prompt's answers per call. */
async function scoreRound(db: DB, roundId: number, sc: Scorer): Promise<void> {
  const rows = unscoredSamples(db, roundId, sc.name, sc.version);
  const byPrompt = new Map<number, typeof rows>();
  for (const x of rows) byPrompt.set(x.prompt_id, [...(byPrompt.get(x.prompt_id) ?? []), x]);
  const groups = [...byPrompt.values()];
  for (let i = 0; i < groups.length; i += 16) {
    const part = groups.slice(i, i + 16);
    const results = await Promise.all(
      part.map((g) => {
        const row = JSON.parse(g[0].prompt_json);
        return sc.score(rowMessages(row), g.map((x) => x.text), row);
      }),
    );
    storeScores(db, sc.name, sc.version, part.flatMap((g, j) => g.map((x, k) => ({ sampleId: x.id, reward: results[j][k] }))));
  }
}

/**
 * How the audit scorer sees the round's selected pairs: the fraction it orders as the main
 * scorer did (chosen above rejected), and the rank correlation of the two scorers over all the
 * round's samples.
 */
function auditAgreement(db: DB, roundId: number, main: Scorer, audit: Scorer): Record<string, number | null> {
  const pairs = pairScores(db, roundId, audit.name, audit.version);
  const both = bothScores(db, roundId, main, audit);
  return {
    'audit/pair_agreement': pairs.length ? pairs.filter((p) => p.c > p.r).length / pairs.length : null,
    'audit/pairs': pairs.length,
    'audit/spearman': spearman(both.map((r) => r.m), both.map((r) => r.x)),
  };
}

/** Spearman's rank correlation (average ranks for ties); null when either side is constant. */
export function spearman(a: number[], b: number[]): number | null {
  const rank = (v: number[]) => {
    const idx = v.map((_, i) => i).sort((i, j) => v[i] - v[j]);
    const r = new Array<number>(v.length);
    for (let i = 0; i < idx.length; ) {
      let j = i;
      while (j + 1 < idx.length && v[idx[j + 1]] === v[idx[i]]) j++;
      for (let k = i; k <= j; k++) r[idx[k]] = (i + j) / 2;
      i = j + 1;
    }
    return r;
  };
  const ra = rank(a);
  const rb = rank(b);
  const mean = (v: number[]) => v.reduce((x, y) => x + y, 0) / v.length;
  const ma = mean(ra);
  const mb = mean(rb);
  let num = 0;
  let da = 0;
  let db = 0;
  for (let i = 0; i < ra.length; i++) {
    num += (ra[i] - ma) * (rb[i] - mb);
    da += (ra[i] - ma) ** 2;
    db += (rb[i] - mb) ** 2;
  }
  return da > 0 && db > 0 ? num / Math.sqrt(da * db) : null;
}

