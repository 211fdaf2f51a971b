/**
 * The cuda backend on a GPU, the node part of bench/gpu-check.sh (docs/REFERENCE.md §11): on
 * Qwen2.5-0.5B's shape with random bf16 weights (built in memory, nothing to download),
 *
 * - gemm: the device's products against float64, one line per case (transposes, broadcast and
 *   strided batches, bf16 and float32, alpha and beta, misaligned operands);
 * - compare: one LoRA DPO step (r 16 on every linear, B non-zero, 2 pairs × 256 tokens) on the
 *   native backend (the CPU) and on the cuda backend — the loss and every adapter gradient;
 * - time: the real-size bench's LoRA DPO step (4 pairs × 256 tokens, dropout 0.05, reference
 *   cached), its log-probs job and its sampling job (4 × 64 new tokens, KV cache) on the cuda
 *   backend, tokens/s, the device's peak bytes and how often a call waits for the device;
 * - profile: that LoRA DPO step once more with every device operation timed alone
 *   (CudaDevice.profile): one line per kernel, product shape, copy and host kernel, the slowest
 *   first, with its share of the step — what to speed up next.
 *
 * One JSON line per result. PREFOPT_CUDA_BF16=0 PREFOPT_CUDA_TF32=0 makes the device's products
 * exact float32 (the comparison's tolerance is then float32's); by default the bf16 weights'
 * products run in bf16 and the rest in TF32 (tolerance a few 1e-2).
 * PREFOPT_CUDA_DEVICE=emulate runs it all without a GPU (slowly): the script's own test;
 * PREFOPT_CUDA_DEVICE=dry issues every kernel and product without running them: `time` then gives
 * the host floor, what a step costs before any device work.
 *   node dist/bench/cuda-check.js [report|gemm|compare|time|profile] [--layers N] [--tiny] [--reps N]   (report: what `doctor` says of CUDA)
 * --tiny: the same jobs on a model of Qwen2's layout a thousand times smaller and 32-token rows,
 * which the emulation runs in seconds (test/cuda-check.test.ts runs every mode so).
 */
import * as tf from '@tensorflow/tfjs-core';
import { initBackend } from '../src/engine/backend.js';
import { cudaAddon } from '../src/engine/native.js';
import { cudaReport } from '../src/engine/cuda.js';
import { openedCudaDevice } from '../src/engine/cuda-device.js';
import { attentionPath, cudaBf16Products } from '../src/engine/cuda-fused.js';
import { HalfWeight } from '../src/engine/half.js';
import { Decoder } from '../src/model/decoder.js';
import { expectedShapes, isLinearWeight, parseConfig, presetConfig } from '../src/model/config.js';
import { sequenceLogps } from '../src/dpo/logps.js';
import { generate } from '../src/infer/generate.js';
import { DEFAULT_SAMPLING } from '../src/infer/sampling.js';
import { f32ToBf16Bits } from '../src/io/safetensors.js';
import { ALL_LINEARS, COMPLETION, PROMPT, QWEN05_SHAPE, benchRows, loraDpoStepOf, loraDpoTrace, timeIt, worstRel } from './steps.js';
import { envOff } from '../src/util/env.js';

const say = (o: object) => process.stdout.write(JSON.stringify(o) + '\n');
const arg = (name: string) => {
  const i = process.argv.indexOf(name);
  return i > 0 ? process.argv[i + 1] : undefined;
};
const what = process.argv[2] ?? 'compare';
const tiny = process.argv.includes('--tiny');
const shape = tiny
  ? { ...QWEN05_SHAPE, hidden_size: 64, intermediate_size: 160, num_hidden_layers: 2, num_attention_heads: 4, num_key_value_heads: 2, head_dim: 16, vocab_size: 512 }
  : QWEN05_SHAPE;
const layers = Number(arg('--layers') ?? shape.num_hidden_layers);
// Timed calls per figure, the fastest kept (bench/steps: timeIt). A step's host side (tfjs's
// dispatch and tape) reaches its speed only after V8 has compiled it: over its first few calls
// the dry device's 0.5B step went from 62 to 35 ms here.
const reps = Number(arg('--reps') ?? 10);
/** The jobs' rows: n of the real-size bench's length (32 tokens with --tiny), scored after the prompt. */
const rows = (n: number) => (tiny ? benchRows(n, 8, shape.vocab_size, 32) : benchRows(n, PROMPT));
const tf32 = !envOff('PREFOPT_CUDA_TF32');
const bf16 = cudaBf16Products();
/** How the LoRA DPO step's attention runs (engine/cuda-fused: attentionPath). */
const attention = attentionPath(8, tiny ? 32 : PROMPT + COMPLETION, tiny ? 32 : PROMPT + COMPLETION, shape.num_attention_heads, shape.num_key_value_heads);

const cfg = parseConfig(presetConfig('qwen2', { ...shape, num_hidden_layers: layers }, shape.vocab_size, { eos: 1, pad: 0 }));

/** Random weights: matrices in bf16 (uniform, std 0.02), norms near 1, biases small. One stream, so every backend gets the same. */
function weights(): Map<string, HalfWeight | { shape: number[]; data: Float32Array }> {
  let s = 0x9e3779b9;
  const next = () => ((s = (Math.imul(s, 1664525) + 1013904223) >>> 0) / 2 ** 32) * 2 - 1;
  const u = new Uint32Array(1);
  const f = new Float32Array(u.buffer);
  const out = new Map<string, HalfWeight | { shape: number[]; data: Float32Array }>();
  for (const [name, shape] of expectedShapes(cfg)) {
    const n = shape.reduce((a, b) => a * b, 1);
    if (shape.length === 2) {
      const bits = new Uint16Array(n);
      for (let i = 0; i < n; i++) {
        f[0] = next() * 0.0346; // uniform with std 0.02
        bits[i] = f32ToBf16Bits(u[0]);
      }
      out.set(name, new HalfWeight(bits, 'bf16', [shape[0], shape[1]], isLinearWeight(name)));
    } else out.set(name, { shape, data: Float32Array.from({ length: n }, () => (name.endsWith('norm.weight') ? 1 + 0.1 * next() : 0.02 * next())) });
  }
  return out;
}

/**
 * The device's products against a float64 reference, case by case: every transpose, batches with
 * a broadcast (stride 0) operand, bf16 and float32 operands, alpha and beta, sizes that are no
 * tile's multiple and operands off a 16-byte boundary — the wrapper's row-major to column-major
 * mapping and its alignment handling, which only the real cuBLASLt can confirm. Tolerance: bf16
 * products are of exact bf16 inputs with float32 sums; float32 ones carry TF32's rounding unless
 * PREFOPT_CUDA_TF32=0.
 */
async function gemmCases(): Promise<void> {
  await initBackend('cuda');
  const dev = openedCudaDevice()!;
  let s = 12345;
  const next = () => ((s = (Math.imul(s, 1664525) + 1013904223) >>> 0) / 2 ** 32) * 2 - 1;
  const bf16 = (x: number) => {
    const f = new Float32Array([x]);
    return f32ToBf16Bits(new Uint32Array(f.buffer)[0]);
  };
  const widen = (b: number) => new Float32Array(new Uint32Array([b << 16]).buffer)[0];
  let failed = 0;
  const cases: { ta: boolean; tb: boolean; batch: number; sa: 0 | 1; sb: 0 | 1; half: boolean; alpha: number; beta: number; shift: number }[] = [];
  for (const half of [false, true])
    for (const ta of [false, true])
      for (const tb of [false, true]) cases.push({ ta, tb, batch: 1, sa: 1, sb: 1, half, alpha: 1, beta: 0, shift: 0 });
  for (const half of [false, true]) {
    cases.push({ ta: false, tb: true, batch: 3, sa: 1, sb: 0, half, alpha: 1, beta: 0, shift: 0 });
    cases.push({ ta: true, tb: false, batch: 3, sa: 0, sb: 1, half, alpha: 0.5, beta: 1, shift: 1 });
  }
  // Attention's products (engine/cuda-fused: attentionByProducts): both operands batched.
  for (const [ta, tb] of [[false, true], [true, false]]) cases.push({ ta, tb, batch: 3, sa: 1, sb: 1, half: false, alpha: 1, beta: 0, shift: 0 });
  const [m, n, k] = tiny ? [7, 5, 9] : [67, 45, 131];
  for (const c of cases) {
    const esize = c.half ? 2 : 4;
    const aLen = (c.sa ? c.batch : 1) * m * k;
    const bLen = (c.sb ? c.batch : 1) * k * n;
    const av = Float32Array.from({ length: aLen }, () => (c.half ? widen(bf16(next())) : next()));
    const bv = Float32Array.from({ length: bLen }, () => (c.half ? widen(bf16(next())) : next()));
    const cv = Float32Array.from({ length: c.batch * m * n }, () => next());
    const pack = (v: Float32Array) => (c.half ? Uint16Array.from(v, (x) => bf16(x)) : v);
    // shift: each operand starts one element past an aligned block (4 or 2 bytes off).
    const pad = c.shift * esize;
    const want = new Float64Array(c.batch * m * n);
    for (let e = 0; e < c.batch; e++)
      for (let i = 0; i < m; i++)
        for (let j = 0; j < n; j++) {
          let acc = 0;
          for (let l = 0; l < k; l++) {
            const x = av[(c.sa ? e * m * k : 0) + (c.ta ? l * m + i : i * k + l)];
            const y = bv[(c.sb ? e * k * n : 0) + (c.tb ? j * k + l : l * n + j)];
            acc += x * y;
          }
          want[e * m * n + i * n + j] = c.alpha * acc + c.beta * cv[e * m * n + i * n + j];
        }
    let got: Float32Array;
    try {
      got = dev.withTemp([aLen * esize + pad, bLen * esize + pad, cv.byteLength + 4 * c.shift], ([a, b, cc]) => {
        dev.upload(a + pad, pack(av));
        dev.upload(b + pad, pack(bv));
        dev.upload(cc + 4 * c.shift, cv);
        dev.gemm({ ta: c.ta, tb: c.tb, batch: c.batch, m, n, k, a: a + pad, b: b + pad, c: cc + 4 * c.shift, sa: c.sa * m * k, sb: c.sb * k * n, alpha: c.alpha, beta: c.beta, half: c.half });
        const out = new Float32Array(c.batch * m * n);
        dev.download(cc + 4 * c.shift, out);
        return out;
      });
    } catch (e: any) {
      // One case failing (the library refusing it) does not hide the others.
      failed++;
      say({ step: 'cuda_gemm', ...c, m, n, k, error: String(e?.message ?? e), ok: false });
      continue;
    }
    // Relative to the terms' magnitude (a sum of k products of values up to 1).
    let worst = 0;
    for (let i = 0; i < got.length; i++) worst = Math.max(worst, Math.abs(got[i] - want[i]) / Math.sqrt(k));
    const tol = c.half || !tf32 ? 1e-5 : 2e-3;
    const ok = worst <= tol;
    if (!ok) failed++;
    say({ step: 'cuda_gemm', ...c, m, n, k, worst_err: +worst.toPrecision(3), tolerance: tol, ok });
  }
  if (failed) process.exitCode = 1;
}

async function compare(): Promise<void> {
  const w = weights();
  const pb = rows(4);
  const run = async (backend: string) => {
    await initBackend(backend);
    const model = Decoder.fromHF(cfg, (n) => w.get(n)!, false);
    const t0 = performance.now();
    const r = loraDpoTrace(model, pb, { dropout: 0, steps: 1, lr: 1e-4, r: 16, targets: ALL_LINEARS });
    const s = (performance.now() - t0) / 1000;
    model.dispose();
    return { ...r, seconds: s };
  };
  const gpu = await run('cuda'); // first: where it cannot open, nothing else is worth the time
  const cpu = await run('native');
  const grads = Object.keys(cpu.grads).map((k) => ({ k, rel: worstRel(gpu.grads[k], cpu.grads[k]) }));
  const worst = grads.reduce((a, b) => (b.rel > a.rel ? b : a));
  // Gradients to float32 rounding, or to TF32's / bf16's (the activations rounded to 8 bits of
  // mantissa for the weights' products); the loss is a difference of sums over 192 tokens of
  // log-softmaxes over 151,936 logits, summed in another order on each side.
  const tol = bf16 ? 5e-2 : tf32 ? 2e-2 : 1e-4;
  const lossTol = (bf16 ? 5e-2 : tf32 ? 2e-2 : 5e-4) * Math.max(1, Math.abs(cpu.loss[0]));
  say({
    step: 'cuda_compare',
    device: cudaAddon()!.cudaOpen('gpu').name,
    layers,
    tf32,
    bf16,
    loss_native: cpu.loss[0],
    loss_cuda: gpu.loss[0],
    loss_abs_diff: Math.abs(cpu.loss[0] - gpu.loss[0]),
    worst_grad_rel: worst.rel,
    worst_grad: worst.k,
    seconds_native: +cpu.seconds.toFixed(2),
    seconds_cuda: +gpu.seconds.toFixed(2),
    tolerance: tol,
    loss_tolerance: lossTol,
    ok: Math.abs(cpu.loss[0] - gpu.loss[0]) <= lossTol && worst.rel <= tol,
  });
}

async function time(): Promise<void> {
  await initBackend('cuda');
  const dev = cudaAddon()!;
  const w = weights();
  const model = Decoder.fromHF(cfg, (n) => w.get(n)!, false);
  for (const job of ['lora_dpo', 'lora_dpo_2k', 'logprobs', 'generate', 'generate_filtered']) {
    dev.cudaStats(true);
    let f: () => void;
    let tokens: number;
    let how = {};
    if (job.startsWith('lora_dpo')) {
      // torch_ref's: 4 pairs of the real-size bench's rows, or 2 pairs of 2,048 tokens (128 with --tiny) scored after 512 (8).
      const pb = job === 'lora_dpo' ? rows(8) : tiny ? benchRows(4, 8, shape.vocab_size, 128) : benchRows(4, 512, shape.vocab_size, 2048);
      tokens = pb.batch * pb.len;
      how = { attention: attentionPath(pb.batch, pb.len, pb.len, shape.num_attention_heads, shape.num_key_value_heads) };
      f = loraDpoStepOf(model, pb, { dropout: 0.05, cachedReference: true }).step;
    } else if (job === 'logprobs') {
      const sb = rows(2);
      tokens = sb.batch * sb.len;
      f = () => void tf.tidy(() => sequenceLogps(model, sb)).dataSync();
    } else {
      // torch_ref's and real-size's sampling job: 4 samples of 64 new tokens (8 with --tiny) after the rows' prompt, KV cache on the device;
      // generate_filtered with Qwen's generation_config (temperature 0.7, top_k 20, top_p 0.8).
      const fresh = tiny ? 8 : 64;
      const prompt = Array.from(rows(1).ids).slice(0, tiny ? 8 : PROMPT);
      const sampling = job === 'generate' ? DEFAULT_SAMPLING : { ...DEFAULT_SAMPLING, temperature: 0.7, topK: 20, topP: 0.8 };
      tokens = 4 * fresh;
      f = () => void generate(model, [{ prompt, seeds: [1, 2, 3, 4] }], { ...sampling, maxNewTokens: fresh, stopIds: [] });
    }
    // Each timed call ends when the device has done its work, as torch_ref's (torch.cuda.synchronize).
    const s = timeIt(() => {
      f();
      dev.cudaSync();
    }, job.startsWith('generate') ? Math.min(reps, 3) : reps);
    const peak = dev.cudaStats().peak;
    // Each wait drains the device's queue: the host's issuing is then no longer hidden behind it.
    dev.cudaStats(true);
    f();
    const waits = dev.cudaStats().waits;
    say({ step: 'cuda_time', job, device: dev.cudaOpen('gpu').name, tf32, bf16, ...how, layers, tokens_per_s: +(tokens / s).toFixed(1), seconds: +s.toFixed(4), peak_device_bytes: peak, waits_per_call: waits });
  }
}

async function profile(): Promise<void> {
  await initBackend('cuda');
  const dev = openedCudaDevice()!;
  const w = weights();
  const model = Decoder.fromHF(cfg, (n) => w.get(n)!, false);
  const pb = rows(8);
  const step = loraDpoStepOf(model, pb, { dropout: 0.05, cachedReference: true }).step;
  const seconds = timeIt(() => {
    step();
    dev.sync();
  }, reps);
  dev.profile(true);
  const t0 = performance.now();
  step();
  const profiled = (performance.now() - t0) / 1000;
  const ops = Object.entries(dev.profile(false)).sort((a, b) => b[1].seconds - a[1].seconds);
  const total = ops.reduce((s, [, t]) => s + t.seconds, 0);
  say({ step: 'cuda_profile', device: dev.name, tf32, bf16, attention, layers, tokens: pb.batch * pb.len, step_seconds: +seconds.toFixed(4), profiled_seconds: +profiled.toFixed(4), timed_seconds: +total.toFixed(4), operations: ops.reduce((s, [, t]) => s + t.count, 0) });
  for (const [key, t] of ops) {
    const rate = key.startsWith('gemm') ? { tflops: +(t.work / t.seconds / 1e12).toPrecision(3) } : t.work ? { gb_per_s: +(t.work / t.seconds / 1e9).toPrecision(3) } : {};
    say({ step: 'cuda_profile_op', key, count: t.count, ms: +(t.seconds * 1000).toPrecision(4), share: +(t.seconds / total).toFixed(4), ...rate });
  }
}

try {
  if (what === 'report') say({ step: 'cuda_report', ...cudaReport() });
  else if (what === 'compare') await compare();
  else if (what === 'gemm') await gemmCases();
  else if (what === 'time') await time();
  else if (what === 'profile') await profile();
  else throw new Error(`unknown "${what}" (report, gemm, compare, time or profile)`);
} catch (e: any) {
  say({ step: `cuda_${what}`, error: String(e?.message ?? e) });
  process.exitCode = 1;
}
