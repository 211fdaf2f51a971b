import { Rng } from '../util/rng.js';

/**
 * Merge methods as mergekit defines them (docs/REFERENCE.md §8), as pure functions over one tensor of
 * each model (flat Float32Arrays of equal length). Arithmetic is done in float64.
 * Registry style: each method names the parameters it reads.
 */
export interface MergeInput {
  base: Float32Array | null;
  models: Float32Array[];
  weights: number[];
  densities: number[];
  lambda: number;
  normalize: boolean;
  t: number;
  /** Seeded per tensor and model (DARE's drops). */
  rng: (model: number) => Rng;
}

export interface MergeMethod {
  needsBase: boolean;
  /** How many models besides the base, if fixed. */
  models?: number;
  usesDensity: boolean;
  defaultNormalize: boolean;
  merge(x: MergeInput): Float32Array;
}

/**
 * Task vectors δᵢ = θᵢ − θ_base, in float32 like the tensors themselves (the difference of two
 * nearby float32 values is exact or nearly so); sums below accumulate in float64 scalars. Every
 * step works in place, so a merge holds about (models + 2) copies of one tensor at its peak.
 */
function deltas(x: MergeInput): Float32Array[] {
  const b = x.base!;
  return x.models.map((m) => {
    const d = new Float32Array(m.length);
    for (let i = 0; i < m.length; i++) d[i] = m[i] - b[i];
    return d;
  });
}

/** The k-th largest value (1-based) of `v`, which is reordered: quickselect, O(n), no sort. */
function kthLargestInPlace(v: Float32Array, k: number): number {
  let lo = 0;
  let hi = v.length - 1;
  const target = k - 1;
  while (lo < hi) {
    const pivot = v[(lo + hi) >>> 1];
    let i = lo;
    let j = hi;
    while (i <= j) {
      while (v[i] > pivot) i++;
      while (v[j] < pivot) j--;
      if (i <= j) {
        const t = v[i];
        v[i] = v[j];
        v[j] = t;
        i++;
        j--;
      }
    }
    if (target <= j) hi = j;
    else if (target >= i) lo = i;
    else return v[target];
  }
  return v[target];
}

/**
 * TIES trim, in place: keep the k = ⌊density·n⌋ entries of largest magnitude, zero the rest;
 * among equal magnitudes at the threshold, earlier entries win.
 */
export function trimTopK(d: Float32Array, density: number): Float32Array {
  if (density >= 1) return d;
  const n = d.length;
  const k = Math.floor(density * n);
  if (k <= 0) return d.fill(0);
  const mag = new Float32Array(n);
  for (let i = 0; i < n; i++) mag[i] = Math.abs(d[i]);
  const th = kthLargestInPlace(mag, k);
  let above = 0;
  for (let i = 0; i < n; i++) if (Math.abs(d[i]) > th) above++;
  let atTh = k - above;
  for (let i = 0; i < n; i++) {
    const a = Math.abs(d[i]);
    if (a > th) continue;
    if (a === th && atTh > 0) atTh--;
    else d[i] = 0;
  }
  return d;
}

/** DARE, in place: drop each entry with probability 1 − density, rescale survivors by 1/density. */
export function dareDrop(d: Float32Array, density: number, rng: Rng): Float32Array {
  if (density >= 1) return d;
  for (let i = 0; i < d.length; i++) d[i] = rng.next() < density ? d[i] / density : 0;
  return d;
}

/** Sign election and disjoint mean: Σ wᵢδᵢ·maskᵢ / Σ wᵢ·maskᵢ (or the plain masked sum). */
export function tiesConsensus(ds: Float32Array[], w: number[], normalize: boolean): Float32Array {
  const n = ds[0].length;
  const out = new Float32Array(n);
  for (let i = 0; i < n; i++) {
    let s = 0;
    for (let m = 0; m < ds.length; m++) s += w[m] * ds[m][i];
    const sign = s >= 0 ? 1 : -1; // ties → +
    let num = 0;
    let den = 0;
    for (let m = 0; m < ds.length; m++) {
      const v = ds[m][i];
      if (v !== 0 && Math.sign(w[m] * v) === sign) {
        num += w[m] * v;
        den += w[m];
      }
    }
    out[i] = normalize ? (Math.abs(den) < 1e-8 ? 0 : num / den) : num;
  }
  return out;
}

function weightedSum(ds: Float32Array[], w: number[], normalize: boolean): Float32Array {
  const out = new Float32Array(ds[0].length);
  const total = normalize ? w.reduce((a, b) => a + b, 0) : 1;
  for (let i = 0; i < out.length; i++) {
    let s = 0;
    for (let m = 0; m < ds.length; m++) s += w[m] * ds[m][i];
    out[i] = s / total;
  }
  return out;
}

/** θ_base + λ·d, written into d. */
function addToBase(base: Float32Array, d: Float32Array, lambda: number): Float32Array {
  for (let i = 0; i < base.length; i++) d[i] = base[i] + lambda * d[i];
  return d;
}

export function slerpVectors(t: number, v0: Float32Array, v1: Float32Array): Float32Array {
  let n0 = 0;
  let n1 = 0;
  let dot = 0;
  for (let i = 0; i < v0.length; i++) {
    n0 += v0[i] * v0[i];
    n1 += v1[i] * v1[i];
    dot += v0[i] * v1[i];
  }
  const cos = n0 > 0 && n1 > 0 ? dot / Math.sqrt(n0 * n1) : 1;
  const out = new Float32Array(v0.length);
  if (Math.abs(cos) > 0.9995) {
    for (let i = 0; i < v0.length; i++) out[i] = (1 - t) * v0[i] + t * v1[i];
    return out;
  }
  const theta = Math.acos(cos);
  const s = Math.sin(theta);
  const s0 = Math.sin((1 - t) * theta) / s;
  const s1 = Math.sin(t * theta) / s;
  for (let i = 0; i < v0.length; i++) out[i] = s0 * v0[i] + s1 * v1[i];
  return out;
}

export const MERGE_METHODS: Record<string, MergeMethod> = {
  linear: {
    needsBase: false,
    usesDensity: false,
    defaultNormalize: true,
    merge: (x) => {
      const total = x.normalize ? x.weights.reduce((a, b) => a + b, 0) : 1;
      const out = new Float32Array(x.models[0].length);
      for (let i = 0; i < out.length; i++) {
        let s = 0;
        for (let m = 0; m < x.models.length; m++) s += x.weights[m] * x.models[m][i];
        out[i] = s / total;
      }
      return out;
    },
  },
  task_arithmetic: {
    needsBase: true,
    usesDensity: false,
    defaultNormalize: false,
    merge: (x) => addToBase(x.base!, weightedSum(deltas(x), x.weights, x.normalize), x.lambda),
  },
  ties: {
    needsBase: true,
    usesDensity: true,
    defaultNormalize: true,
    merge: (x) => addToBase(x.base!, tiesConsensus(deltas(x).map((d, m) => trimTopK(d, x.densities[m])), x.weights, x.normalize), x.lambda),
  },
  dare_ties: {
    needsBase: true,
    usesDensity: true,
    defaultNormalize: true,
    merge: (x) => addToBase(x.base!, tiesConsensus(deltas(x).map((d, m) => dareDrop(d, x.densities[m], x.rng(m))), x.weights, x.normalize), x.lambda),
  },
  dare_linear: {
    needsBase: true,
    usesDensity: true,
    defaultNormalize: false,
    merge: (x) => addToBase(x.base!, weightedSum(deltas(x).map((d, m) => dareDrop(d, x.densities[m], x.rng(m))), x.weights, x.normalize), x.lambda),
  },
  slerp: {
    needsBase: true,
    models: 1,
    usesDensity: false,
    defaultNormalize: false,
    merge: (x) => slerpVectors(x.t, x.base!, x.models[0]),
  },
};
