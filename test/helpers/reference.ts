/**
 * An independent float64 Llama/Mistral/Qwen2/Qwen3/Zhinao forward pass, written plainly from docs/REFERENCE.md §1–2
 * with HF-layout weights ([out, in], y = x·Wᵀ + b). It shares no code with src/model, so that the
 * tests compare two formulations of the same maths.
 */
export type W = Map<string, { shape: number[]; data: Float32Array }>;

export interface RefConfig {
  arch: 'llama' | 'qwen2' | 'qwen3' | 'zhinao';
  hidden: number;
  heads: number;
  kvHeads: number;
  headDim: number;
  layers: number;
  vocab: number;
  eps: number;
  theta: number;
  tied: boolean;
  qkvBias: boolean;
  /** Qwen3: RMSNorm over each query/key head (weights q_norm, k_norm) before rotary. */
  qkNorm: boolean;
  /** Mistral: query t sees key j only when t − j < window. */
  window: number | null;
}

function lin(x: number[], w: { shape: number[]; data: Float32Array }, b?: { data: Float32Array }): number[] {
  const [out, inp] = w.shape;
  const y = new Array(out).fill(0);
  for (let o = 0; o < out; o++) {
    let s = b ? b.data[o] : 0;
    for (let i = 0; i < inp; i++) s += w.data[o * inp + i] * x[i];
    y[o] = s;
  }
  return y;
}

function rms(x: number[], w: Float32Array, eps: number): number[] {
  const ms = x.reduce((a, v) => a + v * v, 0) / x.length;
  const r = 1 / Math.sqrt(ms + eps);
  return x.map((v, i) => v * r * w[i]);
}

function rope(x: number[], pos: number, theta: number): number[] {
  const d = x.length;
  const half = d / 2;
  const out = new Array(d);
  for (let j = 0; j < half; j++) {
    const a = pos * Math.pow(theta, (-2 * j) / d);
    const c = Math.cos(a);
    const s = Math.sin(a);
    out[j] = x[j] * c - x[j + half] * s;
    out[j + half] = x[j + half] * c + x[j] * s;
  }
  return out;
}

/** Logits [T][V] for one unpadded sequence. */
export function referenceLogits(cfg: RefConfig, w: W, ids: number[]): number[][] {
  const g = (n: string) => {
    const t = w.get(n);
    if (!t) throw new Error('missing ' + n);
    return t;
  };
  const { hidden: D, heads: H, kvHeads: KV, headDim: hd } = cfg;
  const G = H / KV;
  const emb = g('model.embed_tokens.weight');
  let xs = ids.map((id) => Array.from(emb.data.subarray(id * D, (id + 1) * D)));
  for (let l = 0; l < cfg.layers; l++) {
    const p = `model.layers.${l}`;
    const qs: number[][][] = [];
    const ks: number[][][] = [];
    const vs: number[][][] = [];
    xs.forEach((x, t) => {
      const h = rms(x, g(`${p}.input_layernorm.weight`).data, cfg.eps);
      let q: number[][] = [];
      let k: number[][] = [];
      let v: number[][] = [];
      if (cfg.arch === 'zhinao') {
        const all = lin(h, g(`${p}.self_attn.qkv_proj.weight`), g(`${p}.self_attn.qkv_proj.bias`));
        for (let kv = 0; kv < KV; kv++) {
          const base = kv * (G + 2) * hd;
          for (let j = 0; j < G; j++) q.push(all.slice(base + j * hd, base + (j + 1) * hd));
          k.push(all.slice(base + G * hd, base + (G + 1) * hd));
          v.push(all.slice(base + (G + 1) * hd, base + (G + 2) * hd));
        }
      } else {
        const b = (n: string) => (cfg.qkvBias ? g(`${p}.self_attn.${n}.bias`) : undefined);
        const qa = lin(h, g(`${p}.self_attn.q_proj.weight`), b('q_proj'));
        const ka = lin(h, g(`${p}.self_attn.k_proj.weight`), b('k_proj'));
        const va = lin(h, g(`${p}.self_attn.v_proj.weight`), b('v_proj'));
        for (let i = 0; i < H; i++) q.push(qa.slice(i * hd, (i + 1) * hd));
        for (let i = 0; i < KV; i++) k.push(ka.slice(i * hd, (i + 1) * hd));
        for (let i = 0; i < KV; i++) v.push(va.slice(i * hd, (i + 1) * hd));
      }
      if (cfg.qkNorm) {
        q = q.map((x) => rms(x, g(`${p}.self_attn.q_norm.weight`).data, cfg.eps));
        k = k.map((x) => rms(x, g(`${p}.self_attn.k_norm.weight`).data, cfg.eps));
      }
      q = q.map((x) => rope(x, t, cfg.theta));
      k = k.map((x) => rope(x, t, cfg.theta));
      qs.push(q);
      ks.push(k);
      vs.push(v);
    });
    xs = xs.map((x, t) => {
      const ctx: number[] = [];
      for (let hh = 0; hh < H; hh++) {
        const kvh = Math.floor(hh / G);
        const j0 = cfg.window === null ? 0 : Math.max(0, t - cfg.window + 1);
        const sc: number[] = [];
        for (let j = j0; j <= t; j++) {
          let s = 0;
          for (let d = 0; d < hd; d++) s += qs[t][hh][d] * ks[j][kvh][d];
          sc.push(s / Math.sqrt(hd));
        }
        const m = Math.max(...sc);
        const e = sc.map((s) => Math.exp(s - m));
        const z = e.reduce((a, b) => a + b, 0);
        for (let d = 0; d < hd; d++) {
          let s = 0;
          for (let j = j0; j <= t; j++) s += (e[j - j0] / z) * vs[j][kvh][d];
          ctx.push(s);
        }
      }
      const o = lin(ctx, g(`${p}.self_attn.o_proj.weight`), w.get(`${p}.self_attn.o_proj.bias`));
      const x1 = x.map((v, i) => v + o[i]);
      const h2 = rms(x1, g(`${p}.post_attention_layernorm.weight`).data, cfg.eps);
      const gate = lin(h2, g(`${p}.mlp.gate_proj.weight`));
      const up = lin(h2, g(`${p}.mlp.up_proj.weight`));
      const act = gate.map((a, i) => (a / (1 + Math.exp(-a))) * up[i]);
      const down = lin(act, g(`${p}.mlp.down_proj.weight`));
      return x1.map((v, i) => v + down[i]);
    });
  }
  const head = cfg.tied ? emb : g('lm_head.weight');
  return xs.map((x) => lin(rms(x, g('model.norm.weight').data, cfg.eps), head));
}

export function logSoftmax(row: number[]): number[] {
  const m = Math.max(...row);
  const z = Math.log(row.reduce((a, v) => a + Math.exp(v - m), 0)) + m;
  return row.map((v) => v - z);
}
