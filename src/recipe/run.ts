import * as fs from 'node:fs';
import * as path from 'node:path';
import { Recipe, Stage, changedStages, refsIn } from './recipe.js';
import { openDb, DB } from '../store/db.js';
import { ensureRun, ensureStage, logEvent, putMetrics, resetStage, roundOfStage, runByName, setRunRecipe, setStage, setStageConfig, stageIdByName, stageOutput } from '../store/run.js';
import { TrainConfig } from '../train/trainer.js';
import { trainConfigFrom } from '../train/options.js';
import { valuesFrom } from '../util/schema.js';
import { initModel } from '../commands/model.js';
import { DEFAULT_SFT, runSft, sftSettingsFrom } from '../stages/sft.js';
import { DEFAULT_DPO_STAGE } from '../stages/dpo.js';
import { trainDpo } from '../stages/command-trainer.js';
import { DEFAULT_RM, runRmTrain } from '../stages/rm.js';
import { DEFAULT_ONLINE, onlineSettingsFrom, runOnline } from '../stages/online.js';
import { runMerge, validateMergeConfig } from '../merge/merge.js';
import { DEFAULT_GGUF, GGUF_OPTIONS, GgufExportResult, exportGguf } from '../gguf/export.js';
import { evaluatePolicy } from '../stages/evaluate.js';
import { openPolicy, stopIdsOf, needTokenizer } from '../model/policy.js';
import { LoraAdapter, DEFAULT_LORA, attach, loraFrom } from '../lora/lora.js';
import { loadPrompts } from '../data/prompts.js';
import { pairSettingsFrom } from '../data/prefs.js';
import { makeScorer } from '../../rm/spec.js';
import { UserError } from '../util/errors.js';
import { dpoParamsFrom } from '../commands/dpo.js';
import { removeDir, writeDirAtomic } from '../util/fsutil.js';
import { log } from '../util/log.js';
import { releasePooledMemory } from '../engine/backend.js';

/**
 * `prefopt run`: stages in order, recorded in the run database. Finished stages are skipped;
 * an interrupted stage resumes (trainers from their last checkpoint, on-policy rounds from
 * their last committed step); a changed recipe is refused unless forced.
 */
export interface RunOptions {
  workdir?: string;
  force?: boolean;
}

export interface RunSummary {
  workdir: string;
  stages: { name: string; type: string; status: string; seconds: number; skipped: boolean }[];
  table: EvalRow[] | null;
  seconds: number;
}

export interface EvalRow {
  model: string;
  accuracy: number | null;
  mean_reward: number | null;
}

function trainFrom(st: Stage, base: TrainConfig, seed: number): TrainConfig {
  return trainConfigFrom(st, { ...base, seed }, 'recipe', `stage ${st.name}: `);
}

export class RecipeRunner {
  readonly workdir: string;
  private db!: DB;
  private runId!: number;

  constructor(
    readonly recipe: Recipe,
    readonly opts: RunOptions = {},
  ) {
    this.workdir = path.resolve(opts.workdir ?? (recipe.workdir ? path.resolve(recipe.dir, recipe.workdir) : path.join('runs', recipe.name)));
  }

  /** A path in the recipe: relative to the recipe file's directory. */
  file(p: string): string {
    return path.isAbsolute(p) ? p : path.resolve(this.recipe.dir, p);
  }

  stageOut(name: string): string {
    return path.join(this.workdir, name);
  }

  /** A scorer spec with a `model:` reference resolved to its checkpoint directory. */
  scorerSpec(spec: string): string {
    return spec.replace(/^model:(.+)$/, (_: string, p: string) => `model:${this.resolve(p)}`);
  }

  /** Resolve "stage.output", "stage.round-N" or a path. */
  resolve(v: string): string {
    const refs = refsIn(v);
    if (!refs.length) return this.file(v);
    const { stage, what } = refs[0];
    const st = this.recipe.stages.find((s) => s.name === stage)!;
    if (what === 'output') {
      if (st.type === 'online_dpo') {
        const output = stageOutput(this.db, this.runId, stage);
        if (!output) throw new UserError(`stage ${stage} has no output yet`);
        return output;
      }
      return this.stageOut(stage);
    }
    // A round that made no pairs keeps the previous policy: ask the database which adapter it is.
    const n = Number(what.slice('round-'.length));
    const row = roundOfStage(this.db, this.runId, stage, n);
    if (!row || row.step !== 'done') throw new UserError(`stage ${stage} has no finished round ${n}`);
    return row.policy_path ?? '';
  }

  /** "a+b" → base dir and optional adapter dir. */
  modelSpec(v: string): { model: string; adapter?: string } {
    const [m, a] = v.split('+');
    // An empty adapter path means the policy is the base itself (no adapter was ever trained).
    return { model: this.resolve(m.trim()), adapter: a ? this.resolve(a.trim()) || undefined : undefined };
  }

  open(): void {
    fs.mkdirSync(this.workdir, { recursive: true });
    this.db = openDb(path.join(this.workdir, 'prefopt.db'));
    const existing = runByName(this.db, this.recipe.name);
    const json = JSON.stringify({ ...this.recipe, dir: undefined, file: undefined, hash: undefined });
    if (existing && existing.recipe_hash !== this.recipe.hash) {
      const changes = changedStages(JSON.parse(existing.recipe_json), this.recipe);
      if (!this.opts.force) {
        throw new UserError(`${this.workdir}: holds run "${this.recipe.name}" made from a different recipe; changed: ${changes.join('; ') || 'run settings'}. Use --force to rerun the changed stages and everything after them, or another --workdir`);
      }
      // Reset the first changed stage and every stage after it.
      const old = JSON.parse(existing.recipe_json);
      const first = this.recipe.stages.findIndex((s, i) => JSON.stringify(s) !== JSON.stringify(old.stages?.[i]));
      for (const s of this.recipe.stages.slice(first < 0 ? this.recipe.stages.length : first)) {
        const id = stageIdByName(this.db, existing.id, s.name);
        if (id !== null) resetStage(this.db, id);
        removeDir(this.stageOut(s.name));
      }
      setRunRecipe(this.db, existing.id, this.recipe.hash, json);
      log('force', { changed: changes.join('; ') });
    }
    this.runId = ensureRun(this.db, this.recipe.name, this.recipe.seed, { hash: this.recipe.hash, json });
  }

  async run(): Promise<RunSummary> {
    const t0 = Date.now();
    this.open();
    const summary: RunSummary = { workdir: this.workdir, stages: [], table: null, seconds: 0 };
    try {
      for (const st of this.recipe.stages) {
        let row = ensureStage(this.db, this.runId, st.name, st.type, st);
        if (row.config_json !== JSON.stringify(st)) {
          // The stage was stored with other settings (an earlier forced run that failed part-way).
          if (!this.opts.force) throw new UserError(`stage ${st.name}: ${this.workdir} holds it with other settings; use --force to rerun it`);
          resetStage(this.db, row.id);
          removeDir(this.stageOut(st.name));
          setStageConfig(this.db, row.id, st);
          row = ensureStage(this.db, this.runId, st.name, st.type, st);
        }
        if (row.status === 'done') {
          log('stage', { name: st.name, type: st.type, status: 'done (skipped)' });
          summary.stages.push({ name: st.name, type: st.type, status: 'done', seconds: 0, skipped: true });
          if (st.type === 'eval' && row.result_json) summary.table = JSON.parse(row.result_json).table;
          continue;
        }
        const s0 = Date.now();
        log('stage', { name: st.name, type: st.type, status: row.status === 'pending' ? 'start' : 'resume' });
        setStage(this.db, row.id, 'running');
        logEvent(this.db, row.id, 'stage_start', { resume: row.status !== 'pending' });
        try {
          const { output, result } = await this.runStage(st, row.id, row.status !== 'pending');
          setStage(this.db, row.id, 'done', { output, result });
          if (st.type === 'eval') summary.table = (result as any).table;
        } catch (e: any) {
          setStage(this.db, row.id, 'failed', { result: { error: String(e?.message ?? e) } });
          throw e;
        } finally {
          releasePooledMemory();
        }
        const secs = (Date.now() - s0) / 1000;
        putMetrics(this.db, row.id, null, { 'time/stage_s': secs });
        summary.stages.push({ name: st.name, type: st.type, status: 'done', seconds: secs, skipped: false });
        log('stage', { name: st.name, status: 'done', seconds: secs });
      }
    } finally {
      summary.seconds = (Date.now() - t0) / 1000;
      this.db.close();
    }
    return summary;
  }

  /** Each stage type's runner: its options from the recipe fields, its result for the run database. */
  private readonly runners: Record<string, (st: Stage, stageId: number, resume: boolean) => Promise<StageOutcome>> = {
    init: (st, id, resume) => this.stageInit(st, id, resume),
    sft: (st, id, resume) => this.stageSft(st, id, resume),
    dpo: (st, id, resume) => this.stageDpo(st, id, resume),
    rm_train: (st, id, resume) => this.stageRmTrain(st, id, resume),
    online_dpo: (st, id, resume) => this.stageOnline(st, id, resume),
    merge: (st, id, resume) => this.stageMerge(st, id, resume),
    export_gguf: (st) => this.stageExportGguf(st),
    eval: (st, id, resume) => this.stageEval(st, id, resume),
  };

  private async runStage(st: Stage, stageId: number, resume: boolean): Promise<StageOutcome> {
    const run = this.runners[st.type];
    if (!run) throw new UserError(`unknown stage type ${st.type}`);
    return run(st, stageId, resume);
  }

  private async stageInit(st: Stage, stageId: number, resume: boolean): Promise<StageOutcome> {
    const out = this.stageOut(st.name);
    const seed = st.seed ?? this.recipe.seed;
    await initModel({ arch: st.arch, preset: st.preset, config: st.config ? this.file(st.config) : undefined, tokenizer: this.resolve(st.tokenizer), out, seed });
    return { output: out, result: {} };
  }

  private async stageSft(st: Stage, stageId: number, resume: boolean): Promise<StageOutcome> {
    const out = this.stageOut(st.name);
    const seed = st.seed ?? this.recipe.seed;
    const r = await runSft({
      ...DEFAULT_SFT,
      model: this.resolve(st.model),
      data: this.file(st.data),
      out,
      evalData: st.eval_data ? this.file(st.eval_data) : undefined,
      ...sftSettingsFrom(st, 'recipe', `stage ${st.name}: `),
      resume,
      train: trainFrom(st, DEFAULT_SFT.train, seed),
    });
    putMetrics(this.db, stageId, null, { loss: r.lastLoss, eval_loss: r.evalLoss, steps: r.steps });
    return { output: out, result: { steps: r.steps, loss: r.lastLoss, eval_loss: r.evalLoss, rows: r.rows, skipped: r.skipped } };
  }

  private async stageDpo(st: Stage, stageId: number, resume: boolean): Promise<StageOutcome> {
    const out = this.stageOut(st.name);
    const seed = st.seed ?? this.recipe.seed;
    const m = this.modelSpec(st.model);
    const r = await trainDpo({
      ...DEFAULT_DPO_STAGE,
      model: m.model,
      data: this.file(st.data),
      out,
      evalData: st.eval_data ? this.file(st.eval_data) : undefined,
      ...pairSettingsFrom(st, DEFAULT_DPO_STAGE, 'recipe', `stage ${st.name}: `),
      refModel: st.ref_model ? this.resolve(st.ref_model) : undefined,
      adapter: st.adapter ? this.resolve(st.adapter) : m.adapter,
      dpo: dpoParamsFrom(st, DEFAULT_DPO_STAGE.dpo, 'recipe', `stage ${st.name}: `),
      lora: loraFrom(st.lora ?? {}, DEFAULT_LORA, 'recipe', `stage ${st.name}: `),
      train: trainFrom(st, DEFAULT_DPO_STAGE.train, seed),
      cacheDb: this.db.name,
      resume,
    }, st.trainer, `stage ${st.name}`);
    putMetrics(this.db, stageId, null, Object.fromEntries(Object.entries(r.evalMetrics).map(([k, v]) => [`eval/${k}`, v])));
    return { output: out, result: { steps: r.steps, pairs: r.pairs, skipped: r.skipped, eval: r.evalMetrics, eval_before: r.evalBefore } };
  }

  private async stageRmTrain(st: Stage, stageId: number, resume: boolean): Promise<StageOutcome> {
    const out = this.stageOut(st.name);
    const seed = st.seed ?? this.recipe.seed;
    const r = await runRmTrain({
      ...DEFAULT_RM,
      model: this.resolve(st.model),
      data: this.file(st.data),
      out,
      evalData: st.eval_data ? this.file(st.eval_data) : undefined,
      ...pairSettingsFrom(st, DEFAULT_RM, 'recipe', `stage ${st.name}: `),
      lora: st.lora ? loraFrom(st.lora, DEFAULT_LORA, 'recipe', `stage ${st.name}: `) : null,
      resume,
      train: trainFrom(st, DEFAULT_RM.train, seed),
    });
    putMetrics(this.db, stageId, null, Object.fromEntries(Object.entries(r.evalMetrics).map(([k, v]) => [`eval/${k}`, v])));
    return { output: out, result: { steps: r.steps, pairs: r.pairs, eval: r.evalMetrics, eval_before: r.evalBefore } };
  }

  private async stageOnline(st: Stage, stageId: number, resume: boolean): Promise<StageOutcome> {
    const out = this.stageOut(st.name);
    const seed = st.seed ?? this.recipe.seed;
    const m = this.modelSpec(st.model);
    const scorer = this.scorerSpec(st.scorer);
    const sampler =
      st.sampler?.type === 'openai'
        ? { type: 'openai' as const, baseUrl: st.sampler.base_url, model: st.sampler.model ?? 'policy', concurrency: st.sampler.concurrency ?? 8, timeoutMs: st.sampler.timeout_ms ?? 120_000, retries: 3 }
        : { type: 'local' as const, maxBatch: st.sampler?.max_batch };
    if (sampler.type === 'openai' && !sampler.baseUrl) throw new UserError(`stage ${st.name}: sampler.base_url is required for type openai`);
    const r = await runOnline(
      {
        ...DEFAULT_ONLINE,
        model: m.model,
        adapter: st.adapter ? this.resolve(st.adapter) : m.adapter,
        prompts: this.file(st.prompts),
        evalPrompts: st.eval_prompts ? this.file(st.eval_prompts) : undefined,
        scorer,
        auditScorer: st.audit_scorer ? this.scorerSpec(st.audit_scorer) : undefined,
        ...onlineSettingsFrom(st, 'recipe', `stage ${st.name}: `),
        sampler,
        dpo: dpoParamsFrom(st, DEFAULT_ONLINE.dpo, 'recipe', `stage ${st.name}: `),
        lora: loraFrom(st.lora ?? {}, DEFAULT_LORA, 'recipe', `stage ${st.name}: `),
        train: trainFrom(st, DEFAULT_ONLINE.train, seed),
        trainer: st.trainer,
        workdir: out,
        seed,
        runName: this.recipe.name,
        stageName: st.name,
        baseDir: this.recipe.dir,
      },
      this.db,
    );
    return { output: r.adapter ?? '', result: r };
  }

  private async stageMerge(st: Stage, stageId: number, resume: boolean): Promise<StageOutcome> {
    const out = this.stageOut(st.name);
    const cfg = validateMergeConfig({ ...st, name: undefined, type: undefined, seed: st.seed ?? this.recipe.seed }, `stage ${st.name}: `);
    const r = await runMerge(cfg, out, (p) => this.resolve(p));
    return { output: out, result: r };
  }

  /** The stage's directory holds model.gguf, or adapter.gguf with lora_only. */
  private async stageExportGguf(st: Stage): Promise<StageOutcome> {
    const out = this.stageOut(st.name);
    const m = this.modelSpec(st.model);
    const settings = valuesFrom(GGUF_OPTIONS, st, { ...DEFAULT_GGUF }, 'recipe');
    const adapter = st.adapter ? this.resolve(st.adapter) : m.adapter;
    let r: GgufExportResult | undefined;
    await writeDirAtomic(out, async (dir) => {
      r = await exportGguf({ ...settings, model: m.model, adapter, out: path.join(dir, settings.loraOnly ? 'adapter.gguf' : 'model.gguf') });
    });
    return { output: out, result: { file: path.join(out, path.basename(r!.file)), arch: r!.arch, tensors: r!.tensors, bytes: r!.bytes, kind: r!.kind } };
  }

  private async stageEval(st: Stage, stageId: number, resume: boolean): Promise<StageOutcome> {
    const out = this.stageOut(st.name);
    const prompts = loadPrompts(this.file(st.prompts));
    const scorer = st.scorer ? await makeScorer(this.scorerSpec(st.scorer), { baseDir: this.recipe.dir }) : null;
    const table: EvalRow[] = [];
    const samples: Record<string, unknown> = {};
    try {
      for (const [label, spec] of Object.entries<string>(st.models)) {
        const m = this.modelSpec(spec);
        const p = openPolicy(m.model);
        if (m.adapter) attach(p.model, LoraAdapter.load(p.model, m.adapter));
        try {
          const e = await evaluatePolicy(p.model, needTokenizer(p, 'eval'), prompts, { scorer, maxNewTokens: st.max_new_tokens ?? 32, stopIds: stopIdsOf(p), padId: p.padId });
          table.push({ model: label, accuracy: e.accuracy, mean_reward: e.mean_reward });
          samples[label] = e.samples.slice(0, 5);
          putMetrics(this.db, stageId, null, { [`${label}/accuracy`]: e.accuracy, [`${label}/mean_reward`]: e.mean_reward });
          log('eval', { model: label, accuracy: e.accuracy, mean_reward: e.mean_reward });
        } finally {
          (p.model.adapter as LoraAdapter | null)?.dispose();
          p.model.dispose();
        }
      }
    } finally {
      await scorer?.close?.();
    }
    fs.mkdirSync(out, { recursive: true });
    fs.writeFileSync(path.join(out, 'results.json'), JSON.stringify({ table, samples }, null, 2) + '\n');
    return { output: out, result: { table } };
  }
}

interface StageOutcome {
  output: string;
  result: unknown;
}

export function formatTable(rows: EvalRow[]): string {
  const f = (x: number | null) => (x === null ? '   -  ' : x.toFixed(3).padStart(6));
  const w = Math.max(8, ...rows.map((r) => r.model.length));
  const lines = [`${'model'.padEnd(w)}  accuracy  mean_reward`, `${'-'.repeat(w)}  --------  -----------`];
  for (const r of rows) lines.push(`${r.model.padEnd(w)}  ${f(r.accuracy)}    ${f(r.mean_reward)}`);
  return lines.join('\n');
}
