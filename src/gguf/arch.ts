import { ModelConfig, expectedShapes } from '../model/config.js';
import { invFreq } from '../model/rope.js';
import { UserError } from '../util/errors.js';
import { MetaValue, f32, str, u32 } from './format.js';

/**
 * What a prefopt checkpoint becomes in llama.cpp's terms (docs/REFERENCE.md §12): the
 * architecture name, its hyperparameter keys, and for every GGUF tensor the checkpoint tensor it
 * comes from and which rows of it, in which order.
 */
export type GgufArch = 'llama' | 'qwen2' | 'qwen3';

/** One tensor of the exported file, drawn from one checkpoint tensor. */
export interface PlanEntry {
  gguf: string;
  source: string;
  /** Rows of the source in the order the file wants them (null: all, as they are). */
  rows: Int32Array | null;
}

/**
 * llama.cpp's architecture for a checkpoint, or a UserError saying why it has none. Zhinao is
 * Qwen2's computation with q, k and v fused; split on export, it is written as qwen2.
 */
export function ggufArchOf(cfg: ModelConfig, where: string): GgufArch {
  if (cfg.head === 'score') throw new UserError(`${where}: a reward model (…ForSequenceClassification, score head) has no llama.cpp counterpart; export a causal LM`);
  if (cfg.sliding_window !== null) throw new UserError(`${where}: sliding_window ${cfg.sliding_window} (Mistral) cannot be expressed in llama.cpp's llama architecture, which attends over the whole context`);
  const arch: GgufArch = cfg.arch === 'zhinao' ? 'qwen2' : cfg.arch;
  if (arch === 'qwen3' && (cfg.qkv_bias || cfg.o_bias)) throw new UserError(`${where}: attention_bias true is not supported by llama.cpp's qwen3 architecture`);
  if (arch === 'qwen2' && cfg.o_bias) throw new UserError(`${where}: an o_proj bias is not supported by llama.cpp's qwen2 architecture`);
  if (cfg.rope_scaling?.type === 'llama3' && arch !== 'llama') throw new UserError(`${where}: rope_scaling llama3 is only carried by llama.cpp's llama architecture, not ${arch}`);
  return arch;
}

/** The `{arch}.*` hyperparameters llama.cpp reads. */
export function archMetadata(cfg: ModelConfig, arch: GgufArch): [string, MetaValue][] {
  const m: [string, MetaValue][] = [
    [`${arch}.vocab_size`, u32(cfg.vocab_size)],
    [`${arch}.context_length`, u32(cfg.max_position_embeddings)],
    [`${arch}.embedding_length`, u32(cfg.hidden_size)],
    [`${arch}.block_count`, u32(cfg.num_hidden_layers)],
    [`${arch}.feed_forward_length`, u32(cfg.intermediate_size)],
    [`${arch}.attention.head_count`, u32(cfg.num_attention_heads)],
    [`${arch}.attention.head_count_kv`, u32(cfg.num_key_value_heads)],
    [`${arch}.attention.key_length`, u32(cfg.head_dim)],
    [`${arch}.attention.value_length`, u32(cfg.head_dim)],
    [`${arch}.rope.dimension_count`, u32(cfg.head_dim)],
    [`${arch}.rope.freq_base`, f32(cfg.rope_theta)],
    [`${arch}.attention.layer_norm_rms_epsilon`, f32(cfg.rms_norm_eps)],
  ];
  if (cfg.rope_scaling?.type === 'linear') {
    m.push([`${arch}.rope.scaling.type`, str('linear')], [`${arch}.rope.scaling.factor`, f32(cfg.rope_scaling.factor)]);
  }
  return m;
}

/**
 * Llama 3's frequency scaling as llama.cpp takes it: a `rope_freqs` factor per frequency that
 * divides θ^(-2j/d). It is the ratio of the unscaled to the scaled inverse frequencies, so it
 * comes from the same function the decoder uses.
 */
export function ropeFactors(cfg: ModelConfig): Float32Array | null {
  if (cfg.rope_scaling?.type !== 'llama3') return null;
  const scaled = invFreq(cfg);
  const plain = invFreq({ ...cfg, rope_scaling: null });
  return Float32Array.from(plain, (p, j) => p / scaled[j]);
}

/**
 * Llama-architecture models rotate interleaved pairs in llama.cpp, and (x_j, x_{j+d/2}) pairs
 * in transformers; the converter reorders each head's query and key rows so both rotate the same
 * pairs: new row 2j + t of a head is old row t·d/2 + j.
 */
export function interleaveHeads(heads: number, hd: number): Int32Array {
  const rows = new Int32Array(heads * hd);
  const half = hd / 2;
  for (let h = 0; h < heads; h++) for (let j = 0; j < half; j++) for (let t = 0; t < 2; t++) rows[h * hd + 2 * j + t] = h * hd + t * half + j;
  return rows;
}

/** Zhinao's fused rows are grouped per key/value head: G query heads, then its key, then its value. */
export function fusedQkvRows(cfg: ModelConfig, part: 'q' | 'k' | 'v'): Int32Array {
  const { num_key_value_heads: KV, head_dim: hd } = cfg;
  const G = cfg.num_attention_heads / KV;
  const slots = part === 'q' ? Array.from({ length: G }, (_, j) => j) : [part === 'k' ? G : G + 1];
  const rows = new Int32Array(KV * slots.length * hd);
  let i = 0;
  for (let g = 0; g < KV; g++) for (const s of slots) for (let d = 0; d < hd; d++) rows[i++] = (g * (G + 2) + s) * hd + d;
  return rows;
}

const LAYER_NAMES: Record<string, string> = {
  'input_layernorm.weight': 'attn_norm.weight',
  'post_attention_layernorm.weight': 'ffn_norm.weight',
  'self_attn.q_norm.weight': 'attn_q_norm.weight',
  'self_attn.k_norm.weight': 'attn_k_norm.weight',
  'self_attn.o_proj.weight': 'attn_output.weight',
  'self_attn.o_proj.bias': 'attn_output.bias',
  'mlp.gate_proj.weight': 'ffn_gate.weight',
  'mlp.up_proj.weight': 'ffn_up.weight',
  'mlp.down_proj.weight': 'ffn_down.weight',
};
const TOP_NAMES: Record<string, string> = { 'model.embed_tokens.weight': 'token_embd.weight', 'model.norm.weight': 'output_norm.weight', 'lm_head.weight': 'output.weight' };

/** The GGUF tensors a checkpoint tensor becomes (several for Zhinao's fused qkv). */
export function planFor(cfg: ModelConfig, arch: GgufArch, name: string): PlanEntry[] {
  if (TOP_NAMES[name]) return [{ gguf: TOP_NAMES[name], source: name, rows: null }];
  const m = /^model\.layers\.(\d+)\.(.+)$/.exec(name);
  if (!m) throw new Error(`no GGUF name for tensor ${name}`);
  const blk = `blk.${m[1]}`;
  const rest = m[2];
  if (LAYER_NAMES[rest]) return [{ gguf: `${blk}.${LAYER_NAMES[rest]}`, source: name, rows: null }];
  const fused = /^self_attn\.qkv_proj\.(weight|bias)$/.exec(rest);
  if (fused) return (['q', 'k', 'v'] as const).map((p) => ({ gguf: `${blk}.attn_${p}.${fused[1]}`, source: name, rows: fusedQkvRows(cfg, p) }));
  const qkv = /^self_attn\.([qkv])_proj\.(weight|bias)$/.exec(rest);
  if (qkv) {
    const [, p, kind] = qkv;
    const heads = p === 'q' ? cfg.num_attention_heads : cfg.num_key_value_heads;
    const rows = arch === 'llama' && p !== 'v' ? interleaveHeads(heads, cfg.head_dim) : null;
    return [{ gguf: `${blk}.attn_${p}.${kind}`, source: name, rows }];
  }
  throw new Error(`no GGUF name for tensor ${name}`);
}

/** Every tensor of the exported model, in the checkpoint's order (embedding, layers, norm, head). */
export function modelPlan(cfg: ModelConfig, arch: GgufArch): PlanEntry[] {
  return [...expectedShapes(cfg).keys()].flatMap((n) => planFor(cfg, arch, n));
}

/** Gather `rows` of a row-major [rows, cols] matrix (or entries of a vector, cols = 1). */
export function takeRows(data: Float32Array, rows: Int32Array | null, cols: number): Float32Array {
  if (!rows) return data;
  const out = new Float32Array(rows.length * cols);
  for (let i = 0; i < rows.length; i++) out.set(data.subarray(rows[i] * cols, (rows[i] + 1) * cols), i * cols);
  return out;
}
