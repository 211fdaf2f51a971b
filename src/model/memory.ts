import * as fs from 'node:fs';
import * as os from 'node:os';
import { ModelConfig, expectedShapes, isHalfMatrix } from './config.js';
import { halfDtypeOf, loadsHalf } from './load.js';
import { HEAD_CHUNK_BYTES, headChunkRows } from './decoder.js';
import { UserError } from '../util/errors.js';
import { loadConfig } from '../io/checkpoint.js';
import { TrainConfig, checkpointingOn } from '../train/trainer.js';
import { LoraConfig, defaultTargets } from '../lora/lora.js';
import { currentBackend } from '../engine/backend.js';
import { openedCudaDevice } from '../engine/cuda-device.js';
import { cudaBf16Products } from '../engine/cuda-fused.js';

/**
 * Peak memory of a job, estimated from the model's config and the job's shape before anything is
 * loaded (docs/REFERENCE.md §10), and the check that stops a job the machine cannot hold. Every
 * tensor is float32. The terms follow what the engine keeps alive at its peak:
 *
 * - weights: 4 bytes per parameter, resident for the whole job — but 2 for the matrices of a
 *   bf16/f16 checkpoint in a job that does not train them (model/load keeps them 16-bit);
 * - training state: gradients, AdamW's two moments (and an accumulation buffer with grad_accum
 *   > 1) for the trained tensors — all weights in full SFT, the adapters in LoRA;
 * - activations: what the gradient tape keeps per layer and token (ACTIVATION_FLOATS), for every
 *   layer, or with checkpointing the residual stream between layers plus one layer recomputed
 *   with its gradients; a forward pass without gradients frees each layer as it goes;
 * - the LM head: one chunk of logits (HEAD_CHUNK_BYTES) with its softmax and gradient; in full
 *   training also three [V, D] gradients of the head weight in flight (a chunk's, the running
 *   sum, the new sum);
 * - generation: the KV cache;
 * - slack: SLACK of the tensor terms but the weights — freed tensor memory of tfjs's own kernels
 *   goes back to the system at the next garbage collection, not at once;
 * - no term for the native backend's pool of freed blocks: it never holds more than the job's
 *   own peak of live tensors leaves room for (native/addon.cc);
 * - the runtime (Node, tfjs, the addon, tokenizer): RUNTIME_BYTES.
 *
 * Calibrated against measured peak RSS (bench/RESULTS.md, "real sizes", native backend, bf16
 * checkpoint: at 0.5B, LoRA DPO 2.55 GB measured for 2.65 estimated, full SFT 11.72 for 11.89;
 * at 7B, log-probs 16.4 for 16.8).
 */
export const RUNTIME_BYTES = 400 * 2 ** 20;
export const SLACK = 0.15;

export type JobKind = 'logprobs' | 'generate' | 'lora' | 'full';

export interface JobShape {
  kind: JobKind;
  /** Sequences in one forward pass (a DPO micro-batch of B pairs is 2B rows). */
  rows: number;
  /** Tokens per sequence at most (for generate: prompt + new tokens). */
  len: number;
  checkpointing?: boolean;
  /** LoRA: rank and the linear modules it targets (their last name component). */
  lora?: { r: number; targets: string[] };
  gradAccum?: number;
  /** The checkpoint's matrices are bf16/f16 and stay so when frozen (model/load's loadsHalf). */
  halfWeights?: boolean;
}

export interface MemoryEstimate {
  /** Bytes by term, in the order above. */
  parts: Record<string, number>;
  total: number;
}

/** Floats the tape keeps per token in one decoder layer: norms, projections, attention, MLP. */
export function activationFloats(cfg: ModelConfig): number {
  const { hidden_size: D, intermediate_size: I, num_attention_heads: H, num_key_value_heads: KV, head_dim: hd } = cfg;
  return 7 * D + 3 * H * hd + 4 * KV * hd + 3 * I;
}

export function paramCount(cfg: ModelConfig): number {
  let n = 0;
  for (const s of expectedShapes(cfg).values()) n += s.reduce((a, b) => a * b, 1);
  return n;
}

/** The module kind of a linear weight's name (`…self_attn.q_proj.weight` → q_proj), the name LoRA targets it by; null for other tensors. */
function linearKind(name: string): string | null {
  return /\.(\w+_proj)\.weight$/.exec(name)?.[1] ?? null;
}

/** Parameters of the LoRA adapters on `targets` ([in, r] + [r, out] per module). */
export function loraParamCount(cfg: ModelConfig, lora: { r: number; targets: string[] }): number {
  const want = new Set(lora.targets);
  let n = 0;
  for (const [name, s] of expectedShapes(cfg)) {
    const kind = linearKind(name);
    if (kind && want.has(kind) && s.length === 2) n += lora.r * (s[0] + s[1]);
  }
  return n;
}

/** Parameters in the matrices a frozen model may keep in 16 bits (config's isHalfMatrix). */
export function halfMatrixCount(cfg: ModelConfig): number {
  let n = 0;
  for (const [name, s] of expectedShapes(cfg)) if (isHalfMatrix(name)) n += s.reduce((a, b) => a * b, 1);
  return n;
}

export function estimateMemory(cfg: ModelConfig, job: JobShape): MemoryEstimate {
  const P = paramCount(cfg);
  const N = job.rows * job.len;
  const L = cfg.num_hidden_layers;
  const layer = 4 * activationFloats(cfg) * N;
  const headRows = Math.min(N, headChunkRows(HEAD_CHUNK_BYTES, cfg.vocab_size));
  const half = job.halfWeights && job.kind !== 'full' ? halfMatrixCount(cfg) : 0;
  const parts: Record<string, number> = { weights: 4 * P - 2 * half };
  const train = job.kind === 'lora' || job.kind === 'full';
  if (train) {
    const T = job.kind === 'full' ? P : loraParamCount(cfg, job.lora ?? { r: 8, targets: [] });
    parts.training_state = 4 * T * (3 + ((job.gradAccum ?? 1) > 1 ? 1 : 0));
    parts.activations = job.checkpointing ? 4 * N * cfg.hidden_size * L + 2 * layer : L * layer;
  } else parts.activations = 2 * layer;
  // The logits, their softmax or slope, and the gradient of a chunk.
  parts.lm_head = 3 * 4 * headRows * cfg.vocab_size;
  if (job.kind === 'full') parts.head_grads = 3 * 4 * cfg.vocab_size * cfg.hidden_size;
  if (job.kind === 'generate') parts.kv_cache = 2 * 4 * L * N * cfg.num_key_value_heads * cfg.head_dim;
  // Weights are resident (never freed and reallocated), so they need no slack.
  const tensors = Object.values(parts).reduce((a, b) => a + b, 0) - parts.weights;
  parts.slack = Math.round(SLACK * tensors);
  parts.runtime = RUNTIME_BYTES;
  return { parts, total: Object.values(parts).reduce((a, b) => a + b, 0) };
}

/**
 * Memory a job may use: the machine's (or the cgroup's, in a container), or PREFOPT_MEMORY_LIMIT
 * ("12GiB", "800MB" or bytes), less 10% for the page cache and other processes.
 */
export function memoryLimit(): { bytes: number; source: string } {
  const env = process.env.PREFOPT_MEMORY_LIMIT;
  if (env) {
    const b = parseBytes(env);
    if (b === null) throw new UserError(`PREFOPT_MEMORY_LIMIT: expected bytes such as 12GiB, 800MB or 1e9, found "${env}"`);
    return { bytes: b, source: 'PREFOPT_MEMORY_LIMIT' };
  }
  let bytes = os.totalmem();
  let source = 'physical memory';
  try {
    const c = fs.readFileSync('/sys/fs/cgroup/memory.max', 'utf8').trim();
    if (/^\d+$/.test(c) && Number(c) < bytes) [bytes, source] = [Number(c), 'cgroup memory.max'];
  } catch {
    // No cgroup v2 limit readable: the machine's memory is the limit.
  }
  return { bytes: Math.floor(bytes * 0.9), source: `90% of ${source}` };
}

export function parseBytes(s: string): number | null {
  const m = /^\s*([\d.]+(?:e\d+)?)\s*(b|kb|kib|mb|mib|gb|gib|tb|tib)?\s*$/i.exec(s);
  if (!m) return null;
  const unit = (m[2] ?? 'b').toLowerCase();
  const mult: Record<string, number> = { b: 1, kb: 1e3, kib: 2 ** 10, mb: 1e6, mib: 2 ** 20, gb: 1e9, gib: 2 ** 30, tb: 1e12, tib: 2 ** 40 };
  const v = Number(m[1]) * mult[unit];
  return Number.isFinite(v) && v > 0 ? Math.floor(v) : null;
}

export const gib = (b: number) => `${(b / 2 ** 30).toFixed(2)} GiB`;

export function describeEstimate(e: MemoryEstimate): string {
  return `${gib(e.total)} (${Object.entries(e.parts).map(([k, v]) => `${k} ${gib(v)}`).join(', ')})`;
}

/**
 * Stop before anything is loaded or written when the job on the checkpoint in `dir` would not fit:
 * `job` gets the config (its max_position_embeddings caps the length) and gives the shape.
 */
export function checkJobFits(dir: string, what: string, job: (cfg: ModelConfig) => JobShape): void {
  const cfg = loadConfig(dir);
  const b = budgetFor(dir);
  assertWithin(estimateOf(cfg, job(cfg), b), b, what);
}

type Budget = ReturnType<typeof budgetFor>;

/** A job's estimate as its budget counts it: the length capped by the model's, its 16-bit weights as the budget's device keeps them. */
function estimateOf(cfg: ModelConfig, asked: JobShape, b: Budget): MemoryEstimate {
  return counted(estimateMemory(cfg, { ...asked, len: Math.min(asked.len, cfg.max_position_embeddings), halfWeights: b.halfWeights }), b);
}

function assertWithin(e: MemoryEstimate, b: Budget, what: string): void {
  if (!b.device) return assertFits(e, what);
  if (e.total > b.bytes)
    throw new UserError(`${what} needs about ${describeEstimate(e)} of GPU memory, more than the ${gib(b.bytes)} ${b.source}; lower --batch-size or --max-length, or turn on --gradient-checkpointing`);
}

/**
 * Whether `gradient_checkpointing: auto` checkpoints a training job: on the host from
 * CHECKPOINT_AUTO_PARAMS (train/trainer: the host's memory is everything else's too); on a GPU
 * only when the job would not fit the device without it — recomputing every layer costs a third
 * more forward compute, for memory a GPU job does not need.
 */
function autoCheckpoints(cfg: ModelConfig, job: JobShape, b: Budget): boolean {
  return b.device ? estimateOf(cfg, { ...job, checkpointing: false }, b).total > b.bytes : checkpointingOn('auto', paramCount(cfg));
}

/**
 * What a job on `dir` is held to: this machine's memory — or, on the cuda backend, its GPU's,
 * which holds every tensor: the device's free memory and prefopt's reusable blocks, with a bf16
 * checkpoint's frozen matrices at 2 bytes (bf16 products; f16 ones are widened to 4).
 */
export function budgetFor(dir: string): { bytes: number; source: string; halfWeights: boolean; device: boolean } {
  const room = currentBackend() === 'cuda' ? openedCudaDevice()?.available() : null;
  if (room) return { bytes: room.bytes, source: `free on the device (of ${gib(room.total)})`, halfWeights: cudaBf16Products() && halfDtypeOf(dir) === 'bf16', device: true };
  const lim = memoryLimit();
  return { bytes: lim.bytes, source: lim.source, halfWeights: loadsHalf(dir), device: false };
}

/** An estimate as a budget counts it: on the GPU without the host's runtime. */
function counted(e: MemoryEstimate, b: { device: boolean }): MemoryEstimate {
  if (!b.device) return e;
  const { runtime, ...parts } = e.parts;
  return { parts, total: e.total - (runtime ?? 0) };
}

export interface JobReport {
  job: string;
  checkpointing: boolean;
  bytes: number;
  parts: Record<string, number>;
  fits: boolean;
}

/**
 * `prefopt doctor --model`: the estimates for the jobs people run on a checkpoint — log-probs,
 * LoRA DPO (rank r on every linear layer, `pairs` pairs a step) and full SFT — with checkpointing
 * as `auto` decides it, against the budget a job there is held to (budgetFor: the GPU's on cuda).
 */
export function jobReports(dir: string, o: { pairs: number; maxLength: number; loraR: number }): { params: number; limit: number; limitSource: string; halfWeights: boolean; jobs: JobReport[] } {
  const cfg = loadConfig(dir);
  const P = paramCount(cfg);
  const len = Math.min(o.maxLength, cfg.max_position_embeddings);
  const linears = [...new Set([...expectedShapes(cfg).keys()].map(linearKind).filter((m): m is string => !!m))];
  const lim = budgetFor(dir);
  const halfWeights = lim.halfWeights;
  const auto = (s: JobShape): JobShape => ({ ...s, checkpointing: autoCheckpoints(cfg, s, lim) });
  const jobs: [string, JobShape][] = [
    ['logprobs', { kind: 'logprobs', rows: 2 * o.pairs, len, halfWeights }],
    [`lora dpo (r ${o.loraR}, ${linears.join(',')})`, auto({ kind: 'lora', rows: 2 * o.pairs, len, lora: { r: o.loraR, targets: linears }, halfWeights })],
    ['full sft', auto({ kind: 'full', rows: o.pairs, len })],
  ];
  return {
    params: P,
    limit: lim.bytes,
    limitSource: lim.device ? `GPU memory ${lim.source}` : lim.source,
    halfWeights,
    jobs: jobs.map(([job, s]) => {
      const e = counted(estimateMemory(cfg, s), lim);
      return { job, checkpointing: !!s.checkpointing, bytes: e.total, parts: e.parts, fits: e.total <= lim.bytes };
    }),
  };
}

/**
 * checkJobFits for a training stage, with the settings the stage will run under, and the
 * checkpointing it runs with (what the stage hands its trainer): `on` or `off` as asked, `auto`
 * as autoCheckpoints decides. LoRA's targets as the adapter resolves them (none given: the
 * architecture's defaults).
 */
export function checkTrainingFits(dir: string, what: string, o: { rows: number; len: number; train: TrainConfig; lora: LoraConfig | null }): boolean {
  const cfg = loadConfig(dir);
  const b = budgetFor(dir);
  const job: JobShape = {
    kind: o.lora ? 'lora' : 'full',
    rows: o.rows,
    len: o.len,
    lora: o.lora ? { r: o.lora.r, targets: o.lora.targets.length ? o.lora.targets : defaultTargets(cfg.arch) } : undefined,
    gradAccum: o.train.gradAccum,
  };
  const mode = o.train.gradientCheckpointing;
  const on = mode === 'auto' ? autoCheckpoints(cfg, job, b) : mode === 'on';
  assertWithin(estimateOf(cfg, { ...job, checkpointing: on }, b), b, what);
  return on;
}

/** Stop before anything is loaded or written when the estimate is over the limit. */
export function assertFits(e: MemoryEstimate, what: string): void {
  const lim = memoryLimit();
  if (e.total <= lim.bytes) return;
  throw new UserError(
    `${what} needs about ${describeEstimate(e)}, more than the ${gib(lim.bytes)} this machine allows (${lim.source}); ` +
      'lower --batch-size or --max-length, turn on --gradient-checkpointing, or use LoRA instead of full fine-tuning',
  );
}
