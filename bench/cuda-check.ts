/**
 * The cuda backend on a GPU, the node part of bench/gpu-check.sh (docs/REFERENCE.md §11): on
 * Qwen2.5-0.5B's shape with random bf16 weights (built in memory, nothing to download),
 *
 * - compare: one LoRA DPO step (r 16 on every linear, B non-zero, 2 pairs × 256 tokens) on the
 *   native backend (the CPU) and on the cuda backend — the loss and every adapter gradient;
 * - time: the real-size bench's LoRA DPO step (4 pairs × 256 tokens, dropout 0.05, reference
 *   cached) and its log-probs job on the cuda backend, tokens/s and the device's peak bytes.
 *
 * One JSON line per result. PREFOPT_CUDA_BF16=0 PREFOPT_CUDA_TF32=0 makes the device's products
 * exact float32 (the comparison's tolerance is then float32's); by default the bf16 weights'
 * products run in bf16 and the rest in TF32 (tolerance a few 1e-2).
 * PREFOPT_CUDA_DEVICE=emulate runs it all without a GPU (slowly): the script's own test.
 *   node dist/bench/cuda-check.js [report|compare|time] [--layers N]   (report: what `doctor` says of CUDA)
 */
import * as tf from '@tensorflow/tfjs-core';
import { initBackend } from '../src/engine/backend.js';
import { cudaAddon } from '../src/engine/native.js';
import { cudaReport } from '../src/engine/cuda.js';
import { cudaBf16Products } from '../src/engine/cuda-fused.js';
import { HalfWeight } from '../src/engine/half.js';
import { Decoder } from '../src/model/decoder.js';
import { expectedShapes, isLinearWeight, parseConfig, presetConfig } from '../src/model/config.js';
import { sequenceLogps } from '../src/dpo/logps.js';
import { f32ToBf16Bits } from '../src/io/safetensors.js';
import { ALL_LINEARS, PROMPT, QWEN05_SHAPE, benchRows, loraDpoStepOf, loraDpoTrace, timeIt, worstRel } from './steps.js';
import { envOff } from '../src/util/env.js';

const say = (o: object) => process.stdout.write(JSON.stringify(o) + '\n');
const arg = (name: string) => {
  const i = process.argv.indexOf(name);
  return i > 0 ? process.argv[i + 1] : undefined;
};
const what = process.argv[2] ?? 'compare';
const layers = Number(arg('--layers') ?? QWEN05_SHAPE.num_hidden_layers);
const tf32 = !envOff('PREFOPT_CUDA_TF32');
const bf16 = cudaBf16Products();

const cfg = parseConfig(presetConfig('qwen2', { ...QWEN05_SHAPE, num_hidden_layers: layers }, QWEN05_SHAPE.vocab_size, { eos: 1, pad: 0 }));

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

async function compare(): Promise<void> {
  const w = weights();
  const pb = benchRows(4, PROMPT);
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
  for (const job of ['lora_dpo', 'logprobs']) {
    dev.cudaStats(true);
    let f: () => void;
    let tokens: number;
    if (job === 'lora_dpo') {
      const pb = benchRows(8, PROMPT);
      tokens = pb.batch * pb.len;
      f = loraDpoStepOf(model, pb, { dropout: 0.05, cachedReference: true }).step;
    } else {
      const sb = benchRows(2, PROMPT);
      tokens = sb.batch * sb.len;
      f = () => void tf.tidy(() => sequenceLogps(model, sb)).dataSync();
    }
    const s = timeIt(f, 3);
    say({ step: 'cuda_time', job, device: dev.cudaOpen('gpu').name, tf32, bf16, layers, tokens_per_s: +(tokens / s).toFixed(1), seconds: +s.toFixed(4), peak_device_bytes: dev.cudaStats().peak });
  }
}

try {
  if (what === 'report') say({ step: 'cuda_report', ...cudaReport() });
  else if (what === 'compare') await compare();
  else if (what === 'time') await time();
  else throw new Error(`unknown "${what}" (compare or time)`);
} catch (e: any) {
  say({ step: `cuda_${what}`, error: String(e?.message ?? e) });
  process.exitCode = 1;
}
