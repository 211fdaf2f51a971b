import { describe, expect, it, beforeAll, afterAll } from 'vitest';
import { spawn, ChildProcess } from 'node:child_process';
import * as path from 'node:path';
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
      [post(JSON.stringify({ messages: [{ role: 'user', content: 'x'.repeat(30000) }] })), 400, /larger than 20000 bytes/],
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
