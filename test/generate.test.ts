import { describe, expect, it } from 'vitest';
import * as tf from '@tensorflow/tfjs-core';
import { Decoder } from '../src/model/decoder.js';
import { generate } from '../src/infer/generate.js';
import { DEFAULT_SAMPLING, applyPenalties, filteredProbs, sampleToken, scaledExps } from '../src/infer/sampling.js';
import { loadNative, nativeSampleExps } from '../src/engine/native.js';
import { Rng } from '../src/util/rng.js';
import { referenceLogits } from './helpers/reference.js';
import { ARCH_SPECS, makeTestModel } from './helpers/models.js';

const greedy = { ...DEFAULT_SAMPLING, temperature: 0 };

describe('sampling processors', () => {
  it('top-k and top-p keep the hand-computed sets', () => {
    const logits = Float32Array.from([Math.log(0.5), Math.log(0.3), Math.log(0.15), Math.log(0.05)]);
    const k2 = filteredProbs(logits, { ...DEFAULT_SAMPLING, topK: 2 });
    expect(k2[0]).toBeCloseTo(0.5 / 0.8, 6);
    expect(k2[1]).toBeCloseTo(0.3 / 0.8, 6);
    expect(k2[2]).toBe(0);
    const p = filteredProbs(logits, { ...DEFAULT_SAMPLING, topP: 0.85 });
    expect(Array.from(p).map((x) => +x.toFixed(6))).toEqual([+(0.5 / 0.95).toFixed(6), +(0.3 / 0.95).toFixed(6), +(0.15 / 0.95).toFixed(6), 0]);
    // Ties go to the lower id, also when a later, likelier token displaces one of them.
    const tied = filteredProbs(Float32Array.from([1, 1, 1, 2]), { ...DEFAULT_SAMPLING, topK: 2 });
    expect(Array.from(tied, (x) => x > 0)).toEqual([true, false, false, true]);
    const t = filteredProbs(Float32Array.from([1, 0]), { ...DEFAULT_SAMPLING, temperature: 0.5 });
    expect(t[0]).toBeCloseTo(Math.exp(2) / (Math.exp(2) + 1), 6);
  });

  it('top-k and top-p over a vocabulary keep what sorting every token keeps, bit for bit: peaked, flat, tied, underflowing to zero, a mass reached late', () => {
    // The whole-vocabulary form the selection replaces: every token sorted, then the prefix.
    const reference = (probs: Float64Array, k: number, topP: number) => {
      const order = Array.from({ length: probs.length }, (_, i) => i).sort((a, b) => probs[b] - probs[a] || a - b);
      let n = k;
      if (topP < 1) {
        let cum = 0;
        for (let i = 0; i < n; i++) {
          cum += probs[order[i]];
          if (cum >= topP) {
            n = i + 1;
            break;
          }
        }
      }
      const out = new Float64Array(probs.length);
      let s = 0;
      for (let i = 0; i < n; i++) s += probs[order[i]];
      for (let i = 0; i < n; i++) out[order[i]] = probs[order[i]] / s;
      return out;
    };
    const rng = new Rng(12);
    const V = 20_000;
    const shapes: [string, () => Float32Array][] = [
      ['peaked', () => Float32Array.from({ length: V }, () => rng.normal() * 4)],
      ['flat', () => Float32Array.from({ length: V }, () => rng.normal() * 0.01)],
      ['tied in steps', () => Float32Array.from({ length: V }, () => Math.floor(rng.next() * 6))],
      ['one token, the rest spread thin', () => Float32Array.from({ length: V }, (_, i) => (i === 777 ? 12 : rng.normal() * 0.001))],
      ['underflowing to zero', () => Float32Array.from({ length: V }, (_, i) => (i < 30 ? 50 + i : -800 + rng.next()))],
    ];
    let cases = 0;
    for (const [name, make] of shapes) {
      const logits = make();
      for (const temperature of [1, 0.05])
        for (const [topK, topP] of [[0, 0.9], [0, 0.999999], [0, 0.5], [50, 1], [40, 0.95], [V - 1, 0.97], [1, 1], [100, 0.3]]) {
          const p = { ...DEFAULT_SAMPLING, temperature, topK, topP };
          const got = filteredProbs(logits, p);
          const want = reference(filteredProbs(logits, { ...p, topK: 0, topP: 1 }), topK > 0 ? topK : V, topP);
          expect(Buffer.from(got.buffer).equals(Buffer.from(want.buffer)), `${name}, T ${temperature}, k ${topK}, p ${topP}`).toBe(true);
          // The draw walks only the kept tokens: the walk over every token, as it was, draws the same.
          const walk = (probs: Float64Array, r: Rng) => {
            let u = r.next();
            for (let i = 0; i < probs.length; i++) if ((u -= probs[i]) < 0) return i;
            return probs.indexOf(Math.max(...probs));
          };
          const [a, b] = [new Rng(cases), new Rng(cases)];
          for (let d = 0; d < 5; d++) expect(sampleToken(logits, p, a)).toBe(walk(want, b));
          cases++;
        }
    }
    expect(cases).toBe(80);
  });

  it('the first pass, exp(x/t − max x/t), is Math.exp\'s to the bit when the addon takes it (every branch of exp, on every core)', () => {
    const rng = new Rng(31);
    const V = 100_003; // several of the addon's chunks, the last one short
    const rows = [
      Float32Array.from({ length: V }, () => rng.normal() * 3),
      Float32Array.from({ length: V }, (_, i) => (i % 5 === 0 ? -800 - (i % 97) : i % 7 === 0 ? 1e-9 * rng.normal() : rng.normal() * 0.4)),
      Float32Array.from({ length: V }, (_, i) => (i === 17 ? 3e4 : rng.normal() * 1e3)),
    ];
    let taken = 0;
    for (const t of [1, 0.7, 0.013])
      for (const [i, x] of rows.entries()) {
        const got = new Float64Array(V);
        if (!nativeSampleExps(x, t, got)) continue; // no addon: scaledExps is the loop below
        taken++;
        let m = -Infinity;
        for (let j = 0; j < V; j++) m = Math.max(m, x[j] / t);
        const want = Float64Array.from(x, (v) => Math.exp(v / t - m));
        expect(Buffer.from(got.buffer).equals(Buffer.from(want.buffer)), `row ${i}, t ${t}`).toBe(true);
        expect(Buffer.from(scaledExps(x, t).buffer).equals(Buffer.from(want.buffer))).toBe(true);
      }
    expect(taken).toBe(loadNative().active ? 9 : 0);
  });

  it('penalties follow transformers (repetition) and OpenAI (presence/frequency)', () => {
    const l = Float32Array.from([2, -2, 1, 0]);
    applyPenalties(l, { ...DEFAULT_SAMPLING, repetitionPenalty: 2, presencePenalty: 0.5, frequencyPenalty: 0.25 }, new Set([0, 1]), new Map([[2, 3]]));
    expect(Array.from(l)).toEqual([1, -4, 1 - 0.75 - 0.5, 0]);
  });

  it('sampling frequencies follow the probabilities', () => {
    const logits = Float32Array.from([0, Math.log(3)]);
    const rng = new Rng(7);
    let ones = 0;
    for (let i = 0; i < 4000; i++) ones += sampleToken(logits, DEFAULT_SAMPLING, rng);
    expect(ones / 4000).toBeGreaterThan(0.72);
    expect(ones / 4000).toBeLessThan(0.78);
  });
});

describe('generate', () => {
  const { cfg, w, ref } = makeTestModel(ARCH_SPECS['qwen2 biases tied rope 1e6'], 11, 0.3);

  it('greedy decoding follows the float64 reference argmax', () => {
    const model = Decoder.fromHF(cfg, (n) => w.get(n)!);
    const prompt = [3, 5, 7];
    const out = generate(model, [{ prompt, seeds: [0] }], { ...greedy, maxNewTokens: 6, stopIds: [] })[0][0];
    const seq = [...prompt];
    for (let i = 0; i < 6; i++) {
      const lg = referenceLogits(ref, w, seq);
      const last = lg[lg.length - 1];
      seq.push(last.indexOf(Math.max(...last)));
    }
    expect(out.ids).toEqual(seq.slice(prompt.length));
    expect(out.finishReason).toBe('length');
    model.dispose();
  });

  it('a sample does not depend on its batch: left padding, shared prefill and per-sample seeds', () => {
    const model = Decoder.fromHF(cfg, (n) => w.get(n)!);
    const opts = { ...DEFAULT_SAMPLING, temperature: 1.0, topK: 10, maxNewTokens: 8, stopIds: [] };
    const together = generate(model, [{ prompt: [1, 2, 3, 4, 5], seeds: [11, 12, 13] }, { prompt: [9, 8], seeds: [21, 22, 23] }], opts);
    const aloneA = generate(model, [{ prompt: [1, 2, 3, 4, 5], seeds: [12] }], opts)[0][0];
    const aloneB = generate(model, [{ prompt: [9, 8], seeds: [23] }], opts)[0][0];
    expect(together[0][1].ids).toEqual(aloneA.ids);
    expect(together[1][2].ids).toEqual(aloneB.ids);
    const again = generate(model, [{ prompt: [1, 2, 3, 4, 5], seeds: [11, 12, 13] }, { prompt: [9, 8], seeds: [21, 22, 23] }], opts);
    expect(again).toEqual(together);
    // Different seeds give different samples (8 tokens over a 40-token vocabulary).
    expect(new Set(together[0].map((s) => s.ids.join(','))).size).toBeGreaterThan(1);
    model.dispose();
  });

  it('stops at a stop id and at a stop string, and leaves no tensors behind', () => {
    const model = Decoder.fromHF(cfg, (n) => w.get(n)!);
    const first = generate(model, [{ prompt: [3, 5, 7], seeds: [0] }], { ...greedy, maxNewTokens: 6, stopIds: [] })[0][0].ids;
    const stopped = generate(model, [{ prompt: [3, 5, 7], seeds: [0] }], { ...greedy, maxNewTokens: 6, stopIds: [first[2]] })[0][0];
    expect(stopped.ids).toEqual(first.slice(0, first.indexOf(first[2])));
    expect(stopped.finishReason).toBe('stop');
    const decode = (ids: number[]) => ids.map((i) => String.fromCharCode(97 + (i % 26))).join('');
    const s = generate(model, [{ prompt: [3, 5, 7], seeds: [0] }], { ...greedy, maxNewTokens: 6, stopIds: [], decode, stop: [decode(first.slice(1, 3))] })[0][0];
    expect(s.text).toBe(decode(first.slice(0, 1)));
    expect(s.finishReason).toBe('stop');
    const before = tf.memory().numTensors;
    for (let i = 0; i < 3; i++) generate(model, [{ prompt: [1, 2], seeds: [i, i + 1] }], { ...DEFAULT_SAMPLING, maxNewTokens: 5, stopIds: [] });
    expect(tf.memory().numTensors).toBe(before);
    model.dispose();
  });
});
