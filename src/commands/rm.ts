import { DEFAULT_RM, runRmTrain } from '../stages/rm.js';
import { TrainConfig } from '../train/trainer.js';
import { makeScorer } from '../../rm/spec.js';
import { Prompt } from '../../rm/scorer.js';
import { readJsonl, toJsonl } from '../data/jsonl.js';
import { isMessages } from '../data/encode.js';
import { pairSettingsFrom } from '../data/prefs.js';
import { UserError } from '../util/errors.js';
import { writeFileAtomic } from '../util/fsutil.js';
import { log } from '../util/log.js';
import { loraFrom } from '../lora/lora.js';

export async function rmTrainCmd(o: Record<string, any>, train: TrainConfig): Promise<void> {
  const res = await runRmTrain({
    ...DEFAULT_RM,
    model: o.model,
    data: o.data,
    out: o.out,
    evalData: o.evalData,
    ...pairSettingsFrom(o, DEFAULT_RM, 'flags'),
    lora: o.lora ? loraFrom(o) : null,
    resume: !!o.resume,
    train,
  });
  log('rm-done', { out: o.out, steps: res.steps, pairs: res.pairs, ...Object.fromEntries(Object.entries(res.evalMetrics).map(([k, v]) => [`eval_${k}`, v])) });
}

/** One {"reward": x} line per input row, in input order; rows sharing a prompt are scored together. */
export async function rmScoreCmd(o: { scorer: string; input: string; out?: string; concurrency?: number; timeout?: number }): Promise<void> {
  const rows = readJsonl(o.input).map(({ line, value }) => {
    const where = `${o.input}:${line}`;
    if (!value || typeof value !== 'object') throw new UserError(`${where}: expected {"prompt","completion"}`);
    if (typeof value.prompt !== 'string' && !isMessages(value.prompt)) throw new UserError(`${where}: "prompt" must be a string or a list of messages`);
    if (typeof value.completion !== 'string') throw new UserError(`${where}: "completion" must be a string`);
    return { prompt: value.prompt as Prompt, completion: value.completion as string, row: value };
  });
  const scorer = await makeScorer(o.scorer, { http: { ...(o.concurrency ? { concurrency: o.concurrency } : {}), ...(o.timeout ? { timeoutMs: o.timeout } : {}) } });
  try {
    const groups = new Map<string, number[]>();
    rows.forEach((r, i) => {
      const k = JSON.stringify(r.prompt);
      groups.set(k, [...(groups.get(k) ?? []), i]);
    });
    const out = new Array<number>(rows.length);
    await Promise.all(
      [...groups.values()].map(async (idx) => {
        const s = await scorer.score(rows[idx[0]].prompt, idx.map((i) => rows[i].completion), rows[idx[0]].row);
        idx.forEach((i, k) => (out[i] = s[k]));
      }),
    );
    const text = toJsonl(out.map((reward) => ({ reward })));
    if (o.out) writeFileAtomic(o.out, text);
    else process.stdout.write(text);
    log('rm-score', { rows: rows.length, scorer: scorer.name, version: scorer.version });
  } finally {
    await scorer.close?.();
  }
}
