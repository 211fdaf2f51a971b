import { Arch, parseConfig, presetConfig, expectedShapes } from '../../src/model/config.js';
import { Rng } from '../../src/util/rng.js';
import type { RefConfig, W } from './reference.js';

/** Small random models of each architecture, with weights large enough to make logits non-trivial. */
export interface TestModelSpec {
  arch: Arch;
  heads: number;
  kvHeads: number;
  hidden: number;
  layers: number;
  vocab: number;
  tied: boolean;
  theta: number;
  attentionBias?: boolean;
  /** An explicit head_dim (Qwen3's differs from hidden / heads). */
  headDim?: number;
  /** A Mistral config with this sliding window. */
  slidingWindow?: number;
}

export function makeTestModel(spec: TestModelSpec, seed = 1, std = 0.15) {
  const raw = presetConfig(
    spec.arch,
    { hidden_size: spec.hidden, intermediate_size: spec.hidden * 2 + 8, num_hidden_layers: spec.layers, num_attention_heads: spec.heads, num_key_value_heads: spec.kvHeads, max_position_embeddings: 256, rope_theta: spec.theta, tie_word_embeddings: spec.tied, head_dim: spec.headDim },
    spec.vocab,
    { eos: 1, pad: 0 },
  );
  if (spec.attentionBias) raw.attention_bias = true;
  if (spec.slidingWindow) Object.assign(raw, { architectures: ['MistralForCausalLM'], model_type: 'mistral', sliding_window: spec.slidingWindow });
  const cfg = parseConfig(raw);
  const w: W = new Map();
  const rng = new Rng(seed);
  for (const [name, shape] of expectedShapes(cfg)) {
    const n = shape.reduce((a, b) => a * b, 1);
    const data = new Float32Array(n);
    for (let i = 0; i < n; i++) data[i] = name.endsWith('norm.weight') ? 1 + 0.1 * rng.normal() : rng.normal() * std;
    w.set(name, { shape, data });
  }
  const ref: RefConfig = {
    arch: spec.arch, hidden: cfg.hidden_size, heads: cfg.num_attention_heads, kvHeads: cfg.num_key_value_heads, headDim: cfg.head_dim,
    layers: cfg.num_hidden_layers, vocab: cfg.vocab_size, eps: cfg.rms_norm_eps, theta: cfg.rope_theta, tied: cfg.tie_word_embeddings, qkvBias: cfg.qkv_bias,
    qkNorm: cfg.qk_norm, window: cfg.sliding_window,
  };
  return { raw, cfg, w, ref };
}

export const ARCH_SPECS: Record<string, TestModelSpec> = {
  'llama GQA untied': { arch: 'llama', heads: 4, kvHeads: 2, hidden: 32, layers: 2, vocab: 50, tied: false, theta: 10000 },
  'llama with attention_bias': { arch: 'llama', heads: 2, kvHeads: 2, hidden: 16, layers: 1, vocab: 30, tied: false, theta: 10000, attentionBias: true },
  'qwen2 biases tied rope 1e6': { arch: 'qwen2', heads: 4, kvHeads: 1, hidden: 32, layers: 2, vocab: 40, tied: true, theta: 1e6 },
  'qwen3 q/k norms, head_dim 12 apart from hidden / heads, tied': { arch: 'qwen3', heads: 4, kvHeads: 2, hidden: 32, layers: 2, vocab: 40, tied: true, theta: 1e6, headDim: 12 },
  'mistral sliding window 3': { arch: 'llama', heads: 4, kvHeads: 2, hidden: 32, layers: 2, vocab: 50, tied: false, theta: 10000, slidingWindow: 3 },
  'zhinao fused qkv GQA': { arch: 'zhinao', heads: 6, kvHeads: 2, hidden: 48, layers: 2, vocab: 45, tied: false, theta: 1e6 },
};
