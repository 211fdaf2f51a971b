import * as fs from 'node:fs';
import * as path from 'node:path';
import { DEFAULT_ONLINE, runOnline } from '../stages/online.js';
import { TrainConfig } from '../train/trainer.js';
import { openDb } from '../store/db.js';
import { UserError } from '../util/errors.js';
import { writeFileAtomic } from '../util/fsutil.js';
import { log } from '../util/log.js';
import { toJsonl } from '../data/jsonl.js';
import { rowMessages } from '../data/prompts.js';
import { dpoParamsFrom, loraFrom } from './dpo.js';
import { samplingFrom } from './model.js';

export async function onlineCmd(o: Record<string, any>, train: TrainConfig): Promise<void> {
  const sampler = o.samplerUrl
    ? { type: 'openai' as const, baseUrl: o.samplerUrl, model: o.samplerModel ?? 'policy', concurrency: o.samplerConcurrency ?? 8, timeoutMs: o.samplerTimeout ?? 120_000, retries: 3, apiKey: process.env.PREFOPT_SAMPLER_API_KEY }
    : { type: 'local' as const };
  const res = await runOnline({
    ...DEFAULT_ONLINE,
    model: o.model,
    adapter: o.adapter,
    prompts: o.prompts,
    evalPrompts: o.evalPrompts,
    scorer: o.scorer,
    auditScorer: o.auditScorer,
    rounds: o.rounds ?? DEFAULT_ONLINE.rounds,
    samplesPerPrompt: o.samplesPerPrompt ?? DEFAULT_ONLINE.samplesPerPrompt,
    promptsPerRound: o.promptsPerRound ?? DEFAULT_ONLINE.promptsPerRound,
    promptMode: o.promptMode ?? DEFAULT_ONLINE.promptMode,
    sampling: { ...samplingFrom({}, { ...o, temperature: o.temperature ?? DEFAULT_ONLINE.sampling.temperature }), maxNewTokens: o.maxNewTokens ?? DEFAULT_ONLINE.sampling.maxNewTokens },
    sampler,
    selection: { rule: o.selection ?? 'max_min', lengthPenalty: o.lengthPenalty ?? 0, minMargin: o.minMargin ?? 0 },
    reference: o.reference ?? DEFAULT_ONLINE.reference,
    dpo: dpoParamsFrom(o, DEFAULT_ONLINE.dpo),
    lora: loraFrom(o),
    maxLength: o.maxLength ?? DEFAULT_ONLINE.maxLength,
    maxPromptLength: o.maxPromptLength ?? DEFAULT_ONLINE.maxPromptLength,
    batchSize: o.batchSize ?? DEFAULT_ONLINE.batchSize,
    train,
    workdir: o.workdir,
    seed: o.seed ?? 0,
  });
  log('online-done', { adapter: res.adapter ?? '(base)', rounds: res.rounds.length });
}

interface StatusRound {
  round: number;
  step: string;
  samples: number;
  scores: number;
  pairs: number;
  metrics: Record<string, number | null>;
}

export function readStatus(workdir: string): { runs: any[] } {
  const file = path.join(workdir, 'prefopt.db');
  if (!fs.existsSync(file)) throw new UserError(`${workdir}: no prefopt.db (not a run directory)`);
  const db = openDb(file);
  try {
    const runs = db.prepare('SELECT id, name, seed, created_at FROM runs ORDER BY id').all() as any[];
    for (const run of runs) {
      run.stages = db.prepare('SELECT id, name, kind, status, output, started_at, finished_at FROM stages WHERE run_id = ? ORDER BY id').all(run.id);
      for (const st of run.stages) {
        const rounds = db.prepare('SELECT id, round, step FROM rounds WHERE stage_id = ? ORDER BY round').all(st.id) as any[];
        st.rounds = rounds.map((r): StatusRound => {
          const count = (sql: string) => (db.prepare(sql).get(r.id) as { n: number }).n;
          const metrics = Object.fromEntries((db.prepare('SELECT name, value FROM metrics WHERE stage_id = ? AND round = ?').all(st.id, r.round) as any[]).map((m) => [m.name, m.value]));
          return {
            round: r.round,
            step: r.step,
            samples: count('SELECT COUNT(*) n FROM samples WHERE round_id = ?'),
            scores: count('SELECT COUNT(*) n FROM scores x JOIN samples s ON s.id = x.sample_id WHERE s.round_id = ?'),
            pairs: count('SELECT COUNT(*) n FROM pairs WHERE round_id = ?'),
            metrics,
          };
        });
        st.metrics = Object.fromEntries((db.prepare('SELECT name, value FROM metrics WHERE stage_id = ? AND round IS NULL').all(st.id) as any[]).map((m) => [m.name, m.value]));
        delete st.id;
      }
      delete run.id;
    }
    return { runs };
  } finally {
    db.close();
  }
}

export function statusCmd(o: { workdir: string; json?: boolean }): void {
  const s = readStatus(o.workdir);
  if (o.json) {
    process.stdout.write(JSON.stringify(s) + '\n');
    return;
  }
  for (const run of s.runs) {
    process.stdout.write(`run ${run.name} (seed ${run.seed}, ${run.created_at})\n`);
    for (const st of run.stages) {
      process.stdout.write(`  ${st.name.padEnd(16)} ${st.kind.padEnd(12)} ${st.status.padEnd(8)} ${st.output ?? ''}\n`);
      for (const r of st.rounds) {
        const m = r.metrics;
        const f = (x: number | null | undefined, d = 3) => (x === null || x === undefined ? '-' : x.toFixed(d));
        process.stdout.write(`    round ${r.round}: ${r.step.padEnd(8)} samples ${r.samples} scores ${r.scores} pairs ${r.pairs} reward ${f(m['reward/mean'])} ties ${m['dropped/tie'] ?? '-'} kl ${f(m.kl)} acc ${f(m['eval/accuracy'])}\n`);
      }
    }
  }
}

/** Pairs as TRL rows ({"prompt","chosen","rejected"} with message lists) or flat JSONL with ids and rewards. */
export function exportPairsCmd(o: { workdir: string; round?: number; format: string; out?: string }): void {
  if (!['trl', 'jsonl'].includes(o.format)) throw new UserError(`--format must be trl or jsonl, found "${o.format}"`);
  const file = path.join(o.workdir, 'prefopt.db');
  if (!fs.existsSync(file)) throw new UserError(`${o.workdir}: no prefopt.db (not a run directory)`);
  const db = openDb(file);
  try {
    const rows = db
      .prepare(
        `SELECT r.round, p.idx, p.prompt_json, cs.text AS chosen, rs.text AS rejected, cs.token_ids AS chosen_ids, rs.token_ids AS rejected_ids, p.prompt_ids, x.margin, x.rule,
                (SELECT reward FROM scores WHERE sample_id = cs.id ORDER BY id LIMIT 1) AS chosen_reward,
                (SELECT reward FROM scores WHERE sample_id = rs.id ORDER BY id LIMIT 1) AS rejected_reward
         FROM pairs x JOIN rounds r ON r.id = x.round_id JOIN prompts p ON p.id = x.prompt_id
         JOIN samples cs ON cs.id = x.chosen_sample_id JOIN samples rs ON rs.id = x.rejected_sample_id
         WHERE (? IS NULL OR r.round = ?) ORDER BY r.round, p.idx`,
      )
      .all(o.round ?? null, o.round ?? null) as any[];
    const out = rows.map((x) => {
      const row = JSON.parse(x.prompt_json);
      const prompt = rowMessages(row);
      if (o.format === 'trl') return { prompt, chosen: [{ role: 'assistant', content: x.chosen }], rejected: [{ role: 'assistant', content: x.rejected }] };
      return { round: x.round, prompt_index: x.idx, prompt, chosen: x.chosen, rejected: x.rejected, prompt_ids: JSON.parse(x.prompt_ids), chosen_ids: JSON.parse(x.chosen_ids), rejected_ids: JSON.parse(x.rejected_ids), chosen_reward: x.chosen_reward, rejected_reward: x.rejected_reward, margin: x.margin, rule: x.rule };
    });
    const text = toJsonl(out);
    if (o.out) writeFileAtomic(o.out, text);
    else process.stdout.write(text);
    log('export-pairs', { rows: out.length });
  } finally {
    db.close();
  }
}
