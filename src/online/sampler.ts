import PQueue from 'p-queue';
import { Decoder } from '../model/decoder.js';
import { TextTokenizer } from '../tokenizer/tokenizer.js';
import { Message } from '../tokenizer/chat.js';
import { generate } from '../infer/generate.js';
import { SamplingParams } from '../infer/sampling.js';
import { UserError, netReason } from '../util/errors.js';

/**
 * Where on-policy samples come from: the local model with its KV cache, or an OpenAI-compatible
 * endpoint (a vLLM server holding the policy and its adapter) for scale. Both return token ids
 * (completion + the stop token when one ended it) so the pairs train on exactly what was sampled.
 */
export interface SampleRequest {
  messages: Message[];
  promptIds: number[];
  /** One seed per sample. */
  seeds: number[];
}

export interface Sampled {
  text: string;
  ids: number[];
  finishReason: 'stop' | 'length';
}

export interface SampleSettings extends SamplingParams {
  maxNewTokens: number;
}

export interface Sampler {
  readonly kind: string;
  sample(reqs: SampleRequest[], s: SampleSettings): Promise<Sampled[][]>;
}

export class LocalSampler implements Sampler {
  readonly kind = 'local';
  constructor(
    private model: Decoder,
    private tok: TextTokenizer,
    private stopIds: number[],
    private padId: number,
    private maxBatch = 64,
  ) {}

  async sample(reqs: SampleRequest[], s: SampleSettings): Promise<Sampled[][]> {
    const out = generate(this.model, reqs.map((r) => ({ prompt: r.promptIds, seeds: r.seeds })), { ...s, stopIds: this.stopIds, padId: this.padId, maxBatch: this.maxBatch });
    return out.map((samples) =>
      samples.map((g) => ({ text: this.tok.decode(g.ids, true), ids: g.stopId !== undefined ? [...g.ids, g.stopId] : g.ids, finishReason: g.finishReason })),
    );
  }
}

export interface OpenAISamplerConfig {
  baseUrl: string;
  model: string;
  concurrency: number;
  timeoutMs: number;
  retries: number;
  apiKey?: string;
}

/**
 * POST {baseUrl}/chat/completions with n = K and a per-prompt seed; the text is tokenized back
 * with the policy's tokenizer (plus <|im_end|> when the server stopped on it).
 */
export class OpenAISampler implements Sampler {
  readonly kind = 'openai';
  private queue: PQueue;
  constructor(
    private cfg: OpenAISamplerConfig,
    private tok: TextTokenizer,
    private endId: number | undefined,
  ) {
    this.queue = new PQueue({ concurrency: cfg.concurrency });
  }

  async sample(reqs: SampleRequest[], s: SampleSettings): Promise<Sampled[][]> {
    return Promise.all(reqs.map((r) => this.queue.add(() => this.one(r, s)) as Promise<Sampled[]>));
  }

  private async one(r: SampleRequest, s: SampleSettings): Promise<Sampled[]> {
    const url = this.cfg.baseUrl.replace(/\/$/, '') + '/chat/completions';
    const body = JSON.stringify({
      model: this.cfg.model,
      messages: r.messages,
      n: r.seeds.length,
      seed: r.seeds[0],
      max_tokens: s.maxNewTokens,
      temperature: s.temperature,
      top_p: s.topP,
      ...(s.topK > 0 ? { top_k: s.topK } : {}),
      presence_penalty: s.presencePenalty,
      frequency_penalty: s.frequencyPenalty,
      ...(s.repetitionPenalty !== 1 ? { repetition_penalty: s.repetitionPenalty } : {}),
    });
    let last = '';
    for (let attempt = 0; attempt <= this.cfg.retries; attempt++) {
      if (attempt) await new Promise((res) => setTimeout(res, 200 * 2 ** (attempt - 1)));
      const ctl = new AbortController();
      const timer = setTimeout(() => ctl.abort(), this.cfg.timeoutMs);
      try {
        const res = await fetch(url, { method: 'POST', body, signal: ctl.signal, headers: { 'content-type': 'application/json', ...(this.cfg.apiKey ? { authorization: `Bearer ${this.cfg.apiKey}` } : {}) } });
        const text = await res.text();
        if (res.status >= 500) {
          last = `HTTP ${res.status}`;
          continue;
        }
        if (res.status !== 200) throw new UserError(`sampler ${url}: HTTP ${res.status}: ${text.slice(0, 200)}`);
        let json: any;
        try {
          json = JSON.parse(text);
        } catch {
          throw new UserError(`sampler ${url}: malformed JSON in the response`);
        }
        const choices = json?.choices;
        if (!Array.isArray(choices) || choices.length !== r.seeds.length) throw new UserError(`sampler ${url}: expected ${r.seeds.length} choices, got ${Array.isArray(choices) ? choices.length : 'none'}`);
        return [...choices]
          .sort((a, b) => (a.index ?? 0) - (b.index ?? 0))
          .map((c) => {
            const content = c?.message?.content;
            if (typeof content !== 'string') throw new UserError(`sampler ${url}: a choice has no message.content`);
            const finish = c.finish_reason === 'length' ? 'length' : 'stop';
            const ids = this.tok.encode(content);
            return { text: content, ids: finish === 'stop' && this.endId !== undefined ? [...ids, this.endId] : ids, finishReason: finish };
          });
      } catch (e: any) {
        if (e instanceof UserError) throw e;
        last = ctl.signal.aborted ? `timeout after ${this.cfg.timeoutMs} ms` : `connection failed: ${netReason(e)}`;
      } finally {
        clearTimeout(timer);
      }
    }
    throw new UserError(`sampler ${url}: unreachable after ${this.cfg.retries + 1} attempts (${last}); the run stays resumable`);
  }
}
