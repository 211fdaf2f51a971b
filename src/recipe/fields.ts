import { Spec, describe } from '../util/schema.js';
import { STAGE_SPECS } from './recipe.js';
import { LORA_OPTIONS } from '../lora/lora.js';

/**
 * Every recipe field of every stage type, with what it accepts and, where an option table
 * declares it, its help: `prefopt fields` prints it and the README's field list is its output
 * (a test holds the two equal).
 */
/** Fields outside the option tables: where a stage's inputs come from. */
const REF_HELP: Record<string, string> = {
  model: 'checkpoint: a directory, `STAGE.output`, or `BASE+ADAPTER`',
  data: 'training data file',
  eval_data: 'held-out data file (default: eval_ratio of data)',
  adapter: 'PEFT adapter to start from (a directory or `STAGE.output`)',
  ref_model: 'reference checkpoint (default: the model with the adapter off)',
  prompts: 'prompts file (JSONL)',
  eval_prompts: 'held-out prompts evaluated after every round',
  scorer: 'model:DIR | module:PATH[#export] | http:URL | builtin:NAME',
  audit_scorer: 'a second scorer that only watches: its agreement with scorer is recorded',
  tokenizer: 'tokenizer directory',
  config: 'config.json fields for the new model',
  preset: 'a named model shape (tiny, 5m, zhinao2-7b)',
  'trainer.type': 'builtin (prefopt trains) | command (a program trains: TRL, another machine)',
  'trainer.run': 'with type command: a shell command; {model} {adapter} {data} {config} {out} become paths (docs/REFERENCE.md §13)',
};

function helpOf(type: string): Map<string, string> {
  const tables = STAGE_SPECS[type].tables ?? [];
  return new Map<string, string>([
    ...Object.entries(REF_HELP),
    ...tables.flatMap((t) => t.map((r) => [r.field, r.help] as [string, string])),
    ...LORA_OPTIONS.map((r) => [`lora.${r.field}`, r.help] as [string, string]),
  ]);
}

function rows(spec: Spec, prefix: string, help: Map<string, string>): [string, string, string][] {
  if (spec.kind !== 'object') return [];
  return Object.entries(spec.fields).flatMap(([k, s]) => {
    const name = prefix + k;
    if (s.kind === 'object') return rows(s, `${name}.`, help);
    const required = spec.required?.includes(k) ? ' (required)' : '';
    return [[name, describe(s) + required, help.get(name) ?? ''] as [string, string, string]];
  });
}

/** Markdown: one table per stage type (or the one asked for). */
export function fieldsMarkdown(only?: string): string {
  const out: string[] = [];
  for (const [type, { spec }] of Object.entries(STAGE_SPECS)) {
    if (only && type !== only) continue;
    out.push(`**\`${type}\`**`, '', '| field | accepts | meaning |', '|---|---|---|');
    for (const [name, accepts, help] of rows(spec, '', helpOf(type))) {
      if (name === 'name' || name === 'type') continue;
      out.push(`| \`${name}\` | ${accepts.replace(/\|/g, '\\|')} | ${help.replace(/\|/g, '\\|')} |`);
    }
    out.push('');
  }
  return out.join('\n');
}
