import * as http from 'node:http';
import { createHash, randomBytes, timingSafeEqual } from 'node:crypto';
import PQueue from 'p-queue';
import { Policy, needTokenizer, stopIdsOf } from '../model/policy.js';
import { generateSteps } from '../infer/generate.js';
import { deriveSeed } from '../util/rng.js';
import { ApiError, ChatRequest, parseChatRequest } from './validate.js';
import { log } from '../util/log.js';

/** Thrown when the client hung up: nothing is left to answer. */
const CLIENT_GONE = Symbol('client gone');

/**
 * An OpenAI-compatible server for a prefopt checkpoint: POST /v1/chat/completions (plain and
 * streamed as server-sent events), GET /v1/models, GET /health. Requests queue behind one model
 * (p-queue); a full queue answers 429; a wrong key 401; bad input 400 with OpenAI's error shape.
 * Generation yields between decode steps, so streams flow and the process stays responsive.
 */
export interface ServeOptions {
  host: string;
  port: number;
  apiKey?: string;
  concurrency: number;
  maxQueue: number;
  maxBodyBytes: number;
  modelName: string;
  requestTimeoutMs: number;
}

/** OpenAI's usage block: prompt tokens once, completion tokens over all n samples. */
function usage(prompt: number[], samples: { ids: number[] }[]) {
  const completion = samples.reduce((a, s) => a + s.ids.length, 0);
  return { prompt_tokens: prompt.length, completion_tokens: completion, total_tokens: prompt.length + completion };
}

export class ChatServer {
  readonly server: http.Server;
  private queue: PQueue;
  private closing = false;

  constructor(
    private policy: Policy,
    private o: ServeOptions,
  ) {
    needTokenizer(policy, 'serving chat');
    this.queue = new PQueue({ concurrency: o.concurrency });
    // Node checks request timeouts every connectionsCheckingInterval (30 s by default): check
    // often enough that a slow client is cut off near --timeout, not up to 30 s later.
    this.server = http.createServer({ connectionsCheckingInterval: Math.max(50, Math.min(30_000, o.requestTimeoutMs / 4)) }, (req, res) => {
      // A client that hangs up mid-request must not take the process down with it.
      req.on('error', () => res.destroy());
      res.on('error', () => res.destroy());
      this.handle(req, res).catch((e) => {
        if (e === CLIENT_GONE || res.destroyed) return void res.destroy();
        this.fail(res, e instanceof ApiError ? e : new ApiError(500, `internal error: ${e?.message ?? e}`));
      });
    });
    this.server.requestTimeout = o.requestTimeoutMs;
    this.server.headersTimeout = Math.min(o.requestTimeoutMs, 60_000);
  }

  listen(): Promise<{ host: string; port: number }> {
    return new Promise((resolve, reject) => {
      this.server.once('error', reject);
      this.server.listen(this.o.port, this.o.host, () => {
        const a = this.server.address() as { address: string; port: number };
        resolve({ host: a.address, port: a.port });
      });
    });
  }

  /** Stop accepting, finish what is in flight and queued, then resolve. */
  async shutdown(): Promise<void> {
    this.closing = true;
    const closed = new Promise<void>((r) => this.server.close(() => r()));
    await this.queue.onIdle();
    this.server.closeIdleConnections?.();
    await closed;
  }

  private authorised(req: http.IncomingMessage): boolean {
    if (!this.o.apiKey) return true;
    const h = String(req.headers.authorization ?? '');
    const got = h.startsWith('Bearer ') ? h.slice(7) : '';
    // Compare digests in constant time: the key's length does not leak either.
    const a = createHash('sha256').update(got).digest();
    const b = createHash('sha256').update(this.o.apiKey).digest();
    return timingSafeEqual(a, b);
  }

  private async readBody(req: http.IncomingMessage): Promise<any> {
    const tooLarge = () => new ApiError(413, `the request body is larger than ${this.o.maxBodyBytes} bytes`);
    if (Number(req.headers['content-length'] ?? 0) > this.o.maxBodyBytes) throw tooLarge();
    const chunks: Buffer[] = [];
    let size = 0;
    try {
      for await (const c of req) {
        size += (c as Buffer).length;
        if (size > this.o.maxBodyBytes) throw tooLarge();
        chunks.push(c as Buffer);
      }
    } catch (e) {
      throw e instanceof ApiError ? e : CLIENT_GONE;
    }
    try {
      return JSON.parse(Buffer.concat(chunks).toString('utf8'));
    } catch (e: any) {
      throw new ApiError(400, `the request body is not valid JSON (${e.message})`);
    }
  }

  private async handle(req: http.IncomingMessage, res: http.ServerResponse): Promise<void> {
    const url = (req.url ?? '/').split('?')[0];
    if (req.method === 'GET' && url === '/health') return this.json(res, 200, { status: this.closing ? 'shutting_down' : 'ok', queued: this.queue.size, running: this.queue.pending });
    if (!this.authorised(req)) throw new ApiError(401, 'invalid or missing API key (Authorization: Bearer …)');
    if (req.method === 'GET' && url === '/v1/models') return this.json(res, 200, { object: 'list', data: [{ id: this.o.modelName, object: 'model', created: 0, owned_by: 'prefopt' }] });
    if (url !== '/v1/chat/completions') throw new ApiError(404, `no route ${req.method} ${url}`);
    if (req.method !== 'POST') throw new ApiError(405, `${url} takes POST`);
    if (this.closing) throw new ApiError(503, 'the server is shutting down');
    const body = await this.readBody(req);
    const gen = this.policy.gen;
    const r = parseChatRequest(body, { maxTokens: gen.max_new_tokens ?? 256, temperature: gen.do_sample === false ? 0 : gen.temperature ?? 1, topP: gen.top_p ?? 1, topK: gen.top_k ?? 0, repetitionPenalty: gen.repetition_penalty ?? 1 });
    const tok = this.policy.tok!;
    const prompt = tok.encode(tok.applyChat(r.messages, true));
    const ctx = this.policy.model.cfg.max_position_embeddings;
    if (prompt.length + r.maxTokens > ctx) throw new ApiError(400, `the prompt (${prompt.length} tokens) plus max_tokens (${r.maxTokens}) exceeds the context length (${ctx})`, 'messages');
    if (this.queue.size >= this.o.maxQueue) throw new ApiError(429, `the queue is full (${this.o.maxQueue} waiting); retry later`);
    await this.queue.add(() => (r.stream ? this.stream(res, r, prompt) : this.complete(res, r, prompt)));
  }

  private seeds(r: ChatRequest): number[] {
    const base = r.seed ?? randomBytes(4).readUInt32LE(0);
    return Array.from({ length: r.n }, (_, k) => deriveSeed(base, 'serve', k));
  }

  private genOpts(r: ChatRequest, onToken?: (req: number, sample: number, id: number) => void) {
    const tok = this.policy.tok!;
    return {
      temperature: r.temperature,
      topK: r.topK,
      topP: r.topP,
      repetitionPenalty: r.repetitionPenalty,
      presencePenalty: r.presencePenalty,
      frequencyPenalty: r.frequencyPenalty,
      maxNewTokens: r.maxTokens,
      stopIds: stopIdsOf(this.policy),
      stop: r.stop,
      decode: (ids: number[]) => tok.decode(ids, true),
      padId: this.policy.padId,
      onToken,
    };
  }

  /** Generate for one request; stops early (CLIENT_GONE) once the client has hung up. */
  private async run(res: http.ServerResponse, r: ChatRequest, prompt: number[], onToken?: (req: number, sample: number, id: number) => void) {
    const it = generateSteps(this.policy.model, [{ prompt, seeds: this.seeds(r) }], this.genOpts(r, onToken));
    try {
      for (;;) {
        if (res.destroyed) throw CLIENT_GONE;
        const s = it.next();
        if (s.done) return s.value[0];
        await new Promise((ok) => setImmediate(ok)); // let sockets and other requests breathe
      }
    } finally {
      it.return?.(undefined as any);
    }
  }

  private async complete(res: http.ServerResponse, r: ChatRequest, prompt: number[]): Promise<void> {
    const samples = await this.run(res, r, prompt);
    this.json(res, 200, {
      id: `chatcmpl-${randomBytes(12).toString('hex')}`,
      object: 'chat.completion',
      created: Math.floor(Date.now() / 1000),
      model: this.o.modelName,
      choices: samples.map((s, i) => ({ index: i, message: { role: 'assistant', content: s.text ?? '' }, finish_reason: s.finishReason, logprobs: null })),
      usage: usage(prompt, samples),
    });
  }

  private async stream(res: http.ServerResponse, r: ChatRequest, prompt: number[]): Promise<void> {
    const tok = this.policy.tok!;
    const id = `chatcmpl-${randomBytes(12).toString('hex')}`;
    const created = Math.floor(Date.now() / 1000);
    res.writeHead(200, { 'content-type': 'text/event-stream', 'cache-control': 'no-cache', connection: 'keep-alive' });
    const send = (choices: unknown[], usage?: unknown) => res.write(`data: ${JSON.stringify({ id, object: 'chat.completion.chunk', created, model: this.o.modelName, choices, ...(usage ? { usage } : {}) })}\n\n`);
    for (let i = 0; i < r.n; i++) send([{ index: i, delta: { role: 'assistant', content: '' }, finish_reason: null }]);
    const ids: number[][] = Array.from({ length: r.n }, () => []);
    const shown = new Array<number>(r.n).fill(0);
    // Stream decoded text as it grows; hold back anything that could still become a stop string.
    const hold = Math.max(0, ...r.stop.map((s) => s.length - 1));
    const samples = await this.run(res, r, prompt, (_q, k, tid) => {
      ids[k].push(tid);
      const text = tok.decode(ids[k], true);
      if (text.endsWith('\ufffd')) return; // an incomplete UTF-8 sequence: wait for the rest
      if (r.stop.some((s) => text.includes(s))) return;
      const safe = text.length - hold;
      if (safe > shown[k]) {
        send([{ index: k, delta: { content: text.slice(shown[k], safe) }, finish_reason: null }]);
        shown[k] = safe;
      }
    });
    samples.forEach((s, k) => {
      const text = s.text ?? '';
      if (text.length > shown[k]) send([{ index: k, delta: { content: text.slice(shown[k]) }, finish_reason: null }]);
      send([{ index: k, delta: {}, finish_reason: s.finishReason }]);
    });
    send([], usage(prompt, samples));
    res.end('data: [DONE]\n\n');
  }

  private json(res: http.ServerResponse, status: number, body: unknown): void {
    const text = JSON.stringify(body);
    res.writeHead(status, { 'content-type': 'application/json', 'content-length': Buffer.byteLength(text) });
    res.end(text);
  }

  private fail(res: http.ServerResponse, e: ApiError): void {
    if (e.status >= 500) log('error', { message: e.message });
    if (res.headersSent) {
      res.end();
      return;
    }
    this.json(res, e.status, e.body());
  }
}
