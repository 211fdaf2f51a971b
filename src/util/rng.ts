/**
 * Seeded randomness. Every random choice in prefopt draws from an Rng built from a recipe seed,
 * and sub-streams are derived by hashing (seed, labels…) so that the draw for one unit of work
 * (a sample, a batch order) does not depend on what ran before it. That is what makes resumed
 * runs reproduce uninterrupted ones.
 */

/** splitmix64 finaliser on a BigInt state: good avalanche for deriving seeds. */
function mix64(x: bigint): bigint {
  const M = (1n << 64n) - 1n;
  x = (x + 0x9e3779b97f4a7c15n) & M;
  x = ((x ^ (x >> 30n)) * 0xbf58476d1ce4e5b9n) & M;
  x = ((x ^ (x >> 27n)) * 0x94d049bb133111ebn) & M;
  return x ^ (x >> 31n);
}

/** Derive a 32-bit seed from a base seed and any labels (numbers or strings). */
export function deriveSeed(seed: number, ...labels: (number | string)[]): number {
  let h = mix64(BigInt.asUintN(64, BigInt(Math.trunc(seed))));
  for (const l of labels) {
    if (typeof l === 'number') {
      h = mix64(h ^ BigInt.asUintN(64, BigInt(Math.trunc(l))));
    } else {
      for (let i = 0; i < l.length; i++) h = mix64(h ^ BigInt(l.charCodeAt(i)));
      h = mix64(h ^ 0xffn);
    }
  }
  return Number(h & 0xffffffffn);
}

/** xoshiro128** : small, fast, and its whole state can be saved in a checkpoint. */
export class Rng {
  private s: Uint32Array;
  constructor(seed: number, ...labels: (number | string)[]) {
    this.s = new Uint32Array(4);
    let x = deriveSeed(seed, ...labels, 'rng');
    for (let i = 0; i < 4; i++) {
      x = deriveSeed(x, i);
      this.s[i] = x;
    }
    if (this.s.every((v) => v === 0)) this.s[0] = 1;
  }
  static fromState(state: number[]): Rng {
    const r = new Rng(0);
    r.s = Uint32Array.from(state);
    return r;
  }
  state(): number[] {
    return Array.from(this.s);
  }
  setState(state: number[]): void {
    this.s.set(state);
  }
  /** Uniform 32-bit unsigned integer. */
  nextU32(): number {
    const s = this.s;
    const result = Math.imul(rotl(Math.imul(s[1], 5), 7), 9) >>> 0;
    const t = s[1] << 9;
    s[2] ^= s[0];
    s[3] ^= s[1];
    s[1] ^= s[2];
    s[0] ^= s[3];
    s[2] ^= t;
    s[3] = rotl(s[3], 11);
    return result;
  }
  /** Uniform in [0, 1) with 53 bits. */
  next(): number {
    const hi = this.nextU32() >>> 5;
    const lo = this.nextU32() >>> 6;
    return (hi * 67108864 + lo) / 9007199254740992;
  }
  /** Integer in [0, n). */
  int(n: number): number {
    return Math.floor(this.next() * n);
  }
  /** Standard normal (Box–Muller). */
  normal(): number {
    let u = 0;
    while (u === 0) u = this.next();
    const v = this.next();
    return Math.sqrt(-2 * Math.log(u)) * Math.cos(2 * Math.PI * v);
  }
  shuffle<T>(a: T[]): T[] {
    for (let i = a.length - 1; i > 0; i--) {
      const j = this.int(i + 1);
      [a[i], a[j]] = [a[j], a[i]];
    }
    return a;
  }
}

function rotl(x: number, k: number): number {
  return ((x << k) | (x >>> (32 - k))) >>> 0;
}
