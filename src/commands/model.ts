import * as tf from '@tensorflow/tfjs-core';
import { ARCHS, Arch, PRESETS, PresetSpec, presetConfig, parseConfig, expectedShapes } from '../model/config.js';
import { initTensor } from '../model/decoder.js';
import { writeCheckpointFiles } from '../io/checkpoint.js';
import { dtypeFromName } from '../io/safetensors.js';
import { TextTokenizer } from '../tokenizer/tokenizer.js';
import { trainBpe } from '../tokenizer/bpe.js';
import { SPECIAL_TOKENS, writeTokenizerFiles } from '../tokenizer/files.js';
import { EOD, PAD } from '../tokenizer/chat.js';
import { readJsonl, readRecords, readText, toJsonl } from '../data/jsonl.js';
import { checkIds, completionText, encodePair, isMessages, promptText } from '../data/encode.js';
import { completionLogprobs } from '../infer/logprobs.js';
import { generate } from '../infer/generate.js';
import { DEFAULT_SAMPLING, SAMPLING_OPTIONS, SamplingParams, validateSampling } from '../infer/sampling.js';
import { valuesFrom } from '../util/schema.js';
import { UserError } from '../util/errors.js';
import { readJson, writeDirAtomic, writeFileAtomic } from '../util/fsutil.js';
import { deriveSeed } from '../util/rng.js';
import { log } from '../util/log.js';
import { openPolicy, openTokenizer, stopIdsOf } from '../model/policy.js';
import { checkJobFits, paramCount, parseBytes } from '../model/memory.js';
import { loadConfig } from '../io/checkpoint.js';

/** Train a byte-level BPE tokenizer on text files (plain text or JSON/JSONL with string fields). */
export async function trainTokenizer(opts: { data: string[]; vocabSize: number; out: string }): Promise<void> {
  const texts: string[] = [];
  for (const f of opts.data) {
    if (/\.jsonl?$/.test(f)) {
      const collect = (v: any): void => {
        if (typeof v === 'string') texts.push(v);
        else if (Array.isArray(v)) v.forEach(collect);
        else if (v && typeof v === 'object') Object.values(v).forEach(collect);
      };
      for (const r of readRecords(f)) collect(r.value);
    } else texts.push(...readText(f).split('\n'));
  }
  const json = trainBpe(texts, { vocabSize: opts.vocabSize, specialTokens: SPECIAL_TOKENS });
  await writeDirAtomic(opts.out, (dir) => writeTokenizerFiles(dir, json));
  log('tokenizer', { out: opts.out, vocab: Object.keys(json.model.vocab).length + SPECIAL_TOKENS.length });
}


export async function initModel(opts: { arch: string; preset?: string; config?: string; tokenizer: string; out: string; seed: number; dtype?: string; maxShardSize?: string }): Promise<void> {
  if (!(ARCHS as string[]).includes(opts.arch)) throw new UserError(`--arch must be one of ${ARCHS.join(', ')}, found "${opts.arch}"`);
  const tok = TextTokenizer.load(opts.tokenizer);
  let spec: PresetSpec;
  if (opts.config) spec = readJson(opts.config);
  else {
    const p = PRESETS[opts.preset ?? ''];
    if (!p) throw new UserError(`--preset must be one of ${Object.keys(PRESETS).join(', ')}, found "${opts.preset}"`);
    spec = p;
  }
  const special = { eos: tok.id(EOD) ?? null, pad: tok.id(PAD) ?? null, bos: null };
  const base = presetConfig(opts.arch as Arch, spec, tok.vocabSize, special);
  // A --config file may set any config.json field, but --arch decides the architecture and the
  // vocabulary must hold every tokenizer id.
  const raw = opts.config ? { ...base, ...spec, architectures: base.architectures, model_type: opts.arch, vocab_size: Math.max(spec.vocab_size ?? 0, tok.vocabSize) } : base;
  const cfg = parseConfig(raw, opts.config ?? `preset ${opts.preset}`);
  if (cfg.vocab_size < tok.vocabSize) throw new UserError(`vocab_size ${cfg.vocab_size} is smaller than the tokenizer's ${tok.vocabSize} ids`);
  const dtype = dtypeFromName(opts.dtype ?? 'f32');
  const maxShardBytes = opts.maxShardSize === undefined ? undefined : parseBytes(opts.maxShardSize);
  if (maxShardBytes === null) throw new UserError(`--max-shard-size: expected bytes such as 5GB or 2GiB, found "${opts.maxShardSize}"`);
  const generationConfig = { eos_token_id: tok.stopIds(), pad_token_id: special.pad, max_new_tokens: 256, do_sample: true, temperature: 1.0, top_k: 0, top_p: 1.0 };
  // A tensor at a time, straight to the file: a 7B model never exists whole in memory.
  const entries = [...expectedShapes(cfg)].map(([name, shape]) => ({ name, shape }));
  await writeDirAtomic(opts.out, (tmp) =>
    writeCheckpointFiles(tmp, cfg.raw, entries, (name) => initTensor(cfg, name, opts.seed).data, { dtype, maxShardBytes, copyFrom: opts.tokenizer, generationConfig }),
  );
  log('init-model', { out: opts.out, arch: cfg.arch, params: paramCount(cfg), vocab: cfg.vocab_size, dtype });
}

export interface LogprobsOptions {
  model: string;
  adapter?: string;
  input: string;
  out?: string;
  batchSize: number;
}

/** Parse logprobs input rows into token ids for the checkpoint in `dir`; every problem names file:line. */
export function logprobRows(tok: TextTokenizer | null, V: number, dir: string, file: string): { prompt: number[]; completion: number[] }[] {
  return readJsonl(file).map(({ line, value: r }) => {
    const where = `${file}:${line}`;
    if (!r || typeof r !== 'object' || Array.isArray(r)) throw new UserError(`${where}: expected a JSON object`);
    if ('prompt_ids' in r || 'completion_ids' in r) {
      return { prompt: checkIds(r.prompt_ids, V, where, 'prompt_ids'), completion: checkIds(r.completion_ids, V, where, 'completion_ids', true) };
    }
    if (!('prompt' in r) || !('completion' in r)) throw new UserError(`${where}: expected {"prompt_ids","completion_ids"} or {"prompt","completion"}`);
    if (!tok) throw new UserError(`${dir}: has no tokenizer.json, needed for text rows (${where})`);
    const pt = promptText(tok, r.prompt, where);
    const ct = completionText(tok, r.prompt, r.completion, where, 'completion');
    const ids = encodePair(tok, pt, ct);
    if (ids.prompt.length === 0) throw new UserError(`${where}: the prompt tokenizes to nothing; a completion needs a prefix to be scored`);
    return ids;
  });
}

export async function logprobsCmd(o: LogprobsOptions): Promise<void> {
  const tok = openTokenizer(o.model);
  const rows = logprobRows(tok, loadConfig(o.model).vocab_size, o.model, o.input);
  const len = Math.max(2, ...rows.map((r) => r.prompt.length + r.completion.length));
  checkJobFits(o.model, `logprobs on ${o.model}`, () => ({ kind: 'logprobs', rows: Math.min(o.batchSize, rows.length), len }));
  const p = openPolicy(o.model, { adapter: o.adapter, tok });
  const res = completionLogprobs(p.model, rows, { batchSize: o.batchSize, padId: p.padId });
  const text = toJsonl(res);
  if (o.out) writeFileAtomic(o.out, text);
  else process.stdout.write(text);
  log('logprobs', { rows: res.length, out: o.out ?? 'stdout' });
  p.model.dispose();
}

export interface GenerateCli extends SamplingParams {
  model: string;
  adapter?: string;
  prompt?: string;
  messages?: string;
  raw?: boolean;
  n: number;
  maxNewTokens: number;
  stop: string[];
  seed: number;
  json?: boolean;
}

/** Sampling settings: command-line values over the checkpoint's generation_config, range-checked. */
export function samplingFrom(gen: Record<string, any>, o: Record<string, any>): SamplingParams {
  const base: SamplingParams = {
    ...DEFAULT_SAMPLING,
    temperature: gen.do_sample === false ? 0 : gen.temperature ?? 1,
    topK: gen.top_k ?? 0,
    topP: gen.top_p ?? 1,
    repetitionPenalty: gen.repetition_penalty ?? 1,
  };
  return validateSampling(valuesFrom(SAMPLING_OPTIONS, o, base, 'flags'));
}

export async function generateCmd(o: GenerateCli): Promise<void> {
  const tok = openTokenizer(o.model);
  if (!tok) throw new UserError(`${o.model}: has no tokenizer.json, needed for generate`);
  let text: string;
  if (o.messages) {
    const m = readJson(o.messages);
    const msgs = isMessages(m) ? m : isMessages(m?.messages) ? m.messages : null;
    if (!msgs) throw new UserError(`${o.messages}: expected a list of {"role","content"} messages or {"messages": [...]}`);
    text = promptText(tok, msgs, o.messages);
  } else if (o.prompt !== undefined) {
    text = o.raw ? o.prompt : tok.applyChat([{ role: 'user', content: o.prompt }], true);
  } else throw new UserError('give --prompt TEXT or --messages FILE');
  const prompt = tok.encode(text);
  if (prompt.length === 0) throw new UserError('the prompt is empty');
  checkJobFits(o.model, `generate on ${o.model}`, () => ({ kind: 'generate', rows: o.n, len: prompt.length + o.maxNewTokens }));
  const p = openPolicy(o.model, { adapter: o.adapter, tok });
  if (prompt.length + o.maxNewTokens > p.model.cfg.max_position_embeddings) {
    log('warning', { prompt_tokens: prompt.length, max_new_tokens: o.maxNewTokens, context: p.model.cfg.max_position_embeddings }, 'prompt + max_new_tokens exceeds the context length');
  }
  const seeds = Array.from({ length: o.n }, (_, k) => deriveSeed(o.seed, 'generate', k));
  const sampling = samplingFrom(p.gen, o);
  const res = generate(p.model, [{ prompt, seeds }], {
    ...sampling,
    maxNewTokens: o.maxNewTokens,
    stopIds: stopIdsOf(p),
    stop: o.stop,
    decode: (ids) => tok.decode(ids, true),
    padId: p.padId,
  })[0];
  if (o.json) {
    process.stdout.write(JSON.stringify({ prompt_tokens: prompt.length, prompt_ids: prompt, samples: res.map((s) => ({ text: s.text, completion_tokens: s.ids.length, completion_ids: s.ids, finish_reason: s.finishReason })) }) + '\n');
  } else {
    res.forEach((s, k) => process.stdout.write((o.n > 1 ? `--- sample ${k} (${s.finishReason})\n` : '') + s.text + '\n'));
  }
  p.model.dispose();
  tf.disposeVariables();
}
