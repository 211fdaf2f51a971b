import * as fs from 'node:fs';
import * as path from 'node:path';
import { DEFAULT_ONLINE, onlineSettingsFrom, runOnline } from '../stages/online.js';
import { TrainConfig } from '../train/trainer.js';
import { openDb } from '../store/db.js';
import { exportedPairs, runStatus } from '../store/rounds.js';
import { UserError } from '../util/errors.js';
import { writeFileAtomic } from '../util/fsutil.js';
import { log } from '../util/log.js';
import { toJsonl } from '../data/jsonl.js';
import { rowMessages } from '../data/prompts.js';
import { dpoParamsFrom } from './dpo.js';
import { loraFrom } from '../lora/lora.js';
import { PLACEHOLDER_LIST, unknownPlaceholder } from '../stages/command-trainer.js';

export async function onlineCmd(o: Record<string, any>, train: TrainConfig): Promise<void> {
  const sampler = o.samplerUrl
    ? { type: 'openai' as const, baseUrl: o.samplerUrl, model: o.samplerModel ?? 'policy', concurrency: o.samplerConcurrency ?? 8, timeoutMs: o.samplerTimeout ?? 120_000, retries: 3, apiKey: process.env.PREFOPT_SAMPLER_API_KEY }
    : { type: 'local' as const };
  const bad = o.trainerCommand ? unknownPlaceholder(o.trainerCommand) : null;
  if (bad) throw new UserError(`--trainer-command: unknown placeholder {${bad}} (expected ${PLACEHOLDER_LIST})`);
  const res = await runOnline({
    ...DEFAULT_ONLINE,
    model: o.model,
    adapter: o.adapter,
    prompts: o.prompts,
    evalPrompts: o.evalPrompts,
    scorer: o.scorer,
    auditScorer: o.auditScorer,
    ...onlineSettingsFrom(o, 'flags'),
    sampler,
    dpo: dpoParamsFrom(o, DEFAULT_ONLINE.dpo),
    lora: loraFrom(o),
    train,
    trainer: o.trainerCommand ? { type: 'command', run: o.trainerCommand } : undefined,
    workdir: o.workdir,
    seed: o.seed ?? 0,
  });
  log('online-done', { adapter: res.adapter ?? '(base)', rounds: res.rounds.length });
}

export function readStatus(workdir: string): { runs: any[] } {
  const file = path.join(workdir, 'prefopt.db');
  if (!fs.existsSync(file)) throw new UserError(`${workdir}: no prefopt.db (not a run directory)`);
  const db = openDb(file);
  try {
    return { runs: runStatus(db) };
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
    const rows = exportedPairs(db, o.round ?? null);
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
