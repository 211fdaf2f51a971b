import { Message, ROLES } from '../tokenizer/chat.js';

/**
 * OpenAI chat-completion requests, checked field by field; a problem becomes a 400 with an
 * OpenAI-style error object naming the parameter.
 */
export class ApiError extends Error {
  constructor(
    readonly status: number,
    message: string,
    readonly param: string | null = null,
    readonly type = status === 401 ? 'authentication_error' : status === 429 ? 'rate_limit_error' : status >= 500 ? 'server_error' : 'invalid_request_error',
  ) {
    super(message);
  }
  body(): unknown {
    return { error: { message: this.message, type: this.type, param: this.param, code: null } };
  }
}

export interface ChatRequest {
  messages: Message[];
  maxTokens: number;
  temperature: number;
  topP: number;
  topK: number;
  presencePenalty: number;
  frequencyPenalty: number;
  repetitionPenalty: number;
  stop: string[];
  n: number;
  seed: number | null;
  stream: boolean;
}

function num(body: any, key: string, dflt: number, check: (v: number) => boolean, want: string): number {
  const v = body[key];
  if (v === undefined || v === null) return dflt;
  if (typeof v !== 'number' || !Number.isFinite(v) || !check(v)) throw new ApiError(400, `"${key}" must be ${want}, got ${JSON.stringify(v)}`, key);
  return v;
}

export function parseChatRequest(body: any, defaults: { maxTokens: number; temperature: number; topP: number; topK: number; repetitionPenalty: number }): ChatRequest {
  if (!body || typeof body !== 'object' || Array.isArray(body)) throw new ApiError(400, 'the request body must be a JSON object');
  const msgs = body.messages;
  if (!Array.isArray(msgs) || msgs.length === 0) throw new ApiError(400, '"messages" must be a non-empty array', 'messages');
  const messages: Message[] = msgs.map((m: any, i: number) => {
    if (!m || typeof m !== 'object') throw new ApiError(400, `messages[${i}] must be an object`, `messages[${i}]`);
    if (!ROLES.has(m.role)) throw new ApiError(400, `messages[${i}].role must be system, user or assistant, got ${JSON.stringify(m.role)}`, `messages[${i}].role`);
    const c = m.content;
    if (typeof c === 'string') return { role: m.role, content: c };
    if (Array.isArray(c) && c.every((p: any) => p?.type === 'text' && typeof p.text === 'string')) return { role: m.role, content: c.map((p: any) => p.text).join('') };
    throw new ApiError(400, `messages[${i}].content must be a string`, `messages[${i}].content`);
  });
  const int = (v: number) => Number.isInteger(v);
  const maxTokens = num(body, 'max_tokens', num(body, 'max_new_tokens', num(body, 'max_completion_tokens', defaults.maxTokens, (v) => int(v) && v > 0, 'a positive integer'), (v) => int(v) && v > 0, 'a positive integer'), (v) => int(v) && v > 0, 'a positive integer');
  let stop: string[] = [];
  if (body.stop !== undefined && body.stop !== null) {
    if (typeof body.stop === 'string') stop = [body.stop];
    else if (Array.isArray(body.stop) && body.stop.length <= 4 && body.stop.every((s: any) => typeof s === 'string')) stop = body.stop;
    else throw new ApiError(400, '"stop" must be a string or an array of at most 4 strings', 'stop');
  }
  if (body.stream !== undefined && typeof body.stream !== 'boolean') throw new ApiError(400, '"stream" must be a boolean', 'stream');
  return {
    messages,
    maxTokens,
    temperature: num(body, 'temperature', defaults.temperature, (v) => v >= 0 && v <= 2, 'a number in [0, 2]'),
    topP: num(body, 'top_p', defaults.topP, (v) => v > 0 && v <= 1, 'a number in (0, 1]'),
    topK: num(body, 'top_k', defaults.topK, (v) => int(v) && v >= 0, 'an integer ≥ 0'),
    presencePenalty: num(body, 'presence_penalty', 0, (v) => v >= -2 && v <= 2, 'a number in [-2, 2]'),
    frequencyPenalty: num(body, 'frequency_penalty', 0, (v) => v >= -2 && v <= 2, 'a number in [-2, 2]'),
    repetitionPenalty: num(body, 'repetition_penalty', defaults.repetitionPenalty, (v) => v > 0, 'a positive number'),
    stop,
    n: num(body, 'n', 1, (v) => int(v) && v >= 1 && v <= 16, 'an integer in [1, 16]'),
    seed: body.seed === undefined || body.seed === null ? null : num(body, 'seed', 0, int, 'an integer'),
    stream: body.stream === true,
  };
}
