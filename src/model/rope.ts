import { ModelConfig } from './config.js';

/**
 * Rotary embedding tables (docs/REFERENCE.md §2, "rotate half"): inv_freq_j = θ^(-2j/d); the angle for
 * position p is p·inv_freq, duplicated to [angles, angles]. Computed on the host in float64 for
 * the exact positions of a batch (rows may start at different offsets), then handed to the graph.
 */
export function invFreq(cfg: ModelConfig): Float64Array {
  const d = cfg.head_dim;
  const out = new Float64Array(d / 2);
  for (let j = 0; j < d / 2; j++) out[j] = Math.pow(cfg.rope_theta, (-2 * j) / d);
  const rs = cfg.rope_scaling;
  if (rs?.type === 'linear') {
    for (let j = 0; j < out.length; j++) out[j] /= rs.factor;
  } else if (rs?.type === 'llama3') {
    const low = rs.low_freq_factor ?? 1;
    const high = rs.high_freq_factor ?? 4;
    const orig = rs.original_max_position_embeddings ?? 8192;
    const lowWave = orig / low;
    const highWave = orig / high;
    for (let j = 0; j < out.length; j++) {
      const wave = (2 * Math.PI) / out[j];
      if (wave < highWave) continue;
      if (wave > lowWave) out[j] /= rs.factor;
      else {
        const smooth = (orig / wave - low) / (high - low);
        out[j] = (1 - smooth) * (out[j] / rs.factor) + smooth * out[j];
      }
    }
  }
  return out;
}

/** cos and sin tables [positions.length, head_dim]. */
export function ropeTables(cfg: ModelConfig, positions: ArrayLike<number>): { cos: Float32Array; sin: Float32Array } {
  const inv = invFreq(cfg);
  const d = cfg.head_dim;
  const half = d / 2;
  const cos = new Float32Array(positions.length * d);
  const sin = new Float32Array(positions.length * d);
  // Rows of a batch repeat the same positions: each is computed once, then copied.
  const first = new Map<number, number>();
  for (let i = 0; i < positions.length; i++) {
    const seen = first.get(positions[i]);
    if (seen !== undefined) {
      cos.copyWithin(i * d, seen * d, (seen + 1) * d);
      sin.copyWithin(i * d, seen * d, (seen + 1) * d);
      continue;
    }
    first.set(positions[i], i);
    for (let j = 0; j < half; j++) {
      const a = positions[i] * inv[j];
      const c = Math.cos(a);
      const s = Math.sin(a);
      cos[i * d + j] = c;
      cos[i * d + j + half] = c;
      sin[i * d + j] = s;
      sin[i * d + j + half] = s;
    }
  }
  return { cos, sin };
}
