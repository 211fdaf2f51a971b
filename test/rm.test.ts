import { describe, expect, it, afterAll } from 'vitest';
import * as fs from 'node:fs';
import * as http from 'node:http';
import * as os from 'node:os';
import * as path from 'node:path';
import * as tf from '@tensorflow/tfjs-core';
import { btLoss } from '../src/stages/rm.js';
import { HttpScorer } from '../rm/http.js';
import { makeScorer } from '../rm/spec.js';
import { exactAnswerReward, extractAnswer } from '../rm/rules.js';
import { freePort } from './helpers/net.js';

const tmp = () => fs.mkdtempSync(path.join(os.tmpdir(), 'prefopt-rm-'));

describe('Bradley–Terry loss', () => {
  it('equals −log σ(r_c − r_r − margin), averaged, by hand', () => {
    const l = tf.tidy(() => btLoss(tf.tensor1d([2, 0.5]), tf.tensor1d([1, 1.5]), tf.tensor1d([0, 0.5]))).dataSync()[0];
    const sig = (x: number) => 1 / (1 + Math.exp(-x));
    expect(l).toBeCloseTo((-Math.log(sig(1)) - Math.log(sig(-1.5))) / 2, 5);
  });
});

describe('rule scorers', () => {
  it('exact_answer gives partial credit for format and language', () => {
    expect(extractAnswer('The answer is 58.')).toEqual({ value: '58', formatted: true });
    expect(extractAnswer('答案是 58。')).toEqual({ value: '58', formatted: true });
    expect(extractAnswer('maybe 12 or 58')).toEqual({ value: '58', formatted: false });
    expect(exactAnswerReward('Which is larger, 31 or 58?', 'The answer is 58.', '58')).toBe(1);
    expect(exactAnswerReward('Which is larger, 31 or 58?', '答案是 58。', '58')).toBe(0.8);
    expect(exactAnswerReward('Which is larger, 31 or 58?', '58', '58')).toBe(0.5);
    expect(exactAnswerReward('Which is larger, 31 or 58?', 'The answer is 31.', '58')).toBe(0.1);
    expect(exactAnswerReward('Which is larger, 31 or 58?', 'no idea', '58')).toBe(0);
  });

  it('module scorers load .js and .ts exports; throwing or non-number results name the module and sample', async () => {
    const d = tmp();
    fs.writeFileSync(path.join(d, 'len.mjs'), 'export default (p, cs) => cs.map((c) => c.length);\nexport const bad = () => [1, "x"];\nexport const nan = () => [0.5, NaN];\nexport const inf = () => [-Infinity];\nexport const boom = () => { throw new Error("kaput"); };\n');
    fs.writeFileSync(path.join(d, 'typed.ts'), 'export function score(p: unknown, cs: string[]): number[] { return cs.map((c: string) => (c.includes("yes") ? 1 : 0)); }\n');
    const a = await makeScorer(`module:${path.join(d, 'len.mjs')}`);
    expect(await a.score('hi', ['abc', 'de'])).toEqual([3, 2]);
    const t = await makeScorer(`module:${path.join(d, 'typed.ts')}#score`);
    expect(await t.score('hi', ['yes', 'no'])).toEqual([1, 0]);
    const bad = await makeScorer(`module:${path.join(d, 'len.mjs')}#bad`);
    await expect(bad.score('q?', ['a', 'b'])).rejects.toThrow(/len.mjs#bad: score 1 for prompt "q\?" is "x", not a finite number/);
    const nan = await makeScorer(`module:${path.join(d, 'len.mjs')}#nan`);
    await expect(nan.score('q?', ['a', 'b'])).rejects.toThrow(/len.mjs#nan: score 1 for prompt "q\?" is NaN, not a finite number/);
    const inf = await makeScorer(`module:${path.join(d, 'len.mjs')}#inf`);
    await expect(inf.score('q?', ['a'])).rejects.toThrow(/len.mjs#inf: score 0 for prompt "q\?" is -Infinity, not a finite number/);
    const boom = await makeScorer(`module:${path.join(d, 'len.mjs')}#boom`);
    await expect(boom.score('q?', ['a'])).rejects.toThrow(/len.mjs#boom threw on the sample for prompt "q\?": kaput/);
    await expect(makeScorer(`module:${path.join(d, 'len.mjs')}#nope`)).rejects.toThrow(/export "nope" is not a function/);
    await expect(makeScorer('builtin:nope')).rejects.toThrow(/unknown built-in/);
    await expect(makeScorer('nonsense')).rejects.toThrow(/expected model:DIR/);
  });
});

describe('HTTP scorer against a real server on 127.0.0.1', () => {
  let inFlight = 0;
  let maxSeen = 0;
  let calls = 0;
  const mode = { value: 'ok' as 'ok' | 'fail-twice' | 'malformed' | 'slow' | 'wrong-count' | 'always-500' };
  let failures = 0;
  const server = http.createServer((req, res) => {
    let body = '';
    req.on('data', (c) => (body += c));
    req.on('end', async () => {
      calls++;
      inFlight++;
      maxSeen = Math.max(maxSeen, inFlight);
      await new Promise((r) => setTimeout(r, mode.value === 'slow' ? 1500 : 30));
      inFlight--;
      const { completions } = JSON.parse(body);
      if (mode.value === 'always-500' || (mode.value === 'fail-twice' && failures++ < 2)) {
        res.writeHead(503).end('busy');
        return;
      }
      if (mode.value === 'malformed') return res.writeHead(200).end('{"scores": [1,');
      const scores = completions.map((c: string) => c.length);
      if (mode.value === 'wrong-count') scores.pop();
      res.writeHead(200, { 'content-type': 'application/json' }).end(JSON.stringify({ scores }));
    });
  });
  const ready = new Promise<string>((r) => server.listen(0, '127.0.0.1', () => r(`http://127.0.0.1:${(server.address() as any).port}/score`)));
  afterAll(() => server.close());

  it('never has more requests in flight than the limit', async () => {
    const url = await ready;
    mode.value = 'ok';
    const s = new HttpScorer(url, { concurrency: 3, timeoutMs: 5000, retries: 2, backoffMs: 10 });
    const res = await Promise.all(Array.from({ length: 20 }, (_, i) => s.score(`p${i}`, ['a'.repeat(i), 'bb'])));
    expect(res[7]).toEqual([7, 2]);
    expect(maxSeen).toBeLessThanOrEqual(3);
    expect(maxSeen).toBeGreaterThan(1);
    expect(s.maxInFlight).toBeLessThanOrEqual(3);
  });

  it('retries 5xx with backoff, then succeeds; gives up clearly when it never recovers', async () => {
    const url = await ready;
    mode.value = 'fail-twice';
    failures = 0;
    calls = 0;
    const s = new HttpScorer(url, { concurrency: 1, timeoutMs: 5000, retries: 3, backoffMs: 10 });
    expect(await s.score('p', ['xyz'])).toEqual([3]);
    expect(calls).toBe(3);
    mode.value = 'always-500';
    await expect(new HttpScorer(url, { concurrency: 1, timeoutMs: 5000, retries: 2, backoffMs: 5 }).score('p', ['x'])).rejects.toThrow(/gave up after 3 attempts \(HTTP 503\)/);
  });

  it('malformed JSON, a wrong number of scores, timeouts and refused connections fail with clear errors', async () => {
    const url = await ready;
    const s = new HttpScorer(url, { concurrency: 1, timeoutMs: 300, retries: 1, backoffMs: 5 });
    mode.value = 'malformed';
    await expect(s.score('p', ['x'])).rejects.toThrow(/malformed JSON in the response/);
    mode.value = 'wrong-count';
    await expect(s.score('p', ['x', 'y'])).rejects.toThrow(/returned 1 scores for 2 completions/);
    mode.value = 'slow';
    await expect(s.score('p', ['x'])).rejects.toThrow(/no answer within 300 ms \(timeout\)/);
    const port = await freePort();
    const dead = new HttpScorer(`http://127.0.0.1:${port}/score`, { concurrency: 1, timeoutMs: 1000, retries: 1, backoffMs: 5 });
    await expect(dead.score('p', ['x'])).rejects.toThrow(new RegExp(`127.0.0.1:${port}/score: gave up after 2 attempts \\(connection failed: ECONNREFUSED\\)`));
  });
});
