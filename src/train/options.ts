import { CHECKPOINT_MODES, DEFAULT_TRAIN, TrainConfig } from './trainer.js';
import { SCHEDULERS } from './schedule.js';
import * as schema from '../util/schema.js';
import type { Spec } from '../util/schema.js';
import { UserError } from '../util/errors.js';

/**
 * The training settings every training command and stage shares, declared once: the recipe field,
 * the TrainConfig key, the allowed values and the help. The CLI flags (the field in kebab-case),
 * the recipe schema and the range checks all come from this table.
 */
export type TrainOption = schema.OptionRow<keyof TrainConfig>;

const below1 = schema.num({ min: 0, max: 1, exclusiveMax: true });
export const TRAIN_OPTIONS: TrainOption[] = [
  { key: 'lr', field: 'lr', hf: 'learning_rate', spec: schema.num({ min: 0, exclusiveMin: true }), help: 'peak learning rate' },
  { key: 'epochs', field: 'epochs', hf: 'num_train_epochs', spec: schema.num({ min: 0, exclusiveMin: true }), help: 'epochs' },
  { key: 'maxSteps', field: 'max_steps', spec: schema.int({ min: 0 }), help: 'optimizer steps (overrides epochs)' },
  { key: 'gradAccum', field: 'grad_accum', hf: 'gradient_accumulation_steps', spec: schema.int({ min: 1 }), help: 'micro-batches per optimizer step' },
  { key: 'warmupRatio', field: 'warmup_ratio', spec: below1, help: 'fraction of steps spent warming up' },
  { key: 'scheduler', field: 'lr_scheduler', hf: 'lr_scheduler_type', spec: schema.str([...SCHEDULERS]), help: SCHEDULERS.join(' | ') },
  { key: 'weightDecay', field: 'weight_decay', spec: schema.num({ min: 0 }), help: 'AdamW weight decay (not on norms and biases)' },
  { key: 'beta1', field: 'adam_beta1', spec: below1, help: 'AdamW β1' },
  { key: 'beta2', field: 'adam_beta2', spec: below1, help: 'AdamW β2' },
  { key: 'eps', field: 'adam_eps', hf: 'adam_epsilon', spec: schema.num({ min: 0, exclusiveMin: true }), help: 'AdamW ε' },
  { key: 'maxGradNorm', field: 'max_grad_norm', spec: schema.num({ min: 0 }), help: 'clip the global gradient norm (0 = off)' },
  { key: 'loggingSteps', field: 'logging_steps', spec: schema.int({ min: 0 }), help: 'log metrics every n steps (0 = every step)' },
  { key: 'saveSteps', field: 'save_steps', spec: schema.int({ min: 0 }), help: 'checkpoint every n steps (0 = off)' },
  { key: 'saveTotalLimit', field: 'save_total_limit', spec: schema.int({ min: 0 }), help: 'checkpoints kept' },
  { key: 'evalSteps', field: 'eval_steps', spec: schema.int({ min: 0 }), help: 'evaluate every n steps (0 = at the end)' },
  { key: 'seed', field: 'seed', spec: schema.int(), help: 'seed' },
  { key: 'detectAnomaly', field: 'detect_anomaly', hf: null, spec: schema.bool, help: 'check every gradient and weight each step; name the first NaN/Inf tensor' },
  {
    key: 'gradientCheckpointing',
    field: 'gradient_checkpointing',
    spec: schema.str([...CHECKPOINT_MODES]),
    help: `${CHECKPOINT_MODES.join(' | ')}: recompute each layer in the backward pass instead of keeping its activations (auto: on from 100M parameters; on a GPU, only when the job would not fit without it)`,
  },
];

/** The recipe schema of the training settings. */
export const TRAIN_SCHEMA: Record<string, Spec> = schema.fieldsOf(TRAIN_OPTIONS);

/**
 * A TrainConfig from parsed CLI options (commander's camelCase names) or from a recipe stage
 * (snake_case fields), over `base`, range-checked.
 */
export function trainConfigFrom(o: Record<string, any>, base: TrainConfig = DEFAULT_TRAIN, from: 'flags' | 'recipe' = 'flags', where = ''): TrainConfig {
  return validateTrainConfig(schema.valuesFrom(TRAIN_OPTIONS, o, base, from), where);
}

/** Range checks from TRAIN_OPTIONS, naming the setting by its recipe field. */
export function validateTrainConfig(c: TrainConfig, where = ''): TrainConfig {
  const bad = schema.firstViolation(TRAIN_OPTIONS, c as unknown as Record<keyof TrainConfig, unknown>);
  if (bad) throw new UserError(`${where}${bad}`);
  if (c.loggingSteps === 0) c.loggingSteps = 1;
  return c;
}
