import { describe, expect, it } from 'vitest';
import * as fs from 'node:fs';
import * as path from 'node:path';
import YAML from 'yaml';
import Database from 'better-sqlite3';
import { prefopt } from './helpers/cli.js';
import { onlineFixture } from './helpers/online-fixture.js';
import { readHeader, readTensor } from '../src/io/safetensors.js';
import { validateRecipe } from '../src/recipe/recipe.js';
import { formatProblems } from '../src/util/schema.js';
import { DPO_JOB_DEFAULTS, DpoJobSettings, dpoConfigJson, readDpoConfig, writeDpoConfig } from '../src/stages/trl-config.js';
import { substitute, unknownPlaceholder } from '../src/stages/command-trainer.js';
import { DEFAULT_DPO_STAGE } from '../src/stages/dpo.js';

/*
 * DPO handed to a command (stages/command-trainer, docs/REFERENCE.md §13): the settings file
 * under TRL's and PEFT's names, the command line, and the acceptance check — a stage that trains
 * through `prefopt dpo --config {config} …` gives the built-in stage's adapter.
 */
const BASE = DPO_JOB_DEFAULTS;
const PREFOPT_DPO = 'prefopt dpo --model {model} --adapter {adapter} --data {data} --config {config} --out {out}';

describe('the trainer config file', () => {
  const settings: DpoJobSettings = {
    dpo: { beta: 0.25, lossType: 'ipo', labelSmoothing: 0, rpoAlpha: 0.5 },
    lora: { r: 4, alpha: 8, dropout: 0.1, targets: ['q_proj', 'v_proj'], useRslora: true },
    train: { ...DEFAULT_DPO_STAGE.train, lr: 0.003, epochs: 2, maxSteps: 0, gradAccum: 2, scheduler: 'cosine', eps: 1e-6, saveSteps: 0, saveTotalLimit: 0, evalSteps: 5, seed: 9, gradientCheckpointing: 'on', detectAnomaly: true },
    pairs: { evalRatio: 0, maxLength: 96, maxPromptLength: 40, batchSize: 3, strict: true },
    reference: 'start_adapter',
    evalData: '/x/eval.jsonl',
  };

  it("writes Hugging Face's names and conventions, and reads back what it wrote", () => {
    const j = dpoConfigJson(settings);
    // Hand-written: the names TRL's DPOConfig / TrainingArguments and PEFT's LoraConfig use.
    expect(j.dpo_config).toMatchObject({ beta: 0.25, loss_type: 'ipo', rpo_alpha: 0.5, learning_rate: 0.003, num_train_epochs: 2, max_steps: -1, gradient_accumulation_steps: 2, lr_scheduler_type: 'cosine', adam_epsilon: 1e-6, save_total_limit: null, eval_steps: 5, seed: 9, gradient_checkpointing: true, per_device_train_batch_size: 3, max_length: 96, max_prompt_length: 40 });
    expect(j.lora_config).toEqual({ task_type: 'CAUSAL_LM', r: 4, lora_alpha: 8, lora_dropout: 0.1, target_modules: ['q_proj', 'v_proj'], use_rslora: true });
    // What Hugging Face cannot say stays under prefopt's own names.
    expect(j.prefopt).toEqual({ reference: 'start_adapter', save_steps: 0, detect_anomaly: true, eval_ratio: 0, strict: true, eval_data: '/x/eval.jsonl' });
    for (const k of ['save_steps', 'detect_anomaly', 'strict', 'eval_ratio']) expect(j.dpo_config).not.toHaveProperty(k);
    const f = path.join(fs.mkdtempSync(path.join(process.env.TMPDIR ?? '/tmp', 'prefopt-tc-')), 'config.json');
    writeDpoConfig(f, settings);
    expect(readDpoConfig(f, BASE)).toEqual(settings);
  });

  it('names the file and key of every bad setting', () => {
    const d = fs.mkdtempSync(path.join(process.env.TMPDIR ?? '/tmp', 'prefopt-tc-'));
    const f = path.join(d, 'c.json');
    const bad = (patch: (j: any) => void, msg: RegExp) => {
      const j = dpoConfigJson(settings);
      patch(j);
      fs.writeFileSync(f, JSON.stringify(j));
      expect(() => readDpoConfig(f, BASE)).toThrow(msg);
    };
    bad((j) => (j.dpo_config.learning_rate = -1), /c\.json: dpo_config\.learning_rate: expected a number > 0, found -1/);
    bad((j) => (j.dpo_config.report_to = 'wandb'), /c\.json: dpo_config\.report_to is not a setting prefopt reads/);
    bad((j) => (j.lora_config.r = 2.5), /c\.json: lora_config\.r: expected an integer/);
    bad((j) => (j.lora_config.task_type = 'SEQ_CLS'), /lora_config\.task_type must be "CAUSAL_LM"/);
    bad((j) => (j.prefopt.reference = 'sft'), /prefopt\.reference must be adapter_off or start_adapter/);
    bad((j) => (j.extra = {}), /unknown section "extra"/);
    fs.writeFileSync(f, '{not json');
    expect(() => readDpoConfig(f, BASE)).toThrow(/c\.json: not JSON/);
  });
});

describe('the command line', () => {
  it('quotes each placeholder as one shell word, leaves the shell\'s ${VAR} alone, and finds unknown words', () => {
    const v = { model: "/m d/it's", adapter: '/a', data: '/d', config: '/c', out: '/o' };
    expect(substitute('t {model} "${HOME}" {out}', v)).toBe(`t '/m d/it'\\''s' "\${HOME}" '/o'`);
    expect(unknownPlaceholder('x {modle} {out}')).toBe('modle');
    expect(unknownPlaceholder('x ${HOME} {out} {data}')).toBeNull();
    const { problems } = validateRecipe({ name: 'r', stages: [{ name: 'd', type: 'dpo', model: 'm', data: 'p', trainer: { type: 'command', run: 'go {modle}' } }] }, 'r.yaml');
    expect(formatProblems('r.yaml', problems)).toMatch(/r\.yaml: stages\[0\]\.trainer\.run: expected placeholders among \{model\} \{adapter\} \{data\} \{config\} \{out\}, found "\{modle\}"/);
    const flag = prefopt(['online', '--model', 'm', '--prompts', 'p', '--scorer', 'builtin:exact_answer', '--workdir', 'w', '--trainer-command', 'go {modle}']);
    expect(flag.code).toBe(2);
    expect(flag.stderr).toContain('--trainer-command: unknown placeholder {modle} (expected {model} {adapter} {data} {config} {out})');
    const none = validateRecipe({ name: 'r', stages: [{ name: 'd', type: 'dpo', model: 'm', data: 'p', trainer: { type: 'command' } }] }, 'r.yaml');
    expect(formatProblems('r.yaml', none.problems)).toMatch(/stages\[0\]\.trainer\.run: expected the command to run/);
  });
});

function pairsFile(dir: string): string {
  const rows = Array.from({ length: 10 }, (_, i) => ({
    prompt: `What is ${i} plus 2?`,
    chosen: `The answer is ${i + 2}.`,
    rejected: i % 2 ? 'yes no maybe' : `The answer is ${i}.`,
  }));
  const f = path.join(dir, 'pairs.jsonl');
  fs.writeFileSync(f, rows.map((r) => JSON.stringify(r)).join('\n') + '\n');
  return f;
}

function tensors(file: string): Map<string, Float32Array> {
  const st = readHeader(file);
  return new Map([...st.tensors.keys()].map((n) => [n, readTensor(st, n)]));
}

function expectSameAdapter(a: string, b: string): void {
  const [x, y] = [tensors(path.join(a, 'adapter_model.safetensors')), tensors(path.join(b, 'adapter_model.safetensors'))];
  expect([...y.keys()].sort()).toEqual([...x.keys()].sort());
  let worst = 0;
  for (const [n, v] of x) v.forEach((e, i) => (worst = Math.max(worst, Math.abs(e - y.get(n)![i]))));
  expect(worst).toBeLessThanOrEqual(1e-6);
  // and it trained: B starts at zero
  expect([...x].some(([n, v]) => n.includes('lora_B') && v.some((e) => e !== 0))).toBe(true);
}

/** One-stage recipes run with the built-in trainer and with `prefopt dpo` as the command: their stage outputs. */
function bothWays(dir: string, stage: Record<string, unknown>, seed: number): [string, string] {
  const run = (name: string, extra: object) => {
    const rf = path.join(dir, `${name}.yaml`);
    fs.writeFileSync(rf, YAML.stringify({ name, seed, workdir: name, stages: [{ ...stage, ...extra }] }));
    const r = prefopt(['run', rf]);
    expect(r.code, r.stderr.slice(-2000)).toBe(0);
    return path.join(dir, name, stage.name as string);
  };
  return [run('builtin', {}), run('command', { trainer: { type: 'command', run: PREFOPT_DPO } })];
}

describe('a stage trained by a command', () => {
  it('dpo through `prefopt dpo --config {config}` gives the built-in stage\'s adapter and eval-dpo metrics', async () => {
    const f = await onlineFixture();
    const data = pairsFile(f.d);
    const stage = { name: 'dpo', type: 'dpo', model: f.base, data, lora: { r: 4, dropout: 0.1, targets: ['q_proj', 'v_proj'] }, max_steps: 3, batch_size: 2, eval_ratio: 0.25, lr: 0.01, max_length: 48, max_prompt_length: 24 };
    const [builtin, command] = bothWays(f.d, stage, 5);
    expectSameAdapter(builtin, command);
    const metrics = (dir: string) => {
      const r = prefopt(['--quiet', 'eval-dpo', '--model', f.base, '--adapter', dir, '--data', data]);
      expect(r.code, r.stderr).toBe(0);
      return JSON.parse(r.stdout);
    };
    const [m1, m2] = [metrics(builtin), metrics(command)];
    for (const k of Object.keys(m1)) expect(Math.abs(m2[k] - m1[k]), k).toBeLessThanOrEqual(1e-6);
    // What the command was given: the held-out split done, the settings under TRL's names.
    const work = path.join(command, 'trainer');
    const cfg = JSON.parse(fs.readFileSync(path.join(work, 'config.json'), 'utf8'));
    expect(cfg.dpo_config).toMatchObject({ learning_rate: 0.01, max_steps: 3, per_device_train_batch_size: 2, max_length: 48, seed: 5 });
    expect(cfg.lora_config).toMatchObject({ r: 4, lora_dropout: 0.1, target_modules: ['q_proj', 'v_proj'] });
    expect(cfg.prefopt).toMatchObject({ eval_ratio: 0, reference: 'adapter_off', eval_data: path.join(work, 'eval.jsonl') });
    const lines = (n: string) => fs.readFileSync(path.join(work, n), 'utf8').trim().split('\n').map((l) => JSON.parse(l));
    const [train, held] = [lines('train.jsonl'), lines('eval.jsonl')];
    expect(train.length + held.length).toBe(10);
    expect(held.length).toBeGreaterThan(0);
    // Text for TRL (the chat template's markers in the prompt), ids for exactness.
    expect(train[0].prompt).toContain('plus 2?');
    expect(Array.isArray(train[0].chosen_ids)).toBe(true);
  }, 300_000);

  it('online rounds trained by the command match the built-in ones, the reference being the previous round', async () => {
    const f = await onlineFixture();
    const stage = { name: 'online', type: 'online_dpo', model: f.base, prompts: f.prompts, scorer: f.scorer, rounds: 2, samples_per_prompt: 3, max_new_tokens: 6, lr: 5e-3, batch_size: 2, reference: 'previous', lora: { r: 4 } };
    const [builtin, command] = bothWays(f.d, stage, 7);
    for (const round of ['round-1', 'round-2']) expectSameAdapter(path.join(builtin, round), path.join(command, round));
    const cfg = JSON.parse(fs.readFileSync(path.join(command, 'round-2', 'trainer', 'config.json'), 'utf8'));
    expect(cfg.prefopt.reference).toBe('start_adapter');
  }, 300_000);

  it('a failing command fails the stage with its exit code and last line, and publishes nothing; so does one that leaves no adapter', async () => {
    const f = await onlineFixture();
    const data = pairsFile(f.d);
    const attempt = (name: string, cmd: string) => {
      const rf = path.join(f.d, `${name}.yaml`);
      fs.writeFileSync(rf, YAML.stringify({ name, workdir: name, stages: [{ name: 'dpo', type: 'dpo', model: f.base, data, max_steps: 1, trainer: { type: 'command', run: cmd } }] }));
      return { r: prefopt(['run', rf]), out: path.join(f.d, name, 'dpo') };
    };
    const fail = attempt('fails', 'echo "out of GPUs" >&2; exit 3');
    expect(fail.r.code).toBe(2);
    expect(fail.r.stderr).toMatch(/stage dpo: the trainer command exited with code 3: out of GPUs/);
    expect(fs.existsSync(path.join(fail.out, 'adapter_config.json'))).toBe(false);
    const db = new Database(path.join(f.d, 'fails', 'prefopt.db'), { readonly: true });
    expect((db.prepare("SELECT status FROM stages WHERE name = 'dpo'").get() as any).status).toBe('failed');
    db.close();
    const empty = attempt('empty', 'mkdir -p {out}');
    expect(empty.r.code).toBe(2);
    expect(empty.r.stderr).toMatch(/the trainer command exited 0 but left no adapter_config\.json in .*trainer\/out/);
    expect(fs.existsSync(path.join(empty.out, 'adapter_model.safetensors'))).toBe(false);
  }, 300_000);

  it('an online round whose command fails stays at its train step, and the rerun finishes it', async () => {
    const f = await onlineFixture();
    const marker = path.join(f.d, 'failed-once');
    // Fails the first time it runs, then trains.
    const cmd = `test -e ${marker} || { touch ${marker}; echo "node lost" >&2; exit 1; }; ${PREFOPT_DPO}`;
    const rf = path.join(f.d, 'r.yaml');
    fs.writeFileSync(rf, YAML.stringify({ name: 'r', seed: 3, workdir: 'r', stages: [{ name: 'online', type: 'online_dpo', model: f.base, prompts: f.prompts, scorer: f.scorer, rounds: 1, samples_per_prompt: 3, max_new_tokens: 6, batch_size: 2, lora: { r: 4 }, trainer: { type: 'command', run: cmd } }] }));
    const rounds = () => {
      const db = new Database(path.join(f.d, 'r', 'prefopt.db'), { readonly: true });
      const rows = db.prepare('SELECT round, step FROM rounds ORDER BY round').all();
      db.close();
      return rows;
    };
    const first = prefopt(['run', rf]);
    expect(first.code).toBe(2);
    expect(first.stderr).toMatch(/round 1: the trainer command exited with code 1: node lost/);
    expect(rounds()).toEqual([{ round: 1, step: 'train' }]);
    const again = prefopt(['run', rf]);
    expect(again.code, again.stderr.slice(-2000)).toBe(0);
    expect(rounds()).toEqual([{ round: 1, step: 'done' }]);
    expect(fs.existsSync(path.join(f.d, 'r', 'online', 'round-1', 'adapter_model.safetensors'))).toBe(true);
  }, 300_000);
});
