import * as fs from 'node:fs';
import * as path from 'node:path';
import { UserError } from '../util/errors.js';
import { firstNonFinite, firstNonFiniteHalf, mapFile, unmapFile } from '../engine/native.js';
import type { HalfWeight } from '../engine/half.js';
import { readJson } from '../util/fsutil.js';
import { ModelConfig, expectedShapes, parseConfig } from '../model/config.js';
import { DType, EncodedTensor, SafetensorsFile, TORCH_DTYPE, TensorData, readEncoded, readHalfBits, readHeader, readTensor, writeSafetensors } from './safetensors.js';

/**
 * Hugging Face checkpoint directories (docs/REFERENCE.md §1): config.json, one safetensors file or shards
 * with an index, generation_config.json and tokenizer files carried along. Tensors are handled in
 * HF layout here; the model decides how it keeps them in memory.
 */
export interface HostTensor {
  shape: number[];
  data: Float32Array;
}

export const TOKENIZER_FILES = ['tokenizer.json', 'tokenizer_config.json', 'special_tokens_map.json', 'vocab.json', 'merges.txt', 'tokenizer.model'];

/** Where each tensor of a checkpoint lives, without reading any data. */
export class TensorSource {
  constructor(
    readonly dir: string,
    readonly files: Map<string, SafetensorsFile>,
    readonly where: Map<string, string>,
  ) {}

  static open(dir: string): TensorSource {
    const single = path.join(dir, 'model.safetensors');
    const index = path.join(dir, 'model.safetensors.index.json');
    const files = new Map<string, SafetensorsFile>();
    const where = new Map<string, string>();
    if (fs.existsSync(index)) {
      const idx = readJson(index);
      if (!idx?.weight_map || typeof idx.weight_map !== 'object') throw new UserError(`${index}: missing "weight_map"`);
      for (const [name, f] of Object.entries<any>(idx.weight_map)) {
        if (typeof f !== 'string' || f.includes('..') || path.isAbsolute(f)) throw new UserError(`${index}: tensor "${name}" maps to a bad file name ${JSON.stringify(f)}`);
        const file = path.join(dir, f);
        if (!files.has(f)) {
          if (!fs.existsSync(file)) throw new UserError(`${index}: tensor "${name}" is in ${f}, which does not exist`);
          files.set(f, readHeader(file));
        }
        if (!files.get(f)!.tensors.has(name)) throw new UserError(`${file}: tensor "${name}" is listed in the index but not in the file`);
        where.set(name, f);
      }
    } else if (fs.existsSync(single)) {
      const st = readHeader(single);
      files.set('model.safetensors', st);
      for (const name of st.tensors.keys()) where.set(name, 'model.safetensors');
    } else {
      throw new UserError(`${dir}: no model.safetensors or model.safetensors.index.json`);
    }
    return new TensorSource(dir, files, where);
  }

  has(name: string): boolean {
    return this.where.has(name);
  }
  names(): string[] {
    return [...this.where.keys()];
  }
  fileOf(name: string): string {
    return path.join(this.dir, this.where.get(name)!);
  }
  shape(name: string): number[] {
    return this.info(name).shape;
  }
  dtype(name: string): DType {
    return this.info(name).dtype;
  }
  /** The tensor's bytes as stored (to copy it unchanged). */
  readEncoded(name: string): EncodedTensor {
    return readEncoded(this.fileFor(name), name);
  }
  /**
   * A BF16/F16 tensor's bits: a view of the memory-mapped file where it can be mapped (no copy,
   * no page faults on fresh memory), else read into an array of its own.
   */
  halfBits(name: string): Uint16Array {
    const st = this.fileFor(name);
    const t = st.tensors.get(name)!;
    if (!this.mapped.has(st.file)) this.mapped.set(st.file, mapFile(st.file));
    const map = this.mapped.get(st.file);
    if (!map || t.begin % 2 !== 0 || t.end > map.byteLength || (t.dtype !== 'BF16' && t.dtype !== 'F16')) return readHalfBits(st, name);
    return new Uint16Array(map, t.begin, (t.end - t.begin) / 2);
  }
  /** Each file's mapping (null: it could not be mapped), made on first use. */
  private readonly mapped = new Map<string, ArrayBuffer | null>();

  /**
   * Unmap the files now: for a caller that copied what it read (a model loaded to train), so the
   * mapped pages stop counting in its memory. Views from halfBits read as empty afterwards.
   */
  unmap(): void {
    for (const m of this.mapped.values()) if (m) unmapFile(m);
    this.mapped.clear();
  }

  read(name: string): HostTensor {
    return { shape: this.shape(name), data: readTensor(this.fileFor(name), name) };
  }

  /** The file holding `name`, or a UserError saying the checkpoint lacks it. */
  private fileFor(name: string): SafetensorsFile {
    const f = this.where.get(name);
    if (!f) throw new UserError(`${this.dir}: missing tensor "${name}"`);
    return this.files.get(f)!;
  }
  private info(name: string) {
    return this.fileFor(name).tensors.get(name)!;
  }
}

export function loadConfig(dir: string): ModelConfig {
  const file = path.join(dir, 'config.json');
  if (!fs.existsSync(file)) throw new UserError(`${dir}: not a checkpoint directory (no config.json)`);
  return parseConfig(readJson(file), file);
}

/** Check every expected tensor is present with the config's shape; returns the source. */
export function openCheckpoint(dir: string): { cfg: ModelConfig; src: TensorSource } {
  const cfg = loadConfig(dir);
  const src = TensorSource.open(dir);
  checkShapes(dir, cfg, src);
  return { cfg, src };
}

/** Every tensor config.json implies is in `src`, with that shape, or a UserError naming it. */
export function checkShapes(dir: string, cfg: ModelConfig, src: TensorSource): void {
  for (const [name, shape] of expectedShapes(cfg)) {
    if (!src.has(name)) throw new UserError(`${dir}: missing tensor "${name}" (config.json says ${cfg.arch} with ${cfg.num_hidden_layers} layers)`);
    const got = src.shape(name);
    if (got.length !== shape.length || got.some((d, i) => d !== shape[i])) {
      throw new UserError(`${src.fileOf(name)}: tensor "${name}" has shape [${got}] but config.json implies [${shape}]`);
    }
  }
}

/** A UserError naming the first NaN or ±Inf of a tensor as read (float32 values, or a 16-bit weight's bits). */
export function checkFinite(name: string, file: string, data: Float32Array | HalfWeight): void {
  const i = data instanceof Float32Array ? firstNonFinite(data) : firstNonFiniteHalf(data);
  const value = data instanceof Float32Array ? ` (${data[i]})` : '';
  if (i >= 0) throw new UserError(`${file}: tensor "${name}" holds a non-finite value${value} at index ${i}`);
}

export interface SaveOptions {
  dtype?: DType;
  /** Split into shards above this many bytes (transformers' max_shard_size); default: one file. */
  maxShardBytes?: number;
  /** Copy tokenizer and generation config files from here. */
  copyFrom?: string | null;
  generationConfig?: Record<string, any> | null;
}

const BYTES: Record<string, number> = { F32: 4, F16: 2, BF16: 2 };

/** Write config + weights (+ carried files) into `dir`, which should be a fresh temp dir. */
export async function writeCheckpointFiles(
  dir: string,
  rawConfig: Record<string, any>,
  entries: { name: string; shape: number[] }[],
  getData: (name: string) => TensorData | Promise<TensorData>,
  opts: SaveOptions = {},
): Promise<void> {
  const dtype = opts.dtype ?? 'F32';
  fs.mkdirSync(dir, { recursive: true });
  const config = { ...rawConfig, torch_dtype: TORCH_DTYPE[dtype] ?? 'float32' };
  fs.writeFileSync(path.join(dir, 'config.json'), JSON.stringify(config, null, 2) + '\n');
  const sizes = entries.map((e) => e.shape.reduce((a, b) => a * b, 1) * BYTES[dtype]);
  const total = sizes.reduce((a, b) => a + b, 0);
  if (!opts.maxShardBytes || total <= opts.maxShardBytes) {
    await writeSafetensors(path.join(dir, 'model.safetensors'), entries, dtype, getData);
  } else {
    const shards: { name: string; shape: number[] }[][] = [[]];
    let cur = 0;
    entries.forEach((e, i) => {
      if (cur > 0 && cur + sizes[i] > opts.maxShardBytes!) {
        shards.push([]);
        cur = 0;
      }
      shards[shards.length - 1].push(e);
      cur += sizes[i];
    });
    const weightMap: Record<string, string> = {};
    const n = String(shards.length).padStart(5, '0');
    for (let s = 0; s < shards.length; s++) {
      const fname = `model-${String(s + 1).padStart(5, '0')}-of-${n}.safetensors`;
      await writeSafetensors(path.join(dir, fname), shards[s], dtype, getData);
      for (const e of shards[s]) weightMap[e.name] = fname;
    }
    fs.writeFileSync(path.join(dir, 'model.safetensors.index.json'), JSON.stringify({ metadata: { total_size: total }, weight_map: weightMap }, null, 2) + '\n');
  }
  if (opts.copyFrom) copyCarriedFiles(opts.copyFrom, dir);
  if (opts.generationConfig) fs.writeFileSync(path.join(dir, 'generation_config.json'), JSON.stringify(opts.generationConfig, null, 2) + '\n');
}

export function copyCarriedFiles(from: string, to: string): void {
  for (const f of [...TOKENIZER_FILES, 'generation_config.json', 'chat_template.jinja']) {
    const src = path.join(from, f);
    if (fs.existsSync(src) && path.resolve(src) !== path.resolve(path.join(to, f))) fs.copyFileSync(src, path.join(to, f));
  }
}

export function readGenerationConfig(dir: string): Record<string, any> | null {
  const f = path.join(dir, 'generation_config.json');
  return fs.existsSync(f) ? readJson(f) : null;
}
