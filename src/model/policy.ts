import * as path from 'node:path';
import { Decoder } from './decoder.js';
import { loadModel } from './load.js';
import { LoraAdapter, attach } from '../lora/lora.js';
import { TextTokenizer } from '../tokenizer/tokenizer.js';
import { readGenerationConfig } from '../io/checkpoint.js';
import { UserError } from '../util/errors.js';

/**
 * A loaded policy: the checkpoint, its tokenizer when it has one, its generation defaults, and
 * an adapter when asked. One loader for every command that runs a model.
 */
export interface Policy {
  dir: string;
  model: Decoder;
  tok: TextTokenizer | null;
  gen: Record<string, any>;
  padId: number;
}

/** The checkpoint's tokenizer, or null when it has none. */
export function openTokenizer(dir: string): TextTokenizer | null {
  return TextTokenizer.exists(dir) ? TextTokenizer.load(dir) : null;
}

/** `tok`: the checkpoint's tokenizer when the caller has already loaded it (openTokenizer). */
export function openPolicy(dir: string, opts: { adapter?: string; trainable?: boolean; tok?: TextTokenizer | null } = {}): Policy {
  const model = loadModel(dir, { trainable: opts.trainable });
  const tok = opts.tok !== undefined ? opts.tok : openTokenizer(dir);
  if (tok && tok.vocabSize > model.cfg.vocab_size) {
    throw new UserError(`${path.join(dir, 'tokenizer.json')}: tokenizer has ${tok.vocabSize} ids but config.json vocab_size is ${model.cfg.vocab_size}`);
  }
  if (opts.adapter) {
    try {
      attach(model, LoraAdapter.load(model, opts.adapter));
    } catch (e) {
      model.dispose();
      throw e;
    }
  }
  const gen = readGenerationConfig(dir) ?? {};
  const padId = model.cfg.pad_token_id ?? (tok?.id('<pad>') ?? 0);
  return { dir, model, tok, gen, padId };
}

export function needTokenizer(p: Policy, why: string): TextTokenizer {
  if (!p.tok) throw new UserError(`${p.dir}: has no tokenizer.json, needed for ${why}`);
  return p.tok;
}

export function stopIdsOf(p: Policy): number[] {
  const ids = new Set<number>();
  const eos = p.gen.eos_token_id ?? p.model.cfg.eos_token_id;
  for (const e of Array.isArray(eos) ? eos : eos == null ? [] : [eos]) ids.add(e);
  for (const id of p.tok?.stopIds() ?? []) ids.add(id);
  return [...ids];
}
