import { describe, expect, it } from 'vitest';
import * as fs from 'node:fs';
import * as http from 'node:http';
import * as path from 'node:path';
import Database from 'better-sqlite3';
import { selectPair, ScoredSample, SelectOptions } from '../src/online/select.js';
import { roundPromptIndices, spearman } from '../src/stages/online.js';
import { Rng } from '../src/util/rng.js';
import { prefopt, prefoptAsync } from './helpers/cli.js';
import { onlineArgs, onlineFixture } from './helpers/online-fixture.js';

const s = (k: number, reward: number, nTokens = 5, key = `k${k}`): ScoredSample => ({ id: 100 + k, k, reward, nTokens, key });
const opt = (o: Partial<SelectOptions> = {}): SelectOptions => ({ rule: 'max_min', lengthPenalty: 0, minMargin: 0, ...o });

describe('pair selection', () => {
  const xs = [s(0, 0.5), s(1, 1.0), s(2, 0.1), s(3, 0.7)];
  it('max_min, max_second, max_random', () => {
    const mm = selectPair(xs, opt(), new Rng(0));
    expect(mm).toMatchObject({ chosen: { k: 1 }, rejected: { k: 2 } });
    expect((mm as any).margin).toBeCloseTo(0.9, 12);
    expect(selectPair(xs, opt({ rule: 'max_second' }), new Rng(0))).toMatchObject({ chosen: { k: 1 }, rejected: { k: 3 } });
    const seen = new Set<number>();
    for (let i = 0; i < 50; i++) {
      const r = selectPair(xs, opt({ rule: 'max_random' }), new Rng(i)) as any;
      expect(r.chosen.k).toBe(1);
      seen.add(r.rejected.k);
    }
    expect([...seen].sort()).toEqual([0, 2, 3]);
    expect(selectPair(xs, opt({ rule: 'max_random' }), new Rng(5))).toEqual(selectPair(xs, opt({ rule: 'max_random' }), new Rng(5)));
  });
  it('max_min with a length penalty prefers short answers', () => {
    const ys = [s(0, 1.0, 30), s(1, 0.9, 2), s(2, 0.0, 40)];
    const r = selectPair(ys, opt({ rule: 'max_min_length_penalty', lengthPenalty: 0.01 }), new Rng(0)) as any;
    expect(r.chosen.k).toBe(1); // 0.88 beats 0.70
    expect(r.rejected.k).toBe(2); // −0.40
    expect(r.margin).toBeCloseTo(0.88 + 0.4, 12);
  });
  it('drops ties (never chosen == rejected), identical answers, and pairs below the margin', () => {
    expect(selectPair([s(0, 0.5), s(1, 0.5), s(2, 0.5)], opt(), new Rng(0))).toEqual({ dropped: 'tie' });
    expect(selectPair([s(0, 0.5), s(1, 0.5)], opt({ rule: 'max_second' }), new Rng(0))).toEqual({ dropped: 'tie' });
    expect(selectPair([s(0, 0.9, 5, 'same'), s(1, 0.1, 5, 'same')], opt(), new Rng(0))).toEqual({ dropped: 'tie' });
    expect(selectPair(xs, opt({ minMargin: 0.95 }), new Rng(0))).toEqual({ dropped: 'below_margin' });
    expect(selectPair([s(0, 1)], opt(), new Rng(0))).toEqual({ dropped: 'too_few' });
  });
  it('prompt slices wrap and resampling is seeded', () => {
    expect(roundPromptIndices(10, 4, 'slice', 0, 1)).toEqual([0, 1, 2, 3]);
    expect(roundPromptIndices(10, 4, 'slice', 0, 3)).toEqual([8, 9, 0, 1]);
    expect(roundPromptIndices(10, 0, 'slice', 0, 2)).toEqual([0, 1, 2, 3, 4, 5, 6, 7, 8, 9]);
    const a = roundPromptIndices(10, 4, 'resample', 3, 2);
    expect(a).toEqual(roundPromptIndices(10, 4, 'resample', 3, 2));
    expect(new Set(a).size).toBe(4);
    expect(a).not.toEqual(roundPromptIndices(10, 4, 'resample', 3, 1));
  });
});

/** Everything a run stored, in a form two runs can be compared by. */
function dump(workdir: string) {
  const db = new Database(path.join(workdir, 'prefopt.db'), { readonly: true });
  const q = (sql: string) => db.prepare(sql).all();
  const out = {
    rounds: q('SELECT round, step, policy_path IS NOT NULL AS has_policy FROM rounds ORDER BY round'),
    roundPrompts: q('SELECT r.round, p.idx, rp.position FROM round_prompts rp JOIN rounds r ON r.id = rp.round_id JOIN prompts p ON p.id = rp.prompt_id ORDER BY r.round, rp.position'),
    samples: q('SELECT r.round, p.idx, s.k, s.text, s.token_ids, s.finish_reason, s.seed FROM samples s JOIN rounds r ON r.id = s.round_id JOIN prompts p ON p.id = s.prompt_id ORDER BY r.round, p.idx, s.k'),
    scores: q('SELECT r.round, p.idx, s.k, x.reward, x.scorer FROM scores x JOIN samples s ON s.id = x.sample_id JOIN rounds r ON r.id = s.round_id JOIN prompts p ON p.id = s.prompt_id ORDER BY r.round, p.idx, s.k'),
    pairs: q('SELECT r.round, p.idx, c.k AS ck, j.k AS jk, x.margin, x.rule FROM pairs x JOIN rounds r ON r.id = x.round_id JOIN prompts p ON p.id = x.prompt_id JOIN samples c ON c.id = x.chosen_sample_id JOIN samples j ON j.id = x.rejected_sample_id ORDER BY r.round, p.idx'),
    adapters: [1, 2].map((r) => {
      const f = path.join(workdir, `round-${r}`, 'adapter_model.safetensors');
      return fs.existsSync(f) ? fs.readFileSync(f).toString('base64') : null;
    }),
  };
  db.close();
  return out;
}

describe('scorer agreement', () => {
  it("Spearman's rank correlation: hand-computed values, average ranks for ties, null when constant", () => {
    expect(spearman([1, 2, 3, 4], [10, 20, 30, 40])).toBeCloseTo(1, 12);
    expect(spearman([1, 2, 3, 4], [4, 3, 2, 1])).toBeCloseTo(-1, 12);
    // ranks a = [1, 2, 3, 4], b = [2, 1, 4, 3]: 1 − 6·Σd²/(n(n²−1)) = 1 − 6·4/60 = 0.6
    expect(spearman([1, 2, 3, 4], [2, 1, 4, 3])).toBeCloseTo(0.6, 12);
    // ties: a = [0.1, 1, 1, 0] → ranks [1, 2.5, 2.5, 0], b → [0, 1, 2, 3]; centred, Σ products =
    // 0.75 − 0.5 + 0.5 − 2.25 = −1.5, Σ squares 4.5 and 5.
    expect(spearman([0.1, 1, 1, 0], [5, 6, 7, 8])).toBeCloseTo(-1.5 / Math.sqrt(4.5 * 5), 12);
    expect(spearman([1, 1, 1], [1, 2, 3])).toBeNull();
  });
});

describe('online stage', () => {
  it('runs rounds into SQLite with no duplicates or gaps; status and export-pairs read it', async () => {
    const f = await onlineFixture();
    const wd = path.join(f.d, 'run');
    const r = prefopt(onlineArgs(f, wd));
    expect(r.code, r.stderr).toBe(0);
    const d = dump(wd);
    expect(d.rounds).toEqual([{ round: 1, step: 'done', has_policy: 1 }, { round: 2, step: 'done', has_policy: 1 }].map((x) => ({ ...x })));
    expect(d.samples).toHaveLength(2 * 6 * 3);
    expect(d.scores).toHaveLength(2 * 6 * 3);
    for (const p of d.pairs as any[]) expect(p.ck).not.toBe(p.jk);
    const st = JSON.parse(prefopt(['--json', 'status', '--workdir', wd]).stdout);
    const rounds = st.runs[0].stages[0].rounds;
    expect(rounds.map((x: any) => x.samples)).toEqual([18, 18]);
    for (const x of rounds) expect(x.pairs + x.metrics['dropped/tie'] + x.metrics['dropped/below_margin']).toBe(6);
    expect(rounds[0].metrics).toHaveProperty('kl');
    const ex = prefopt(['export-pairs', '--workdir', wd, '--round', '1', '--format', 'trl']);
    const rows = ex.stdout.trim().split('\n').filter(Boolean).map((l) => JSON.parse(l));
    expect(rows).toHaveLength(rounds[0].pairs);
    if (rows.length) expect(rows[0]).toMatchObject({ prompt: [{ role: 'user' }], chosen: [{ role: 'assistant' }], rejected: [{ role: 'assistant' }] });
    // Same seed, fresh workdir: the same database contents.
    const again = prefopt(onlineArgs(f, path.join(f.d, 'again')));
    expect(again.code).toBe(0);
    expect(dump(path.join(f.d, 'again'))).toEqual(d);
    // A changed setting for the same workdir is refused.
    const changed = prefopt(onlineArgs(f, wd, ['--temperature', '0.5']));
    expect(changed.code).toBe(2);
    expect(changed.stderr).toMatch(/other settings \(sampling\)/);
  });

  it('reference: fixed at sft keeps one reference hash, previous uses a new one each round', async () => {
    const f = await onlineFixture();
    const hashes = (wd: string) => {
      const db = new Database(path.join(wd, 'prefopt.db'), { readonly: true });
      const n = (db.prepare('SELECT COUNT(DISTINCT ref_hash) n FROM ref_logps').get() as any).n;
      db.close();
      return n;
    };
    expect(prefopt(onlineArgs(f, path.join(f.d, 'sft'), ['--reference', 'sft'])).code).toBe(0);
    expect(prefopt(onlineArgs(f, path.join(f.d, 'prev'), ['--reference', 'previous'])).code).toBe(0);
    expect(hashes(path.join(f.d, 'sft'))).toBe(1);
    expect(hashes(path.join(f.d, 'prev'))).toBe(2);
  });

  it('an unreachable sampler or scorer endpoint fails the round clearly and the run stays resumable', async () => {
    const f = await onlineFixture();
    let healthy = false;
    const server = http.createServer((req, res) => {
      let body = '';
      req.on('data', (c) => (body += c));
      req.on('end', () => {
        if (!healthy) return res.writeHead(500).end('down');
        const { completions } = JSON.parse(body);
        res.writeHead(200, { 'content-type': 'application/json' }).end(JSON.stringify({ scores: completions.map((c: string) => c.length % 3) }));
      });
    });
    await new Promise<void>((r) => server.listen(0, '127.0.0.1', () => r()));
    const url = `http://127.0.0.1:${(server.address() as any).port}/score`;
    const wd = path.join(f.d, 'net');
    const args = onlineArgs(f, wd).map((a) => (a === f.scorer ? url : a));
    const r1 = await prefoptAsync(args);
    expect(r1.code).toBe(2);
    expect(r1.stderr).toContain(`${url}: gave up after`);
    expect((dump(wd).rounds as any[])[0].step).toBe('score'); // samples committed, waiting for scores
    healthy = true;
    const r2 = await prefoptAsync(args);
    expect(r2.code, r2.stderr).toBe(0);
    server.close();
    // A sampling endpoint that fails on purpose (HTTP 500), then one that is not there at all.
    const failing = http.createServer((_req, res) => res.writeHead(500).end('overloaded'));
    await new Promise<void>((r) => failing.listen(0, '127.0.0.1', () => r()));
    const surl = `http://127.0.0.1:${(failing.address() as any).port}/v1`;
    const sampler = await prefoptAsync(onlineArgs(f, path.join(f.d, 'sampler'), ['--sampler-url', surl, '--sampler-timeout', '2000']));
    failing.close();
    expect(sampler.code).toBe(2);
    expect(sampler.stderr).toContain(`sampler ${surl}/chat/completions: unreachable after 4 attempts (HTTP 500); the run stays resumable`);
    expect((dump(path.join(f.d, 'sampler')).rounds as any[])[0].step).toBe('sample');
    const gone = await prefoptAsync(onlineArgs(f, path.join(f.d, 'sampler2'), ['--sampler-url', surl, '--sampler-timeout', '500']));
    expect(gone.stderr).toMatch(/unreachable after 4 attempts \(connection failed: ECONNREFUSED\)/);
  });

  it('survives SIGKILL at random points in every step: the database equals an uninterrupted run', async () => {
    const f0 = await onlineFixture();
    // The same rewards, 30 ms late per prompt: scoring lasts long enough for a kill to land in it.
    const slow = path.join(f0.d, 'slow-scorer.mjs');
    fs.writeFileSync(slow, `import score from ${JSON.stringify(f0.scorer.slice('module:'.length))};\nexport default async (p, cs) => (await new Promise((r) => setTimeout(r, 30)), score(p, cs));\n`);
    const f = { ...f0, scorer: `module:${slow}` };
    const ref = path.join(f.d, 'ref');
    const t0 = Date.now();
    const refRun = await prefoptAsync(onlineArgs(f, ref));
    expect(refRun.code, refRun.stderr).toBe(0);
    const T = Date.now() - t0;
    const want = dump(ref);
    // Every step the uninterrupted run entered, as logged after each commit: the first kill of a
    // session is aimed just after one of them (within 5 ms: with kills up to 30 ms late, a
    // fresh-clone run once missed round 2's sampling, which had ended before the kill), so every
    // step is interrupted whatever the machine's speed; the kills after it (while resuming) fall
    // at random instants.
    const entered = [...refRun.stderr.matchAll(/\[prefopt\] (round|step) round=(\d+) step=(\w+)/g)].map((m) => `${m[1]} round=${m[2]} step=${m[3]}`);
    expect(entered.length).toBe(2 * 6); // per round: sample, score, select, train, evaluate, done
    const rng = new Rng(2024);
    let kills = 0;
    let sessions = 0;
    const stepsHit = new Set<string>();
    const killed = (wd: string) => {
      kills++;
      if (!fs.existsSync(path.join(wd, 'prefopt.db'))) return;
      const rounds = dump(wd).rounds as any[];
      stepsHit.add(rounds.map((x) => `${x.round}:${x.step}`).at(-1) ?? 'start');
    };
    while (kills < 20 || sessions < entered.length) {
      const wd = path.join(f.d, `crash-${sessions}`);
      const aim = entered[sessions++ % entered.length];
      const first = await prefoptAsync(onlineArgs(f, wd), { killOnStderr: { text: aim, delayMs: rng.next() * 5 } });
      if (first.killed) killed(wd);
      for (let r = first; r.killed; ) {
        r = await prefoptAsync(onlineArgs(f, wd), { killAfterMs: 150 + rng.next() * T });
        if (r.killed) killed(wd);
        else expect(r.code, r.stderr).toBe(0);
      }
      if (!first.killed) expect(first.code, first.stderr).toBe(0);
      const got = dump(wd);
      for (const k of Object.keys(want) as (keyof typeof want)[]) expect(got[k], `session ${sessions - 1}: ${k} differs after ${kills} kills`).toEqual(want[k]);
    }
    // Both rounds interrupted in every step that lasts long enough to be hit (select takes under a millisecond).
    for (const step of ['sample', 'score', 'train', 'evaluate']) for (const r of [1, 2]) expect([...stepsHit], step).toContain(`${r}:${step}`);
    console.log(`crash test: ${kills} kills over ${sessions} sessions; steps interrupted: ${[...stepsHit].sort().join(' ')}`);
  }, 600_000);
});
