/**
 * Learning-rate schedules as transformers defines them (get_*_schedule_with_warmup): a
 * multiplier of the peak rate at optimizer step `step` (0-based, the rate used for that update).
 */
export type SchedulerName = 'cosine' | 'linear' | 'constant' | 'constant_with_warmup';
export const SCHEDULERS: SchedulerName[] = ['cosine', 'linear', 'constant', 'constant_with_warmup'];

export function warmupSteps(totalSteps: number, warmupRatio: number): number {
  return Math.ceil(totalSteps * warmupRatio);
}

export function lrMultiplier(name: SchedulerName, step: number, totalSteps: number, warmup: number): number {
  if (name === 'constant') return 1;
  if (step < warmup) return step / Math.max(1, warmup);
  if (name === 'constant_with_warmup') return 1;
  const progress = (step - warmup) / Math.max(1, totalSteps - warmup);
  if (name === 'linear') return Math.max(0, (totalSteps - step) / Math.max(1, totalSteps - warmup));
  return Math.max(0, 0.5 * (1 + Math.cos(Math.PI * progress)));
}
