import { Decoder } from './decoder.js';
import { checkFinite, openCheckpoint, readGenerationConfig, SaveOptions, TensorSource, writeCheckpointFiles } from '../io/checkpoint.js';
import { writeDirAtomic } from '../util/fsutil.js';
import { HalfWeight } from '../engine/half.js';
import { fusedActive } from '../engine/fused.js';
import { isHalfMatrix, isLinearWeight } from './config.js';

export interface LoadOptions {
  /** Float32 variables that training updates; otherwise the weights are frozen. */
  trainable?: boolean;
  /**
   * Keep a frozen model's bf16/f16 matrices in 16 bits (engine/half), where the native kernels
   * serve the backend (default). False: every weight widened to float32, as before.
   */
  half?: boolean;
}

/** Load a checkpoint directory into a Decoder; every tensor is validated before use. */
export function loadModel(dir: string, opts: LoadOptions = {}): Decoder {
  const { cfg, src } = openCheckpoint(dir);
  const trainable = opts.trainable ?? false;
  // Trained 16-bit matrices are read from the mapped file too, and widened straight into the
  // backend's memory (Decoder.fromHF): no float32 copy in the JavaScript heap on the way.
  const half = (opts.half ?? true) && fusedActive();
  const model = Decoder.fromHF(cfg, (name) => (half && keepsHalf(src, name) ? readHalf(src, name) : readChecked(src, name)), trainable);
  if (trainable) src.unmap(); // every 16-bit matrix was widened
  return model;
}

/** A matrix stored in 16 bits (norms and biases are widened: the kernels that read them take float32). */
export function keepsHalf(src: TensorSource, name: string): boolean {
  const dt = src.dtype(name);
  return (dt === 'BF16' || dt === 'F16') && src.shape(name).length === 2 && isHalfMatrix(name);
}

/**
 * Whether loading `dir` frozen would keep its matrices in 16 bits (for the memory estimate,
 * before anything is loaded): a bf16/f16 checkpoint, with the native kernels serving the backend.
 */
export function loadsHalf(dir: string): boolean {
  if (!fusedActive()) return false;
  const src = TensorSource.open(dir);
  return src.names().some((n) => keepsHalf(src, n));
}

/** The 16-bit type of the matrices loading `dir` frozen keeps in 16 bits, or null (as loadsHalf). */
export function halfDtypeOf(dir: string): 'bf16' | 'f16' | null {
  if (!fusedActive()) return null;
  const src = TensorSource.open(dir);
  const name = src.names().find((n) => keepsHalf(src, n));
  return name === undefined ? null : src.dtype(name) === 'BF16' ? 'bf16' : 'f16';
}

function readChecked(src: TensorSource, name: string) {
  const t = src.read(name);
  checkFinite(name, src.fileOf(name), t.data);
  return t;
}

function readHalf(src: TensorSource, name: string): HalfWeight {
  const [rows, cols] = src.shape(name);
  const w = new HalfWeight(src.halfBits(name), src.dtype(name) === 'BF16' ? 'bf16' : 'f16', [rows, cols], isLinearWeight(name));
  checkFinite(name, src.fileOf(name), w);
  return w;
}

/**
 * Save as a Hugging Face checkpoint, atomically. Tokenizer and generation files are carried over
 * from `copyFrom` (usually the directory the model was loaded from).
 */
export async function saveModel(model: Decoder, dir: string, opts: SaveOptions = {}): Promise<void> {
  const gen = opts.generationConfig ?? (opts.copyFrom ? readGenerationConfig(opts.copyFrom) : null);
  await writeDirAtomic(dir, (tmp) =>
    writeCheckpointFiles(tmp, model.cfg.raw, model.hfEntries(), (name) => model.hfData(name), { ...opts, generationConfig: gen }),
  );
}
