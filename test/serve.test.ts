import { describe, expect, it, beforeAll, afterAll, onTestFinished } from 'vitest';
import { spawn, ChildProcess } from 'node:child_process';
import * as path from 'node:path';
import * as net from 'node:net';
import { Rng } from '../src/util/rng.js';
import OpenAI from 'openai';
import { onlineFixture } from './helpers/online-fixture.js';
import { freePort } from './helpers/net.js';

/** The real CLI server on a free loopback port, talked to with the openai npm client. */
async function startServer(args: string[]): Promise<{ child: ChildProcess; url: string; stderr: () => string }> {
  const port = await freePort();
  const child = spawn(process.execPath, [path.resolve('bin/prefopt.js'), 'serve', '--port', String(port), ...args], { stdio: ['ignore', 'pipe', 'pipe'] });
  let err = '';
  child.stderr!.on('data', (c) => (err += c));
  await new Promise<void>((resolve, reject) => {
    child.stdout!.on('data', (c) => String(c).includes('listening on') && resolve());
    child.on('exit', (code) => reject(new Error(`server exited ${code}: ${err}`)));
  });
  return { child, url: `http://127.0.0.1:${port}`, stderr: () => err };
}

describe('prefopt serve', () => {
  let srv: Awaited<ReturnType<typeof startServer>>;
  let client: OpenAI;
  beforeAll(async () => {
    const f = await onlineFixture();
    srv = await startServer(['--model', f.base, '--api-key', 'sekret', '--max-queue', '2', '--max-body', '20000', '--name', 'tiny']);
    client = new OpenAI({ baseURL: `${srv.url}/v1`, apiKey: 'sekret', maxRetries: 0 });
  }, 60_000);
  afterAll(() => srv?.child.kill('SIGKILL'));

  it('lists the model and answers plain completions with usage and finish_reason; seeds reproduce text', async () => {
    const models = await client.models.list();
    expect(models.data.map((m) => m.id)).toEqual(['tiny']);
    const ask = () => client.chat.completions.create({ model: 'tiny', messages: [{ role: 'user', content: 'What is 1 plus 2?' }], max_tokens: 8, seed: 42, temperature: 1 });
    const a = await ask();
    const b = await ask();
    expect(a.choices[0].message.content).toBe(b.choices[0].message.content);
    expect(['stop', 'length']).toContain(a.choices[0].finish_reason);
    expect(a.usage!.prompt_tokens).toBeGreaterThan(5);
    expect(a.usage!.total_tokens).toBe(a.usage!.prompt_tokens + a.usage!.completion_tokens);
    const many = await client.chat.completions.create({ model: 'tiny', messages: [{ role: 'user', content: 'hi' }], max_tokens: 6, n: 3, seed: 1 });
    expect(many.choices.map((c) => c.index)).toEqual([0, 1, 2]);
  });

  it('streams chunks that add up to the plain answer; stop strings cut the text', async () => {
    const req = { model: 'tiny', messages: [{ role: 'user' as const, content: 'Say yes or no.' }], max_tokens: 10, seed: 7, temperature: 0 };
    const plain = await client.chat.completions.create(req);
    const stream = await client.chat.completions.create({ ...req, stream: true });
    let text = '';
    let finish: string | null = null;
    for await (const chunk of stream) {
      for (const c of chunk.choices) {
        text += c.delta?.content ?? '';
        finish = c.finish_reason ?? finish;
      }
    }
    expect(text).toBe(plain.choices[0].message.content);
    expect(finish).toBe(plain.choices[0].finish_reason);
    const full = plain.choices[0].message.content ?? '';
    if (full.length >= 3) {
      const cut = await client.chat.completions.create({ ...req, stop: [full.slice(1, 3)] });
      expect(cut.choices[0].message.content).toBe(full.slice(0, full.indexOf(full.slice(1, 3))));
      expect(cut.choices[0].finish_reason).toBe('stop');
    }
  });

  it('answers each error with its status and an OpenAI error object', async () => {
    const post = (body: string, key = 'sekret') => fetch(`${srv.url}/v1/chat/completions`, { method: 'POST', body, headers: { authorization: `Bearer ${key}`, 'content-type': 'application/json' } });
    const cases: [Promise<Response>, number, RegExp][] = [
      [post('{not json'), 400, /not valid JSON/],
      [post(JSON.stringify({ messages: [{ role: 'robot', content: 'x' }] })), 400, /messages\[0\]\.role/],
      [post(JSON.stringify({ messages: [{ role: 'user', content: 'x' }], temperature: 'hot' })), 400, /"temperature" must be/],
      [post(JSON.stringify({ messages: [{ role: 'user', content: 'x' }], max_tokens: 100000 })), 400, /exceeds the context length/],
      [post(JSON.stringify({ messages: [{ role: 'user', content: 'x'.repeat(30000) }] })), 413, /larger than 20000 bytes/],
      [post(JSON.stringify({ messages: [{ role: 'user', content: 'x' }] }), 'wrong'), 401, /API key/],
      [fetch(`${srv.url}/v1/models`), 401, /API key/],
    ];
    for (const [p, status, msg] of cases) {
      const r = await p;
      expect(r.status).toBe(status);
      const body = await r.json();
      expect(body.error.message).toMatch(msg);
      expect(body.error).toHaveProperty('type');
    }
    expect((await fetch(`${srv.url}/health`)).status).toBe(200);
  });

  it('queues a burst of concurrent requests; past the queue limit it answers 429', async () => {
    const one = (i: number) => client.chat.completions.create({ model: 'tiny', messages: [{ role: 'user', content: `q${i}` }], max_tokens: 24, seed: i }).then(() => 200, (e) => e.status as number);
    const codes = await Promise.all(Array.from({ length: 8 }, (_, i) => one(i)));
    expect(codes.filter((c) => c === 200).length).toBeGreaterThanOrEqual(3);
    expect(codes.every((c) => c === 200 || c === 429)).toBe(true);
    expect(codes).toContain(429);
  });

  it('SIGTERM finishes the request in flight, then exits', async () => {
    const p = client.chat.completions.create({ model: 'tiny', messages: [{ role: 'user', content: 'last' }], max_tokens: 40, seed: 3 });
    await new Promise((r) => setTimeout(r, 50));
    srv.child.kill('SIGTERM');
    const done = await p;
    expect(done.choices).toHaveLength(1);
    const code = await new Promise((r) => srv.child.on('exit', (c) => r(c)));
    expect(code).toBe(0);
  });
});

/** Random JSON values of every type, including the awkward ones. */
function randomValue(rng: Rng, depth = 0): unknown {
  const pick = rng.int(depth > 2 ? 9 : 12);
  const pool: unknown[] = [null, true, false, 0, -1, 1e308, -0.5, 3, 2.5, '', 'x', '\ud800 lone surrogate \u0000 nul \u202e'];
  if (pick < 9) return pool[rng.int(pool.length)];
  if (pick === 9) return 'é漢🙂'.repeat(1 + rng.int(50));
  if (pick === 10) return Array.from({ length: rng.int(4) }, () => randomValue(rng, depth + 1));
  return Object.fromEntries(Array.from({ length: rng.int(4) }, (_, i) => [['role', 'content', 'type', 'text', `k${i}`][rng.int(5)], randomValue(rng, depth + 1)]));
}

/** A request with one field replaced, removed, or a random key added, at any depth. */
function mutateObject(rng: Rng, o: any): any {
  const c = JSON.parse(JSON.stringify(o));
  const paths: (string | number)[][] = [];
  const walk = (x: any, p: (string | number)[]) => {
    paths.push(p);
    if (x && typeof x === 'object') for (const k of Object.keys(x)) walk(x[k], [...p, Array.isArray(x) ? Number(k) : k]);
  };
  walk(c, []);
  const p = paths[rng.int(paths.length)];
  if (p.length === 0) return randomValue(rng);
  const parent = p.slice(0, -1).reduce((x, k) => x[k], c);
  const key = p.at(-1)!;
  const op = rng.int(3);
  if (op === 0) parent[key] = randomValue(rng);
  else if (op === 1) Array.isArray(parent) ? parent.splice(Number(key), 1) : delete parent[key];
  else if (!Array.isArray(parent)) parent[`extra_${rng.int(100)}`] = randomValue(rng);
  return c;
}

/** The text with a few characters deleted, inserted or replaced. */
function mutateText(rng: Rng, t: string): string {
  const chars = [...t];
  const alphabet = ['{', '}', '[', ']', '"', ':', ',', '\\', '0', '-', 'e', 'n', ' ', '\u0000', '\ud83d', 'é'];
  for (let m = 1 + rng.int(3); m > 0; m--) {
    const i = rng.int(chars.length + 1);
    const op = rng.int(3);
    if (op === 0) chars.splice(i, 1);
    else if (op === 1) chars.splice(i, 0, alphabet[rng.int(alphabet.length)]);
    else chars[i] = alphabet[rng.int(alphabet.length)];
  }
  return chars.join('');
}

/** Raw HTTP over a socket: headers, part of a body, then hang up or stall. */
function rawRequest(port: number, head: string, body: string, o: { hangUpAfterMs?: number; waitMs: number }): Promise<string> {
  return new Promise((resolve) => {
    const sock = net.connect(port, '127.0.0.1');
    let got = '';
    sock.on('data', (d) => (got += d));
    sock.on('error', () => resolve(got));
    sock.on('close', () => resolve(got));
    sock.write(head + body);
    if (o.hangUpAfterMs !== undefined) setTimeout(() => sock.destroy(), o.hangUpAfterMs);
    setTimeout(() => (sock.destroy(), resolve(got)), o.waitMs);
  });
}

describe('prefopt serve under request fuzzing', () => {
  it('random bytes, mutated JSON, odd routes, hang-ups and stalled bodies: only 2xx/4xx, and the server keeps serving', async () => {
    const f = await onlineFixture();
    const srv = await startServer(['--model', f.base, '--api-key', 'k', '--max-body', '4000', '--timeout', '1000', '--max-queue', '4']);
    onTestFinished(() => void srv.child.kill('SIGKILL')); // also when an assertion fails
    const port = Number(new URL(srv.url).port);
    const auth = { authorization: 'Bearer k', 'content-type': 'application/json' };
    const valid = { model: 'm', messages: [{ role: 'system', content: 'be brief' }, { role: 'user', content: 'What is 1 plus 2?' }], max_tokens: 3, temperature: 0.7, top_p: 0.9, n: 2, stop: ['\n'], seed: 5, stream: false };
    const rng = new Rng(31337);
    const counts: Record<string, number> = {};
    const statuses: Record<number, number> = {};
    const send = async (kind: string, init: RequestInit & { path?: string }) => {
      counts[kind] = (counts[kind] ?? 0) + 1;
      const r = await fetch(`${srv.url}${init.path ?? '/v1/chat/completions'}`, init);
      await r.arrayBuffer();
      statuses[r.status] = (statuses[r.status] ?? 0) + 1;
      expect([200, 400, 401, 404, 405, 413, 429], `${kind}: ${r.status}`).toContain(r.status);
    };
    for (let i = 0; i < 150; i++) {
      const bytes = Buffer.from(Array.from({ length: rng.int(300) }, () => rng.int(256)));
      await send('random bytes', { method: 'POST', body: bytes, headers: auth });
    }
    for (let i = 0; i < 200; i++) await send('mutated JSON text', { method: 'POST', body: mutateText(rng, JSON.stringify({ ...valid, stream: rng.next() < 0.3 })), headers: auth });
    for (let i = 0; i < 250; i++) await send('mutated request fields', { method: 'POST', body: JSON.stringify(mutateObject(rng, valid)), headers: auth });
    // Concurrent bursts of mutated requests exercise the queue and 429.
    for (let b = 0; b < 5; b++) await Promise.all(Array.from({ length: 8 }, () => send('concurrent mutated', { method: 'POST', body: JSON.stringify(mutateObject(rng, valid)), headers: auth })));
    const methods = ['GET', 'PUT', 'DELETE', 'PATCH', 'POST', 'OPTIONS'];
    const paths = ['/', '/v1', '/v1/models', '/v1/chat/completions/', '/v1/chat/completions?x=1', '/%00', '/../../etc/passwd', '/health?' + 'a'.repeat(2000)];
    for (let i = 0; i < 40; i++) {
      const m = methods[rng.int(methods.length)];
      await send('odd method/route', { method: m, path: paths[rng.int(paths.length)], headers: rng.next() < 0.5 ? auth : {}, ...(m === 'GET' || m === 'OPTIONS' ? {} : { body: '{}' }) });
    }
    // Hang-ups: mid-body, and mid-stream after the first chunk; stalled bodies are cut at --timeout.
    const req = JSON.stringify({ ...valid, max_tokens: 40, stream: true });
    const head = (len: number) => `POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer k\r\nContent-Type: application/json\r\nContent-Length: ${len}\r\n\r\n`;
    let stalledCut = 0;
    for (let i = 0; i < 6; i++) {
      counts['hang-up mid-body'] = (counts['hang-up mid-body'] ?? 0) + 1;
      await rawRequest(port, head(req.length), req.slice(0, 10 + rng.int(req.length - 20)), { hangUpAfterMs: rng.int(20), waitMs: 100 });
      counts['hang-up mid-stream'] = (counts['hang-up mid-stream'] ?? 0) + 1;
      await rawRequest(port, head(req.length), req, { hangUpAfterMs: 5 + rng.int(30), waitMs: 100 });
    }
    for (let i = 0; i < 2; i++) {
      counts['stalled body'] = (counts['stalled body'] ?? 0) + 1;
      const t0 = Date.now();
      const got = await rawRequest(port, head(req.length), req.slice(0, 20), { waitMs: 5000 });
      if (/^HTTP\/1\.1 408/.test(got) && Date.now() - t0 < 4000) stalledCut++;
    }
    expect(stalledCut).toBe(2);
    // Still alive and still right.
    expect(srv.child.exitCode).toBeNull();
    expect((await fetch(`${srv.url}/health`)).status).toBe(200);
    const ok = await fetch(`${srv.url}/v1/chat/completions`, { method: 'POST', body: JSON.stringify(valid), headers: auth });
    expect(ok.status).toBe(200);
    expect((await ok.json()).choices).toHaveLength(2);
    expect(srv.stderr()).not.toMatch(/internal error/);
    expect(statuses[200]).toBeGreaterThan(20);
    expect(statuses[400]).toBeGreaterThan(100);
    const total = Object.values(counts).reduce((a, b) => a + b, 0);
    console.log(`serve fuzzing: ${total} requests — ${Object.entries(counts).map(([k, v]) => `${k} ${v}`).join(', ')}; statuses ${JSON.stringify(statuses)}`);
  }, 120_000);
});

describe('prefopt chat', () => {
  it('holds a two-turn conversation over piped stdin and leaves on /exit', async () => {
    const f = await onlineFixture();
    const child = spawn(process.execPath, [path.resolve('bin/prefopt.js'), 'chat', '--model', f.base, '--max-new-tokens', '6', '--temperature', '0'], { stdio: ['pipe', 'pipe', 'pipe'] });
    let out = '';
    child.stdout.on('data', (c) => (out += c));
    child.stdin.write('What is 1 plus 2?\n');
    child.stdin.write('/clear\n');
    child.stdin.write('And 3 plus 4?\n');
    child.stdin.write('/exit\n');
    const code = await new Promise((r) => child.on('exit', r));
    expect(code).toBe(0);
    expect((out.match(/assistant> /g) ?? []).length).toBe(2);
    expect(out).toContain('(history cleared)');
  }, 60_000);
});
