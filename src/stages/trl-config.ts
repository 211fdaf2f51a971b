import * as fs from 'node:fs';
import { DPO_OPTIONS, DpoParams } from '../dpo/loss.js';
import { LORA_OPTIONS, LoraConfig } from '../lora/lora.js';
import { PAIR_OPTIONS, PairSettings, pairSettingsFrom } from '../data/prefs.js';
import { TRAIN_OPTIONS, validateTrainConfig } from '../train/options.js';
import { TrainConfig } from '../train/trainer.js';
import { OptionRow, Problem, check, formatProblems } from '../util/schema.js';
import { UserError } from '../util/errors.js';
import { writeFileAtomic } from '../util/fsutil.js';
import { DEFAULT_DPO_STAGE } from './dpo.js';

/**
 * A DPO job's settings as one JSON file under Hugging Face's names (docs/REFERENCE.md §13): what
 * a `trainer: {type: command}` stage hands to the command it runs, and what `prefopt dpo --config`
 * reads back. `dpo_config` holds TRL's DPOConfig (and TrainingArguments) names, `lora_config`
 * PEFT's LoraConfig, `prefopt` what those have no way to say. The names come from the option
 * tables (their `hf` column), so a setting added to a table is carried without a change here.
 */
export interface DpoJobSettings {
  dpo: DpoParams;
  lora: LoraConfig;
  train: TrainConfig;
  pairs: PairSettings;
  /** The reference: the base with the adapter off, or the base plus the adapter the job starts from. */
  reference: 'adapter_off' | 'start_adapter';
  evalData?: string;
  refModel?: string;
}

/** The built-in DPO stage's defaults, as a file's settings start from them. */
export const DPO_JOB_DEFAULTS: DpoJobSettings = {
  dpo: DEFAULT_DPO_STAGE.dpo,
  lora: DEFAULT_DPO_STAGE.lora,
  train: DEFAULT_DPO_STAGE.train,
  pairs: pairSettingsFrom({}, DEFAULT_DPO_STAGE, 'recipe'),
  reference: 'adapter_off',
};

type Section = 'dpo_config' | 'lora_config';
type Group = 'dpo' | 'lora' | 'train' | 'pairs';
const GROUPS: { group: Group; section: Section; rows: OptionRow<string>[] }[] = [
  { group: 'dpo', section: 'dpo_config', rows: DPO_OPTIONS },
  { group: 'pairs', section: 'dpo_config', rows: PAIR_OPTIONS },
  { group: 'train', section: 'dpo_config', rows: TRAIN_OPTIONS },
  { group: 'lora', section: 'lora_config', rows: LORA_OPTIONS },
];

/**
 * Settings whose value means something else to Hugging Face: prefopt's value there (undefined
 * where it has none, and the setting goes to the `prefopt` section) and back.
 */
const VALUE_MAP: Record<string, { toHf: (v: any) => unknown; fromHf: (v: any) => unknown }> = {
  max_steps: { toHf: (v) => (v === 0 ? -1 : v), fromHf: (v) => (v === -1 ? 0 : v) },
  save_total_limit: { toHf: (v) => (v === 0 ? null : v), fromHf: (v) => (v === null ? 0 : v) },
  save_steps: { toHf: (v) => (v === 0 ? undefined : v), fromHf: (v) => v },
  eval_steps: { toHf: (v) => (v === 0 ? undefined : v), fromHf: (v) => v },
  gradient_checkpointing: { toHf: (v) => (v === 'on' ? true : v === 'off' ? false : undefined), fromHf: (v) => (v === true ? 'on' : v === false ? 'off' : v) },
};
const hfName = (row: OptionRow<string>): string | null => (row.hf === null ? null : row.hf ?? row.field);
/** The first row (and its group) of the sections' tables that `match` accepts. */
const rowWhere = (sections: Section[], match: (row: OptionRow<string>) => boolean) =>
  GROUPS.filter((g) => sections.includes(g.section)).flatMap((g) => g.rows.filter(match).map((row) => ({ row, group: g.group })))[0];
const REFERENCES = ['adapter_off', 'start_adapter'];

/** The file's JSON for these settings. */
export function dpoConfigJson(s: DpoJobSettings): Record<string, any> {
  const out: Record<string, any> = { dpo_config: {}, lora_config: { task_type: 'CAUSAL_LM' }, prefopt: { reference: s.reference } };
  for (const { group, section, rows } of GROUPS)
    for (const row of rows) {
      const v = (s[group] as unknown as Record<string, unknown>)[row.key];
      const name = hfName(row);
      const hf = name === null ? undefined : VALUE_MAP[row.field] ? VALUE_MAP[row.field].toHf(v) : v;
      if (hf === undefined) out.prefopt[row.field] = v;
      else out[section][name!] = hf;
    }
  if (s.evalData) out.prefopt.eval_data = s.evalData;
  if (s.refModel) out.prefopt.ref_model = s.refModel;
  return out;
}

export function writeDpoConfig(file: string, s: DpoJobSettings): void {
  writeFileAtomic(file, JSON.stringify(dpoConfigJson(s), null, 2) + '\n');
}

/** Settings from the file over `base`; every key is checked, and a bad one named by file and key. */
export function readDpoConfig(file: string, base: DpoJobSettings): DpoJobSettings {
  let json: any;
  try {
    json = JSON.parse(fs.readFileSync(file, 'utf8'));
  } catch (e: any) {
    throw new UserError(`${file}: ${e.code === 'ENOENT' ? 'no such file' : `not JSON (${e.message})`}`);
  }
  if (!json || typeof json !== 'object' || Array.isArray(json)) throw new UserError(`${file}: expected a JSON object with dpo_config, lora_config and prefopt`);
  for (const k of Object.keys(json)) if (!['dpo_config', 'lora_config', 'prefopt'].includes(k)) throw new UserError(`${file}: unknown section "${k}" (expected dpo_config, lora_config, prefopt)`);
  const s: DpoJobSettings = { ...base, dpo: { ...base.dpo }, lora: { ...base.lora }, train: { ...base.train }, pairs: { ...base.pairs } };
  const problems: Problem[] = [];
  const set = (row: OptionRow<string>, group: Group, v: unknown, where: string) => {
    check(v, row.spec, where, problems);
    (s[group] as unknown as Record<string, unknown>)[row.key] = v;
  };
  for (const section of ['dpo_config', 'lora_config'] as Section[]) {
    const given = json[section] ?? {};
    if (typeof given !== 'object' || Array.isArray(given)) throw new UserError(`${file}: ${section} must be a JSON object`);
    for (const [k, raw] of Object.entries(given)) {
      if (section === 'lora_config' && k === 'task_type') {
        if (raw !== 'CAUSAL_LM') throw new UserError(`${file}: lora_config.task_type must be "CAUSAL_LM", found ${JSON.stringify(raw)}`);
        continue;
      }
      const hit = rowWhere([section], (r) => hfName(r) === k);
      if (!hit) throw new UserError(`${file}: ${section}.${k} is not a setting prefopt reads`);
      set(hit.row, hit.group, VALUE_MAP[hit.row.field] ? VALUE_MAP[hit.row.field].fromHf(raw) : raw, `${section}.${k}`);
    }
  }
  const own = json.prefopt ?? {};
  if (typeof own !== 'object' || Array.isArray(own)) throw new UserError(`${file}: prefopt must be a JSON object`);
  for (const [k, v] of Object.entries<any>(own)) {
    if (k === 'reference') {
      if (!REFERENCES.includes(v)) throw new UserError(`${file}: prefopt.reference must be ${REFERENCES.join(' or ')}, found ${JSON.stringify(v)}`);
      s.reference = v;
    } else if (k === 'eval_data' || k === 'ref_model') {
      if (typeof v !== 'string' || !v) throw new UserError(`${file}: prefopt.${k} must be a path`);
      s[k === 'eval_data' ? 'evalData' : 'refModel'] = v;
    } else {
      const hit = rowWhere(['dpo_config', 'lora_config'], (r) => r.field === k);
      if (!hit) throw new UserError(`${file}: prefopt.${k} is not a setting prefopt reads`);
      set(hit.row, hit.group, v, `prefopt.${k}`);
    }
  }
  if (problems.length) throw new UserError(formatProblems(file, problems));
  s.train = validateTrainConfig(s.train, `${file}: `);
  return s;
}
