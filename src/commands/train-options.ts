import { Command } from 'commander';
import { CHECKPOINT_MODES, DEFAULT_TRAIN, TrainConfig } from '../train/trainer.js';
import { SCHEDULERS, SchedulerName } from '../train/schedule.js';
import { UserError } from '../util/errors.js';

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

/** The optimizer/schedule/checkpoint flags shared by every training command. */
export function addTrainOptions(cmd: Command): Command {
  return cmd
    .option('--lr <x>', 'peak learning rate', num)
    .option('--epochs <n>', 'epochs', num)
    .option('--max-steps <n>', 'optimizer steps (overrides epochs)', num)
    .option('--grad-accum <n>', 'micro-batches per optimizer step', num)
    .option('--warmup-ratio <x>', 'fraction of steps spent warming up', num)
    .option('--lr-scheduler <name>', SCHEDULERS.join(' | '))
    .option('--weight-decay <x>', 'AdamW weight decay (not on norms and biases)', num)
    .option('--adam-beta1 <x>', 'AdamW β1', num)
    .option('--adam-beta2 <x>', 'AdamW β2', num)
    .option('--adam-eps <x>', 'AdamW ε', num)
    .option('--max-grad-norm <x>', 'clip the global gradient norm (0 = off)', num)
    .option('--logging-steps <n>', 'log metrics every n steps', num)
    .option('--save-steps <n>', 'checkpoint every n steps (0 = off)', num)
    .option('--save-total-limit <n>', 'checkpoints kept', num)
    .option('--eval-steps <n>', 'evaluate every n steps (0 = at the end)', num)
    .option('--seed <n>', 'seed', num)
    .option('--detect-anomaly', 'check every gradient and weight each step; name the first NaN/Inf tensor')
    .option('--gradient-checkpointing <mode>', `${CHECKPOINT_MODES.join(' | ')}: recompute each layer in the backward pass instead of keeping its activations (auto: on from 100M parameters)`)
    .option('--resume', 'continue from the newest checkpoint in --out');
}

/** Training settings by their recipe field name; the CLI flag is the same name in kebab-case. */
export const TRAIN_FIELDS: [keyof TrainConfig, string][] = [
  ['lr', 'lr'], ['epochs', 'epochs'], ['maxSteps', 'max_steps'], ['gradAccum', 'grad_accum'], ['warmupRatio', 'warmup_ratio'],
  ['scheduler', 'lr_scheduler'], ['weightDecay', 'weight_decay'], ['beta1', 'adam_beta1'], ['beta2', 'adam_beta2'], ['eps', 'adam_eps'],
  ['maxGradNorm', 'max_grad_norm'], ['loggingSteps', 'logging_steps'], ['saveSteps', 'save_steps'], ['saveTotalLimit', 'save_total_limit'],
  ['evalSteps', 'eval_steps'], ['seed', 'seed'], ['detectAnomaly', 'detect_anomaly'], ['gradientCheckpointing', 'gradient_checkpointing'],
];

/** A recipe field's CLI option name as commander stores it: rpo_alpha → rpoAlpha. */
export const camel = (snake: string) => snake.replace(/_(\w)/g, (_, c: string) => c.toUpperCase());

/**
 * A TrainConfig from parsed CLI options (commander's camelCase names) or from a recipe stage
 * (snake_case fields), over `base`, range-checked.
 */
export function trainConfigFrom(o: Record<string, any>, base: TrainConfig = DEFAULT_TRAIN, from: 'flags' | 'recipe' = 'flags', where = ''): TrainConfig {
  const c: any = { ...base };
  for (const [k, field] of TRAIN_FIELDS) {
    const v = o[from === 'flags' ? camel(field) : field];
    if (v !== undefined) c[k] = v;
  }
  return validateTrainConfig(c, where);
}

/** Range checks, naming the setting (recipe field names are the snake_case of these). */
export function validateTrainConfig(c: TrainConfig, where = ''): TrainConfig {
  const bad = (k: string, want: string, got: unknown) => {
    throw new UserError(`${where}${k}: expected ${want}, found ${JSON.stringify(got)}`);
  };
  if (!(c.lr > 0)) bad('lr', 'a positive number', c.lr);
  if (!(c.epochs > 0)) bad('epochs', 'a positive number', c.epochs);
  if (!(Number.isInteger(c.maxSteps) && c.maxSteps >= 0)) bad('max_steps', 'an integer ≥ 0', c.maxSteps);
  if (!(Number.isInteger(c.gradAccum) && c.gradAccum >= 1)) bad('grad_accum', 'an integer ≥ 1', c.gradAccum);
  if (!(c.warmupRatio >= 0 && c.warmupRatio < 1)) bad('warmup_ratio', 'a number in [0, 1)', c.warmupRatio);
  if (!SCHEDULERS.includes(c.scheduler as SchedulerName)) bad('lr_scheduler', SCHEDULERS.join(' | '), c.scheduler);
  if (!(c.weightDecay >= 0)) bad('weight_decay', 'a number ≥ 0', c.weightDecay);
  if (!(c.beta1 >= 0 && c.beta1 < 1)) bad('adam_beta1', 'a number in [0, 1)', c.beta1);
  if (!(c.beta2 >= 0 && c.beta2 < 1)) bad('adam_beta2', 'a number in [0, 1)', c.beta2);
  if (!(c.eps > 0)) bad('adam_eps', 'a positive number', c.eps);
  if (!(c.maxGradNorm >= 0)) bad('max_grad_norm', 'a number ≥ 0', c.maxGradNorm);
  for (const k of ['loggingSteps', 'saveSteps', 'saveTotalLimit', 'evalSteps'] as const) {
    if (!(Number.isInteger(c[k]) && c[k] >= 0)) bad(k.replace(/[A-Z]/g, (m) => '_' + m.toLowerCase()), 'an integer ≥ 0', c[k]);
  }
  if (c.loggingSteps === 0) c.loggingSteps = 1;
  if (!Number.isInteger(c.seed)) bad('seed', 'an integer', c.seed);
  if (!(CHECKPOINT_MODES as readonly string[]).includes(c.gradientCheckpointing)) bad('gradient_checkpointing', CHECKPOINT_MODES.join(' | '), c.gradientCheckpointing);
  return c;
}

/** LoRA flags shared by dpo, rm train and online. */
export function addLoraOptions(cmd: Command): Command {
  return cmd
    .option('--lora-r <n>', 'LoRA rank', num)
    .option('--lora-alpha <a>', 'LoRA alpha', num)
    .option('--lora-dropout <p>', 'LoRA dropout', num)
    .option('--lora-targets <list>', 'comma-separated modules (q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj; qkv_proj on Zhinao)')
    .option('--use-rslora', 'scale by alpha/√r');
}
