import * as readline from 'node:readline';
import { openPolicy, needTokenizer, stopIdsOf } from '../model/policy.js';
import { ChatServer } from '../serve/server.js';
import { generateSteps } from '../infer/generate.js';
import { SamplingParams } from '../infer/sampling.js';
import { Message } from '../tokenizer/chat.js';
import { deriveSeed } from '../util/rng.js';
import { log } from '../util/log.js';
import { samplingFrom } from './model.js';
import * as path from 'node:path';

export async function serveCmd(o: Record<string, any>): Promise<void> {
  const policy = openPolicy(o.model, { adapter: o.adapter });
  const srv = new ChatServer(policy, {
    host: o.host,
    port: o.port,
    apiKey: o.apiKey ?? process.env.PREFOPT_API_KEY,
    concurrency: o.concurrency,
    maxQueue: o.maxQueue,
    maxBodyBytes: o.maxBody,
    modelName: o.name ?? path.basename(path.resolve(o.model)),
    requestTimeoutMs: o.timeout,
  });
  const at = await srv.listen();
  log('serve', { url: `http://${at.host}:${at.port}/v1`, model: o.model, adapter: o.adapter ?? null });
  process.stdout.write(`listening on http://${at.host}:${at.port}\n`);
  await new Promise<void>((resolve) => {
    const stop = (sig: string) => {
      log('serve', { signal: sig }, 'finishing in-flight requests, then exiting');
      srv.shutdown().then(resolve);
    };
    process.once('SIGTERM', () => stop('SIGTERM'));
    process.once('SIGINT', () => stop('SIGINT'));
  });
}

/**
 * Terminal chat: tokens are printed as they are generated; /clear resets the history, /exit
 * leaves; the oldest turns are dropped (with a notice) when the history outgrows the context.
 */
export async function chatCmd(o: Record<string, any> & Partial<SamplingParams>): Promise<void> {
  const policy = openPolicy(o.model, { adapter: o.adapter });
  const tok = needTokenizer(policy, 'chat');
  const sampling = samplingFrom(policy.gen, o);
  const ctx = policy.model.cfg.max_position_embeddings;
  const system: Message[] = o.system ? [{ role: 'system', content: o.system }] : [];
  let history: Message[] = [];
  const out = process.stdout;
  const rl = readline.createInterface({ input: process.stdin, terminal: false });
  const lines = rl[Symbol.asyncIterator]();
  let turn = 0;
  const ask = () => out.write('you> ');
  ask();
  for (;;) {
    const next = await lines.next();
    if (next.done) break;
    const line = next.value.trim();
    if (!line) {
      ask();
      continue;
    }
    if (line === '/exit' || line === '/quit') break;
    if (line === '/clear') {
      history = [];
      out.write('(history cleared)\n');
      ask();
      continue;
    }
    history.push({ role: 'user', content: line });
    let prompt = tok.encode(tok.applyChat([...system, ...history], true));
    while (prompt.length + o.maxNewTokens > ctx && history.length > 1) {
      history.splice(0, history[0].role === 'user' && history[1]?.role === 'assistant' ? 2 : 1);
      out.write('(the oldest turn was dropped to fit the context)\n');
      prompt = tok.encode(tok.applyChat([...system, ...history], true));
    }
    out.write('assistant> ');
    const ids: number[] = [];
    let shown = 0;
    const it = generateSteps(policy.model, [{ prompt, seeds: [deriveSeed(o.seed, 'chat', turn++)] }], {
      ...sampling,
      maxNewTokens: o.maxNewTokens,
      stopIds: stopIdsOf(policy),
      padId: policy.padId,
      decode: (x) => tok.decode(x, true),
      onToken: (_r, _s, id) => {
        ids.push(id);
        const text = tok.decode(ids, true);
        if (!text.endsWith('\ufffd') && text.length > shown) {
          out.write(text.slice(shown));
          shown = text.length;
        }
      },
    });
    let res;
    for (;;) {
      const s = it.next();
      if (s.done) {
        res = s.value[0][0];
        break;
      }
      await new Promise((r) => setImmediate(r));
    }
    const text = res.text ?? '';
    if (text.length > shown) out.write(text.slice(shown));
    out.write('\n');
    history.push({ role: 'assistant', content: text });
    ask();
  }
  out.write('\n');
  rl.close();
  policy.model.dispose();
}
