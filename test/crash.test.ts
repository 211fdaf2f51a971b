import { describe, expect, it } from 'vitest';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { AsyncRun, prefoptAsync } from './helpers/cli.js';
import { onlineArgs, onlineFixture } from './helpers/online-fixture.js';
import { Decoder } from '../src/model/decoder.js';
import { parseConfig, presetConfig } from '../src/model/config.js';
import { loadModel, saveModel } from '../src/model/load.js';
import { listCheckpoints } from '../src/train/trainer.js';
import { readHeader, readTensor } from '../src/io/safetensors.js';
import { Rng } from '../src/util/rng.js';

/**
 * SIGKILL at random instants, and aimed into writes (a kill lands a few milliseconds after a
 * temp file appears), must never leave an output that a later run or a loader takes for good:
 * after every kill each output is either absent or byte-identical to an uninterrupted run's.
 * A write that fails (RLIMIT_FSIZE, the stand-in for a full disk) must name its file, exit
 * non-zero and leave the previous state usable.
 */

type Verdict = 'absent' | 'good';

/** Every tensor of a safetensors file reads back (throws on a torn file). */
function readAll(file: string): void {
  const st = readHeader(file);
  for (const name of st.tensors.keys()) readTensor(st, name);
}

/** Checkpoints that `--resume` would pick up must be whole. */
function checkCheckpoints(dir: string): void {
  for (const c of listCheckpoints(dir)) {
    JSON.parse(fs.readFileSync(path.join(c.dir, 'trainer_state.json'), 'utf8'));
    readAll(path.join(c.dir, 'optimizer.safetensors'));
    for (const f of fs.readdirSync(path.join(c.dir, 'weights'))) if (f.endsWith('.safetensors')) readAll(path.join(c.dir, 'weights', f));
  }
}

/** `marker` present ⇒ `file` equals the reference bytes; absent ⇒ nothing to mistake. */
function sameOrAbsent(dir: string, marker: string, file: string, want: Buffer): Verdict {
  if (!fs.existsSync(path.join(dir, marker))) return 'absent';
  expect(fs.readFileSync(path.join(dir, file)).equals(want), `${dir}/${file} differs from the uninterrupted run`).toBe(true);
  return 'good';
}

interface Torture {
  args: string[];
  /** Where the command's temp files appear. */
  watch: string;
  /** Checks the outputs after a kill or a finished run; throws on anything torn. */
  verify: () => Verdict;
  /** Start a fresh session (remove outputs). */
  reset: () => void;
  kills: number;
  /** Kills per session before it is let run to completion (resumable commands make progress). */
  perSession: number;
  T: number;
  rng: Rng;
}

async function torture(t: Torture) {
  let kills = 0;
  let duringWrite = 0;
  let sessions = 0;
  while (kills < t.kills) {
    t.reset();
    sessions++;
    for (let k = 0; ; k++) {
      const aimed = kills % 2 === 1;
      const opts = k >= t.perSession ? {} : aimed ? { killOnTemp: { dir: t.watch, nth: 1 + Math.floor(t.rng.next() * 3), delayMs: t.rng.next() * 3 } } : { killAfterMs: 150 + t.rng.next() * t.T };
      const r: AsyncRun = await prefoptAsync(t.args, opts);
      if (r.killed) {
        kills++;
        if (r.tempAtKill) duringWrite++;
        t.verify();
        continue;
      }
      expect(r.code, r.stderr.slice(-500)).toBe(0);
      expect(t.verify()).toBe('good');
      break;
    }
  }
  return { kills, duringWrite, sessions };
}

async function timed(args: string[]): Promise<number> {
  const t0 = Date.now();
  const r = await prefoptAsync(args);
  expect(r.code, r.stderr.slice(-500)).toBe(0);
  return Date.now() - t0;
}

async function fixture() {
  const f = await onlineFixture();
  const rng = new Rng(5);
  const convs = Array.from({ length: 24 }, () => {
    const a = rng.int(9);
    return { conversations: [{ from: 'user', value: `What is ${a} plus 2?` }, { from: 'assistant', value: `The answer is ${a + 2}.` }] };
  });
  fs.writeFileSync(path.join(f.d, 'sft.json'), JSON.stringify(convs));
  const prefs = Array.from({ length: 16 }, (_, i) => JSON.stringify({ prompt: `What is ${i % 8} plus 2?`, chosen: `The answer is ${(i % 8) + 2}.`, rejected: `no ${i}` }));
  fs.writeFileSync(path.join(f.d, 'prefs.jsonl'), prefs.join('\n') + '\n');
  return f;
}

const report: string[] = [];

describe('SIGKILL during writes', () => {
  it('sft checkpoints and final model, dpo adapter export: resumed to completion, bytes equal an uninterrupted run', async () => {
    const f = await fixture();
    const sftArgs = (out: string) => ['sft', '--model', f.base, '--data', path.join(f.d, 'sft.json'), '--out', out, '--batch-size', '4', '--epochs', '2', '--lr', '3e-3', '--save-steps', '1', '--save-total-limit', '2', '--resume', '--seed', '3'];
    const dpoArgs = (out: string) => ['dpo', '--model', f.base, '--data', path.join(f.d, 'prefs.jsonl'), '--out', out, '--batch-size', '4', '--epochs', '2', '--lr', '5e-3', '--save-steps', '1', '--resume', '--seed', '3'];
    for (const [name, args, marker, file] of [
      ['sft', sftArgs, 'config.json', 'model.safetensors'],
      ['dpo', dpoArgs, 'adapter_config.json', 'adapter_model.safetensors'],
    ] as const) {
      const ref = path.join(f.d, `${name}-ref`);
      const T = await timed(args(ref));
      const want = fs.readFileSync(path.join(ref, file));
      const out = path.join(f.d, `${name}-crash`);
      const r = await torture({
        args: args(out),
        watch: out,
        T,
        kills: 8,
        perSession: 4,
        rng: new Rng(name.length),
        reset: () => fs.rmSync(out, { recursive: true, force: true }),
        verify: () => {
          checkCheckpoints(out);
          const v = sameOrAbsent(out, marker, file, want);
          if (v === 'good' && name === 'sft') loadModel(out).dispose();
          return v;
        },
      });
      report.push(`${name}: ${r.kills} kills (${r.duringWrite} inside a write) over ${r.sessions} sessions`);
      expect(r.duringWrite).toBeGreaterThan(0);
    }
  }, 300_000);

  it('merge, merge-lora and report: the output is absent or whole after every kill', async () => {
    const f = await fixture();
    // Bigger checkpoints than the fixture's so that a write lasts long enough to be hit.
    const raw = presetConfig('llama', { hidden_size: 128, intermediate_size: 512, num_hidden_layers: 4, num_attention_heads: 4, num_key_value_heads: 2, max_position_embeddings: 256, rope_theta: 10000, tie_word_embeddings: false }, 300, { eos: 1, pad: 0 });
    const dirs: string[] = [];
    for (const seed of [1, 2, 3]) {
      const m = Decoder.init(parseConfig(raw), seed, 0.1);
      dirs.push(path.join(f.d, `m${seed}`));
      await saveModel(m, dirs.at(-1)!);
      m.dispose();
    }
    const yml = path.join(f.d, 'ties.yaml');
    fs.writeFileSync(yml, `merge_method: ties\nbase_model: ${dirs[0]}\nmodels:\n  - model: ${dirs[1]}\n    parameters: {weight: 1, density: 0.5}\n  - model: ${dirs[2]}\n    parameters: {weight: 0.5, density: 0.5}\n`);
    const adapter = path.join(f.d, 'adapter');
    expect((await prefoptAsync(['dpo', '--model', f.base, '--data', path.join(f.d, 'prefs.jsonl'), '--out', adapter, '--max-steps', '2', '--batch-size', '4'])).code).toBe(0);
    const run = path.join(f.d, 'run');
    expect((await prefoptAsync(onlineArgs(f, run, ['--rounds', '1']))).code).toBe(0);
    const outs = path.join(f.d, 'outs');
    const cases = [
      { name: 'merge', args: (o: string) => ['merge', yml, '--out', o], watch: outs, out: path.join(outs, 'merged'), marker: 'config.json', file: 'model.safetensors' },
      { name: 'merge-lora', args: (o: string) => ['merge-lora', '--model', f.base, '--adapter', adapter, '--out', o], watch: outs, out: path.join(outs, 'folded'), marker: 'config.json', file: 'model.safetensors' },
      { name: 'report', args: () => ['report', '--workdir', run], watch: run, out: run, marker: 'report.html', file: 'report.html' },
    ];
    for (const c of cases) {
      const ref = c.name === 'report' ? run : path.join(f.d, `${c.name}-ref`);
      const T = await timed(c.args(ref));
      const want = fs.readFileSync(path.join(ref, c.file));
      const r = await torture({
        args: c.args(c.out),
        watch: c.watch,
        T,
        kills: 6,
        perSession: 1,
        rng: new Rng(c.name.length),
        reset: () => (c.name === 'report' ? fs.rmSync(path.join(run, 'report.html'), { force: true }) : fs.rmSync(c.out, { recursive: true, force: true })),
        verify: () => {
          const v = sameOrAbsent(c.out, c.marker, c.file, want);
          if (v === 'good' && c.name !== 'report') loadModel(c.out).dispose();
          return v;
        },
      });
      report.push(`${c.name}: ${r.kills} kills (${r.duringWrite} inside a write) over ${r.sessions} sessions`);
    }
    // A later successful write sweeps the temp files the killed writers left behind.
    expect(fs.readdirSync(outs).filter((n) => n.includes('.tmp'))).toEqual([]);
    console.log(`crash torture: ${report.join('; ')}`);
  }, 300_000);
});

describe('a write that fails (file size limit, as on a full disk)', () => {
  it('names the file, exits non-zero, and keeps the previous model, merge output and run database usable', async () => {
    const f = await fixture();
    // SFT into a directory that holds a good model: the new model.safetensors cannot be written.
    const out = path.join(f.d, 'sft');
    const args = ['sft', '--model', f.base, '--data', path.join(f.d, 'sft.json'), '--out', out, '--batch-size', '8', '--epochs', '1', '--seed', '3'];
    expect((await prefoptAsync(args)).code).toBe(0);
    const before = fs.readFileSync(path.join(out, 'model.safetensors'));
    const limitKb = Math.floor(before.length / 1024 / 2);
    const r = await prefoptAsync([...args, '--lr', '1e-2'], { fileSizeLimitKb: limitKb });
    expect(r.code).toBe(2);
    expect(r.stderr).toMatch(/prefopt: error: .*model\.safetensors: write failed \(EFBIG: file too large\); nothing was replaced, the previous contents are unchanged/);
    expect(fs.readFileSync(path.join(out, 'model.safetensors')).equals(before)).toBe(true);
    loadModel(out).dispose();
    expect(fs.readdirSync(out).filter((n) => n.includes('.tmp'))).toEqual([]);

    // A merge over an existing output keeps the old one.
    const yml = path.join(f.d, 'lin.yaml');
    fs.writeFileSync(yml, `merge_method: linear\nmodels:\n  - model: ${f.base}\n  - model: ${out}\n`);
    const merged = path.join(f.d, 'merged');
    fs.cpSync(out, merged, { recursive: true });
    const m = await prefoptAsync(['merge', yml, '--out', merged], { fileSizeLimitKb: limitKb });
    expect(m.code).toBe(2);
    expect(m.stderr).toMatch(/merged.*: write failed \(EFBIG: file too large\)/);
    expect(fs.readFileSync(path.join(merged, 'model.safetensors')).equals(before)).toBe(true);

    // The run database: a round whose writes fail rolls back; without the limit the run resumes
    // and ends equal to a run that never failed.
    const ref = path.join(f.d, 'ref');
    expect((await prefoptAsync(onlineArgs(f, ref))).code).toBe(0);
    const wd = path.join(f.d, 'online');
    // 64 KiB: the database opens (its shared-memory file takes 32) and a later transaction fails.
    const full = await prefoptAsync(onlineArgs(f, wd), { fileSizeLimitKb: 64 });
    expect(full.code).toBe(2);
    expect(full.stderr).toMatch(/prefopt: error: .*prefopt\.db: write failed \(SQLITE_(FULL|IOERR\w*): disk full, file too large or I\/O error\); the transaction was rolled back, the run stays resumable/);
    const resumed = await prefoptAsync(onlineArgs(f, wd));
    expect(resumed.code, resumed.stderr.slice(-400)).toBe(0);
    for (const r of [1, 2]) expect(fs.readFileSync(path.join(wd, `round-${r}`, 'adapter_model.safetensors')).equals(fs.readFileSync(path.join(ref, `round-${r}`, 'adapter_model.safetensors')))).toBe(true);
  }, 300_000);
});

describe('numerical guards through the CLI', () => {
  it('a diverging SFT run stops naming step, micro-batch and tensor; the last checkpoint is whole and finite', async () => {
    const f = await fixture();
    const out = path.join(f.d, 'diverge');
    const r = await prefoptAsync(['sft', '--model', f.base, '--data', path.join(f.d, 'sft.json'), '--out', out, '--batch-size', '4', '--epochs', '3', '--lr', '1e6', '--max-grad-norm', '0', '--save-steps', '2', '--detect-anomaly', '--seed', '3']);
    expect(r.code).toBe(2);
    const m = /prefopt: error: non-finite (gradient of (\S+)|loss \(NaN\)|weight (\S+)).* at step (\d+), micro-batch (\d+)|non-finite weight (\S+) after the update of step (\d+)/.exec(r.stderr);
    expect(m, r.stderr.slice(-400)).not.toBeNull();
    expect(r.stderr).toMatch(/the last good checkpoint is kept/);
    expect(fs.existsSync(path.join(out, 'config.json'))).toBe(false);
    const last = listCheckpoints(out).at(-1)!;
    expect(last).toBeDefined();
    checkCheckpoints(out);
    const st = readHeader(path.join(last.dir, 'weights', 'model.safetensors'));
    for (const name of st.tensors.keys()) expect(readTensor(st, name).every(Number.isFinite), name).toBe(true);
  }, 120_000);
});
