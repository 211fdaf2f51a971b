import PQueue from 'p-queue';
import { UserError, netReason } from '../src/util/errors.js';
import { Prompt, PromptRow, Scorer, checkScores, promptLabel } from './scorer.js';

/**
 * A reward-model server over HTTP (`http:URL`). Protocol:
 *   POST URL  {"prompt": string | [{"role","content"}], "completions": [string, ...]}
 *   200       {"scores": [number, ...]}            (one per completion, same order)
 * At most `concurrency` requests are in flight; each has a timeout; 5xx answers and connection
 * errors are retried with exponential backoff; anything else malformed is a clear error.
 */
export interface HttpScorerOptions {
  concurrency: number;
  timeoutMs: number;
  retries: number;
  backoffMs: number;
  headers?: Record<string, string>;
}

export const DEFAULT_HTTP: HttpScorerOptions = { concurrency: 4, timeoutMs: 30_000, retries: 4, backoffMs: 200 };

class Retryable extends Error {}

export class HttpScorer implements Scorer {
  readonly name: string;
  readonly version: string;
  private queue: PQueue;
  /** Highest number of requests seen in flight (for tests and logs). */
  maxInFlight = 0;
  private inFlight = 0;

  constructor(
    readonly url: string,
    readonly opts: HttpScorerOptions = DEFAULT_HTTP,
  ) {
    try {
      const u = new URL(url);
      if (u.protocol !== 'http:' && u.protocol !== 'https:') throw new Error();
    } catch {
      throw new UserError(`scorer http:${url}: not an http(s) URL`);
    }
    this.name = `http:${url}`;
    this.version = '1';
    this.queue = new PQueue({ concurrency: opts.concurrency });
  }

  score(prompt: Prompt, completions: string[], _row?: PromptRow): Promise<number[]> {
    return this.queue.add(() => this.request(prompt, completions)) as Promise<number[]>;
  }

  private async request(prompt: Prompt, completions: string[]): Promise<number[]> {
    const body = JSON.stringify({ prompt, completions });
    const what = promptLabel(prompt);
    let last = '';
    for (let attempt = 0; attempt <= this.opts.retries; attempt++) {
      if (attempt > 0) await sleep(this.opts.backoffMs * 2 ** (attempt - 1));
      try {
        return await this.once(body, completions.length, what);
      } catch (e: any) {
        if (!(e instanceof Retryable)) throw e;
        last = e.message;
      }
    }
    throw new UserError(`${this.url}: gave up after ${this.opts.retries + 1} attempts (${last})`);
  }

  private async once(body: string, n: number, what: string): Promise<number[]> {
    this.inFlight++;
    this.maxInFlight = Math.max(this.maxInFlight, this.inFlight);
    const ctl = new AbortController();
    const timer = setTimeout(() => ctl.abort(), this.opts.timeoutMs);
    try {
      let res: Response;
      try {
        res = await fetch(this.url, { method: 'POST', body, headers: { 'content-type': 'application/json', ...this.opts.headers }, signal: ctl.signal });
      } catch (e: any) {
        if (ctl.signal.aborted) throw new UserError(`${this.url}: no answer within ${this.opts.timeoutMs} ms (timeout) for ${what}`);
        throw new Retryable(`connection failed: ${netReason(e)}`);
      }
      let text: string;
      try {
        text = await res.text();
      } catch (e: any) {
        if (ctl.signal.aborted) throw new UserError(`${this.url}: no answer within ${this.opts.timeoutMs} ms (timeout) for ${what}`);
        throw new Retryable(`reading the response failed: ${e?.message ?? e}`);
      }
      if (res.status >= 500) throw new Retryable(`HTTP ${res.status}`);
      if (res.status !== 200) throw new UserError(`${this.url}: HTTP ${res.status} for ${what}: ${text.slice(0, 200)}`);
      let json: any;
      try {
        json = JSON.parse(text);
      } catch {
        throw new UserError(`${this.url}: malformed JSON in the response for ${what}: ${JSON.stringify(text.slice(0, 80))}`);
      }
      return checkScores(json?.scores, n, this.url, what);
    } finally {
      clearTimeout(timer);
      this.inFlight--;
    }
  }

  async close(): Promise<void> {
    await this.queue.onIdle();
  }
}

function sleep(ms: number): Promise<void> {
  return new Promise((r) => setTimeout(r, ms));
}
