import * as tf from '@tensorflow/tfjs-core';
import { fused, fusedActive } from './fused.js';

/**
 * Dropout with tf.dropout's exact mask, computed by the native kernel where the fused kernels
 * run. tf.dropout draws its uniforms from seedrandom's alea generator seeded with String(seed)
 * and combines them in four element-wise tfjs ops; at a 0.5B model's LoRA inputs that is
 * hundreds of millions of draws a step, most of the step's time on the cpu backend. The kernel
 * runs the same generator from the same state, so a seed gives the same mask either way (and a
 * checkpoint or run made with one path continues with the other).
 */
export interface AleaState {
  s0: number;
  s1: number;
  s2: number;
  c: number;
}

/** Baagoe's Mash hash as seedrandom's alea seeds with it (lib/alea.js). */
function mash(): (data: string) => number {
  let n = 0xefc8249d;
  return (data) => {
    for (let i = 0; i < data.length; i++) {
      n += data.charCodeAt(i);
      let h = 0.02519603282416938 * n;
      n = h >>> 0;
      h -= n;
      h *= n;
      n = h >>> 0;
      h -= n;
      n += h * 0x100000000;
    }
    return (n >>> 0) * 2.3283064365386963e-10;
  };
}

/** The generator state alea starts from for `seed` (tfjs passes numbers through String()). */
export function aleaState(seed: number | string): AleaState {
  const m = mash();
  let s0 = m(' ');
  let s1 = m(' ');
  let s2 = m(' ');
  const key = String(seed);
  s0 -= m(key);
  if (s0 < 0) s0 += 1;
  s1 -= m(key);
  if (s1 < 0) s1 += 1;
  s2 -= m(key);
  if (s2 < 0) s2 += 1;
  return { s0, s1, s2, c: 1 };
}

/**
 * Masks already drawn, by generator state, size and rate: a training step applies each mask two
 * or three times (forward; a checkpointed layer's recompute; the backward pass), and only the
 * first needs the generator — the others apply the recorded bits on every core
 * (at 0.5B, LoRA dropout on all seven linears took a third of a DPO step drawing each mask three
 * times). The mask is a function of the key, so the cache never changes a result: an entry
 * dropped (the cache is bounded) is drawn again, the same. The backward pass retires its entry.
 */
const masks = new Map<string, Uint32Array>();
const MASK_CACHE_BYTES = 256 * 2 ** 20;
let maskBytes = 0;

/** One mask's entry in the cache. */
export interface MaskStore {
  get(): Uint32Array | undefined;
  set(bits: Uint32Array): void;
  retire(): void;
}

function maskStore(key: string): MaskStore {
  const retire = () => {
    const v = masks.get(key);
    if (!v) return;
    masks.delete(key);
    maskBytes -= v.byteLength;
  };
  return {
    get: () => masks.get(key),
    set: (bits) => {
      retire();
      for (const [k, v] of masks) {
        if (maskBytes + bits.byteLength <= MASK_CACHE_BYTES) break;
        masks.delete(k); // the oldest first
        maskBytes -= v.byteLength;
      }
      masks.set(key, bits);
      maskBytes += bits.byteLength;
    },
    retire,
  };
}

/** tf.dropout(x, rate, undefined, seed), by the native kernel when it is available. */
export function dropout(x: tf.Tensor, rate: number, seed: number): tf.Tensor {
  if (!fusedActive() || rate === 0) return tf.dropout(x, rate, undefined, seed);
  const state = aleaState(seed);
  const key = `${state.s0},${state.s1},${state.s2},${state.c}:${x.size}:${rate}`;
  return fused.dropout(x, state, 1 - rate, maskStore(key));
}
