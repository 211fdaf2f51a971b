import * as tf from '@tensorflow/tfjs-core';
import { ModelConfig, expectedShapes, isLinearWeight } from './config.js';
import { maskTensor } from './mask.js';
import { ropeTables } from './rope.js';
import { addRmsNorm, attention, embed, labelLogProbs, labelLogProbsSlope, linear, mm, mmTransB, rmsNorm, rope, splitQkv, swiglu } from '../engine/ops.js';
import { Rng } from '../util/rng.js';
import { RngHooks, checkpoint } from '../engine/checkpoint.js';
import { transpose2d, widenHalf } from '../engine/native.js';
import { dropTensorArray, tensorArray } from '../engine/native-backend.js';
import { HalfWeight, Weight, isHalf } from '../engine/half.js';

/**
 * A Llama-family decoder (Llama, Mistral, Qwen2, Qwen3, 360Zhinao) in one file, after nanoGPT's model.py.
 * Parameters keep their Hugging Face names; linear weights are held transposed ([in, out]) so
 * that every product is a plain x·W (see engine/ops). Adapters (LoRA) plug in per linear layer
 * through `adapter`, and can be switched off to recover the base model exactly.
 */

/** Something that computes a named linear layer in place of x·W + b (e.g. LoRA: that plus a low-rank update). */
export interface LinearAdapter {
  targets(module: string): boolean;
  linear(module: string, x: tf.Tensor, w: Weight, bias: tf.Tensor | null): tf.Tensor;
  /** The trainable tensors of the modules whose names start with `prefix`. */
  variables(prefix: string): tf.Variable[];
  /** Its random stream (dropout), for a checkpointed layer to replay. */
  rng?: RngHooks;
}

/** Per-layer key/value tensors [B, Tc, KV, hd], kept across decode steps. */
export class KVCache {
  k: (tf.Tensor4D | null)[];
  v: (tf.Tensor4D | null)[];
  /** keyValid for every cached position, row-major [B, Tc]. */
  valid: number[][];
  constructor(layers: number, batch: number) {
    this.k = new Array(layers).fill(null);
    this.v = new Array(layers).fill(null);
    this.valid = Array.from({ length: batch }, () => []);
  }
  get length(): number {
    return this.valid[0]?.length ?? 0;
  }
  get batch(): number {
    return this.valid.length;
  }
  /** Repeat each row `times` times (prefill a prompt once, then sample K continuations). */
  repeatRows(times: number): void {
    if (times === 1) return;
    const idx: number[] = [];
    for (let b = 0; b < this.batch; b++) for (let r = 0; r < times; r++) idx.push(b);
    const ii = tf.tensor1d(idx, 'int32');
    for (let l = 0; l < this.k.length; l++) {
      const k = this.k[l]!;
      const v = this.v[l]!;
      this.k[l] = tf.keep(tf.gather(k, ii)) as tf.Tensor4D;
      this.v[l] = tf.keep(tf.gather(v, ii)) as tf.Tensor4D;
      k.dispose();
      v.dispose();
    }
    ii.dispose();
    this.valid = idx.map((b) => [...this.valid[b]]);
  }
  dispose(): void {
    for (const t of [...this.k, ...this.v]) t?.dispose();
    this.k.fill(null);
    this.v.fill(null);
  }
}

export interface ForwardBatch {
  /** Token ids [B, T]. */
  ids: ArrayLike<number>;
  batch: number;
  len: number;
  /** Absolute positions [B*T]; default 0..T-1 (offset by the cache length). */
  positions?: ArrayLike<number>;
  /** [B*T] 1 for real tokens, 0 for padding; default all real. */
  valid?: ArrayLike<number>;
  /** [B*T] segment ids when several conversations are packed in one row. */
  segments?: ArrayLike<number>;
}

/** Logits computed at once at most (128 MiB: 220 rows of a 152K vocabulary). */
export const HEAD_CHUNK_BYTES = 128 * 2 ** 20;

/** Rows of a vocabulary of `vocab` whose float32 logits fit in `bytes` (at least one). */
export function headChunkRows(bytes: number, vocab: number): number {
  return Math.max(1, Math.floor(bytes / (4 * vocab)));
}

export class Decoder {
  adapter: LinearAdapter | null = null;
  adapterEnabled = true;
  /**
   * Recompute each decoder layer in the backward pass instead of keeping its activations
   * (engine/checkpoint): only the residual stream between layers stays alive while training.
   */
  checkpointLayers = false;
  /** Bytes of float32 logits the LM head computes at once (labelLogps). */
  headChunkBytes = HEAD_CHUNK_BYTES;

  constructor(
    readonly cfg: ModelConfig,
    /** Float32 parameters (tfjs variables, prefopt's layout). */
    readonly params: Map<string, tf.Variable>,
    /** Frozen matrices kept in the checkpoint's bf16/f16 (engine/half); never in `params` too. */
    readonly half: Map<string, HalfWeight> = new Map(),
  ) {}

  /** Build from HF-layout host tensors (transposing linear weights), or 16-bit frozen weights as they are. */
  static fromHF(cfg: ModelConfig, get: (name: string) => { shape: number[]; data: Float32Array } | HalfWeight, trainable = false): Decoder {
    // Variables stay unnamed: tfjs names are global, and two models (policy, reference) coexist.
    const params = new Map<string, tf.Variable>();
    const half = new Map<string, HalfWeight>();
    try {
      for (const [name] of expectedShapes(cfg)) {
        const t = get(name);
        if (isHalf(t) && !trainable) {
          half.set(name, t);
          continue;
        }
        const init = isHalf(t) ? halfToInternal(name, t) : toInternal(name, t.shape, t.data);
        params.set(name, tf.variable(init, trainable));
        init.dispose();
      }
    } catch (e) {
      for (const v of params.values()) v.dispose();
      throw e;
    }
    return new Decoder(cfg, params, half);
  }

  /** Fresh weights (initTensor), trainable. */
  static init(cfg: ModelConfig, seed: number, std = 0.02): Decoder {
    return Decoder.fromHF(cfg, (name) => initTensor(cfg, name, seed, std), true);
  }

  /** A float32 parameter (a 16-bit one is an error: read it with weight(), or widen it with float32()). */
  p(name: string): tf.Variable {
    if (this.half.has(name)) throw new Error(`${name} is held in ${this.half.get(name)!.dtype}; read it with weight() or widen it with float32()`);
    const v = this.params.get(name);
    if (!v) throw new Error(`model has no parameter ${name}`);
    return v;
  }

  /** A weight as it is held: float32, or the checkpoint's 16 bits for a frozen matrix. */
  weight(name: string): Weight {
    return this.half.get(name) ?? this.p(name);
  }

  /** Every parameter's name, however it is stored. */
  names(): string[] {
    return [...this.params.keys(), ...this.half.keys()];
  }

  /** A parameter's shape in prefopt's layout ([in, out] for linear weights), however it is stored. */
  shapeOf(name: string): number[] {
    return this.weight(name).shape as number[];
  }

  /** Replace a 16-bit weight by a float32 variable of its values (to train it, or to fold an update in). */
  float32(name: string): tf.Variable {
    const hw = this.half.get(name);
    if (!hw) return this.p(name);
    const init = halfToInternal(name, hw);
    const v = tf.variable(init, false);
    init.dispose();
    this.half.delete(name);
    this.params.set(name, v);
    return v;
  }

  setTrainable(trainable: boolean): void {
    if (trainable) for (const name of [...this.half.keys()]) this.float32(name);
    for (const v of this.params.values()) v.trainable = trainable;
  }

  /** A linear layer by module name, with its bias and any adapter. */
  lin(module: string, x: tf.Tensor): tf.Tensor {
    const w = this.weight(`${module}.weight`);
    const b = this.params.get(`${module}.bias`) ?? null;
    if (this.adapter && this.adapterEnabled && this.adapter.targets(module)) return this.adapter.linear(module, x, w, b);
    return linear(x, w, b);
  }

  /** Final hidden states [B, T, D]. With a cache, appends this chunk's keys/values to it. */
  hidden(batch: ForwardBatch, cache?: KVCache): tf.Tensor3D {
    const cfg = this.cfg;
    const { batch: B, len: T } = batch;
    const past = cache?.length ?? 0;
    const Tk = past + T;
    const positions = batch.positions ?? Array.from({ length: B * T }, (_, i) => past + (i % T));
    const { cos, sin } = ropeTables(cfg, positions);
    const hd = cfg.head_dim;
    const cosT = tf.tensor4d(cos, [B, T, 1, hd]);
    const sinT = tf.tensor4d(sin, [B, T, 1, hd]);
    let keyValid: number[] | undefined;
    if (cache) {
      for (let b = 0; b < B; b++) for (let t = 0; t < T; t++) cache.valid[b].push(batch.valid ? batch.valid[b * T + t] : 1);
      keyValid = cache.valid.flat();
    } else if (batch.valid) keyValid = Array.from(batch.valid);
    const mask = maskTensor({ batch: B, queryLen: T, keyLen: Tk, keyValid, segments: batch.segments, window: cfg.sliding_window ?? undefined });
    // The residual stream is [B·T, D] until the end: linear layers take it as it is.
    const ids = tf.tensor1d(Array.from(batch.ids), 'int32');
    let x = embed(this.weight('model.embed_tokens.weight'), ids) as tf.Tensor;
    const L = cfg.num_hidden_layers;
    const eps = cfg.rms_norm_eps;
    if (this.checkpointLayers && !cache && L > 0) {
      // Each layer is one unit from its residual input to its residual output.
      for (let l = 0; l < L; l++) {
        const unit = (xl: tf.Tensor, c: tf.Tensor, s: tf.Tensor, m: tf.Tensor) => {
          const { x2, mlp } = this.block(l, xl, rmsNorm(xl, this.p(`model.layers.${l}.input_layernorm.weight`), eps), B, T, c, s, m as tf.Tensor4D);
          return tf.add(x2, mlp);
        };
        const prev = x;
        x = checkpoint(unit, x, this.trainables(`model.layers.${l}.`), [cosT, sinT, mask], this.adapterEnabled ? this.adapter?.rng : undefined);
        prev.dispose();
      }
    } else {
      // Each residual add is fused with the norm that reads its sum, but for the last one (the
      // final norm's input has no other reader).
      // Each layer in its own tidy: what the gradient tape saved survives it, the rest (all of
      // it in a forward pass without gradients) is freed before the next layer runs.
      let h = L > 0 ? rmsNorm(x, this.p('model.layers.0.input_layernorm.weight'), eps) : x;
      for (let l = 0; l < L; l++) {
        const prev = [x, h];
        [x, h] = tf.tidy(() => {
          const { x2, mlp } = this.block(l, x, h, B, T, cosT, sinT, mask, cache);
          return l + 1 < L ? addRmsNorm(x2, mlp, this.p(`model.layers.${l + 1}.input_layernorm.weight`), eps) : [tf.add(x2, mlp), h];
        });
        // The tape keeps its own references (clones) to what it saved.
        for (const t of prev) if (t !== x && t !== h) t.dispose();
      }
    }
    return tf.reshape(rmsNorm(x, this.p('model.norm.weight'), eps), [B, T, cfg.hidden_size]) as tf.Tensor3D;
  }

  /**
   * Layer l on the residual stream x [B·T, D] and its normalized form h: x2 = x + attention(h)
   * and the MLP's output on norm(x2); the layer's output is x2 + mlp.
   */
  private block(l: number, x: tf.Tensor, h: tf.Tensor, B: number, T: number, cos: tf.Tensor, sin: tf.Tensor, mask: tf.Tensor4D, cache?: KVCache): { x2: tf.Tensor; mlp: tf.Tensor } {
    const p = `model.layers.${l}`;
    const [x2, h2] = addRmsNorm(x, this.attention(l, h as tf.Tensor2D, B, T, cos, sin, mask, cache), this.p(`${p}.post_attention_layernorm.weight`), this.cfg.rms_norm_eps);
    const mlp = this.lin(`${p}.mlp.down_proj`, swiglu(this.lin(`${p}.mlp.gate_proj`, h2), this.lin(`${p}.mlp.up_proj`, h2)));
    return { x2, mlp };
  }

  /** The tensors under `prefix` that training updates: trainable weights, and the adapter's while it is on. */
  trainables(prefix: string): tf.Variable[] {
    const own = [...this.params].filter(([n, v]) => n.startsWith(prefix) && v.trainable).map(([, v]) => v);
    return this.adapter && this.adapterEnabled ? [...own, ...this.adapter.variables(prefix)] : own;
  }

  /** Self-attention of layer l over h [B·T, D]; → [B·T, D]. */
  private attention(l: number, h: tf.Tensor2D, B: number, T: number, cos: tf.Tensor, sin: tf.Tensor, mask: tf.Tensor4D, cache?: KVCache): tf.Tensor {
    const cfg = this.cfg;
    const H = cfg.num_attention_heads;
    const KV = cfg.num_key_value_heads;
    const G = H / KV;
    const hd = cfg.head_dim;
    const p = `model.layers.${l}.self_attn`;
    let q: tf.Tensor, k: tf.Tensor, v: tf.Tensor;
    if (cfg.arch === 'zhinao') {
      const [qs, ks, vs] = splitQkv(this.lin(`${p}.qkv_proj`, h) as tf.Tensor2D, KV, G, hd);
      q = tf.reshape(qs, [B, T, H, hd]);
      k = tf.reshape(ks, [B, T, KV, hd]);
      v = tf.reshape(vs, [B, T, KV, hd]);
    } else {
      q = tf.reshape(this.lin(`${p}.q_proj`, h), [B, T, H, hd]);
      k = tf.reshape(this.lin(`${p}.k_proj`, h), [B, T, KV, hd]);
      v = tf.reshape(this.lin(`${p}.v_proj`, h), [B, T, KV, hd]);
    }
    if (cfg.qk_norm) {
      q = rmsNorm(q, this.p(`${p}.q_norm.weight`), cfg.rms_norm_eps);
      k = rmsNorm(k, this.p(`${p}.k_norm.weight`), cfg.rms_norm_eps);
    }
    q = rope(q, cos, sin);
    k = rope(k, cos, sin);
    if (cache) {
      const pk = cache.k[l];
      const pv = cache.v[l];
      if (pk && pv) {
        k = tf.concat([pk, k], 1);
        v = tf.concat([pv, v], 1);
        pk.dispose();
        pv.dispose();
      }
      cache.k[l] = tf.keep(k as tf.Tensor4D);
      cache.v[l] = tf.keep(v as tf.Tensor4D);
    }
    const ctx = attention(q as tf.Tensor4D, k as tf.Tensor4D, v as tf.Tensor4D, mask, 1 / Math.sqrt(hd)); // [B, T, H, hd]
    const merged = tf.reshape(ctx, [B * T, H * hd]);
    return this.lin(`${p}.o_proj`, merged);
  }

  /** Logits [N, V] for hidden states [N, D]; a tied head multiplies by the embedding [V, D] transposed. */
  logits(h: tf.Tensor2D): tf.Tensor2D {
    const w = this.weight(`${this.headModule()}.weight`);
    return this.cfg.tie_word_embeddings ? mmTransB(h, w) : mm(h, w);
  }

  /** g [N, V] taken back through the head to [N, D]: the transpose of logits' product (g·E tied, g·Wᵀ untied). */
  private headBackward(g: tf.Tensor2D): tf.Tensor2D {
    const w = this.weight(`${this.headModule()}.weight`);
    return this.cfg.tie_word_embeddings ? mm(g, w) : mmTransB(g, w);
  }

  /** The module whose weight the LM head multiplies by. */
  private headModule(): string {
    return this.cfg.tie_word_embeddings ? 'model.embed_tokens' : 'lm_head';
  }

  /**
   * log p(labels[i] | row i) for final hidden rows h [N, D]. Past headChunkRows() rows, the head
   * and its log-softmax run in chunks, so the [N, V] logits never exist whole, forward or
   * backward (one chunk's logits and their gradient at a time). A trained head (full SFT)
   * recomputes each chunk in the backward pass; a frozen one needs only ∂lp/∂h, a [rows, D]
   * slope computed with the logits and scaled by the upstream gradient later — two passes over
   * the vocabulary instead of three (the fused linear cross-entropy of docs/REFERENCE.md §10).
   */
  labelLogps(h: tf.Tensor2D, labels: Int32Array): tf.Tensor1D {
    const N = h.shape[0];
    const R = this.headChunkRows();
    if (N <= R) return labelLogProbs(this.logits(h), tf.tensor1d(labels, 'int32')) as tf.Tensor1D;
    const head = this.trainables(`${this.headModule()}.`);
    const parts: tf.Tensor[] = [];
    for (let s = 0; s < N; s += R) {
      const n = Math.min(R, N - s);
      const y = tf.tensor1d(labels.subarray(s, s + n), 'int32');
      const hc = tf.slice(h, [s, 0], [n, -1]) as tf.Tensor2D;
      parts.push(head.length ? checkpoint((x, yc) => labelLogProbs(this.logits(x as tf.Tensor2D), yc as tf.Tensor1D), hc, head, [y]) : this.frozenHeadLogps(hc, y));
    }
    return tf.concat(parts) as tf.Tensor1D;
  }

  private frozenHeadLogps(h: tf.Tensor2D, labels: tf.Tensor1D): tf.Tensor1D {
    const op = tf.customGrad(((x: tf.Tensor2D, save: tf.GradSaveFunc) => {
      const { lp, slope } = tf.tidy(() => {
        const logits = this.logits(x);
        const lp = labelLogProbs(logits, labels);
        return { lp, slope: this.headBackward(labelLogProbsSlope(logits, labels, lp)) };
      });
      save([slope]);
      return { value: lp, gradFunc: (dy: tf.Tensor, [sl]: tf.Tensor[]) => tf.mul(sl, tf.reshape(dy, [-1, 1])) };
    }) as any) as (x: tf.Tensor2D) => tf.Tensor1D;
    return op(h);
  }

  /** Rows per LM-head chunk: headChunkBytes of float32 logits. */
  headChunkRows(): number {
    return headChunkRows(this.headChunkBytes, this.cfg.vocab_size);
  }

  /** The parameter in Hugging Face layout, on the host. */
  hfData(name: string): Float32Array {
    const hw = this.half.get(name);
    if (hw) return widenHalf(hw); // stored as the file has it, which is Hugging Face's layout
    const v = this.p(name);
    return fromInternal(name, v.shape, v.dataSync() as Float32Array);
  }

  hfEntries(): { name: string; shape: number[] }[] {
    return [...expectedShapes(this.cfg)].map(([name, shape]) => ({ name, shape }));
  }

  paramCount(): number {
    let n = 0;
    for (const v of [...this.params.values(), ...this.half.values()]) n += v.size;
    return n;
  }

  dispose(): void {
    for (const v of this.params.values()) v.dispose();
    this.params.clear();
    this.half.clear();
  }
}

/**
 * A fresh tensor in HF layout: N(0, std) for matrices (transformers' initializer_range, 0.02),
 * ones for norms, zeros for biases; each from its own stream, so one can be made without the
 * others (init-model writes a 7B checkpoint a tensor at a time).
 */
export function initTensor(cfg: ModelConfig, name: string, seed: number, std = 0.02): { shape: number[]; data: Float32Array } {
  const shape = expectedShapes(cfg).get(name);
  if (!shape) throw new Error(`a ${cfg.arch} model has no tensor ${name}`);
  const n = shape.reduce((a, b) => a * b, 1);
  const data = new Float32Array(n);
  if (name.endsWith('norm.weight')) data.fill(1);
  else if (!name.endsWith('.bias')) {
    const rng = new Rng(seed, name);
    for (let i = 0; i < n; i++) data[i] = rng.normal() * std;
  }
  return { shape, data };
}

/** HF layout → memory layout: linear weights [out, in] become [in, out]. */
export function toInternal(name: string, shape: number[], data: Float32Array): tf.Tensor {
  if (isLinearWeight(name) && shape.length === 2) return tf.tensor2d(transpose2d(data, shape[0], shape[1], tensorArray(data.length)), [shape[1], shape[0]]);
  return tf.tensor(data, shape);
}

/** A 16-bit weight as a float32 tensor in prefopt's layout: widened in Hugging Face's, then laid out. */
function halfToInternal(name: string, hw: HalfWeight): tf.Tensor {
  const wide = widenHalf(hw, tensorArray(hw.size));
  const t = toInternal(name, hw.stored, wide);
  dropTensorArray(wide); // unless it became the tensor's own data
  return t;
}

export function fromInternal(name: string, internalShape: number[], data: Float32Array): Float32Array {
  if (isLinearWeight(name) && internalShape.length === 2) return transpose2d(data, internalShape[0], internalShape[1]);
  return new Float32Array(data);
}
