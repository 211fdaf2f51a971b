import { encode, f16ToF32, f32ToF16 } from '../io/safetensors.js';
import type { GgmlType } from './format.js';

/**
 * Tensor data in ggml's encodings (docs/REFERENCE.md §12). F16 and BF16 round to nearest even,
 * as the safetensors writer does; Q8_0 is ggml's reference quantizer: blocks of 32 values along
 * the innermost dimension, each an f16 scale d = max|x| / 127 followed by 32 int8 values
 * round(x / d), rounding half away from zero as C's roundf does.
 */
export function encodeTensor(values: Float32Array, type: GgmlType): Buffer {
  switch (type) {
    case 'F32':
      return encode(values, 'F32');
    case 'F16':
      return encode(values, 'F16');
    case 'BF16':
      return encode(values, 'BF16');
    case 'Q8_0':
      return quantizeQ8_0(values);
  }
}

export const Q8_BLOCK = 32;

export function quantizeQ8_0(x: Float32Array): Buffer {
  if (x.length % Q8_BLOCK !== 0) throw new Error(`Q8_0 needs a multiple of ${Q8_BLOCK} values, found ${x.length}`);
  const blocks = x.length / Q8_BLOCK;
  const out = Buffer.alloc(blocks * 34);
  for (let b = 0; b < blocks; b++) {
    const base = b * Q8_BLOCK;
    let amax = 0;
    for (let i = 0; i < Q8_BLOCK; i++) amax = Math.max(amax, Math.abs(x[base + i]));
    // ggml computes d and 1/d in float32 and quantizes with 1/d before d is rounded to f16.
    const d = Math.fround(amax / 127);
    const id = d ? Math.fround(1 / d) : 0;
    const o = b * 34;
    out.writeUInt16LE(f32ToF16(d), o);
    for (let i = 0; i < Q8_BLOCK; i++) {
      const v = Math.fround(x[base + i] * id);
      out.writeInt8(v < 0 ? -Math.round(-v) : Math.round(v), o + 2 + i);
    }
  }
  return out;
}

/** The values a Q8_0 buffer stands for (tests and error checks). */
export function dequantizeQ8_0(buf: Buffer): Float32Array {
  const blocks = buf.length / 34;
  const out = new Float32Array(blocks * Q8_BLOCK);
  for (let b = 0; b < blocks; b++) {
    const d = f16ToF32(buf.readUInt16LE(b * 34));
    for (let i = 0; i < Q8_BLOCK; i++) out[b * Q8_BLOCK + i] = d * buf.readInt8(b * 34 + 2 + i);
  }
  return out;
}
