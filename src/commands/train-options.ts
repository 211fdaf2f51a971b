import { Command } from 'commander';
import { TRAIN_OPTIONS } from '../train/options.js';
import * as schema from '../util/schema.js';
import { UserError } from '../util/errors.js';
import { LORA_OPTIONS } from '../lora/lora.js';

/** Flag parsers: a finite number, an integer. */
export const num = (v: string): number => {
  const n = Number(v);
  if (!Number.isFinite(n)) throw new UserError(`expected a number, found "${v}"`);
  return n;
};
export const int = (v: string): number => {
  const n = num(v);
  if (!Number.isInteger(n)) throw new UserError(`expected an integer, found "${v}"`);
  return n;
};


/** One flag per row of an option table: --field-in-kebab-case, parsed by the row's kind. */
export function addTableOptions(cmd: Command, rows: schema.OptionRow<string>[]): Command {
  for (const o of rows) {
    const flag = `--${schema.flagOf(o)}`;
    if (o.spec.kind === 'boolean') cmd.option(flag, o.help);
    else if (o.spec.kind === 'number') cmd.option(`${flag} <${o.spec.int ? 'n' : 'x'}>`, o.help, o.spec.int ? int : num);
    else if (o.spec.kind === 'strings') cmd.option(`${flag} <list>`, o.help, list);
    else cmd.option(`${flag} <value>`, o.help);
  }
  return cmd;
}

const list = (v: string) => v.split(',').map((s) => s.trim()).filter(Boolean);

/** The flags of TRAIN_OPTIONS, and --resume, for a training command. */
export function addTrainOptions(cmd: Command): Command {
  return addTableOptions(cmd, TRAIN_OPTIONS).option('--resume', 'continue from the newest checkpoint in --out');
}


/** LoRA flags shared by dpo, rm train and online. */
export function addLoraOptions(cmd: Command): Command {
  return addTableOptions(cmd, LORA_OPTIONS);
}
