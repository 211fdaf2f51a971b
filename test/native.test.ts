import { describe, expect, it } from 'vitest';
import { spawnSync } from 'node:child_process';
import * as path from 'node:path';
import * as tf from '@tensorflow/tfjs-core';
import { hostMatmul, loadNative, nativeMatmul, nativeMatmulActive } from '../src/engine/native.js';
import { Rng } from '../src/util/rng.js';

/** float64 reference: C[b] = op(A[b])·op(B[b]). */
function ref(ta: boolean, tb: boolean, batch: number, M: number, N: number, K: number, A: Float32Array, sa: number, B: Float32Array, sb: number): Float64Array {
  const C = new Float64Array(batch * M * N);
  for (let b = 0; b < batch; b++)
    for (let i = 0; i < M; i++)
      for (let j = 0; j < N; j++) {
        let s = 0;
        for (let k = 0; k < K; k++) s += A[b * sa + (ta ? k * M + i : i * K + k)] * B[b * sb + (tb ? j * K + k : k * N + j)];
        C[(b * M + i) * N + j] = s;
      }
  return C;
}

const rand = (rng: Rng, n: number) => Float32Array.from({ length: n }, () => rng.normal());

/** max |got − want| / (1 + |want|): float32 sums of K products of unit normals. */
function relErr(got: ArrayLike<number>, want: ArrayLike<number>): number {
  let e = 0;
  for (let i = 0; i < want.length; i++) e = Math.max(e, Math.abs(got[i] - want[i]) / (1 + Math.abs(want[i])));
  return e;
}

const hasCompiler = spawnSync('g++', ['--version']).status === 0;
const native = loadNative();

describe('native matmul', () => {
  it('hostMatmul (the adapter fold of merge-lora and export-gguf) equals a float64 product, odd shapes included', () => {
    const rng = new Rng(5);
    for (const [m, k, n] of [[1, 1, 1], [37, 16, 53], [130, 3, 7]]) {
      const a = Float32Array.from({ length: m * k }, () => rng.normal());
      const b = Float32Array.from({ length: k * n }, () => rng.normal());
      const c = hostMatmul(a, b, m, k, n);
      for (let i = 0; i < m; i++) {
        for (let t = 0; t < n; t++) {
          let want = 0;
          for (let j = 0; j < k; j++) want += a[i * k + j] * b[j * n + t];
          expect(Math.abs(c[i * n + t] - want)).toBeLessThan(1e-5 * (1 + Math.abs(want)) * k);
        }
      }
    }
  });

  it('is built at install wherever a C++ compiler exists', () => {
    if (!hasCompiler) return console.log(`no g++ here: ${native.reason}`);
    expect(native.active, native.reason).toBe(true);
    console.log(`native matmul: ${native.reason}, ${native.threads} threads`);
  });

  it.runIf(native.active)('equals a float64 product for every transpose, odd sizes, batches and broadcasts (built-in and BLAS)', () => {
    const rng = new Rng(11);
    const shapes = [[1, 1, 1, 1], [1, 5, 7, 3], [1, 17, 33, 300], [3, 13, 16, 6], [4, 37, 70, 129], [2, 64, 64, 0], [1, 300, 257, 64]];
    for (const useBlas of native.kernel === 'blas' ? [false, true] : [false]) {
      for (const [batch, M, N, K] of shapes)
        for (const ta of [false, true])
          for (const tb of [false, true])
            for (const bcast of batch > 1 ? ['none', 'a', 'b'] : ['none']) {
              const sa = bcast === 'a' ? 0 : M * K;
              const sb = bcast === 'b' ? 0 : K * N;
              const A = rand(rng, Math.max(1, (batch - 1) * sa + M * K));
              const B = rand(rng, Math.max(1, (batch - 1) * sb + K * N));
              const C = new Float32Array(batch * M * N).fill(NaN);
              nativeMatmul(ta, tb, batch, M, N, K, A, sa, B, sb, C, useBlas);
              const e = relErr(C, ref(ta, tb, batch, M, N, K, A, sa, B, sb));
              expect(e, `${useBlas ? 'blas' : 'builtin'} ${batch}×${M}×${N}×${K} ta=${ta} tb=${tb} bcast=${bcast}`).toBeLessThan(2e-5 * Math.sqrt(Math.max(K, 1)));
            }
    }
  });

  it.runIf(native.active)('is deterministic: the same product twice is bit-identical', () => {
    const rng = new Rng(3);
    const [M, N, K] = [200, 300, 500];
    const A = rand(rng, M * K);
    const B = rand(rng, K * N);
    for (const useBlas of [false, true]) {
      const c1 = new Float32Array(M * N);
      const c2 = new Float32Array(M * N);
      nativeMatmul(false, true, 1, M, N, K, A, 0, B, 0, c1, useBlas);
      nativeMatmul(false, true, 1, M, N, K, A, 0, B, 0, c2, useBlas);
      expect(Buffer.from(c1.buffer).equals(Buffer.from(c2.buffer))).toBe(true);
    }
  });

  /**
   * Runs `body` (Node code with the addon as `m`, a seeded `rnd(n)` and a hash `h` to update) under
   * each instruction set in `isas` (the first also on one thread) and on two threads; every run
   * must give the same hash.
   */
  const sameBitsEverywhere = (body: string, isas = ['avx512', 'avx2', 'portable']) => {
    const script = `
      const m = require(${JSON.stringify(path.resolve('build/Release/prefopt_native.node'))});
      const h = require('node:crypto').createHash('sha256');
      let seed = 1;
      const rnd = (n) => Float32Array.from({ length: n }, () => ((seed = (seed * 16807) % 2147483647) / 2147483647) - 0.5);
      ${body}
      console.log(m.info().isa + ' ' + h.digest('hex'));`;
    const runs = [...isas.map((isa) => [isa, '2']), [isas[0], '1']].map(([isa, threads]) => {
      const r = spawnSync(process.execPath, ['-e', script], { env: { ...process.env, PREFOPT_ISA: isa, PREFOPT_THREADS: threads, PREFOPT_BLAS: 'builtin' }, encoding: 'utf8' });
      expect(r.status, r.stderr).toBe(0);
      return r.stdout.trim().split(' ');
    });
    console.log(`ISAs compared: ${[...new Set(runs.map((r) => r[0]))].join(', ')}`);
    expect(new Set(runs.map((r) => r[1])).size).toBe(1);
  };

  it.runIf(native.active)('gives the same bits with AVX-512, AVX2 and portable code (PREFOPT_ISA), and on one thread or all', () => {
    // Each kernel sums every element of C as one chain of fused multiply-adds in k order: the
    // instruction set and the thread split may not change a bit. K > 256 crosses a KC block.
    sameBitsEverywhere(`
      for (const [M, N, K, ta, tb] of [[37, 70, 300, false, false], [200, 45, 520, true, false], [13, 129, 64, false, true], [64, 64, 1000, true, true]]) {
        const A = rnd(M * K), B = rnd(K * N), C = new Float32Array(M * N);
        m.matmul(ta, tb, 1, M, N, K, A, 0, B, 0, C, false);
        h.update(Buffer.from(C.buffer));
      }`);
  });

  it.runIf(native.active)('its elementwise, normalisation and attention kernels give the same bits with AVX-512, AVX2 and portable code (attention and SwiGLU: x86 forms), on one thread or all', () => {
    // The vectorized forms (16 lanes under AVX-512, 4 in the baseline build) must round exactly
    // as the scalar ones, sums included; odd lengths exercise the tails. Large enough to split.
    const setup = `
      const out = (a) => h.update(Buffer.from(a.buffer));
      const N = 301, D = 203, n = N * D, H = 3, hd = 18;
      const x = rnd(n), w = rnd(D), dy = rnd(n), g = rnd(n), u = rnd(n);
      const y = new Float32Array(n), dx = new Float32Array(n), dw = new Float32Array(D), du = new Float32Array(n);`;
    // SwiGLU's σ and attention's softmax use a vector exp wherever AVX2 runs (8 or 16 lanes) and
    // the C library's expf in the portable build, which rounds differently: compared across the
    // x86 forms and thread counts only. Odd sizes leave partial vectors.
    sameBitsEverywhere(`${setup}
      m.swiglu(g, u, n, y); out(y);
      m.swigluGrad(g, u, dy, n, dx, du); out(dx); out(du);
      const [B, T, Tk, Hq, KV, hq] = [3, 37, 45, 4, 2, 16], nq = B * T * Hq * hq, nk = B * Tk * KV * hq;
      const q = rnd(nq), k = rnd(nk), v = rnd(nk), dout = rnd(nq), mask = new Float32Array(B * T * Tk);
      for (let i = 0; i < mask.length; i++) if (i % Tk > (Math.floor(i / Tk) % T) + Tk - T) mask[i] = -1e9;
      const o = new Float32Array(nq), dq = new Float32Array(nq), dk = new Float32Array(nk), dv = new Float32Array(nk);
      m.attention(q, k, v, mask, 0.25, B, T, Tk, Hq, KV, hq, o); out(o);
      m.attentionGrad(q, k, v, mask, 0.25, B, T, Tk, Hq, KV, hq, dout, dq, dk, dv); out(dq); out(dk); out(dv);`, ['avx512', 'avx2']);
    sameBitsEverywhere(`${setup}
      m.rmsNorm(x, w, N, D, 1e-5, y, null, null); out(y);
      m.rmsNormGrad(x, w, dy, N, D, 1e-5, dx, dw, null); out(dx); out(dw);
      const sum = new Float32Array(n);
      m.rmsNorm(x, w, N, D, 1e-5, y, g, sum); out(y); out(sum);
      m.rmsNormGrad(sum, w, dy, N, D, 1e-5, dx, null, u); out(dx);
      m.add(x, dy, n, y); out(y);
      m.biasAdd(x, w, N, D, y); out(y);
      m.columnSum(dy, N, D, dw); out(dw);
      const rows = Math.floor(n / (H * hd)), cos = rnd(rows * hd), sin = rnd(rows * hd), r = new Float32Array(rows * H * hd);
      m.rope(x.subarray(0, rows * H * hd), cos, sin, rows, H, hd, false, r); out(r);
      m.rope(x.subarray(0, rows * H * hd), cos, sin, rows, H, hd, true, r); out(r);
      const ids = Int32Array.from({ length: N }, (_, i) => (i * 7) % 11), dt = new Float32Array(11 * D);
      m.embedGrad(ids, N, dy, 11, D, dt); out(dt);
      const p2 = new Float32Array(n), m2 = new Float32Array(n), v2 = new Float32Array(n);
      m.adamw(x, dy, g, u.map(Math.abs), n, Float32Array.from([0.7, 0.9, 0.1, 0.95, 0.05, 0.8, 1e-8, 1e-3, 1e-4]), p2, m2, v2); out(p2); out(m2); out(v2);`);
  });

  it.runIf(native.active)('serves tf.matMul on the active backend: transposes and batch broadcasts on both sides', () => {
    expect(nativeMatmulActive()).toBe(true);
    const rng = new Rng(5);
    const A = rand(rng, 2 * 3 * 4 * 5);
    const B = rand(rng, 5 * 6);
    const a = tf.tensor4d(A, [2, 3, 4, 5]);
    const b = tf.tensor2d(B, [5, 6]);
    const c = tf.matMul(a, b);
    expect(c.shape).toEqual([2, 3, 4, 6]);
    expect(relErr(c.dataSync(), ref(false, false, 6, 4, 6, 5, A, 20, B, 0))).toBeLessThan(1e-5);
    const bt = tf.tensor3d(rand(rng, 6 * 5 * 4), [6, 5, 4]);
    const at = tf.reshape(a, [6, 4, 5]);
    const ct = tf.matMul(bt, at, true, true); // [6,4,5]ᵀ·[6,4,5]ᵀ → [6,4,4]
    expect(relErr(ct.dataSync(), ref(true, true, 6, 4, 4, 5, bt.dataSync() as Float32Array, 20, A, 20))).toBeLessThan(1e-5);
    // A two-sided batch broadcast ([2,1] against [1,3]): numpy semantics (tfjs 4.22's own kernels get it wrong).
    const x = tf.tensor4d(rand(rng, 2 * 4 * 5), [2, 1, 4, 5]);
    const y = tf.tensor4d(rand(rng, 3 * 5 * 6), [1, 3, 5, 6]);
    const xy = tf.matMul(x, y);
    expect(xy.shape).toEqual([2, 3, 4, 6]);
    const X = x.dataSync() as Float32Array;
    const Y = y.dataSync() as Float32Array;
    const got = xy.dataSync();
    for (let i = 0; i < 2; i++)
      for (let j = 0; j < 3; j++) {
        const want = ref(false, false, 1, 4, 6, 5, X.subarray(i * 20, (i + 1) * 20), 0, Y.subarray(j * 30, (j + 1) * 30), 0);
        expect(relErr(got.subarray((i * 3 + j) * 24, (i * 3 + j + 1) * 24), want)).toBeLessThan(1e-5);
      }
    [a, b, c, bt, at, ct, x, y, xy].forEach((t) => t.dispose());
  });
});

describe('zero-copy Identity and Cast on wasm', () => {
  it('a clone survives its source, same-dtype casts share data, other casts still convert, and numTensors/bytes stay balanced', () => {
    const before = tf.memory();
    const x = tf.tensor1d([1.5, -2, 3]);
    const y = tf.clone(x);
    const z = tf.cast(x, 'float32');
    x.dispose();
    expect(Array.from(y.dataSync())).toEqual([1.5, -2, 3]);
    expect(Array.from(z.dataSync())).toEqual([1.5, -2, 3]);
    const i = tf.cast(y, 'int32');
    expect(i.dtype).toBe('int32');
    expect(Array.from(i.dataSync())).toEqual([1, -2, 3]);
    [y, z, i].forEach((t) => t.dispose());
    expect(tf.memory().numTensors).toBe(before.numTensors);
    expect(tf.memory().numBytes).toBe(before.numBytes);
  });
});
