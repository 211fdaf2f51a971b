import * as path from 'node:path';
import { createHash } from 'node:crypto';
import YAML from 'yaml';
import { OptionRow, Problem, Spec, bool, check, fieldsOf, formatProblems, int, num, obj, str } from '../util/schema.js';
import { readText } from '../data/jsonl.js';
import { UserError } from '../util/errors.js';
import { TRAIN_OPTIONS, TRAIN_SCHEMA } from '../train/options.js';
import { DPO_OPTIONS } from '../dpo/loss.js';
import { MERGE_METHODS } from '../merge/methods.js';
import { BACKEND_ORDER } from '../engine/backend.js';
import { ARCHS } from '../model/config.js';
import { LORA_OPTIONS } from '../lora/lora.js';
import { ONLINE_OPTIONS } from '../stages/online.js';
import { SFT_OPTIONS } from '../stages/sft.js';
import { PAIR_OPTIONS, PAIR_SHAPE_OPTIONS } from '../data/prefs.js';
import { SAMPLING_OPTIONS } from '../infer/sampling.js';
import { GGUF_OPTIONS } from '../gguf/export.js';
import { PLACEHOLDER_LIST, unknownPlaceholder } from '../stages/command-trainer.js';

/**
 * Recipes (YAML or JSON): run settings and an ordered list of stages. A stage names its inputs
 * by other stages' outputs — `sft.output`, `online.round-2`, `sft.output+dpo.output` (a base
 * with an adapter) — and may only refer to stages before it, so a recipe can never loop.
 */
const train = TRAIN_SCHEMA;
const lora = obj(fieldsOf(LORA_OPTIONS));
const trainer = obj({ type: str(['builtin', 'command']), run: str() }, ['type']);
const dpoFields: Record<string, Spec> = { ...fieldsOf(DPO_OPTIONS), ...fieldsOf(PAIR_SHAPE_OPTIONS), lora, trainer };

/**
 * Each stage type's recipe schema, the fields that name other stages' outputs, and the option
 * tables its fields come from (their help is what `prefopt fields` prints).
 */
export const STAGE_SPECS: Record<string, { spec: Spec; refs: string[]; tables?: OptionRow<string>[][] }> = {
  init: {
    spec: obj({ name: str(), type: str(), arch: str(ARCHS), preset: str(), config: str(), tokenizer: str(), seed: int() }, ['name', 'type', 'arch', 'tokenizer']),
    refs: ['tokenizer'],
  },
  sft: {
    spec: obj({ name: str(), type: str(), model: str(), data: str(), eval_data: str(), ...fieldsOf(SFT_OPTIONS), ...train }, ['name', 'type', 'model', 'data']),
    refs: ['model'],
    tables: [SFT_OPTIONS, TRAIN_OPTIONS],
  },
  dpo: {
    spec: obj({ name: str(), type: str(), model: str(), data: str(), eval_data: str(), ref_model: str(), adapter: str(), ...fieldsOf(PAIR_OPTIONS), ...dpoFields, ...train }, ['name', 'type', 'model', 'data']),
    refs: ['model', 'ref_model', 'adapter'],
    tables: [PAIR_OPTIONS, DPO_OPTIONS, TRAIN_OPTIONS],
  },
  rm_train: {
    spec: obj({ name: str(), type: str(), model: str(), data: str(), eval_data: str(), ...fieldsOf(PAIR_OPTIONS), lora, ...train }, ['name', 'type', 'model', 'data']),
    refs: ['model'],
    tables: [PAIR_OPTIONS, TRAIN_OPTIONS],
  },
  online_dpo: {
    spec: obj(
      {
        name: str(), type: str(), model: str(), adapter: str(), prompts: str(), eval_prompts: str(), scorer: str(), audit_scorer: str(),
        ...fieldsOf(ONLINE_OPTIONS), ...fieldsOf(SAMPLING_OPTIONS),
        sampler: obj({ type: str(['local', 'openai']), base_url: str(), model: str(), concurrency: int({ min: 1 }), timeout_ms: int({ min: 1 }), max_batch: int({ min: 1 }) }, ['type']),
        ...dpoFields, ...train,
      },
      ['name', 'type', 'model', 'prompts', 'scorer'],
    ),
    refs: ['model', 'adapter', 'scorer', 'audit_scorer'],
    tables: [ONLINE_OPTIONS, SAMPLING_OPTIONS, DPO_OPTIONS, TRAIN_OPTIONS],
  },
  merge: {
    spec: obj(
      {
        name: str(), type: str(), merge_method: str(Object.keys(MERGE_METHODS)), base_model: str(),
        models: { kind: 'list', of: obj({ model: str(), parameters: obj({ weight: num(), density: num({ min: 0, max: 1, exclusiveMin: true }) }) }, ['model']) },
        parameters: obj({ normalize: bool, lambda: num(), t: num({ min: 0, max: 1 }), density: num({ min: 0, max: 1, exclusiveMin: true }), weight: num() }),
        dtype: str(['f32', 'f16', 'bf16', 'float32', 'float16', 'bfloat16']), seed: int(),
      },
      ['name', 'type', 'merge_method', 'models'],
    ),
    refs: ['base_model'],
  },
  export_gguf: {
    spec: obj({ name: str(), type: str(), model: str(), adapter: str(), ...fieldsOf(GGUF_OPTIONS) }, ['name', 'type', 'model']),
    refs: ['model', 'adapter'],
    tables: [GGUF_OPTIONS],
  },
  eval: {
    spec: obj({ name: str(), type: str(), models: { kind: 'map', of: str() }, prompts: str(), scorer: str(), max_new_tokens: int({ min: 1 }) }, ['name', 'type', 'models', 'prompts']),
    refs: [],
  },
};

export const STAGE_TYPES = Object.keys(STAGE_SPECS);

export interface Stage {
  name: string;
  type: string;
  [k: string]: any;
}

export interface Recipe {
  name: string;
  seed: number;
  workdir?: string;
  backend?: string;
  stages: Stage[];
  /** Directory relative paths resolve against (the recipe file's). */
  dir: string;
  file: string;
  hash: string;
}

const TOP = obj({ name: str(), seed: int(), workdir: str(), backend: str([...BACKEND_ORDER, 'auto', 'node', 'node-gpu', 'gpu', 'cuda']), description: str(), stages: { kind: 'list', of: { kind: 'any' } } }, ['name', 'stages']);

/** Every reference in a stage value: "x.output", "x.round-2", split on "+", "model:x.output". */
export function refsIn(value: string): { stage: string; what: string }[] {
  return value
    .replace(/^model:/, '')
    .split('+')
    .map((p) => /^([A-Za-z_][\w-]*)\.(output|round-\d+)$/.exec(p.trim()))
    .filter((m): m is RegExpExecArray => !!m)
    .map((m) => ({ stage: m[1], what: m[2] }));
}

function stageValues(st: Stage): string[] {
  const spec = STAGE_SPECS[st.type];
  const out: string[] = [];
  for (const k of spec?.refs ?? []) if (typeof st[k] === 'string') out.push(st[k]);
  if (st.type === 'merge') for (const m of st.models ?? []) if (typeof m?.model === 'string') out.push(m.model);
  if (st.type === 'eval') for (const v of Object.values(st.models ?? {})) if (typeof v === 'string') out.push(v);
  return out;
}

export function validateRecipe(raw: unknown, file: string): { recipe: Recipe | null; problems: Problem[] } {
  const problems: Problem[] = [];
  check(raw, TOP, '', problems);
  if (problems.length || !raw) return { recipe: null, problems };
  const r = raw as any;
  const names = new Map<string, number>();
  (r.stages as any[]).forEach((st, i) => {
    const p = `stages[${i}]`;
    if (!st || typeof st !== 'object') return problems.push({ path: p, expected: 'a stage mapping', found: st });
    if (typeof st.name !== 'string' || !/^[A-Za-z_][\w-]*$/.test(st.name)) problems.push({ path: `${p}.name`, expected: 'a name of letters, digits, _ or -', found: st.name });
    else if (names.has(st.name)) problems.push({ path: `${p}.name`, expected: `a unique stage name (also used by stages[${names.get(st.name)}])`, found: st.name });
    if (!STAGE_SPECS[st.type]) return problems.push({ path: `${p}.type`, expected: STAGE_TYPES.join(' | '), found: st.type });
    check(st, STAGE_SPECS[st.type].spec, p, problems);
    const t = st.trainer;
    if (t?.type === 'command') {
      const bad = typeof t.run === 'string' ? unknownPlaceholder(t.run) : null;
      if (typeof t.run !== 'string' || !t.run.trim()) problems.push({ path: `${p}.trainer.run`, expected: 'the command to run (required with type: command)', found: t.run });
      else if (bad) problems.push({ path: `${p}.trainer.run`, expected: `placeholders among ${PLACEHOLDER_LIST}`, found: `{${bad}}` });
    }
    for (const v of stageValues(st)) {
      for (const ref of refsIn(v)) {
        if (!names.has(ref.stage)) {
          const later = (r.stages as any[]).findIndex((s) => s?.name === ref.stage);
          problems.push({ path: p, expected: later >= 0 ? `references to earlier stages only ("${ref.stage}" runs later: a cycle or wrong order)` : `a reference to a known stage`, found: v });
        } else if (ref.what.startsWith('round-') && r.stages[names.get(ref.stage)!].type !== 'online_dpo') {
          problems.push({ path: p, expected: `".${ref.what}" only on an online_dpo stage`, found: v });
        }
      }
    }
    if (typeof st.name === 'string') names.set(st.name, i);
  });
  if (problems.length) return { recipe: null, problems };
  const text = JSON.stringify(r);
  return {
    recipe: { ...r, seed: r.seed ?? 0, dir: path.dirname(path.resolve(file)), file, hash: createHash('sha256').update(text).digest('hex') },
    problems,
  };
}

export function loadRecipe(file: string): Recipe {
  let raw: unknown;
  const text = readText(file);
  try {
    raw = /\.json$/i.test(file) ? JSON.parse(text) : YAML.parse(text);
  } catch (e: any) {
    throw new UserError(`${file}: not valid ${/\.json$/i.test(file) ? 'JSON' : 'YAML'} (${e.message.split('\n')[0]})`);
  }
  const { recipe, problems } = validateRecipe(raw, file);
  if (!recipe) throw new UserError(`${file}: ${problems.length} problem(s)\n${formatProblems(file, problems)}`);
  return recipe;
}

/** Stages whose settings differ between two recipes (for --force messages). */
export function changedStages(a: { stages: Stage[] }, b: { stages: Stage[] }): string[] {
  const out: string[] = [];
  const n = Math.max(a.stages.length, b.stages.length);
  for (let i = 0; i < n; i++) {
    const x = a.stages[i];
    const y = b.stages[i];
    if (!x || !y) out.push(`stages[${i}] (${(x ?? y).name}) ${x ? 'removed' : 'added'}`);
    else if (JSON.stringify(x) !== JSON.stringify(y)) {
      const keys = [...new Set([...Object.keys(x), ...Object.keys(y)])].filter((k) => JSON.stringify(x[k]) !== JSON.stringify(y[k]));
      out.push(`${y.name}: ${keys.join(', ')}`);
    }
  }
  return out;
}
