import * as fs from 'node:fs';
import * as path from 'node:path';
import { spawn } from 'node:child_process';
import { DpoConfig, DpoResult, dpoPairs, evaluatePairs, referenceFor, runDpo, startAdapter } from './dpo.js';
import { publishFiles } from './sft.js';
import { DpoJobSettings, writeDpoConfig } from './trl-config.js';
import { referenceLogps } from '../dpo/logps.js';
import { PrefPair, pairSettingsFrom } from '../data/prefs.js';
import { LoraAdapter, attach } from '../lora/lora.js';
import { Policy, openPolicy } from '../model/policy.js';
import { checkpointingOn, readMetricsFile } from '../train/trainer.js';
import { currentBackend } from '../engine/backend.js';
import { openDb } from '../store/db.js';
import { packageRoot } from '../util/package-root.js';
import { UserError } from '../util/errors.js';
import { writeFileAtomic } from '../util/fsutil.js';
import { log } from '../util/log.js';

/**
 * DPO training handed to another program (docs/REFERENCE.md §13): a stage's
 * `trainer: {type: command, run: "..."}`. prefopt prepares what the built-in trainer would use —
 * the pairs after its limits and hold-out, the adapter it would start from, the settings under
 * TRL's and PEFT's names — runs the command, then checks the PEFT adapter it leaves and carries on
 * as the built-in stage does (evaluation, publishing). A failed command fails the step, which a
 * rerun repeats from the start.
 */
export interface TrainerSpec {
  type: 'builtin' | 'command';
  run?: string;
}

/** The words a command may use; each becomes a quoted path. */
export const PLACEHOLDERS = ['model', 'adapter', 'data', 'config', 'out'] as const;
type Placeholder = (typeof PLACEHOLDERS)[number];

/** The placeholders as a user writes them, for messages. */
export const PLACEHOLDER_LIST = PLACEHOLDERS.map((x) => `{${x}}`).join(' ');

/** The first `{word}` in a command that is not a placeholder (`${VAR}` is the shell's), or null. */
export function unknownPlaceholder(run: string): string | null {
  for (const m of run.matchAll(/(\$?)\{(\w+)\}/g)) if (!m[1] && !(PLACEHOLDERS as readonly string[]).includes(m[2])) return m[2];
  return null;
}

const shellQuote = (s: string) => `'${s.replace(/'/g, `'\\''`)}'`;

export function substitute(run: string, values: Record<Placeholder, string>): string {
  return run.replace(/(\$?)\{(\w+)\}/g, (all, dollar: string, name: string) => (!dollar && name in values ? shellQuote(values[name as Placeholder]) : all));
}

/**
 * The rows handed to the command: TRL's prompt/chosen/rejected as text (the token ids decoded, so
 * the chat template's markers are in the prompt), and the ids themselves, which prefopt reads
 * first — the text need not tokenize back to the same ids.
 */
function pairRows(pairs: PrefPair[], policy: Policy): string {
  const text = (ids: number[]) => (policy.tok ? policy.tok.decode(ids) : undefined);
  return pairs.map((p) => JSON.stringify({ prompt: text(p.prompt), chosen: text(p.chosen), rejected: text(p.rejected), prompt_ids: p.prompt, chosen_ids: p.chosen, rejected_ids: p.rejected })).join('\n') + '\n';
}

/** Run `cmd` in a shell; its output goes to stderr (stdout is prefopt's own); the last lines are kept for an error. */
function runShell(cmd: string, env: NodeJS.ProcessEnv): Promise<{ code: number | null; signal: string | null; tail: string }> {
  return new Promise((resolve, reject) => {
    const child = spawn('/bin/sh', ['-c', cmd], { env, stdio: ['ignore', 'pipe', 'pipe'] });
    let tail = '';
    const keep = (b: Buffer) => {
      process.stderr.write(b);
      tail = (tail + b.toString()).slice(-4000);
    };
    child.stdout.on('data', keep);
    child.stderr.on('data', keep);
    child.on('error', reject);
    child.on('close', (code, signal) => resolve({ code, signal, tail }));
  });
}

/** A `prefopt` on the command's PATH that is this installation, whatever else is installed. */
function prefoptShim(dir: string): string {
  const bin = path.join(dir, 'bin');
  fs.mkdirSync(bin, { recursive: true });
  const script = `#!/bin/sh\nexec ${shellQuote(process.execPath)} ${shellQuote(path.join(packageRoot(), 'bin', 'prefopt.js'))} "$@"\n`;
  fs.writeFileSync(path.join(bin, 'prefopt'), script, { mode: 0o755 });
  return bin;
}

/** The adapter the command left: it must be there, and load onto the model (shapes, finite values). */
function checkedAdapter(policy: Policy, dir: string, what: string): LoraAdapter {
  for (const f of ['adapter_config.json', 'adapter_model.safetensors'])
    if (!fs.existsSync(path.join(dir, f))) throw new UserError(`${what}: the trainer command exited 0 but left no ${f} in ${dir}`);
  return LoraAdapter.load(policy.model, dir);
}

/** DPO by the built-in trainer or by the command a stage names. */
export function trainDpo(c: DpoConfig, trainer: TrainerSpec | undefined, what: string): Promise<DpoResult> {
  return trainer?.type === 'command' ? runDpoCommand(c, trainer.run ?? '', what) : runDpo(c);
}

export async function runDpoCommand(c: DpoConfig, run: string, what: string): Promise<DpoResult> {
  const work = path.join(c.out, 'trainer');
  fs.rmSync(work, { recursive: true, force: true });
  fs.mkdirSync(work, { recursive: true });
  const files = { data: path.join(work, 'train.jsonl'), eval: path.join(work, 'eval.jsonl'), config: path.join(work, 'config.json'), out: path.join(work, 'out'), adapter: c.adapter ? path.resolve(c.adapter) : path.join(work, 'start-adapter') };

  let policy = openPolicy(c.model);
  const { pairs, evalPairs, skipped } = dpoPairs(c, policy);
  let adapter = startAdapter(c, policy);
  let held = true; // the policy and its adapter are in memory
  const drop = () => {
    if (held) [adapter.dispose(), policy.model.dispose()];
    held = false;
  };
  const db = openDb(c.cacheDb ?? path.join(c.out, 'prefopt.db'));
  const ref = referenceFor(policy, c, c.batchSize);
  try {
    // The reference values of the held-out pairs (the command computes its own for training).
    const r = evalPairs.length ? referenceLogps(db, ref.hash, evalPairs, ref.compute, c.batchSize) : { chosen: [], rejected: [], hits: 0 };
    const evalBefore = evalPairs.length ? evaluatePairs(policy.model, evalPairs, r, c.dpo, c.batchSize, policy.padId) : {};
    if (!c.adapter) await adapter.save(files.adapter);
    writeFileAtomic(files.data, pairRows(pairs, policy));
    if (evalPairs.length) writeFileAtomic(files.eval, pairRows(evalPairs, policy));
    const settings: DpoJobSettings = {
      dpo: c.dpo,
      lora: adapter.cfg,
      // 'auto' is settled here: Hugging Face's flag is a yes or no.
      train: { ...c.train, gradientCheckpointing: checkpointingOn(c.train.gradientCheckpointing, policy.model.paramCount()) ? 'on' : 'off' },
      // The hold-out is done: the command gets the pairs to train on and, apart, those to evaluate.
      pairs: { ...pairSettingsFrom({}, c, 'recipe'), evalRatio: 0 },
      reference: c.refIsStartAdapter && c.adapter ? 'start_adapter' : 'adapter_off',
      evalData: evalPairs.length ? files.eval : undefined,
      refModel: c.refModel ? path.resolve(c.refModel) : undefined,
    };
    writeDpoConfig(files.config, settings);
    // The model is not needed while the command trains: its memory is the command's.
    drop();

    const cmd = substitute(run, { model: path.resolve(c.model), adapter: files.adapter, data: files.data, config: files.config, out: files.out });
    log('trainer-command', { command: cmd });
    const backend = currentBackend();
    const env = { ...process.env, PATH: `${prefoptShim(work)}${path.delimiter}${process.env.PATH ?? ''}`, ...(backend ? { PREFOPT_BACKEND: backend } : {}) };
    const t0 = Date.now();
    const res = await runShell(cmd, env);
    if (res.code !== 0) {
      const last = res.tail.trim().split('\n').at(-1) ?? '';
      throw new UserError(`${what}: the trainer command ${res.signal ? `was killed by ${res.signal}` : `exited with code ${res.code}`}${last ? `: ${last}` : ''}`);
    }

    policy = openPolicy(c.model);
    held = true;
    adapter = checkedAdapter(policy, files.out, what);
    adapter.baseModelName = path.resolve(c.model);
    attach(policy.model, adapter);
    const evalMetrics = evalPairs.length ? evaluatePairs(policy.model, evalPairs, r, c.dpo, c.batchSize, policy.padId) : {};
    await publishFiles(c.out, 'adapter_config.json', (tmp) => adapter.save(tmp));
    // A prefopt command leaves its metrics log; another trainer may leave none.
    const history = readMetricsFile(path.join(files.out, 'metrics.jsonl')).filter((m) => m.split === 'train') as Record<string, number>[];
    const last = history.at(-1) ?? {};
    log('trainer-command-done', { seconds: (Date.now() - t0) / 1000, adapter: c.out });
    return { steps: last.step ?? 0, lastLoss: last.loss ?? null, evalLoss: null, history, pairs: pairs.length, evalPairs: evalPairs.length, skipped, cacheHits: r.hits, trainMetrics: last, evalMetrics, evalBefore };
  } finally {
    ref.dispose();
    db.close();
    drop();
  }
}
