import { UserError } from '../util/errors.js';

/**
 * The architecture fields prefopt reads from a Hugging Face `config.json`. The original JSON is
 * kept in `raw` so a checkpoint written back carries every field transformers expects.
 */
export type Arch = 'llama' | 'qwen2' | 'qwen3' | 'zhinao';

export interface RopeScaling {
  type: 'linear' | 'llama3';
  factor: number;
  low_freq_factor?: number;
  high_freq_factor?: number;
  original_max_position_embeddings?: number;
}

export interface ModelConfig {
  arch: Arch;
  vocab_size: number;
  hidden_size: number;
  intermediate_size: number;
  num_hidden_layers: number;
  num_attention_heads: number;
  num_key_value_heads: number;
  head_dim: number;
  rms_norm_eps: number;
  rope_theta: number;
  rope_scaling: RopeScaling | null;
  max_position_embeddings: number;
  tie_word_embeddings: boolean;
  /** q/k/v carry a bias (Qwen2 always; Zhinao's fused qkv; Llama when attention_bias). */
  qkv_bias: boolean;
  /** o_proj carries a bias (Llama and Qwen3 with attention_bias only). */
  o_bias: boolean;
  /** RMSNorm over head_dim on every query and key head before rotary (Qwen3's q_norm / k_norm). */
  qk_norm: boolean;
  /** Mistral's sliding window: query i sees key j only when i − j < sliding_window; null = off. */
  sliding_window: number | null;
  bos_token_id: number | null;
  eos_token_id: number | number[] | null;
  pad_token_id: number | null;
  /** 'lm' for …ForCausalLM; 'score' for …ForSequenceClassification (reward models). */
  head: 'lm' | 'score';
  num_labels: number;
  raw: Record<string, any>;
}

const ARCH_BY_CLASS: Record<string, Arch> = {
  LlamaForCausalLM: 'llama',
  MistralForCausalLM: 'llama',
  Qwen2ForCausalLM: 'qwen2',
  Qwen3ForCausalLM: 'qwen3',
  ZhinaoForCausalLM: 'zhinao',
};
const ARCH_BY_TYPE: Record<string, Arch> = { llama: 'llama', mistral: 'llama', qwen2: 'qwen2', qwen3: 'qwen3', zhinao: 'zhinao' };

export const ARCH_CLASS: Record<Arch, string> = { llama: 'LlamaForCausalLM', qwen2: 'Qwen2ForCausalLM', qwen3: 'Qwen3ForCausalLM', zhinao: 'ZhinaoForCausalLM' };
export const ARCHS = Object.keys(ARCH_CLASS) as Arch[];

function int(raw: any, key: string, file: string, dflt?: number): number {
  const v = raw[key] ?? dflt;
  if (typeof v !== 'number' || !Number.isInteger(v) || v <= 0) {
    throw new UserError(`${file}: field "${key}" must be a positive integer, found ${JSON.stringify(raw[key])}`);
  }
  return v;
}

export function parseConfig(raw: any, file = 'config.json'): ModelConfig {
  if (!raw || typeof raw !== 'object') throw new UserError(`${file}: expected a JSON object`);
  const classes: string[] = Array.isArray(raw.architectures) ? raw.architectures : [];
  let arch: Arch | undefined;
  let head: 'lm' | 'score' = 'lm';
  for (const c of classes) {
    const base = c.replace(/ForSequenceClassification$/, 'ForCausalLM');
    if (!arch && ARCH_BY_CLASS[base]) {
      arch = ARCH_BY_CLASS[base];
      if (base !== c) head = 'score';
    }
  }
  arch ??= ARCH_BY_TYPE[raw.model_type];
  if (!arch) {
    throw new UserError(
      `${file}: unsupported architecture ${JSON.stringify(classes.length ? classes : raw.model_type)}; ` +
        `supported: ${Object.keys(ARCH_BY_CLASS).join(', ')}`,
    );
  }
  const act = raw.hidden_act ?? 'silu';
  if (act !== 'silu') throw new UserError(`${file}: hidden_act "${act}" is not supported (only "silu")`);
  if (raw.mlp_bias === true) throw new UserError(`${file}: mlp_bias true is not supported (gate/up/down projections without bias only)`);
  if (raw.use_sliding_window === true) {
    throw new UserError(`${file}: use_sliding_window true is not supported for ${arch} (its window applies to some layers only); set it to false to attend over the whole context`);
  }
  const hidden = int(raw, 'hidden_size', file);
  const heads = int(raw, 'num_attention_heads', file);
  const kv = int(raw, 'num_key_value_heads', file, heads);
  if (heads % kv !== 0) throw new UserError(`${file}: num_attention_heads (${heads}) must be a multiple of num_key_value_heads (${kv})`);
  const headDim = raw.head_dim ?? hidden / heads;
  if (!Number.isInteger(headDim) || headDim % 2 !== 0) throw new UserError(`${file}: head_dim must be an even integer, found ${headDim}`);
  const theta = raw.rope_theta ?? raw.rope_parameters?.rope_theta ?? 10000;
  if (typeof theta !== 'number' || !(theta > 0)) throw new UserError(`${file}: rope_theta must be a positive number`);
  return {
    arch,
    vocab_size: int(raw, 'vocab_size', file),
    hidden_size: hidden,
    intermediate_size: int(raw, 'intermediate_size', file),
    num_hidden_layers: int(raw, 'num_hidden_layers', file),
    num_attention_heads: heads,
    num_key_value_heads: kv,
    head_dim: headDim,
    rms_norm_eps: raw.rms_norm_eps ?? raw.layer_norm_epsilon ?? 1e-6,
    rope_theta: theta,
    rope_scaling: parseRopeScaling(raw.rope_scaling ?? raw.rope_parameters, file),
    max_position_embeddings: raw.max_position_embeddings ?? 4096,
    tie_word_embeddings: raw.tie_word_embeddings ?? false,
    qkv_bias: arch === 'qwen2' || arch === 'zhinao' || raw.attention_bias === true,
    o_bias: (arch === 'llama' || arch === 'qwen3') && raw.attention_bias === true,
    qk_norm: arch === 'qwen3',
    sliding_window: slidingWindow(raw, arch, file),
    bos_token_id: raw.bos_token_id ?? null,
    eos_token_id: raw.eos_token_id ?? null,
    pad_token_id: raw.pad_token_id ?? null,
    head,
    num_labels: head === 'score' ? (raw.num_labels ?? Object.keys(raw.id2label ?? { 0: 0 }).length) : 0,
    raw,
  };
}

/**
 * Mistral applies its window on every layer; Qwen2/Qwen3 configs carry a `sliding_window` that
 * is off unless `use_sliding_window` (refused above), and Llama has none.
 */
function slidingWindow(raw: any, arch: Arch, file: string): number | null {
  const w = raw.sliding_window;
  if (raw.model_type !== 'mistral' || w === null || w === undefined) return null;
  if (!Number.isInteger(w) || w <= 0) throw new UserError(`${file}: sliding_window must be a positive integer or null, found ${JSON.stringify(w)}`);
  return arch === 'llama' ? w : null;
}

function parseRopeScaling(rs: any, file: string): RopeScaling | null {
  if (!rs || typeof rs !== 'object') return null;
  const type = rs.rope_type ?? rs.type;
  if (type === undefined || type === 'default') return null;
  if (type === 'linear' || type === 'llama3') {
    if (typeof rs.factor !== 'number' || rs.factor <= 0) throw new UserError(`${file}: rope_scaling.factor must be a positive number`);
    return { type, factor: rs.factor, low_freq_factor: rs.low_freq_factor, high_freq_factor: rs.high_freq_factor, original_max_position_embeddings: rs.original_max_position_embeddings };
  }
  throw new UserError(`${file}: rope_scaling type "${type}" is not supported (default, linear, llama3)`);
}

/** Expected tensor shapes, in Hugging Face layout ([out, in] for linear weights). */
export function expectedShapes(cfg: ModelConfig): Map<string, number[]> {
  const m = new Map<string, number[]>();
  const { hidden_size: D, intermediate_size: F, num_attention_heads: H, num_key_value_heads: KV, head_dim: hd, vocab_size: V } = cfg;
  m.set('model.embed_tokens.weight', [V, D]);
  for (let i = 0; i < cfg.num_hidden_layers; i++) {
    const p = `model.layers.${i}`;
    m.set(`${p}.input_layernorm.weight`, [D]);
    m.set(`${p}.post_attention_layernorm.weight`, [D]);
    if (cfg.arch === 'zhinao') {
      const n = (H + 2 * KV) * hd;
      m.set(`${p}.self_attn.qkv_proj.weight`, [n, D]);
      m.set(`${p}.self_attn.qkv_proj.bias`, [n]);
    } else {
      m.set(`${p}.self_attn.q_proj.weight`, [H * hd, D]);
      m.set(`${p}.self_attn.k_proj.weight`, [KV * hd, D]);
      m.set(`${p}.self_attn.v_proj.weight`, [KV * hd, D]);
      if (cfg.qkv_bias) {
        m.set(`${p}.self_attn.q_proj.bias`, [H * hd]);
        m.set(`${p}.self_attn.k_proj.bias`, [KV * hd]);
        m.set(`${p}.self_attn.v_proj.bias`, [KV * hd]);
      }
    }
    if (cfg.qk_norm) {
      m.set(`${p}.self_attn.q_norm.weight`, [hd]);
      m.set(`${p}.self_attn.k_norm.weight`, [hd]);
    }
    m.set(`${p}.self_attn.o_proj.weight`, [D, H * hd]);
    if (cfg.o_bias) m.set(`${p}.self_attn.o_proj.bias`, [D]);
    m.set(`${p}.mlp.gate_proj.weight`, [F, D]);
    m.set(`${p}.mlp.up_proj.weight`, [F, D]);
    m.set(`${p}.mlp.down_proj.weight`, [D, F]);
  }
  m.set('model.norm.weight', [D]);
  if (cfg.head === 'score') m.set('score.weight', [cfg.num_labels, D]);
  else if (!cfg.tie_word_embeddings) m.set('lm_head.weight', [V, D]);
  return m;
}

/**
 * The matrices a frozen model keeps in its checkpoint's bf16/f16 (model/load): the linear
 * layers, the embedding and the LM head — all but a few MB of a model.
 */
export function isHalfMatrix(name: string): boolean {
  return /(_proj|lm_head)\.weight$/.test(name) || name === 'model.embed_tokens.weight';
}

/** Linear weights are stored transposed ([in, out]) in memory; everything else as on disk. */
export function isLinearWeight(name: string): boolean {
  return /(_proj|lm_head|score)\.weight$/.test(name) || /lora_[AB]\.weight$/.test(name);
}

export interface PresetSpec {
  hidden_size: number;
  intermediate_size: number;
  num_hidden_layers: number;
  num_attention_heads: number;
  num_key_value_heads: number;
  max_position_embeddings: number;
  rope_theta: number;
  tie_word_embeddings: boolean;
  vocab_size?: number;
  /** Qwen3 and others set it apart from hidden_size / num_attention_heads. */
  head_dim?: number;
}

export const PRESETS: Record<string, PresetSpec> = {
  /** The quickstart's model: trains from scratch on 2 cores in minutes. */
  tiny: { hidden_size: 128, intermediate_size: 352, num_hidden_layers: 4, num_attention_heads: 4, num_key_value_heads: 2, max_position_embeddings: 512, rope_theta: 10000, tie_word_embeddings: true },
  /** ~5M parameters with a 2K vocabulary: the benchmark model. */
  '5m': { hidden_size: 256, intermediate_size: 704, num_hidden_layers: 6, num_attention_heads: 8, num_key_value_heads: 4, max_position_embeddings: 1024, rope_theta: 10000, tie_word_embeddings: true },
  /** 360Zhinao2-7B's shape, for configs and validation; far too large to train here. */
  'zhinao2-7b': { hidden_size: 4096, intermediate_size: 11008, num_hidden_layers: 32, num_attention_heads: 32, num_key_value_heads: 32, max_position_embeddings: 32768, rope_theta: 1000000, tie_word_embeddings: false, vocab_size: 158464 },
};

/** A complete HF config.json for a preset and architecture. */
export function presetConfig(arch: Arch, preset: PresetSpec, vocabSize: number, special: { bos?: number | null; eos?: number | null; pad?: number | null }): Record<string, any> {
  const cfg: Record<string, any> = {
    architectures: [ARCH_CLASS[arch]],
    model_type: arch,
    vocab_size: preset.vocab_size ?? vocabSize,
    hidden_size: preset.hidden_size,
    intermediate_size: preset.intermediate_size,
    num_hidden_layers: preset.num_hidden_layers,
    num_attention_heads: preset.num_attention_heads,
    num_key_value_heads: preset.num_key_value_heads,
    head_dim: preset.head_dim ?? preset.hidden_size / preset.num_attention_heads,
    hidden_act: 'silu',
    rms_norm_eps: 1e-6,
    rope_theta: preset.rope_theta,
    rope_scaling: null,
    max_position_embeddings: preset.max_position_embeddings,
    tie_word_embeddings: preset.tie_word_embeddings,
    initializer_range: 0.02,
    torch_dtype: 'float32',
    bos_token_id: special.bos ?? null,
    eos_token_id: special.eos ?? null,
    pad_token_id: special.pad ?? null,
    use_cache: true,
  };
  if (arch === 'llama' || arch === 'qwen3') cfg.attention_bias = false;
  return cfg;
}
