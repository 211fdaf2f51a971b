import { describe, expect, it } from 'vitest';
import { expectedShapes, parseConfig } from '../src/model/config.js';
import { invFreq } from '../src/model/rope.js';
import { UserError } from '../src/util/errors.js';

/**
 * config.json files as their publishers ship them (every field, including those prefopt does not
 * read), parsed as they are. Parameter counts are the published totals, from the shapes alone.
 */
const LLAMA_3_1_8B = {
  architectures: ['LlamaForCausalLM'], attention_bias: false, attention_dropout: 0.0, bos_token_id: 128000, eos_token_id: [128001, 128008, 128009],
  hidden_act: 'silu', hidden_size: 4096, initializer_range: 0.02, intermediate_size: 14336, max_position_embeddings: 131072, mlp_bias: false,
  model_type: 'llama', num_attention_heads: 32, num_hidden_layers: 32, num_key_value_heads: 8, pretraining_tp: 1, rms_norm_eps: 1e-5,
  rope_scaling: { factor: 8.0, low_freq_factor: 1.0, high_freq_factor: 4.0, original_max_position_embeddings: 8192, rope_type: 'llama3' },
  rope_theta: 500000.0, tie_word_embeddings: false, torch_dtype: 'bfloat16', transformers_version: '4.43.0.dev0', use_cache: true, vocab_size: 128256,
};
const LLAMA_3_2_1B = {
  ...LLAMA_3_1_8B, head_dim: 64, hidden_size: 2048, intermediate_size: 8192, num_hidden_layers: 16, num_key_value_heads: 8,
  rope_scaling: { factor: 32.0, high_freq_factor: 4.0, low_freq_factor: 1.0, original_max_position_embeddings: 8192, rope_type: 'llama3' },
  tie_word_embeddings: true, transformers_version: '4.45.0.dev0',
};
const MISTRAL_7B_V01 = {
  architectures: ['MistralForCausalLM'], bos_token_id: 1, eos_token_id: 2, hidden_act: 'silu', hidden_size: 4096, initializer_range: 0.02, intermediate_size: 14336,
  max_position_embeddings: 32768, model_type: 'mistral', num_attention_heads: 32, num_hidden_layers: 32, num_key_value_heads: 8, rms_norm_eps: 1e-5,
  rope_theta: 10000.0, sliding_window: 4096, tie_word_embeddings: false, torch_dtype: 'bfloat16', transformers_version: '4.34.0.dev0', use_cache: true, vocab_size: 32000,
};
const MISTRAL_7B_V03 = { ...MISTRAL_7B_V01, head_dim: null, rope_theta: 1000000.0, sliding_window: null, vocab_size: 32768 };
const QWEN3_0_6B = {
  architectures: ['Qwen3ForCausalLM'], attention_bias: false, attention_dropout: 0.0, bos_token_id: 151643, eos_token_id: 151645, head_dim: 128, hidden_act: 'silu',
  hidden_size: 1024, initializer_range: 0.02, intermediate_size: 3072, max_position_embeddings: 40960, max_window_layers: 28, model_type: 'qwen3',
  num_attention_heads: 16, num_hidden_layers: 28, num_key_value_heads: 8, rms_norm_eps: 1e-6, rope_scaling: null, rope_theta: 1000000, sliding_window: null,
  tie_word_embeddings: true, torch_dtype: 'bfloat16', transformers_version: '4.51.0', use_cache: true, use_sliding_window: false, vocab_size: 151936,
};
const QWEN2_5_0_5B = {
  architectures: ['Qwen2ForCausalLM'], attention_dropout: 0.0, bos_token_id: 151643, eos_token_id: 151643, hidden_act: 'silu', hidden_size: 896, initializer_range: 0.02,
  intermediate_size: 4864, max_position_embeddings: 32768, max_window_layers: 24, model_type: 'qwen2', num_attention_heads: 14, num_hidden_layers: 24,
  num_key_value_heads: 2, rms_norm_eps: 1e-6, rope_theta: 1000000.0, sliding_window: 32768, tie_word_embeddings: true, torch_dtype: 'bfloat16',
  transformers_version: '4.40.1', use_cache: true, use_sliding_window: false, vocab_size: 151936,
};

const params = (raw: any) => [...expectedShapes(parseConfig(raw)).values()].reduce((a, s) => a + s.reduce((x, y) => x * y, 1), 0);

describe('published configs load as they are', () => {
  it('Llama 3.1 8B: llama3 rope scaling, an eos list, 8,030,261,248 parameters', () => {
    const c = parseConfig(LLAMA_3_1_8B);
    expect([c.arch, c.head_dim, c.qkv_bias, c.o_bias, c.qk_norm, c.sliding_window]).toEqual(['llama', 128, false, false, false, null]);
    expect(c.rope_scaling).toEqual({ type: 'llama3', factor: 8, low_freq_factor: 1, high_freq_factor: 4, original_max_position_embeddings: 8192 });
    expect(c.eos_token_id).toEqual([128001, 128008, 128009]);
    expect(params(LLAMA_3_1_8B)).toBe(8_030_261_248);
  });

  it('Llama 3.2 1B: tied embeddings (no lm_head), 1,235,814,400 parameters', () => {
    const c = parseConfig(LLAMA_3_2_1B);
    expect(c.tie_word_embeddings).toBe(true);
    expect(expectedShapes(c).has('lm_head.weight')).toBe(false);
    expect(params(LLAMA_3_2_1B)).toBe(1_235_814_400);
  });

  it('Mistral 7B: v0.1 keeps its 4096-token sliding window, v0.3 has none (head_dim null), 7,241,732,096 parameters', () => {
    const a = parseConfig(MISTRAL_7B_V01);
    expect([a.arch, a.sliding_window, a.head_dim]).toEqual(['llama', 4096, 128]);
    expect(params(MISTRAL_7B_V01)).toBe(7_241_732_096);
    const b = parseConfig(MISTRAL_7B_V03);
    expect([b.sliding_window, b.head_dim]).toEqual([null, 128]);
  });

  it('Qwen3 0.6B: head_dim 128 apart from hidden / heads (64), q/k norms, no biases, 596,049,920 parameters', () => {
    const c = parseConfig(QWEN3_0_6B);
    expect([c.arch, c.head_dim, c.qkv_bias, c.o_bias, c.qk_norm, c.sliding_window]).toEqual(['qwen3', 128, false, false, true, null]);
    const s = expectedShapes(c);
    expect(s.get('model.layers.0.self_attn.q_proj.weight')).toEqual([2048, 1024]);
    expect(s.get('model.layers.0.self_attn.o_proj.weight')).toEqual([1024, 2048]);
    expect(s.get('model.layers.27.self_attn.k_norm.weight')).toEqual([128]);
    expect(s.has('model.layers.0.self_attn.q_proj.bias')).toBe(false);
    expect(params(QWEN3_0_6B)).toBe(596_049_920);
  });

  it('Qwen2.5 0.5B: q/k/v biases, the unused sliding_window ignored, 494,032,768 parameters', () => {
    const c = parseConfig(QWEN2_5_0_5B);
    expect([c.arch, c.qkv_bias, c.o_bias, c.sliding_window]).toEqual(['qwen2', true, false, null]);
    expect(params(QWEN2_5_0_5B)).toBe(494_032_768);
  });

  it('refuses what it cannot run, naming the field', () => {
    const err = (raw: any) => {
      try {
        parseConfig(raw, 'm/config.json');
      } catch (e) {
        expect(e).toBeInstanceOf(UserError);
        return (e as Error).message;
      }
      return 'no error';
    };
    expect(err({ ...LLAMA_3_1_8B, mlp_bias: true })).toMatch(/^m\/config\.json: mlp_bias/);
    expect(err({ ...QWEN3_0_6B, use_sliding_window: true })).toMatch(/^m\/config\.json: use_sliding_window/);
    expect(err({ ...LLAMA_3_1_8B, architectures: ['GemmaForCausalLM'], model_type: 'gemma' })).toMatch(/unsupported architecture.*Qwen3ForCausalLM/);
  });
});

describe('llama3 rope scaling', () => {
  it("equals transformers' formulation (wavelength bands with torch.where) for Llama 3.1", () => {
    const c = parseConfig(LLAMA_3_1_8B);
    const got = invFreq(c);
    const { factor, low_freq_factor: lo, high_freq_factor: hi, original_max_position_embeddings: orig } = LLAMA_3_1_8B.rope_scaling;
    const d = 128;
    let scaled = 0;
    let smoothed = 0;
    for (let j = 0; j < d / 2; j++) {
      const inv = 1 / Math.pow(500000, (2 * j) / d);
      const wavelen = (2 * Math.PI) / inv;
      const byLow = wavelen > orig / lo ? inv / factor : inv;
      const smooth = (orig / wavelen - lo) / (hi - lo);
      const medium = !(wavelen < orig / hi) && !(wavelen > orig / lo);
      const want = medium ? (1 - smooth) * (byLow / factor) + smooth * byLow : byLow;
      expect(Math.abs(got[j] - want) / want).toBeLessThan(1e-12);
      if (want === inv / factor) scaled++;
      if (medium) smoothed++;
    }
    // All three bands are exercised: unchanged high frequencies, smoothed middle, scaled low.
    expect(scaled).toBeGreaterThan(0);
    expect(smoothed).toBeGreaterThan(0);
    expect(got[0]).toBe(1);
  });
});
