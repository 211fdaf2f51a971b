import { describe, expect, it } from 'vitest';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { prefoptAsync } from './helpers/cli.js';

/**
 * The reward model on the embedded default, trained exactly as recipes/quickstart.yaml trains it
 * (sft-base from scratch, then the Bradley–Terry model): ≥ 0.9 accuracy on held-out pairs. The
 * slowest test in the suite (~4 min of one core); it runs alongside the others.
 */
describe('reward model on the embedded preference pairs', () => {
  it('reaches ≥ 0.9 accuracy on held-out pairs', async () => {
    const d = fs.mkdtempSync(path.join(os.tmpdir(), 'prefopt-rmq-'));
    const q = 'data/quickstart';
    const run = async (args: string[]) => {
      const r = await prefoptAsync(['--quiet', ...args]);
      expect(r.code, r.stderr.slice(-800)).toBe(0);
    };
    await run(['init-model', '--arch', 'zhinao', '--config', `${q}/model.json`, '--tokenizer', `${q}/tokenizer`, '--out', path.join(d, 'base')]);
    await run(['sft', '--model', path.join(d, 'base'), '--data', `${q}/sft.json`, '--out', path.join(d, 'sft'), '--lr', '2e-3', '--epochs', '6', '--batch-size', '16', '--max-len', '128', '--warmup-ratio', '0.05', '--eval-ratio', '0.02', '--seed', '0']);
    await run(['rm', 'train', '--model', path.join(d, 'sft'), '--data', `${q}/prefs.jsonl`, '--out', path.join(d, 'rm'), '--eval-ratio', '0.1', '--lr', '1e-3', '--epochs', '12', '--batch-size', '16', '--warmup-ratio', '0.1', '--seed', '0']);
    const evals = fs.readFileSync(path.join(d, 'rm', 'metrics.jsonl'), 'utf8').trim().split('\n').map((l) => JSON.parse(l)).filter((r) => r.split === 'eval');
    const last = evals.at(-1);
    console.log(`reward model: held-out accuracy ${last.accuracy} (80 pairs), margin ${last.margin.toFixed(2)}, loss ${last.loss.toFixed(3)}`);
    expect(last.accuracy).toBeGreaterThanOrEqual(0.9);
    fs.rmSync(d, { recursive: true, force: true });
  }, 900_000);
});
