import { DEFAULT_DPO_STAGE, evaluatePairs, runDpo } from '../stages/dpo.js';
import { DPO_OPTIONS, DpoParams, validateDpoParams } from '../dpo/loss.js';
import { loraFrom, withAdapterOff } from '../lora/lora.js';
import { valuesFrom } from '../util/schema.js';
import { pairLogpsHost } from '../dpo/logps.js';
import { loadPrefs, pairSettingsFrom } from '../data/prefs.js';
import { loadModel } from '../model/load.js';
import { trainConfigFrom } from '../train/options.js';
import { DPO_JOB_DEFAULTS, readDpoConfig } from '../stages/trl-config.js';
import { UserError } from '../util/errors.js';
import { log } from '../util/log.js';
import { openPolicy } from '../model/policy.js';

/** DPO settings by recipe field name (TRL's); the CLI flag is the same name in kebab-case. */

/** DpoParams from parsed CLI options or a recipe stage, over `base`, range-checked. */
export function dpoParamsFrom(o: Record<string, any>, base: DpoParams, from: 'flags' | 'recipe' = 'flags', where = ''): DpoParams {
  return validateDpoParams(valuesFrom(DPO_OPTIONS, o, base, from), where);
}

export async function dpoCmd(o: Record<string, any>): Promise<void> {
  const base = o.config ? readDpoConfig(o.config, DPO_JOB_DEFAULTS) : DPO_JOB_DEFAULTS;
  if (base.reference === 'start_adapter' && !o.adapter) throw new UserError(`${o.config}: prefopt.reference "start_adapter" needs --adapter`);
  const res = await runDpo({
    ...DEFAULT_DPO_STAGE,
    model: o.model,
    data: o.data,
    out: o.out,
    evalData: o.evalData ?? base.evalData,
    ...pairSettingsFrom(o, base.pairs, 'flags'),
    refModel: o.refModel ?? base.refModel,
    adapter: o.adapter,
    refIsStartAdapter: base.reference === 'start_adapter',
    dpo: dpoParamsFrom(o, base.dpo),
    lora: loraFrom(o, base.lora),
    train: trainConfigFrom(o, base.train),
    cacheDb: o.cache,
    resume: !!o.resume,
  });
  log('dpo-done', { out: o.out, steps: res.steps, pairs: res.pairs, eval_pairs: res.evalPairs, cache_hits: res.cacheHits, ...Object.fromEntries(Object.entries(res.evalMetrics).map(([k, v]) => [`eval_${k}`, v])) });
}

/** Only evaluates: ONE JSON object of TRL's metric names, averaged over the rows. */
export async function evalDpoCmd(o: Record<string, any>): Promise<void> {
  const p = openPolicy(o.model, { adapter: o.adapter });
  const params = dpoParamsFrom(o, DEFAULT_DPO_STAGE.dpo);
  const ctx = p.model.cfg.max_position_embeddings;
  const shape = pairSettingsFrom(o, { ...DEFAULT_DPO_STAGE, maxLength: ctx, maxPromptLength: ctx, batchSize: 4 }, 'flags');
  const { pairs, skipped } = loadPrefs(o.data, p.tok, p.model.cfg.vocab_size, { maxLength: shape.maxLength, maxPromptLength: shape.maxPromptLength, strict: false, allowIdentical: true });
  if (!pairs.length) throw new UserError(`${o.data}: no usable rows (${JSON.stringify(skipped)})`);
  const bs = shape.batchSize;
  let ref: { chosen: number[]; rejected: number[] };
  if (o.refModel) {
    const r = loadModel(o.refModel);
    ref = pairLogpsHost(r, pairs, bs, p.padId);
    r.dispose();
  } else ref = withAdapterOff(p.model, () => pairLogpsHost(p.model, pairs, bs, p.padId));
  const m = evaluatePairs(p.model, pairs, ref, params, bs, p.padId);
  process.stdout.write(JSON.stringify({ ...m, rows: pairs.length, skipped: Object.values(skipped).reduce((a, b) => a + b, 0) }) + '\n');
  p.model.dispose();
}
