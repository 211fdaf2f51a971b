import * as tf from '@tensorflow/tfjs-core';
import { DT_CODE } from './half.js';
import { FusedAddon, Placement, registerFusedKernels } from './fused.js';
import { CUDA_BACKEND, CudaBackend } from './cuda-backend.js';
import { CudaDevice, dims } from './cuda-device.js';
import { envOff } from '../util/env.js';
import { UserError } from '../util/errors.js';

/**
 * prefopt's fused kernels (engine/fused's table) on the device: the FusedAddon calls with device
 * addresses where the host kernels take arrays, each one or a few launches of
 * native/cuda/kernels.cu or cuBLASLt products. 16-bit frozen weights come as the host's bits
 * (engine/half) and go up once, kept while their bits are alive: bf16 as bits for bf16 products
 * (cudaBf16Products), f16 widened to float32. Dropout
 * masks are drawn on the device, tf.dropout's alea stream with each thread jumping ahead to its
 * chunk (kernels.cu: alea_bits), again at each use rather than kept.
 */
type Addr = number;
/** What `view` gives adamwInPlace: an address and a length. */
interface DeviceArray {
  addr: Addr;
  length: number;
}

/** A frozen weight on the device: float32, or bf16 bits for bf16 products. */
interface DeviceWeight {
  addr: Addr;
  half: boolean;
}

/**
 * bf16 checkpoints' frozen matrices stay bf16 on the device and their products run bf16 × bf16
 * with float32 accumulation (the activations rounded to bf16 for them, as PyTorch's bf16 models
 * do), unless PREFOPT_CUDA_BF16=0 widens them to float32 (exact products, twice the memory).
 */
export const cudaBf16Products = () => !envOff('PREFOPT_CUDA_BF16');

/**
 * Frozen weights on the device, uploaded once per form and kept while their bits are alive, and
 * the products with them.
 */
function deviceWeights(dev: CudaDevice) {
  const kept = { f32: new WeakMap<Uint16Array, Addr>(), half: new WeakMap<Uint16Array, Addr>() };
  const weights = new FinalizationRegistry<Addr>((a) => dev.free(a));
  const weight = (w: Addr | Uint16Array, dt: number): DeviceWeight => {
    if (dt === DT_CODE.f32) return { addr: w as Addr, half: false };
    const bits = w as Uint16Array;
    const half = dt === DT_CODE.bf16 && cudaBf16Products();
    const cache = half ? kept.half : kept.f32;
    let a = cache.get(bits);
    if (a === undefined) {
      a = dev.alloc((half ? 2 : 4) * bits.length);
      const out = a;
      if (half) dev.upload(out, bits);
      else
        dev.withTemp([2 * bits.length], ([src]) => {
          dev.upload(src, bits);
          dev.each('widen', bits.length, [src, bits.length, dt, out]);
        });
      cache.set(bits, a);
      weights.register(bits, a);
    }
    return { addr: a, half };
  };
  /** c (+)= a [m, k] · op(W): through bf16 when W is bf16, a rounded for it. */
  const byWeight = (o: { m: number; n: number; k: number; a: Addr; w: DeviceWeight; tb: boolean; c: Addr; beta?: number }) => {
    if (!o.w.half) return dev.gemm({ m: o.m, n: o.n, k: o.k, a: o.a, b: o.w.addr, tb: o.tb, c: o.c, beta: o.beta });
    dev.withTemp([2 * o.m * o.k], ([a16]) => {
      dev.each('to_bf16', o.m * o.k, [o.a, o.m * o.k, a16]);
      dev.gemm({ m: o.m, n: o.n, k: o.k, a: a16, b: o.w.addr, tb: o.tb, c: o.c, beta: o.beta, half: true });
    });
  };
  return { weight, byWeight };
}

/** The host's alea jump multipliers (native/fused.cc: alea_jumps). */
export type AleaJumps = (step: number, count: number, out: BigUint64Array) => void;

/** Mask draws per thread of kernels.cu's alea_bits (PREFOPT_ALEA_CHUNK). */
const ALEA_CHUNK = 256;

/**
 * The multipliers that start each chunk of a mask (kernels.cu: alea_bits), on the device for the
 * life of the process: made at registration for masks up to 16M elements (256 KiB, a few ms),
 * remade larger when a mask needs more.
 */
function aleaJumpTable(dev: CudaDevice, jumps: AleaJumps) {
  let addr = 0;
  let chunks = 0;
  const grow = (need: number) => {
    const words = new BigUint64Array(2 * need);
    jumps(ALEA_CHUNK, need, words);
    const fresh = dev.alloc(words.byteLength);
    dev.upload(fresh, words);
    if (addr) dev.free(addr);
    addr = fresh;
    chunks = need;
  };
  grow(16384);
  return (n: number): Addr => {
    const need = Math.ceil(n / ALEA_CHUNK);
    if (need > chunks) grow(Math.max(need, 2 * chunks));
    return addr;
  };
}

/**
 * The most score memory attention by products holds at once, by default: runs of kv groups, or
 * of one group's query heads, whose scores fit in it go one after another (scoreRuns).
 * PREFOPT_CUDA_ATTENTION_MIB changes it.
 */
const PRODUCT_SCORES_MIB = 256;

/**
 * Which way attention of these sizes runs: `products` (cuBLASLt's tensor cores, the scores held a
 * run at a time) wherever one query head's [T, Tk] scores fit in the budget — training and
 * prefill, up to 8,192 tokens by default — or `flash` (kernels.cu's, the scores never held):
 * decoding's single query, where products would also copy the cache to a heads-first layout, and
 * longer rows. PREFOPT_CUDA_ATTENTION=flash or =products forces one (bench/gpu-check times both).
 */
export function attentionPath(b: number, t: number, tk: number, h: number, kv: number, env: NodeJS.ProcessEnv = process.env): 'products' | 'flash' {
  const forced = forcedAttention(env);
  if (forced) return forced;
  return t >= 16 && b > 0 && h >= kv && 4 * t * tk <= scoresBudget(env) ? 'products' : 'flash';
}

/** PREFOPT_CUDA_ATTENTION_MIB in bytes (default PRODUCT_SCORES_MIB); anything but a positive number is refused. */
export function scoresBudget(env: NodeJS.ProcessEnv = process.env): number {
  const v = (env.PREFOPT_CUDA_ATTENTION_MIB ?? '').trim();
  const mib = v === '' ? PRODUCT_SCORES_MIB : Number(v);
  if (!(mib > 0 && Number.isFinite(mib))) throw new UserError(`PREFOPT_CUDA_ATTENTION_MIB: expected a positive number of MiB, found "${env.PREFOPT_CUDA_ATTENTION_MIB}"`);
  return Math.floor(mib * 2 ** 20);
}

/**
 * One run of attention by products: kv groups `group` … `group + groups − 1` (b·KV + kv head),
 * and of each, the query heads `head` … `head + heads − 1` (of G).
 */
export interface ScoreRun {
  group: number;
  groups: number;
  head: number;
  heads: number;
}

/**
 * The runs attention by products goes in, their scores within `budget` bytes: as many whole batch
 * entries as fit; where one entry does not, as many of one entry's kv groups; where one group does
 * not, as many of one group's query heads (their dk and dv then add up over the runs). A run never
 * crosses an entry's edge unless it takes entries whole, so that its rows find their mask rows
 * from its first entry (kernels.cu: softmax_rows). At least one query head a run, even past the
 * budget (attentionPath keeps such sizes off this path).
 */
export function scoreRuns(b: number, kv: number, g: number, t: number, tk: number, budget: number): ScoreRun[] {
  const head = 4 * t * tk;
  const groupsFit = Math.floor(budget / (g * head));
  const runs: ScoreRun[] = [];
  const whole = (group: number, groups: number) => runs.push({ group, groups, head: 0, heads: g });
  if (groupsFit >= kv) {
    const entries = Math.floor(groupsFit / kv);
    for (let b0 = 0; b0 < b; b0 += entries) whole(b0 * kv, Math.min(entries, b - b0) * kv);
  } else if (groupsFit >= 1) {
    for (let b0 = 0; b0 < b; b0++) for (let k0 = 0; k0 < kv; k0 += groupsFit) whole(b0 * kv + k0, Math.min(groupsFit, kv - k0));
  } else {
    const heads = Math.max(1, Math.floor(budget / head));
    for (let j = 0; j < b * kv; j++) for (let h0 = 0; h0 < g; h0 += heads) runs.push({ group: j, groups: 1, head: h0, heads: Math.min(heads, g - h0) });
  }
  return runs;
}

/** PREFOPT_CUDA_ATTENTION's way, null for auto (unset or empty); anything else is refused. */
export function forcedAttention(env: NodeJS.ProcessEnv = process.env): 'products' | 'flash' | null {
  const v = (env.PREFOPT_CUDA_ATTENTION ?? '').trim().toLowerCase();
  if (v === '' || v === 'auto') return null;
  if (v === 'products' || v === 'flash') return v;
  throw new UserError(`PREFOPT_CUDA_ATTENTION: expected products, flash or auto, found "${env.PREFOPT_CUDA_ATTENTION}"`);
}

/**
 * Attention as products: q [B, T, H, hd], k and v [B, Tk, KV, hd] copied heads-first, so that
 * the G query heads of a kv group and their T rows are one [G·T, hd] matrix; then for each run
 * (scoreRuns), one strided batch of products over its kv groups each: scores = q·kᵀ,
 * p = softmax_rows(scores), o = p·v. The backward pass computes p again the same way (the same
 * bits), then dp = dO·vᵀ, ds = softmax_grad_rows(p, dp), dq = ds·k, dk = dsᵀ·q (which sums the
 * run's query heads) and dv = pᵀ·dO, added to what the group's earlier runs left.
 */
function attentionByProducts(dev: CudaDevice) {
  const gemm = dev.gemm.bind(dev);
  // x [B, T, N, hd] ↔ [B, N, T, hd]
  const headsFirst = (x: number, y: number, b: number, t: number, n: number, hd: number, back = false) => {
    const rowMajor = [t * n * hd, hd, n * hd, 1];
    const headMajor = [n * t * hd, t * hd, hd, 1];
    const count = b * n * t * hd;
    dev.each('strided_copy', count, [x, y, count, 4, dims([b, n, t, hd], back ? headMajor : rowMajor, back ? rowMajor : headMajor)]);
  };
  const bytes = (...n: number[]) => 4 * n.reduce((x, y) => x * y, 1);
  type Sizes = { b: number; t: number; tk: number; h: number; kv: number; hd: number; g: number };
  /** The runs, and the bytes of the largest one's scores. */
  const plan = (z: Sizes) => {
    const runs = scoreRuns(z.b, z.kv, z.g, z.t, z.tk, scoresBudget());
    return { runs, scores: Math.max(...runs.map((r) => bytes(r.groups, r.heads, z.t, z.tk))) };
  };
  /**
   * A run in the heads-first operands: where it starts on the query side (its groups' rows
   * `query` floats apart) and on the key side, its m rows of scores a group and their size.
   */
  const place = (run: ScoreRun, z: Sizes) => ({
    q: (addr: number) => addr + bytes(run.group * z.g + run.head, z.t, z.hd),
    k: (addr: number) => addr + bytes(run.group, z.tk, z.hd),
    m: run.heads * z.t,
    query: z.g * z.t * z.hd,
    scores: run.heads * z.t * z.tk,
  });
  /** q, k and v heads-first into qh, kh and vh: what both passes start from. */
  const qkvHeadsFirst = (q: number, k: number, v: number, [qh, kh, vh]: number[], z: Sizes) => {
    headsFirst(q, qh, z.b, z.t, z.h, z.hd);
    headsFirst(k, kh, z.b, z.tk, z.kv, z.hd);
    headsFirst(v, vh, z.b, z.tk, z.kv, z.hd);
  };
  /** A run's scores qh·khᵀ into s, turned into probabilities in place. */
  const probabilities = (run: ScoreRun, qh: number, kh: number, s: number, mask: number, scale: number, z: Sizes) => {
    const r = place(run, z);
    gemm({ batch: run.groups, m: r.m, n: z.tk, k: z.hd, a: r.q(qh), sa: r.query, b: r.k(kh), sb: z.tk * z.hd, tb: true, c: s, sc: r.scores });
    dev.rows('softmax_rows', run.groups * r.m, [s, mask + bytes(Math.floor(run.group / z.kv), z.t, z.tk), z.t, z.tk, z.h * z.t, scale]);
  };
  return {
    forward: (q: number, k: number, v: number, mask: number, scale: number, b: number, t: number, tk: number, h: number, kv: number, hd: number, o: number) => {
      const z = { b, t, tk, h, kv, hd, g: h / kv };
      const { runs, scores } = plan(z);
      dev.withTemp([bytes(b, h, t, hd), bytes(b, kv, tk, hd), bytes(b, kv, tk, hd), scores, bytes(b, h, t, hd)], ([qh, kh, vh, s, oh]) => {
        qkvHeadsFirst(q, k, v, [qh, kh, vh], z);
        for (const run of runs) {
          const r = place(run, z);
          probabilities(run, qh, kh, s, mask, scale, z);
          gemm({ batch: run.groups, m: r.m, n: hd, k: tk, a: s, sa: r.scores, b: r.k(vh), sb: tk * hd, c: r.q(oh), sc: r.query });
        }
        headsFirst(oh, o, b, t, h, hd, true);
      });
    },
    backward: (q: number, k: number, v: number, mask: number, scale: number, b: number, t: number, tk: number, h: number, kv: number, hd: number, dout: number, dq: number, dk: number, dv: number) => {
      const z = { b, t, tk, h, kv, hd, g: h / kv };
      const { runs, scores } = plan(z);
      const side = bytes(b, kv, tk, hd);
      const rows = bytes(b, h, t, hd);
      dev.withTemp([rows, side, side, rows, scores, scores, rows, side, side], ([qh, kh, vh, doh, p, ds, dqh, dkh, dvh]) => {
        qkvHeadsFirst(q, k, v, [qh, kh, vh], z);
        headsFirst(dout, doh, b, t, h, hd);
        for (const run of runs) {
          const r = place(run, z);
          probabilities(run, qh, kh, p, mask, scale, z);
          gemm({ batch: run.groups, m: r.m, n: tk, k: hd, a: r.q(doh), sa: r.query, b: r.k(vh), sb: tk * hd, tb: true, c: ds, sc: r.scores });
          dev.rows('softmax_grad_rows', run.groups * r.m, [p, ds, tk, scale]);
          const each = { batch: run.groups, sa: r.scores };
          gemm({ ...each, m: r.m, n: hd, k: tk, a: ds, b: r.k(kh), sb: tk * hd, c: r.q(dqh), sc: r.query });
          // dk and dv: a group's later query heads add to what its first ones left.
          const onto = { ...each, ta: true, m: tk, n: hd, k: r.m, sb: r.query, sc: tk * hd, beta: run.head > 0 ? 1 : 0 };
          gemm({ ...onto, a: ds, b: r.q(qh), c: r.k(dkh) });
          gemm({ ...onto, a: p, b: r.q(doh), c: r.k(dvh) });
        }
        headsFirst(dqh, dq, b, t, h, hd, true);
        headsFirst(dkh, dk, b, tk, kv, hd, true);
        headsFirst(dvh, dv, b, tk, kv, hd, true);
      });
    },
  };
}

/**
 * Attention forward and backward on the device: as products (attentionByProducts) where
 * attentionPath says, else kernels.cu's flash-style kernels. Those keep each query row's max and
 * log Σ exp beside the output (a companion of o's memory, freed with it), and the op saves o for
 * the backward pass (savesAttentionOutput, on that path only): the backward pass starts from them,
 * not from a second forward pass (about a fifth of attention's arithmetic).
 */
function deviceAttention(dev: CudaDevice): Pick<FusedAddon, 'attention' | 'attentionGrad' | 'savesAttentionOutput'> {
  const products = attentionByProducts(dev);
  return {
    savesAttentionOutput: (b, t, tk, h, kv) => attentionPath(b, t, tk, h, kv) === 'flash',
    attention: (q: any, kk: any, v: any, mask: any, scale, b, t, tk, h, kv, hd, o: any) => {
      checkHeadDim(dev, hd);
      if (attentionPath(b, t, tk, h, kv) === 'products') return products.forward(q, kk, v, mask, scale, b, t, tk, h, kv, hd, o);
      const stat = dev.allocCompanion(o, 8 * b * h * t);
      dev.blocks('attention_fwd', attentionJobs(dev, b * h, t, hd), [q, kk, v, mask, scale, b, t, tk, h, kv, hd, o, stat], ATTENTION_BLOCK);
    },
    // With grouped heads, dk and dv per query head first, summed over each group after (kernels.cu: no atomics).
    attentionGrad: (q: any, kk: any, v: any, mask: any, scale, b, t, tk, h, kv, hd, dout: any, dq: any, dk: any, dv: any, o: any) => {
      checkHeadDim(dev, hd);
      if (attentionPath(b, t, tk, h, kv) === 'products') return products.backward(q, kk, v, mask, scale, b, t, tk, h, kv, hd, dout, dq, dk, dv);
      const stat = o === null ? undefined : dev.companion(o);
      if (stat === undefined) throw new Error("cuda backend: attention's backward pass needs the forward pass's output and row statistics");
      const g = h / kv;
      const perHead = g > 1 ? 4 * b * tk * h * hd : 0;
      dev.withTemp([4 * b * h * t, perHead, perHead], ([delta, pk, pv]) => {
        dev.warps('attention_bwd_delta', b * h * t, [o, dout, b, t, h, hd, delta]);
        dev.blocks('attention_bwd_dq', attentionJobs(dev, b * h, t, hd), [q, kk, v, mask, dout, stat, delta, scale, b, t, tk, h, kv, hd, dq], ATTENTION_BLOCK);
        dev.blocks('attention_bwd_dkdv', attentionJobs(dev, b * h, tk, hd), [q, kk, v, mask, dout, stat, delta, scale, b, t, tk, h, kv, hd, g > 1 ? pk : dk, g > 1 ? pv : dv], ATTENTION_BLOCK);
        if (g > 1) {
          dev.each('head_group_sum', b * tk * kv * hd, [pk, b * tk, kv, g, hd, dk]);
          dev.each('head_group_sum', b * tk * kv * hd, [pv, b * tk, kv, g, hd, dv]);
        }
      });
    },
  };
}

/** Dropout on the device: masks drawn there (alea_bits) and applied (dropout_bits). */
function deviceDropout(dev: CudaDevice, jumps: AleaJumps): Pick<FusedAddon, 'dropoutAlea' | 'dropoutBits' | 'drawsMasks'> {
  const jumpTable = aleaJumpTable(dev, jumps);
  return {
    // The mask drawn on the device from the generator's state (its words: s·2³², exact), applied
    // there; copied to the host only if asked for (drawsMasks: dropout does not ask).
    dropoutAlea: (x: any, n, s0, s1, s2, c, keep, y: any, bits) =>
      dev.withTemp([4 * Math.ceil(n / 32)], ([b]) => {
        dev.each('alea_bits', Math.ceil(n / ALEA_CHUNK), [n, s0 * 2 ** 32, s1 * 2 ** 32, s2 * 2 ** 32, c, jumpTable(n), keep, b], 128);
        dev.each('dropout_bits', n, [x, n, b, keep, y]);
        if (bits) dev.download(b, bits);
      }),
    // A mask kept on the host (only where drawsMasks is off: not on this device).
    dropoutBits: (x: any, n, bits, keep, y: any) =>
      dev.withTemp([4 * bits.length], ([b]) => {
        dev.upload(b, bits);
        dev.each('dropout_bits', n, [x, n, b, keep, y]);
      }),
    drawsMasks: true,
  };
}

export function cudaFused(dev: CudaDevice, jumps: AleaJumps): FusedAddon {
  const { weight, byWeight } = deviceWeights(dev);
  const gemm = dev.gemm.bind(dev);
  /** out [d] = Σ_rows dy (· x·r): chunks of rows in parallel, then their sums in order. */
  const columnSum = (dy: Addr, x: Addr, r: Addr, n: number, d: number, out: Addr) => {
    const chunks = Math.ceil(n / COLUMN_CHUNK);
    dev.withTemp([4 * chunks * d], ([part]) => {
      dev.each('column_sum_part', chunks * d, [dy, x, r, n, d, COLUMN_CHUNK, part]);
      dev.each('column_sum', d, [part, chunks, d, out]);
    });
  };

  const k: FusedAddon = {
    ...deviceAttention(dev),
    ...deviceDropout(dev, jumps),
    labelLogProbs: (x: any, n, v, labels: any, out: any) => dev.rows('label_logprobs', n, [x, v, labels, out]),
    labelLogProbsGrad: (x: any, n, v, labels: any, out: any, dy: any, dx: any) => dev.rows('label_logprobs_grad', n, [x, v, labels, out, dy, dx]),
    rmsNorm: (x: any, w: any, n, d, eps, y: any, res: any, sum: any) => dev.rows('rms_norm', n, [x, w, d, eps, y, res ?? 0, sum ?? 0, 0]),
    rmsNormGrad: (x: any, w: any, dy: any, n, d, eps, dx: any, dw: any, dres: any) =>
      dev.withTemp([4 * n], ([r]) => {
        dev.rows('rms_inv', n, [x, d, eps, r]);
        if (dx !== null) dev.rows('rms_norm_grad_x', n, [x, w, dy, r, d, dx, dres ?? 0]);
        if (dw !== null) columnSum(dy, x, r, n, d, dw);
      }),
    swiglu: (g: any, u: any, n, y: any) => dev.each('swiglu', n, [g, u, n, y]),
    swigluGrad: (g: any, u: any, dy: any, n, dg: any, du: any) =>
      dev.withTemp([dg === null ? 4 * n : 0, du === null ? 4 * n : 0], ([tg, tu]) => dev.each('swiglu_grad', n, [g, u, dy, n, dg ?? tg, du ?? tu])),
    rope: (x: any, cos: any, sin: any, rows, heads, hd, inverse, y: any) => dev.each('rope', (rows * heads * hd) / 2, [x, cos, sin, rows, heads, hd, inverse ? 1 : 0, y]),
    biasAdd: (x: any, bias: any, n, d, y: any) => dev.each('bias_add', n * d, [x, bias, n, d, y]),
    columnSum: (dy: any, n, d, out: any) => columnSum(dy, 0, 0, n, d, out),
    add: (a: any, b: any, n, y: any) => dev.each('binary', n, [0, a, b, y, n, 1, dims([n], [1], [1])]),
    // u = s·(xd·A), y = x·W + u·B (+ bias): the host kernel's terms (native/lora.cc).
    loraForward: (m, din, dout, r, x: any, xd: any, w: any, a: any, b: any, scale, wdt, whf, y: any, u: any, bias: any) => {
      gemm({ m, n: r, k: din, a: xd, b: a, c: u, alpha: scale });
      byWeight({ m, n: dout, k: din, a: x, w: weight(w, wdt), tb: whf, c: y });
      gemm({ m, n: dout, k: r, a: u, b, c: y, beta: 1 });
      if (bias !== null) dev.each('bias_add', m * dout, [y, bias, m, dout, y]);
    },
    // g = s·dy·Bᵀ; dA = xdᵀ·g, dB = uᵀ·dy, dx = dy·Wᵀ (+ g·Aᵀ, or that to dxd under dropout).
    loraBackward: (m, din, dout, r, dy: any, xd: any, w: any, a: any, b: any, u: any, scale, wdt, whf, dx: any, dxd: any, da: any, db: any) =>
      dev.withTemp([4 * m * r], ([g]) => {
        gemm({ m, n: r, k: dout, a: dy, b, tb: true, c: g, alpha: scale });
        gemm({ m: din, n: r, k: m, a: xd, ta: true, b: g, c: da });
        gemm({ m: r, n: dout, k: m, a: u, ta: true, b: dy, c: db });
        byWeight({ m, n: din, k: dout, a: dy, w: weight(w, wdt), tb: !whf, c: dx });
        if (dxd === null) gemm({ m, n: din, k: r, a: g, b: a, tb: true, c: dx, beta: 1 });
        else gemm({ m, n: din, k: r, a: g, b: a, tb: true, c: dxd });
      }),
    matmulWeight: (tb, m, n, kk, a: any, b: any, bdt, c: any) => byWeight({ m, n, k: kk, a, w: weight(b, bdt), tb, c }),
    adamwInPlace: (ps: any[], gs: any[], ms: any[], vs: any[], scalars) => adamwAll(dev, ps, gs, ms, vs, scalars),
    sumSquares: (x: any, n, out: any) => dev.single('sum_squares', [x, n, out]),
    splitQkv: (qkv: any, n, kv, g, hd, q: any, kk: any, v: any, merge) => dev.each('split_qkv', n * kv * (g + 2) * hd, [qkv, n, kv, g, hd, q, kk, v, merge ? 1 : 0]),
    embed: (table: any, v, d, ids: any, n, out: any, dt) => {
      const t = weight(table, dt);
      if (t.half) dev.each('embed_half', n * d, [t.addr, v, d, dt, ids, n, out]);
      else dev.each('embed', n * d, [t.addr, v, d, ids, n, out]);
    },
    // The ids come down (a few KB) to group the rows by id on the host: the kernel then sums
    // each id's rows in parallel over ids and columns (kernels.cu: embed_grad).
    embedGrad: (ids: any, n, dy: any, v, d, dtable: any) => {
      const host = new Int32Array(n);
      dev.download(ids, host);
      const g = rowsById(host, v);
      const u = g.ids.length;
      const packed = new Int32Array(u + g.starts.length + g.rows.length); // one upload: ids, starts, rows
      packed.set(g.ids);
      packed.set(g.starts, u);
      packed.set(g.rows, u + g.starts.length);
      dev.fill(dtable, v * d, 0);
      dev.withTemp([4 * packed.length], ([p]) => {
        dev.upload(p, packed);
        dev.each('embed_grad', u * d, [p, p + 4 * u, p + 4 * (u + g.starts.length), u, dy, d, dtable]);
      });
    },
  };
  return k;
}

/** Rows a thread of column_sum_part sums: 2048 rows of 896 columns make 28,672 threads. */
const COLUMN_CHUNK = 64;

/**
 * The rows of each distinct id in [0, v), in order (ids ascending, rows ascending within one):
 * rows of ids[u] are rows[starts[u] .. starts[u + 1]). Ids outside [0, v) have no gradient.
 */
export function rowsById(idx: Int32Array, v: number): { ids: Int32Array; starts: Int32Array; rows: Int32Array } {
  const order = Int32Array.from({ length: idx.length }, (_, i) => i).filter((i) => idx[i] >= 0 && idx[i] < v);
  order.sort((a, b) => idx[a] - idx[b] || a - b);
  const ids: number[] = [];
  const starts: number[] = [];
  order.forEach((row, k) => {
    if (k === 0 || idx[row] !== idx[order[k - 1]]) ids.push(idx[row]), starts.push(k);
  });
  starts.push(order.length);
  return { ids: Int32Array.from(ids), starts: Int32Array.from(starts), rows: order };
}

/** Elements a block of kernels.cu's adamw takes at a time (PREFOPT_ADAMW_CHUNK), and a tensor's words in its table (PREFOPT_ADAMW_WORDS). */
const ADAMW_CHUNK = 4096;
const ADAMW_WORDS = 15;

/**
 * One optimizer step over every tensor in one launch (kernels.cu: adamw): per tensor, its
 * addresses, size, first chunk and the float bits of its nine scalars, in one table, uploaded.
 */
function adamwAll(dev: CudaDevice, ps: DeviceArray[], gs: DeviceArray[], ms: DeviceArray[], vs: DeviceArray[], scalars: Float32Array): void {
  const tab = new BigInt64Array(ADAMW_WORDS * ps.length);
  const bits = new Uint32Array(scalars.buffer, scalars.byteOffset, scalars.length);
  let chunks = 0;
  ps.forEach((p, i) => {
    tab.set([p.addr, gs[i].addr, ms[i].addr, vs[i].addr, p.length, chunks].map(BigInt), ADAMW_WORDS * i);
    tab.set(Array.from(bits.subarray(9 * i, 9 * i + 9), BigInt), ADAMW_WORDS * i + 6);
    chunks += Math.ceil(p.length / ADAMW_CHUNK);
  });
  if (!chunks) return;
  dev.withTemp([tab.byteLength], ([t]) => {
    dev.upload(t, tab);
    dev.blocks('adamw', chunks, [t, ps.length, chunks], 256);
  });
}

/** Threads per block of the attention kernels. */
const ATTENTION_BLOCK = 128;

/**
 * kernels.cu's attention jobs for `heads` (b, head) pairs of `rows` rows: a block covers the rows
 * of one pair that the kernels' own rule gives (attn_group, through the addon).
 */
function attentionJobs(dev: CudaDevice, heads: number, rows: number, hd: number): number {
  return heads * Math.ceil(rows / dev.addon.cudaAttentionRows(hd, ATTENTION_BLOCK));
}

/** The flash kernels' limit on head_dim (a row's dimensions spread over a group's registers). */
function checkHeadDim(dev: CudaDevice, hd: number): void {
  if (!dev.addon.cudaAttentionRows(hd, ATTENTION_BLOCK)) throw new Error(`cuda backend: attention's kernels take head_dim up to ${maxHeadDim(dev)}, not ${hd}`);
}

function maxHeadDim(dev: CudaDevice): number {
  let hd = 1;
  while (dev.addon.cudaAttentionRows(hd * 2, ATTENTION_BLOCK)) hd *= 2;
  return hd;
}

/** Outputs allocated on the device; kernels get addresses, adamwInPlace {addr, length}. */
const devicePlacement: Placement = {
  run: (be: CudaBackend, inputs, shapes, fill) => {
    const outs = shapes.map((s) => be.makeTensorInfo(s, 'float32'));
    fill(inputs.map((t) => (t ? be.addr(t) : null)), outs.map((t) => be.addr(t)));
    return outs;
  },
  view: (be: CudaBackend, t) => ({ addr: be.addr(t), length: tf.util.sizeFromShape(t.shape) }),
};

export function registerCudaFused(dev: CudaDevice, jumps: AleaJumps): void {
  forcedAttention(); // a bad value stops the job before it starts
  scoresBudget();
  registerFusedKernels(CUDA_BACKEND, cudaFused(dev, jumps), devicePlacement);
}
