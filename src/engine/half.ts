import * as tf from '@tensorflow/tfjs-core';

/**
 * A frozen weight kept as the checkpoint stores it: bf16 or f16 bits, in the file's own layout
 * (docs/REFERENCE.md §10). A 0.5B model's frozen base is then 1 GB instead of 2, and a 7B one fits
 * this machine at all. Only the native kernels read it (the products, LoRA's layer and the
 * embedding lookup widen it to float32 while packing), so it exists only where they serve the
 * backend; it is never a tfjs tensor, and has no gradient.
 */
export type HalfDtype = 'bf16' | 'f16';

/** The addon's storage codes (native/kernels.h, Dt). */
export const DT_CODE = { f32: 0, bf16: 1, f16: 2 } as const;

export class HalfWeight {
  constructor(
    /** The bits, row-major over `stored`. */
    readonly bits: Uint16Array,
    readonly dtype: HalfDtype,
    /** The shape as stored (Hugging Face's: [out, in] for a linear weight). */
    readonly stored: [number, number],
    /** The model uses the transpose of what is stored (linear weights, which prefopt keeps [in, out]). */
    readonly transposed: boolean,
  ) {
    if (bits.length !== stored[0] * stored[1]) throw new Error(`a ${stored.join('×')} weight needs ${stored[0] * stored[1]} values, got ${bits.length}`);
  }

  /** The shape the model sees: [in, out] for a linear weight, as a float32 one would have. */
  get shape(): [number, number] {
    return this.transposed ? [this.stored[1], this.stored[0]] : [this.stored[0], this.stored[1]];
  }
  get size(): number {
    return this.bits.length;
  }
  get bytes(): number {
    return this.bits.byteLength;
  }
  get code(): number {
    return DT_CODE[this.dtype];
  }
}

/** A weight as the model holds it: a float32 tensor, or 16-bit bits. */
export type Weight = tf.Tensor | HalfWeight;

export const isHalf = (w: unknown): w is HalfWeight => w instanceof HalfWeight;
