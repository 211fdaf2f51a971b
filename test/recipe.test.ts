import { describe, expect, it } from 'vitest';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import YAML from 'yaml';
import Database from 'better-sqlite3';
import { validateRecipe } from '../src/recipe/recipe.js';
import { formatProblems } from '../src/util/schema.js';
import { prefopt } from './helpers/cli.js';

const tmp = () => fs.mkdtempSync(path.join(os.tmpdir(), 'prefopt-recipe-'));

function problems(r: unknown): string {
  const { problems: ps } = validateRecipe(r, 'r.yaml');
  return formatProblems('r.yaml', ps);
}

const ok = () => ({
  name: 'x',
  seed: 1,
  stages: [
    { name: 'sft', type: 'sft', model: 'base', data: 'd.json', lr: 1e-3 },
    { name: 'dpo', type: 'dpo', model: 'sft.output', data: 'p.jsonl', lora: { r: 4 } },
    { name: 'online', type: 'online_dpo', model: 'sft.output', adapter: 'dpo.output', prompts: 'q.jsonl', scorer: 'builtin:exact_answer' },
    { name: 'eval', type: 'eval', prompts: 'q.jsonl', models: { a: 'sft.output', b: 'sft.output+online.round-1' } },
  ],
});

describe('recipe validation', () => {
  it('accepts a good recipe and the shipped ones', () => {
    expect(problems(ok())).toBe('');
    for (const f of ['recipes/quickstart.yaml', 'recipes/zhinao2-7b.yaml']) {
      const r = prefopt(['validate', f]);
      expect(r.code, r.stderr).toBe(0);
    }
  });

  it('reports each kind of error with its field path, expected and found value', () => {
    const cases: [(r: any) => void, RegExp][] = [
      [(r) => (r.stages[0].learning_rate = 1), /stages\[0\]\.learning_rate: expected one of the known fields \(.*lr.*\), found "unknown field \\"learning_rate\\""/],
      [(r) => (r.stages[0].lr = 'fast'), /stages\[0\]\.lr: expected a number > 0, found "fast"/],
      [(r) => (r.stages[1].lora.r = 0), /stages\[1\]\.lora\.r: expected an integer ≥ 1, found 0/],
      [(r) => delete r.stages[0].data, /stages\[0\]\.data: expected a string \(required\), found nothing/],
      [(r) => (r.stages[1].type = 'ppo'), /stages\[1\]\.type: expected init \| sft \| dpo \| rm_train \| online_dpo \| merge \| export_gguf \| eval, found "ppo"/],
      [(r) => (r.stages[1].model = 'nosuch.output'), /stages\[1\]: expected a reference to a known stage, found "nosuch.output"/],
      [(r) => (r.stages[0].model = 'dpo.output'), /stages\[0\]: expected references to earlier stages only \("dpo" runs later: a cycle or wrong order\), found "dpo.output"/],
      [(r) => (r.stages[3].models.c = 'dpo.round-2'), /stages\[3\]: expected ".round-2" only on an online_dpo stage/],
      [(r) => (r.stages[2].name = 'sft'), /stages\[2\]\.name: expected a unique stage name \(also used by stages\[0\]\)/],
      [(r) => (r.stages[2].selection = 'best'), /stages\[2\]\.selection: expected "max_min" \| "max_random"/],
      [(r) => (r.seed = 1.5), /seed: expected an integer, found 1.5/],
      [(r) => (r.extra = true), /extra: expected one of the known fields/],
    ];
    for (const [mutate, re] of cases) {
      const r = ok();
      mutate(r);
      expect(problems(r)).toMatch(re);
    }
  });

  it('prefopt validate lists every problem and exits non-zero; missing files and bad YAML are clear', () => {
    const d = tmp();
    const f = path.join(d, 'bad.yaml');
    const r = ok() as any;
    r.stages[0].lr = -1;
    r.stages[1].beta = 'x';
    fs.writeFileSync(f, YAML.stringify(r));
    const out = prefopt(['validate', f]);
    expect(out.code).toBe(2);
    expect(out.stderr).toContain('2 problem(s)');
    expect(out.stderr).toContain(`${f}: stages[0].lr: expected a number > 0, found -1`);
    expect(out.stderr).toContain(`${f}: stages[1].beta: expected a number > 0, found "x"`);
    fs.writeFileSync(f, 'name: [unclosed');
    expect(prefopt(['validate', f]).stderr).toMatch(/not valid YAML/);
    expect(prefopt(['validate', path.join(d, 'missing.yaml')]).stderr).toMatch(/missing.yaml: cannot read \(ENOENT\)/);
  });
});

describe('a shrunken quickstart end to end', () => {
  it('runs every stage, records them in the database, resumes as a no-op, and refuses a changed recipe', () => {
    const d = tmp();
    const data = path.join(d, 'data');
    expect(prefopt(['--quiet', 'make-data', '--out', data, '--sft', '160', '--prefs', '60', '--prompts', '24', '--eval', '16', '--vocab-size', '300']).code).toBe(0);
    const recipe = YAML.parse(fs.readFileSync('recipes/quickstart.yaml', 'utf8'));
    recipe.workdir = 'run';
    for (const st of recipe.stages) {
      for (const k of ['config', 'tokenizer', 'data', 'prompts', 'eval_prompts']) if (typeof st[k] === 'string') st[k] = st[k].replace('../data/quickstart', 'data');
      if (['sft', 'dpo', 'rm_train', 'online_dpo'].includes(st.type)) {
        st.max_steps = 3;
        st.save_steps = 2;
      }
      if (st.type === 'online_dpo') Object.assign(st, { rounds: 2, prompts_per_round: 6, samples_per_prompt: 2, max_new_tokens: 6 });
      if (st.type === 'eval') {
        st.max_new_tokens = 6;
        st.models = { 'sft-base': 'sft.output', dpo: 'sft.output+dpo.output', 'round-2': 'sft.output+online.round-2', merged: 'merged.output' };
      }
    }
    const rf = path.join(d, 'quick.yaml');
    fs.writeFileSync(rf, YAML.stringify(recipe));
    const r = prefopt(['run', rf]);
    expect(r.code, r.stderr.slice(-2000)).toBe(0);
    expect(r.stdout).toContain('held-out evaluation');
    for (const m of ['sft-base', 'dpo', 'round-2', 'merged']) expect(r.stdout).toMatch(new RegExp(`^${m}\\s+\\d\\.\\d{3}\\s+\\d\\.\\d{3}`, 'm'));
    const wd = path.join(d, 'run');
    for (const f of ['base/config.json', 'sft/model.safetensors', 'sft/metrics.jsonl', 'dpo/adapter_model.safetensors', 'dpo/adapter_config.json', 'rm/config.json', 'merged/model.safetensors', 'eval/results.json']) {
      expect(fs.existsSync(path.join(wd, f)), f).toBe(true);
    }
    expect(JSON.parse(fs.readFileSync(path.join(wd, 'rm/config.json'), 'utf8')).architectures).toEqual(['ZhinaoForSequenceClassification']);
    // The run ends with a self-contained report whose charts are real PNGs.
    const html = fs.readFileSync(path.join(wd, 'report.html'), 'utf8');
    const imgs = [...html.matchAll(/src="data:image\/png;base64,([^"]+)"/g)].map((m) => Buffer.from(m[1], 'base64'));
    expect(imgs.length).toBeGreaterThanOrEqual(3);
    for (const img of imgs) expect(img.subarray(1, 4).toString()).toBe('PNG');
    expect(html).toContain('Held-out evaluation');
    const db = new Database(path.join(wd, 'prefopt.db'), { readonly: true });
    expect(db.prepare('SELECT name, status FROM stages ORDER BY id').all()).toEqual(recipe.stages.map((s: any) => ({ name: s.name, status: 'done' })));
    expect((db.prepare('SELECT COUNT(*) n FROM samples').get() as any).n).toBe(2 * 6 * 2);
    expect(db.prepare('SELECT round, step FROM rounds ORDER BY round').all()).toEqual([{ round: 1, step: 'done' }, { round: 2, step: 'done' }]);
    expect((db.prepare('SELECT COUNT(*) n FROM ref_logps').get() as any).n).toBeGreaterThan(0);
    db.close();
    // Running again skips every stage.
    const again = prefopt(['run', rf]);
    expect(again.code).toBe(0);
    expect((again.stdout.match(/skipped \(done before\)/g) ?? []).length).toBe(recipe.stages.length);
    // A changed recipe is refused, naming the change, unless --force.
    recipe.stages[2].beta = 0.2;
    fs.writeFileSync(rf, YAML.stringify(recipe));
    const changed = prefopt(['run', rf]);
    expect(changed.code).toBe(2);
    expect(changed.stderr).toMatch(/changed: dpo: beta/);
  }, 300_000);
});

describe('flags and recipe fields', () => {
  it('every flag of sft, dpo, rm train and online is a field of that recipe stage (or set by the runner)', async () => {
    const { buildProgram } = await import('../src/cli.js');
    const { STAGE_SPECS } = await import('../src/recipe/recipe.js');
    const program = buildProgram();
    const command = (names: string[]) => names.reduce((c: any, n) => c.commands.find((x: any) => x.name() === n), program);
    // Set by the runner for every stage: the output directory (from the stage name), resumption
    // (a recipe always resumes) and the run database (its reference cache); dpo's --config is
    // the file a trainer command gets, written from the stage's own fields.
    const runner = new Set(['out', 'workdir', 'resume', 'cache', 'config']);
    // Flags that are fields of a nested recipe mapping.
    const nested: Record<string, string> = {
      lora_r: 'lora.r', lora_alpha: 'lora.alpha', lora_dropout: 'lora.dropout', lora_targets: 'lora.targets', use_rslora: 'lora.use_rslora',
      sampler_url: 'sampler.base_url', sampler_model: 'sampler.model', sampler_concurrency: 'sampler.concurrency', sampler_timeout: 'sampler.timeout_ms', trainer_command: 'trainer.run',
    };
    const field = (spec: any, dotted: string) => dotted.split('.').reduce((s: any, k) => s?.fields?.[k], spec);
    for (const [stage, names] of Object.entries({ sft: ['sft'], dpo: ['dpo'], rm_train: ['rm', 'train'], online_dpo: ['online'] })) {
      const spec = STAGE_SPECS[stage].spec;
      const flags = command(names).options.map((o: any) => (o.long as string).slice(2).replace(/-/g, '_'));
      expect(flags.length).toBeGreaterThan(15);
      const missing = flags.filter((f: string) => !runner.has(f) && !field(spec, nested[f] ?? f));
      expect(missing, `${stage}: flags without a recipe field`).toEqual([]);
    }
  });
});

describe('one table for the training settings', () => {
  it('a flag and a recipe field are checked by the same rule, with the same words', async () => {
    const { trainConfigFrom, TRAIN_OPTIONS } = await import('../src/train/options.js');
    for (const [field, bad, want] of [
      ['warmup_ratio', 1, 'expected a number ≥ 0 and < 1, found 1'],
      ['adam_beta2', 1, 'expected a number ≥ 0 and < 1, found 1'],
      ['grad_accum', 0, 'expected an integer ≥ 1, found 0'],
      ['lr_scheduler', 'step', 'expected "cosine" | "linear" | "constant" | "constant_with_warmup", found "step"'],
      ['gradient_checkpointing', 'sometimes', 'expected "auto" | "on" | "off", found "sometimes"'],
    ] as const) {
      expect(TRAIN_OPTIONS.some((o) => o.field === field)).toBe(true);
      const r = ok() as any;
      r.stages[0][field] = bad;
      expect(problems(r)).toContain(`stages[0].${field}: ${want}`);
      expect(() => trainConfigFrom({ [field]: bad }, undefined, 'recipe', 'stage sft: ')).toThrow(`stage sft: ${field}: ${want}`);
      const flags = { [field.replace(/_(\w)/g, (_, c: string) => c.toUpperCase())]: bad };
      expect(() => trainConfigFrom(flags)).toThrow(`${field}: ${want}`);
    }
  });
});

describe('one table for the DPO loss settings', () => {
  it('dpo flags, the recipe fields and the library check share one rule', async () => {
    const { dpoParamsFrom } = await import('../src/commands/dpo.js');
    const { DEFAULT_DPO, validateDpoParams } = await import('../src/dpo/loss.js');
    for (const [field, key, bad, want] of [
      ['label_smoothing', 'labelSmoothing', 0.5, 'expected a number ≥ 0 and < 0.5, found 0.5'],
      ['beta', 'beta', 0, 'expected a number > 0, found 0'],
      ['loss_type', 'lossType', 'kto', 'expected "sigmoid" | "hinge" | "ipo" | "robust", found "kto"'],
    ] as const) {
      const r = ok() as any;
      r.stages[1][field] = bad;
      expect(problems(r)).toContain(`stages[1].${field}: ${want}`);
      expect(() => dpoParamsFrom({ [key]: bad }, DEFAULT_DPO)).toThrow(`${field}: ${want}`);
      expect(() => validateDpoParams({ ...DEFAULT_DPO, [key]: bad } as any, 'x: ')).toThrow(`x: ${field}: ${want}`);
    }
    // 0.49 was the recipe's cap and < 0.5 the library's: both now accept it.
    const r = ok() as any;
    r.stages[1].label_smoothing = 0.49;
    expect(problems(r)).toBe(formatProblems('r.yaml', []));
  });
});

describe('one table each for LoRA, sampling, the online stage, pairs and SFT', () => {
  it('a flag, a recipe field and the library check give the same words for the same bad value', async () => {
    const { loraFrom } = await import('../src/lora/lora.js');
    const { LoraAdapter, DEFAULT_LORA } = await import('../src/lora/lora.js');
    const { onlineSettingsFrom } = await import('../src/stages/online.js');
    const { sftSettingsFrom } = await import('../src/stages/sft.js');
    // LoRA: `lora: {dropout}` in a recipe, --lora-dropout on the command line, LoraAdapter.create in the library.
    const r = ok() as any;
    r.stages[1].lora.dropout = 1;
    const want = 'expected a number ≥ 0 and < 1, found 1';
    expect(problems(r)).toContain(`stages[1].lora.dropout: ${want}`);
    expect(() => loraFrom({ loraDropout: 1 })).toThrow(`lora.dropout: ${want}`);
    expect(() => loraFrom({ dropout: 1 }, DEFAULT_LORA, 'recipe', 'stage dpo: ')).toThrow(`stage dpo: lora.dropout: ${want}`);
    expect(() => LoraAdapter.create(null as any, { ...DEFAULT_LORA, dropout: 1 }, 0)).toThrow(`lora.dropout: ${want}`);
    // --lora-r was parsed as any number on the command line and checked only when the adapter was made.
    expect(() => loraFrom({ loraR: 2.5 })).toThrow('lora.r: expected an integer ≥ 1, found 2.5');
    expect(loraFrom({ loraTargets: ['q_proj', 'v_proj'], useRslora: true })).toMatchObject({ targets: ['q_proj', 'v_proj'], useRslora: true, r: DEFAULT_LORA.r });
    // Sampling and the online stage's own settings.
    for (const [field, flag, bad, expected] of [
      ['top_p', 'topP', 0, 'expected a number > 0 and ≤ 1, found 0'],
      ['temperature', 'temperature', -1, 'expected a number ≥ 0, found -1'],
      ['samples_per_prompt', 'samplesPerPrompt', 1, 'expected an integer ≥ 2, found 1'],
      ['eval_max_new_tokens', 'evalMaxNewTokens', 0, 'expected an integer ≥ 1, found 0'],
    ] as const) {
      const rr = ok() as any;
      rr.stages[2][field] = bad;
      expect(problems(rr)).toContain(`stages[2].${field}: ${expected}`);
      expect(() => onlineSettingsFrom({ [field]: bad }, 'recipe', 'stage online: ')).toThrow(`stage online: ${field}: ${expected}`);
      expect(() => onlineSettingsFrom({ [flag]: bad }, 'flags')).toThrow(`${field}: ${expected}`);
    }
    const s = onlineSettingsFrom({ samplesPerPrompt: 6, topK: 5, maxNewTokens: 9, selection: 'max_second' }, 'flags');
    expect(s).toMatchObject({ samplesPerPrompt: 6, sampling: { topK: 5, maxNewTokens: 9 }, selection: { rule: 'max_second' } });
    // The pair stages' settings: dpo and rm_train read one table (rm's --eval-ratio was unchecked too).
    const { pairSettingsFrom } = await import('../src/data/prefs.js');
    const { DEFAULT_RM } = await import('../src/stages/rm.js');
    const pr = ok() as any;
    pr.stages[1].eval_ratio = 1;
    expect(problems(pr)).toContain('stages[1].eval_ratio: expected a number ≥ 0 and ≤ 0.9, found 1');
    expect(() => pairSettingsFrom({ evalRatio: 1 }, DEFAULT_RM, 'flags')).toThrow('eval_ratio: expected a number ≥ 0 and ≤ 0.9, found 1');
    expect(pairSettingsFrom({ max_length: 64, strict: true }, DEFAULT_RM, 'recipe')).toEqual({ evalRatio: DEFAULT_RM.evalRatio, maxLength: 64, maxPromptLength: DEFAULT_RM.maxPromptLength, batchSize: DEFAULT_RM.batchSize, strict: true });
    // SFT's own settings: --eval-ratio was parsed with Number() and never checked.
    expect(() => sftSettingsFrom({ evalRatio: 2 }, 'flags')).toThrow('eval_ratio: expected a number ≥ 0 and ≤ 0.9, found 2');
    expect(sftSettingsFrom({ max_len: 64, dtype: 'bf16' }, 'recipe')).toMatchObject({ maxLen: 64, dtype: 'BF16' });
  });

  it('the README lists every recipe field as `prefopt fields` prints it', async () => {
    const { fieldsMarkdown } = await import('../src/recipe/fields.js');
    const readme = fs.readFileSync('README.md', 'utf8');
    const start = readme.indexOf('\n', readme.indexOf('<!-- fields:start')) + 1;
    expect(readme.slice(start, readme.indexOf('<!-- fields:end -->'))).toBe(fieldsMarkdown());
    const out = prefopt(['fields', 'export_gguf']);
    expect(out.code).toBe(0);
    expect(out.stdout).toContain('| `lora_only` | true or false |');
    expect(prefopt(['fields', 'ppo']).stderr).toMatch(/unknown stage type "ppo"/);
  });
});
