/**
 * `npm run bench`: speed and memory of prefopt's hot paths on a ~5M-parameter model, measured
 * side by side in ONE run, appended to bench/RESULTS.md with the date, backend and machine.
 * A PyTorch reference of the same steps runs when /usr/bin/python3 has torch (bench/torch_ref.py);
 * otherwise it is skipped with a notice and ratios are null. `--json` prints one JSON object last.
 */
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { spawnSync } from 'node:child_process';
import * as tf from '@tensorflow/tfjs-core';
import { initBackend } from '../src/engine/backend.js';
import { fusedActive, setFused } from '../src/engine/fused.js';
import { packageRoot } from '../src/util/package-root.js';
import { Decoder } from '../src/model/decoder.js';
import { PRESETS, parseConfig, presetConfig } from '../src/model/config.js';
import { makeBatch } from '../src/infer/batch.js';
import { sftLoss, trainedTokens } from '../src/stages/sft.js';
import { AdamW } from '../src/train/adamw.js';
import { pairBatch, sequenceLogps } from '../src/dpo/logps.js';
import { generate } from '../src/infer/generate.js';
import { DEFAULT_SAMPLING } from '../src/infer/sampling.js';
import { rewardModelFrom, rewards } from '../rm/bt.js';
import { saveModel } from '../src/model/load.js';
import { openDb, tx } from '../src/store/db.js';
import { Rng } from '../src/util/rng.js';
import { dpoStepOf, loraDpoStepOf, sftStepOf, timeIt } from './steps.js';

const json = process.argv.includes('--json');
const quick = process.argv.includes('--quick');
const say = (s: string) => process.stderr.write(s + '\n');

let peakRss = 0;
const rssTimer = setInterval(() => (peakRss = Math.max(peakRss, process.memoryUsage().rss)), 20);

async function main() {
  const b = await initBackend();
  const V = 2048;
  const cfg = parseConfig(presetConfig('qwen2', PRESETS['5m'], V, {}));
  const B = 8;
  const T = 128;
  const rng = new Rng(0);
  const rows = Array.from({ length: B }, () => ({ ids: Array.from({ length: T }, () => rng.int(V)), weights: Array(T).fill(1) }));
  const sb = makeBatch(rows);
  const reps = quick ? 1 : 5;
  const tokens: Record<string, number> = {};
  const extra: Record<string, number> = {};

  // The GEMM rate of the active matmul kernel: one 1024³ product.
  {
    extra.gemm_gflops = +(gemmRate((f) => timeIt(f, quick ? 3 : 10)) / 1e9).toFixed(1);
    say(`GEMM 1024³: ${extra.gemm_gflops} GFLOP/s (${b.native.active ? b.native.reason : 'tfjs kernel'})`);
  }

  // Forward (no grad) and SFT step (forward + backward + AdamW), full model.
  const model = Decoder.init(cfg, 0);
  const params = model.paramCount();
  say(`model: qwen2 ${params} params, batch ${B}x${T}, backend ${b.chosen}`);
  tokens.forward = (B * T) / timeIt(() => tf.tidy(() => sftLoss(model, sb)).dispose(), reps);
  const sft = sftStepOf(model, sb);
  const sftStep = sft.step;
  const rssBefore = process.memoryUsage().rss;
  tokens.sft_step = (B * T) / timeIt(sftStep, reps);
  const profile = kernelProfile(sftStep);
  const fwdFlops = forwardFlopsPerToken(cfg, T);
  // SFT: forward + backward (2x) = 3x the forward's FLOPs.
  const pairedSft = pairedMfu(sftStep, 3 * fwdFlops * B * T, quick ? 2 : 5);
  if (fusedActive()) {
    // The same step with the fused kernels off (tfjs compositions, native matmul still on).
    setFused(false);
    extra.sft_step_unfused = +((B * T) / timeIt(sftStep, reps)).toFixed(1);
    setFused(true);
  }
  extra.sft_rss_mb = Math.round(Math.max(peakRss, process.memoryUsage().rss) / 2 ** 20);
  sft.dispose();
  say(`forward ${tokens.forward.toFixed(0)} tok/s, SFT step ${tokens.sft_step.toFixed(0)} tok/s`);

  // DPO step with LoRA (policy pass + reference pass with the adapter off) vs full-model DPO.
  model.setTrainable(false);
  const pairs = Array.from({ length: B / 2 }, () => ({ prompt: rows[0].ids.slice(0, 64), chosen: Array.from({ length: 64 }, () => rng.int(V)), rejected: Array.from({ length: 64 }, () => rng.int(V)), where: '' }));
  const pb = pairBatch(pairs, 0);
  const lora = loraDpoStepOf(model, pb);
  const lp = lora.params;
  const loraStep = lora.step;
  const dpoTokens = pb.batch * pb.len;
  tokens.dpo_step_lora = dpoTokens / timeIt(loraStep, reps);
  // LoRA DPO: the reference forward (base model), the policy's forward (base and adapter) and
  // its backward: input gradients only through the frozen weights, input and weight gradients
  // through the adapter. Each adapter weight takes one multiply-add per token forward, so the
  // adapter adds 2·(its parameters) FLOPs per token forward and twice that backward.
  // The LM head and its log-softmax run only where a token is scored (the completions, half of
  // the positions here): the FLOPs counted are the ones the step needs.
  const adapterFlops = 2 * [...lp.values()].reduce((a, v) => a + v.size, 0);
  const headFlops = 2 * cfg.hidden_size * cfg.vocab_size;
  const dpoFlops = 3 * (fwdFlops - headFlops + adapterFlops) + (3 * headFlops * trainedTokens(pb)) / dpoTokens;
  const pairedDpo = pairedMfu(loraStep, dpoFlops * dpoTokens, quick ? 2 : 5);
  const loraTensorsMb = (tf.memory().numBytes / 2 ** 20);
  lora.dispose();
  // Full-model DPO needs a second copy of the weights as the frozen reference.
  const refModel = Decoder.init(cfg, 0);
  model.setTrainable(true);
  const fopt = new AdamW({ beta1: 0.9, beta2: 0.95, eps: 1e-8, weightDecay: 0 }, model.params);
  tokens.dpo_step_full = dpoTokens / timeIt(dpoStepOf(model, pb, model.params, fopt, 1e-5, () => sequenceLogps(refModel, pb)), reps);
  const fullTensorsMb = tf.memory().numBytes / 2 ** 20;
  extra.dpo_lora_tensor_mb = +loraTensorsMb.toFixed(1);
  extra.dpo_full_tensor_mb = +fullTensorsMb.toFixed(1);
  fopt.dispose();
  refModel.dispose();
  say(`DPO step: LoRA ${tokens.dpo_step_lora.toFixed(0)} tok/s (${loraTensorsMb.toFixed(1)} MB of tensors), full ${tokens.dpo_step_full.toFixed(0)} tok/s (${fullTensorsMb.toFixed(1)} MB)`);

  // Sampling with the KV cache: 4 prompts × K = 4 answers × 64 new tokens.
  model.setTrainable(false);
  const reqs = Array.from({ length: 4 }, (_, i) => ({ prompt: rows[i].ids.slice(0, 32), seeds: [1, 2, 3, 4].map((s) => s + 10 * i) }));
  const newTok = quick ? 16 : 64;
  const gt = timeIt(() => void generate(model, reqs, { ...DEFAULT_SAMPLING, maxNewTokens: newTok, stopIds: [] }), 1);
  tokens.sampling = (16 * newTok) / gt;
  say(`sampling ${tokens.sampling.toFixed(0)} new tok/s (4 prompts x 4 samples)`);

  // Reward-model scoring throughput.
  const rm = rewardModelFrom(model, 0);
  const rsb = makeBatch(Array.from({ length: 16 }, (_, i) => ({ ids: rows[i % B].ids.slice(0, 96), weights: [] })));
  const rmt = timeIt(() => tf.tidy(() => rewards(rm, rsb)).dataSync(), reps);
  extra.rm_samples_per_s = +(16 / rmt).toFixed(1);
  say(`reward model: ${extra.rm_samples_per_s} samples/s (96 tokens each)`);

  // Store: rows/s of sample inserts in transactions.
  const dbDir = fs.mkdtempSync(path.join(os.tmpdir(), 'prefopt-bench-'));
  const db = openDb(path.join(dbDir, 'b.db'));
  db.exec("INSERT INTO runs (name) VALUES ('b'); INSERT INTO stages (run_id, name, kind, status) VALUES (1, 's', 'online_dpo', 'running'); INSERT INTO rounds (stage_id, round, step) VALUES (1, 1, 'sample')");
  const insP = db.prepare("INSERT INTO prompts (stage_id, idx, prompt_json, prompt_ids) VALUES (1, ?, '{}', '[]')");
  tx(db, () => { for (let i = 0; i < 2000; i++) insP.run(i); });
  const ins = db.prepare("INSERT INTO samples (round_id, prompt_id, k, text, token_ids, finish_reason, sampler_json, seed) VALUES (1, ?, ?, 'some sampled text of moderate length', '[1,2,3,4,5,6,7,8]', 'stop', '{}', 0)");
  const st0 = performance.now();
  for (let p = 1; p <= 2000; p += 16) tx(db, () => { for (let q = p; q < p + 16 && q <= 2000; q++) for (let k = 0; k < 4; k++) ins.run(q, k); });
  extra.store_rows_per_s = Math.round(8000 / ((performance.now() - st0) / 1000));
  db.close();
  say(`store: ${extra.store_rows_per_s} sample rows/s (transactions of 64 rows)`);

  // Merge peak memory: three checkpoints of ~50 MB each, TIES, streamed.
  const mcfg = parseConfig(presetConfig('llama', { hidden_size: 512, intermediate_size: 1408, num_hidden_layers: 6, num_attention_heads: 8, num_key_value_heads: 8, max_position_embeddings: 512, rope_theta: 10000, tie_word_embeddings: false }, 4096, {}));
  const dirs: string[] = [];
  for (const s of [0, 1, 2]) {
    const m = Decoder.init(mcfg, s);
    dirs.push(path.join(dbDir, `m${s}`));
    await saveModel(m, dirs.at(-1)!);
    m.dispose();
  }
  const ckptMb = fs.statSync(path.join(dirs[0], 'model.safetensors')).size / 2 ** 20;
  model.dispose();
  rm.dispose();
  // Peak RSS of a merge process against a process that only loads the same code.
  const child = path.join(path.dirname(new URL(import.meta.url).pathname), 'merge-child.js');
  const peak = (args: string[]) => JSON.parse(spawnSync(process.execPath, ['--expose-gc', child, ...args], { encoding: 'utf8' }).stdout.trim()).maxRssMb as number;
  const baseline = peak([]);
  const merged = peak([path.join(dbDir, 'merged'), ...dirs]);
  extra.merge_checkpoint_mb = +ckptMb.toFixed(1);
  extra.merge_rss_growth_mb = +(merged - baseline).toFixed(1);
  say(`merge: 3 x ${ckptMb.toFixed(1)} MB checkpoints; the merge process peaked ${extra.merge_rss_growth_mb} MB above a process that only loads the code`);
  fs.rmSync(dbDir, { recursive: true, force: true });
  void rssBefore;

  // Serving: 8 concurrent streaming clients against `prefopt serve` on a ~5M model.
  Object.assign(extra, await serveBench());

  // The PyTorch reference of the same steps, when available.
  const ref = torchReference();
  // The two training steps again, on a fresh model, after PyTorch's reference: this VM's speed
  // drifts by up to 3x within minutes, and PyTorch takes the best of three configurations run one
  // after another, so each side gets more than one window; the faster of prefopt's two counts.
  {
    const m2 = Decoder.init(cfg, 0);
    const s2 = sftStepOf(m2, sb);
    const sft2 = (B * T) / timeIt(s2.step, reps);
    s2.dispose();
    m2.setTrainable(false);
    const l2 = loraDpoStepOf(m2, pb);
    const dpo2 = dpoTokens / timeIt(l2.step, reps);
    l2.dispose();
    m2.dispose();
    extra.step_windows = { sft_step: [+tokens.sft_step.toFixed(1), +sft2.toFixed(1)], dpo_step_lora: [+tokens.dpo_step_lora.toFixed(1), +dpo2.toFixed(1)] } as any;
    say(`second window: SFT step ${sft2.toFixed(0)} tok/s (first ${tokens.sft_step.toFixed(0)}), LoRA DPO step ${dpo2.toFixed(0)} tok/s (first ${tokens.dpo_step_lora.toFixed(0)})`);
    tokens.sft_step = Math.max(tokens.sft_step, sft2);
    tokens.dpo_step_lora = Math.max(tokens.dpo_step_lora, dpo2);
  }
  const ratio = (k: string) => (ref?.[k] ? +(tokens[k] / ref[k]).toFixed(3) : null);
  // Model FLOP utilisation against the best GEMM rate measured on this machine in this run: the
  // start-of-run product, PyTorch's, and every paired round's.
  const peakGemm = Math.max(extra.gemm_gflops, ref?.gemm_gflops_any ?? 0, ...pairedSft.gemm_gflops, ...pairedDpo.gemm_gflops) * 1e9;
  const mfu = (tps: number | undefined, flopsPerToken: number) => (tps ? +((tps * flopsPerToken) / peakGemm).toFixed(3) : null);
  extra.mfu = {
    peak_gemm_gflops: +(peakGemm / 1e9).toFixed(1),
    sft_step: mfu(tokens.sft_step, 3 * fwdFlops),
    dpo_step: mfu(tokens.dpo_step_lora, dpoFlops),
    torch_sft_step: mfu(ref?.sft_step, 3 * fwdFlops),
    torch_dpo_step: mfu(ref?.dpo_step_lora, dpoFlops),
    paired: { sft_step: pairedSft, dpo_step: pairedDpo },
  } as any;
  const result = {
    date: new Date().toISOString(),
    backend: b.chosen,
    machine: `${os.cpus()[0]?.model ?? 'cpu'} x${os.cpus().length}, ${(os.totalmem() / 2 ** 30).toFixed(0)} GiB, node ${process.version}`,
    model: { arch: 'qwen2', params, batch: `${B}x${T}` },
    reps,
    tokens_per_s: Object.fromEntries(Object.entries(tokens).map(([k, v]) => [k, +v.toFixed(1)])),
    torch_tokens_per_s: ref,
    ratios: { sft_step: ratio('sft_step'), dpo_step: ref?.dpo_step_lora ? +(tokens.dpo_step_lora / ref.dpo_step_lora).toFixed(3) : null, sampling: ratio('sampling') },
    peak_rss_mb: Math.round(Math.max(peakRss, process.memoryUsage().rss) / 2 ** 20),
    native: b.native.active ? b.native.reason : `off (${b.native.reason})`,
    profile,
    ...extra,
  };
  clearInterval(rssTimer);
  appendResults(result);
  if (json) process.stdout.write(JSON.stringify(result) + '\n');
}

async function serveBench(): Promise<Record<string, number>> {
  const root = packageRoot();
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'prefopt-serve-bench-'));
  const tokDir = path.join(root, 'data', 'quickstart', 'tokenizer');
  const { TextTokenizer } = await import('../src/tokenizer/tokenizer.js');
  const tok = TextTokenizer.load(tokDir);
  const m = Decoder.init(parseConfig(presetConfig('qwen2', PRESETS['5m'], tok.vocabSize, { eos: tok.id('<eod>'), pad: tok.id('<pad>') })), 0);
  await saveModel(m, path.join(dir, 'm'), { copyFrom: tokDir });
  m.dispose();
  const { spawn } = await import('node:child_process');
  const child = spawn(process.execPath, [path.join(root, 'bin', 'prefopt.js'), 'serve', '--model', path.join(dir, 'm'), '--port', '0', '--max-queue', '64'], { stdio: ['ignore', 'pipe', 'ignore'] });
  const url = await new Promise<string>((resolve) => child.stdout!.on('data', (c) => {
    const mm = /listening on (\S+)/.exec(String(c));
    if (mm) resolve(mm[1]);
  }));
  const ttft: number[] = [];
  const one = async (i: number) => {
    const t0 = performance.now();
    const res = await fetch(`${url}/v1/chat/completions`, { method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify({ messages: [{ role: 'user', content: `Which is larger, ${i % 10} or ${(i + 3) % 10}?` }], max_tokens: 32, temperature: 1, seed: i, stream: true }) });
    const reader = res.body!.getReader();
    let first = true;
    for (;;) {
      const { done, value } = await reader.read();
      if (done) break;
      if (first && new TextDecoder().decode(value).includes('"content":"') && !new TextDecoder().decode(value).includes('"content":""')) {
        ttft.push(performance.now() - t0);
        first = false;
      }
    }
  };
  const t0 = performance.now();
  await Promise.all(Array.from({ length: 8 }, async (_, c) => {
    for (let k = 0; k < 4; k++) await one(c * 4 + k);
  }));
  const secs = (performance.now() - t0) / 1000;
  child.kill('SIGTERM');
  fs.rmSync(dir, { recursive: true, force: true });
  ttft.sort((a, b) => a - b);
  const r = { serve_requests_per_s: +(32 / secs).toFixed(2), serve_ttft_p50_ms: Math.round(ttft[Math.floor(ttft.length / 2)] ?? NaN), serve_ttft_p90_ms: Math.round(ttft[Math.floor(ttft.length * 0.9)] ?? NaN) };
  say(`serve: 8 clients x 4 streamed requests (32 new tokens): ${r.serve_requests_per_s} req/s, time to first token p50 ${r.serve_ttft_p50_ms} ms, p90 ${r.serve_ttft_p90_ms} ms`);
  return r;
}

/** Forward FLOPs per token: every weight product (lm head included) and dense attention over T. */
function forwardFlopsPerToken(cfg: ReturnType<typeof parseConfig>, T: number): number {
  const D = cfg.hidden_size;
  const hd = cfg.head_dim;
  const q = D * cfg.num_attention_heads * hd;
  const kv = 2 * D * cfg.num_key_value_heads * hd;
  const mlp = 3 * D * cfg.intermediate_size;
  const perLayer = 2 * (q + kv + q + mlp) + 4 * T * cfg.num_attention_heads * hd;
  return cfg.num_hidden_layers * perLayer + 2 * D * cfg.vocab_size;
}

/**
 * Where one call of `f` spends its time, by tfjs kernel: the wall time of each kernel call,
 * taken by wrapping the backend's registered kernels for the call. (tf.profile reads every
 * output back to check it for NaNs, which tripled the figures of small kernels.)
 */
function kernelProfile(f: () => void): { kernel: string; ms: number; calls: number }[] {
  const by = new Map<string, { ms: number; calls: number }>();
  const kernels = tf.getKernelsForBackend(tf.getBackend());
  for (const k of kernels) {
    tf.unregisterKernel(k.kernelName, k.backendName);
    tf.registerKernel({
      ...k,
      kernelFunc: ((args: any) => {
        const t0 = performance.now();
        const out = k.kernelFunc(args);
        const e = by.get(k.kernelName) ?? { ms: 0, calls: 0 };
        e.ms += performance.now() - t0;
        e.calls++;
        by.set(k.kernelName, e);
        return out;
      }) as tf.KernelFunc,
    });
  }
  try {
    f();
  } finally {
    for (const k of kernels) {
      tf.unregisterKernel(k.kernelName, k.backendName);
      tf.registerKernel(k);
    }
  }
  return [...by].map(([kernel, e]) => ({ kernel, ms: +e.ms.toFixed(1), calls: e.calls })).sort((a, b) => b.ms - a.ms);
}

/** FLOP/s of one 1024³ product on the active matmul kernel; `time` gives seconds per call of f. */
function gemmRate(time: (f: () => void) => number): number {
  const ga = tf.randomNormal([1024, 1024]) as tf.Tensor2D;
  const gb = tf.randomNormal([1024, 1024]) as tf.Tensor2D;
  try {
    return (2 * 1024 ** 3) / time(() => tf.matMul(ga, gb).dispose());
  } finally {
    tf.dispose([ga, gb]);
  }
}

/**
 * Model FLOP utilisation in rounds: each round times the 1024³ GEMM (best of 3) and then the
 * step (best of 2) back to back, and divides the step's FLOP rate by that GEMM's. This VM's
 * speed drifts by up to 3x over minutes, so a peak taken at one moment and steps timed at
 * another measure the drift as much as the code. The median round, with the range.
 */
function pairedMfu(step: () => void, flops: number, rounds: number): { median: number; min: number; max: number; gemm_gflops: number[] } {
  const mfu: number[] = [];
  const gemm: number[] = [];
  for (let r = 0; r < rounds; r++) {
    const g = gemmRate((f) => timeIt(f, 3));
    mfu.push(flops / timeIt(step, 2) / g);
    gemm.push(+(g / 1e9).toFixed(1));
  }
  const sorted = [...mfu].sort((a, b) => a - b);
  const r3 = (x: number) => +x.toFixed(3);
  return { median: r3(sorted[Math.floor(sorted.length / 2)]), min: r3(sorted[0]), max: r3(sorted.at(-1)!), gemm_gflops: gemm };
}

function torchReference(): Record<string, number> | null {
  const py = '/usr/bin/python3';
  const script = path.join(packageRoot(), 'bench', 'torch_ref.py');
  if (!fs.existsSync(py) || spawnSync(py, ['-c', 'import torch'], { encoding: 'utf8' }).status !== 0) {
    say('PyTorch reference: skipped (/usr/bin/python3 has no torch; apt-get install python3-torch to compare)');
    return null;
  }
  // OpenBLAS 0.3.21 (Debian 12) picks a slow kernel on some new CPUs (Sapphire Rapids here:
  // ~30 GFLOP/s, against ~150 with its Haswell or SkylakeX kernels), so the reference is the
  // fastest of PyTorch as installed and with OPENBLAS_CORETYPE=Haswell (AVX2) or SkylakeX
  // (AVX-512): the best it does here.
  const runs: Record<string, number>[] = [];
  const cores = process.env.OPENBLAS_CORETYPE ? [] : ['Haswell', 'SkylakeX'];
  for (const env of [{} as Record<string, string>, ...cores.map((c) => ({ OPENBLAS_CORETYPE: c }))]) {
    const r = spawnSync(py, [script], { encoding: 'utf8', timeout: 600_000, env: { ...process.env, ...env } });
    if (r.status !== 0) {
      say(`PyTorch reference failed (${JSON.stringify(env)}): ${r.stderr.slice(-300)}`);
      continue;
    }
    runs.push({ ...JSON.parse(r.stdout.trim().split('\n').at(-1)!), openblas_coretype: (env.OPENBLAS_CORETYPE ?? '') as any });
  }
  if (!runs.length) return null;
  const best = runs.reduce((a, b) => (b.sft_step > a.sft_step ? b : a));
  say(`PyTorch reference: ${runs.map((r) => `${r.openblas_coretype ? `OPENBLAS_CORETYPE=${r.openblas_coretype}` : 'as installed'} SFT ${r.sft_step.toFixed(0)} tok/s, GEMM ${r.gemm_gflops.toFixed(0)} GFLOP/s`).join('; ')}`);
  // The machine's peak is the best GEMM any configuration reached, not only the best one's.
  return { ...best, gemm_gflops_any: Math.max(...runs.map((r) => r.gemm_gflops)) };
}

function appendResults(r: any): void {
  const file = path.join(packageRoot(), 'bench', 'RESULTS.md');
  const head = fs.existsSync(file) ? '' : '# Benchmark results\n\nAppended by `npm run bench`; each section is one run, all figures measured side by side in that run.\n';
  const t = r.tokens_per_s;
  const f = (x: number | string | null | undefined) => (x === null || x === undefined ? 'n/a' : String(x));
  const pct = (x: number | null) => (x === null ? 'n/a' : `${(x * 100).toFixed(1)}%`);
  const lines = [
    '',
    `## ${r.date} — backend ${r.backend}`,
    '',
    `Machine: ${r.machine}. Model: ${r.model.arch}, ${r.model.params} parameters, batch ${r.model.batch}. Each figure is the fastest of ${r.reps} timed calls after a warm-up, for prefopt and PyTorch alike${r.step_windows ? `; the SFT and LoRA DPO steps are timed in two windows, before and after PyTorch's reference (which takes the best of its three configurations), and the faster counts (SFT ${r.step_windows.sft_step.join(' / ')}, LoRA DPO ${r.step_windows.dpo_step_lora.join(' / ')} tokens/s)` : ''}.`,
    '',
    '| measure | prefopt | PyTorch | ratio |',
    '|---|---|---|---|',
    `| forward, tokens/s | ${t.forward} | ${f(r.torch_tokens_per_s?.forward)} | ${r.torch_tokens_per_s?.forward ? (t.forward / r.torch_tokens_per_s.forward).toFixed(3) : 'n/a'} |`,
    `| SFT step (fwd+bwd+AdamW), tokens/s | ${t.sft_step} | ${f(r.torch_tokens_per_s?.sft_step)} | ${f(r.ratios.sft_step)} |`,
    `| LoRA DPO step (policy + adapter-off reference), tokens/s | ${t.dpo_step_lora} | ${f(r.torch_tokens_per_s?.dpo_step_lora)} | ${f(r.ratios.dpo_step)} |`,
    `| full-model DPO step (second model as reference), tokens/s | ${t.dpo_step_full} | | |`,
    `| sampling with KV cache (4 prompts × 4 samples), new tokens/s | ${t.sampling} | ${f(r.torch_tokens_per_s?.sampling)} | ${f(r.ratios.sampling)} |`,
    `| reward-model scoring, samples/s | ${r.rm_samples_per_s} | | |`,
    `| store inserts, sample rows/s | ${r.store_rows_per_s} | | |`,
    `| serve: 8 concurrent streaming clients, requests/s (32 new tokens each) | ${r.serve_requests_per_s} | | |`,
    `| serve: time to first token p50 / p90, ms | ${r.serve_ttft_p50_ms} / ${r.serve_ttft_p90_ms} | | |`,
    '',
    `Matmul: ${r.native}; GEMM 1024³ ${r.gemm_gflops} GFLOP/s (PyTorch ${f(r.torch_tokens_per_s?.gemm_gflops?.toFixed?.(1))}${r.torch_tokens_per_s?.openblas_coretype ? `, its fastest configuration here: OPENBLAS_CORETYPE=${r.torch_tokens_per_s.openblas_coretype}` : ''}). ` +
      `Model FLOP utilisation against the best GEMM measured anywhere in the run (${r.mfu.peak_gemm_gflops} GFLOP/s): SFT step ${pct(r.mfu.sft_step)} (PyTorch ${pct(r.mfu.torch_sft_step)}), LoRA DPO step ${pct(r.mfu.dpo_step)} (PyTorch ${pct(r.mfu.torch_dpo_step)}; its FLOPs include the adapter's products). ` +
      (r.mfu.paired
        ? `Paired with a 1024³ GEMM timed just before each step (${r.mfu.paired.sft_step.gemm_gflops.length} rounds each; the machine's GEMM rate meanwhile: ${[...r.mfu.paired.sft_step.gemm_gflops, ...r.mfu.paired.dpo_step.gemm_gflops].join(', ')} GFLOP/s): ` +
          `SFT step ${pct(r.mfu.paired.sft_step.median)} median (${pct(r.mfu.paired.sft_step.min)}–${pct(r.mfu.paired.sft_step.max)}), LoRA DPO step ${pct(r.mfu.paired.dpo_step.median)} (${pct(r.mfu.paired.dpo_step.min)}–${pct(r.mfu.paired.dpo_step.max)}).`
        : ''),
    '',
    `Profile of one SFT step by kernel (wall ms, calls): ${r.profile.slice(0, 10).map((p: any) => `${p.kernel} ${p.ms} (${p.calls})`).join(', ')}; total ${r.profile.reduce((a: number, p: any) => a + p.ms, 0).toFixed(0)} ms.` +
      (r.sft_step_unfused ? ` The same SFT step with the fused kernels off (PREFOPT_FUSED=0): ${r.sft_step_unfused} tokens/s (fused: ${t.sft_step}).` : ''),
    '',
    `Memory: peak RSS ${r.peak_rss_mb} MB; SFT phase RSS ${r.sft_rss_mb} MB; live tensors during the LoRA DPO step ${r.dpo_lora_tensor_mb} MB vs ${r.dpo_full_tensor_mb} MB for full-model DPO (which holds a second copy of the weights); ` +
      `a TIES merge of three ${r.merge_checkpoint_mb} MB checkpoints grew RSS by ${r.merge_rss_growth_mb} MB (streamed tensor by tensor).`,
    '',
  ];
  fs.writeFileSync(file, head + (fs.existsSync(file) ? fs.readFileSync(file, 'utf8') : '') + lines.join('\n'));
}

await main();
