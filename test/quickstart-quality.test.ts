import { describe, expect, it } from 'vitest';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import YAML from 'yaml';
import { prefopt, prefoptAsync } from './helpers/cli.js';
import { greedy, loadGguf } from './helpers/llama-cpp.js';
import { readStatus } from '../src/commands/online.js';

/**
 * The embedded default earns its stages: a shrunken recipes/quickstart.yaml (its SFT, reward
 * model and round settings exactly as shipped; off-policy DPO and the merge left out, so the
 * rounds start from sft-base; two rounds instead of three; the GGUF export takes the last round's
 * policy) trained from scratch with seed 0
 * (measured: sft-base 0.33, round-2 0.57; sample reward 0.343 → 0.420). The rounds must raise the rule reward of their
 * samples every round and the held-out accuracy over sft-base, and the reward model must rank
 * held-out human pairs. Deterministic: the kernels give the same bits on any thread count and
 * on AVX-512 or AVX2. The slowest test in the suite (a few minutes of one core); it runs
 * alongside the others.
 */
describe('the embedded default', () => {
  it('on-policy rounds raise the sample reward every round and held-out accuracy over sft-base; the reward model ranks held-out pairs', async () => {
    const d = fs.mkdtempSync(path.join(os.tmpdir(), 'prefopt-quality-'));
    const recipe = YAML.parse(fs.readFileSync('recipes/quickstart.yaml', 'utf8'));
    const data = path.resolve('data/quickstart');
    recipe.workdir = path.join(d, 'run');
    recipe.stages = recipe.stages.filter((st: any) => !['dpo', 'merged'].includes(st.name));
    for (const st of recipe.stages) {
      for (const k of ['config', 'tokenizer', 'data', 'prompts', 'eval_prompts']) if (typeof st[k] === 'string') st[k] = st[k].replace('../data/quickstart', data);
      if (st.type === 'online_dpo') {
        delete st.adapter;
        st.rounds = 2;
      }
      if (st.type === 'eval') st.models = { 'sft-base': 'sft.output', 'round-2': 'sft.output+online.round-2' };
      if (st.type === 'export_gguf') st.model = 'sft.output+online.output';
    }
    const rf = path.join(d, 'quality.yaml');
    fs.writeFileSync(rf, YAML.stringify(recipe));
    const r = await prefoptAsync(['--quiet', 'run', rf]);
    expect(r.code, r.stderr.slice(-1500)).toBe(0);
    const table = JSON.parse(fs.readFileSync(path.join(d, 'run', 'eval', 'results.json'), 'utf8')).table as { model: string; accuracy: number }[];
    const acc = Object.fromEntries(table.map((t) => [t.model, t.accuracy]));
    const stages = readStatus(path.join(d, 'run')).runs[0].stages;
    const rounds = stages.find((s: any) => s.kind === 'online_dpo').rounds;
    const reward = rounds.map((x: any) => x.metrics['reward/mean']);
    // The reward model audits every pair the rule selected.
    for (const x of rounds) {
      expect(x.metrics['audit/pairs']).toBe(x.metrics.pairs);
      expect(x.metrics['audit/pair_agreement']).toBeGreaterThanOrEqual(0);
      expect(x.metrics['audit/pair_agreement']).toBeLessThanOrEqual(1);
    }
    const rmEval = stages.find((s: any) => s.kind === 'rm_train').metrics['eval/accuracy'];
    console.log(`quickstart quality: sft-base ${acc['sft-base']}, round-2 ${acc['round-2']}; sample reward per round ${reward.map((x: number) => x.toFixed(3)).join(' → ')}; reward model held-out accuracy ${rmEval}`);
    expect(acc['sft-base']).toBeLessThanOrEqual(0.65);
    expect(reward[1]).toBeGreaterThan(reward[0] + 0.05);
    expect(acc['round-2']).toBeGreaterThanOrEqual(acc['sft-base'] + 0.15);
    expect(rmEval).toBeGreaterThanOrEqual(0.9);
    // The export stage's file answers in llama.cpp as the trained policy does in prefopt.
    const policy = stages.find((s: any) => s.kind === 'online_dpo').output;
    const g = prefopt(['generate', '--model', path.join(d, 'run', 'sft'), '--adapter', policy, '--prompt', 'Which is larger, 7 or 8?', '--temperature', '0', '--max-new-tokens', '16', '--json']);
    expect(g.code, g.stderr).toBe(0);
    const j = JSON.parse(g.stdout);
    const ids = j.samples[0].completion_ids;
    expect(await greedy(await loadGguf(path.join(d, 'run', 'gguf', 'model.gguf')), j.prompt_ids, ids.length)).toEqual(ids);
    fs.rmSync(d, { recursive: true, force: true });
  }, 900_000);
});
