import { Decoder } from './decoder.js';
import { checkFinite, openCheckpoint, readGenerationConfig, SaveOptions, writeCheckpointFiles } from '../io/checkpoint.js';
import { writeDirAtomic } from '../util/fsutil.js';

/** Load a checkpoint directory into a Decoder; every tensor is validated before use. */
export function loadModel(dir: string, opts: { trainable?: boolean } = {}): Decoder {
  const { cfg, src } = openCheckpoint(dir);
  return Decoder.fromHF(cfg, (name) => {
    const t = src.read(name);
    checkFinite(name, src.fileOf(name), t.data);
    return t;
  }, opts.trainable ?? false);
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

