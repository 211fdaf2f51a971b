import * as v8 from 'node:v8';
import * as vm from 'node:vm';
import YAML from 'yaml';
import { TensorSource, loadConfig, writeCheckpointFiles } from '../io/checkpoint.js';
import type { ModelConfig } from '../model/config.js';
import { DType, SafetensorsFile, dtypeFromName, readTensor } from '../io/safetensors.js';
import { loraScale, readPeftAdapter } from '../lora/lora.js';
import { writeDirAtomic } from '../util/fsutil.js';
import { UserError } from '../util/errors.js';
import { hostMatmul } from '../engine/native.js';
import { Rng } from '../util/rng.js';
import { readText } from '../data/jsonl.js';
import { MERGE_METHODS } from './methods.js';

/**
 * mergekit-style merges, streamed tensor by tensor: for each output tensor only that tensor of
 * every input is in memory, so a merge needs about (models + 1) × the largest tensor, not whole
 * models. A model may be written `base+adapter_dir`: the LoRA adapter is folded in per tensor.
 */
export interface MergeModelSpec {
  model: string;
  parameters?: { weight?: number; density?: number };
}

export interface MergeConfig {
  merge_method: string;
  base_model?: string;
  models: MergeModelSpec[];
  parameters?: { normalize?: boolean; lambda?: number; t?: number; density?: number; weight?: number };
  dtype?: string;
  seed?: number;
}

/** A LoRA adapter applied on the host: W' = W + s·B·A for the tensors it targets. */
export class HostAdapter {
  private st: SafetensorsFile;
  readonly scale: number;
  readonly r: number;
  private keys: Map<string, { A: string; B: string }>;
  constructor(readonly dir: string) {
    const a = readPeftAdapter(dir);
    this.r = a.cfg.r;
    this.scale = loraScale(a.cfg);
    this.st = a.st;
    this.keys = a.modules;
  }
  modules(): string[] {
    return [...this.keys.keys()];
  }
  /** Whether apply changes tensor `name`. */
  touches(name: string): boolean {
    return name.endsWith('.weight') && this.keys.has(name.replace(/\.weight$/, ''));
  }
  /** `w` is the HF-layout [out, in] weight of tensor `name`. */
  apply(name: string, shape: number[], w: Float32Array): Float32Array {
    const mod = name.replace(/\.weight$/, '');
    const k = this.keys.get(mod);
    if (!k || !name.endsWith('.weight')) return w;
    const [out, inp] = shape;
    const A = readTensor(this.st, k.A); // [r, in]
    const B = readTensor(this.st, k.B); // [out, r]
    if (A.length !== this.r * inp || B.length !== out * this.r) throw new UserError(`${this.dir}: adapter for "${mod}" does not fit its shape [${shape}]`);
    // B·A through the native kernel rather than a JavaScript triple loop: the product is most of the fold's work.
    const res = hostMatmul(B, A, out, this.r, inp);
    for (let i = 0; i < res.length; i++) res[i] = w[i] + this.scale * res[i];
    return res;
  }
}

/** One merge input: a checkpoint, optionally with an adapter folded in. */
export class ModelInput {
  readonly src: TensorSource;
  readonly adapter: HostAdapter | null;
  readonly cfg: ModelConfig;
  readonly raw: Record<string, any>;
  constructor(
    readonly label: string,
    readonly dir: string,
    adapterDir?: string,
  ) {
    this.cfg = loadConfig(dir);
    this.raw = this.cfg.raw;
    this.src = TensorSource.open(dir);
    this.adapter = adapterDir ? new HostAdapter(adapterDir) : null;
    for (const m of this.adapter?.modules() ?? []) {
      if (!this.src.has(`${m}.weight`)) throw new UserError(`${adapterDir}: targets "${m}", which ${dir} does not have`);
    }
  }
  read(name: string): Float32Array {
    const t = this.src.read(name);
    return this.adapter ? this.adapter.apply(name, t.shape, t.data) : t.data;
  }
  /** Whether read(name) is the stored tensor itself (no adapter touches it). */
  unchanged(name: string): boolean {
    return !this.adapter?.touches(name);
  }
}

/** "dir" or "dir+adapter", each part through `resolve` (recipe stage references). */
export function openInput(spec: string, resolve: (s: string) => string = (s) => s): ModelInput {
  const [m, a] = spec.split('+');
  return new ModelInput(spec, resolve(m.trim()), a ? resolve(a.trim()) || undefined : undefined);
}

export function parseMergeConfig(file: string): MergeConfig {
  let c: any;
  try {
    c = YAML.parse(readText(file));
  } catch (e: any) {
    if (e instanceof UserError) throw e;
    throw new UserError(`${file}: invalid YAML (${e.message})`);
  }
  return validateMergeConfig(c, file + ': ');
}

export function validateMergeConfig(c: any, where = ''): MergeConfig {
  if (!c || typeof c !== 'object') throw new UserError(`${where}expected a mapping with merge_method and models`);
  const method = MERGE_METHODS[c.merge_method];
  if (!method) throw new UserError(`${where}merge_method: expected one of ${Object.keys(MERGE_METHODS).join(', ')}, found ${JSON.stringify(c.merge_method)}`);
  if (!Array.isArray(c.models) || !c.models.length) throw new UserError(`${where}models: expected a non-empty list of {model, parameters}`);
  c.models.forEach((m: any, i: number) => {
    if (!m || typeof m.model !== 'string') throw new UserError(`${where}models[${i}].model: expected a path (or path+adapter)`);
    const p = m.parameters ?? {};
    if (p.weight !== undefined && typeof p.weight !== 'number') throw new UserError(`${where}models[${i}].parameters.weight: expected a number`);
    const d = p.density ?? c.parameters?.density;
    if (d !== undefined && !(typeof d === 'number' && d > 0 && d <= 1)) throw new UserError(`${where}models[${i}].parameters.density: expected a number in (0, 1], found ${JSON.stringify(d)}`);
  });
  if (method.needsBase && typeof c.base_model !== 'string') throw new UserError(`${where}base_model: ${c.merge_method} needs a base_model`);
  if (c.merge_method === 'slerp') {
    const others = c.models.filter((m: any) => m.model !== c.base_model);
    if (others.length !== 1) throw new UserError(`${where}models: slerp merges exactly two models (base_model and one other), found ${c.models.length} model(s) with ${others.length} besides the base`);
  }
  const t = c.parameters?.t;
  if (t !== undefined && !(typeof t === 'number' && t >= 0 && t <= 1)) throw new UserError(`${where}parameters.t: expected a number in [0, 1]`);
  if (c.dtype !== undefined) dtypeFromName(String(c.dtype));
  return c as MergeConfig;
}

export interface MergeResult {
  tensors: number;
  models: number;
  method: string;
}

export async function runMerge(c: MergeConfig, out: string, resolve: (s: string) => string = (s) => s): Promise<MergeResult> {
  const method = MERGE_METHODS[c.merge_method];
  const base = c.base_model ? openInput(c.base_model, resolve) : null;
  let specs = c.models;
  if (base) specs = specs.filter((m) => m.model !== c.base_model);
  if (c.merge_method === 'linear' && base && !specs.length) specs = c.models;
  const inputs = specs.map((m) => openInput(m.model, resolve));
  const weights = specs.map((m) => m.parameters?.weight ?? c.parameters?.weight ?? 1);
  const densities = specs.map((m) => m.parameters?.density ?? c.parameters?.density ?? 1);
  const normalize = c.parameters?.normalize ?? method.defaultNormalize;
  if (normalize && (c.merge_method === 'linear' || c.merge_method.startsWith('dare') || c.merge_method === 'ties' || c.merge_method === 'task_arithmetic')) {
    if (Math.abs(weights.reduce((a, b) => a + b, 0)) < 1e-12) throw new UserError(`models: the weights sum to zero, which normalize: true cannot divide by`);
  }
  const ref = base ?? inputs[0];
  const all = base ? [base, ...inputs] : inputs;
  // Same architecture, same tensor names, same shapes — or a clear error naming the difference.
  const arch = (x: ModelInput) => JSON.stringify(x.raw.architectures ?? x.raw.model_type);
  const names = ref.src.names().sort();
  for (const x of all) {
    if (arch(x) !== arch(ref)) throw new UserError(`${x.label}: architecture ${arch(x)} differs from ${ref.label}'s ${arch(ref)}`);
    const n2 = x.src.names().sort();
    const missing = names.find((n) => !x.src.has(n)) ?? n2.find((n) => !ref.src.has(n));
    if (missing) throw new UserError(`${x.label}: tensor names differ from ${ref.label} (e.g. "${missing}")`);
    for (const n of names) {
      if (x.src.shape(n).join() !== ref.src.shape(n).join()) throw new UserError(`${x.label}: tensor "${n}" has shape [${x.src.shape(n)}], ${ref.label} has [${ref.src.shape(n)}]`);
    }
  }
  const dtype: DType = c.dtype ? dtypeFromName(String(c.dtype)) : 'F32';
  const seed = c.seed ?? 0;
  const entries = names.map((name) => ({ name, shape: ref.src.shape(name) }));
  // A tensor the merge leaves as it is (one model at weight 1, no adapter on it, already in the
  // output dtype — most of a merge-lora) is copied as bytes: a 7B model's 1.3 GB embedding never
  // becomes 2.6 GB of float32 and then 1.3 GB again.
  const w1 = normalize ? 1 : weights[0];
  const copies = (name: string) => !base && inputs.length === 1 && c.merge_method === 'linear' && w1 === 1 && inputs[0].unchanged(name) && inputs[0].src.dtype(name) === dtype;
  await writeDirAtomic(out, (tmp) =>
    writeCheckpointFiles(
      tmp,
      ref.raw,
      entries,
      (name) => {
        // Let the previous tensor's buffers go before reading the next: peak memory stays near
        // one tensor per model instead of whatever V8 lets pile up.
        collectGarbage();
        if (copies(name)) return inputs[0].src.readEncoded(name);
        return method.merge({
          base: base ? base.read(name) : null,
          models: inputs.map((x) => x.read(name)),
          weights,
          densities,
          lambda: c.parameters?.lambda ?? 1,
          normalize,
          t: c.parameters?.t ?? 0.5,
          rng: (m) => new Rng(seed, 'dare', name, m),
        });
      },
      { dtype, copyFrom: ref.dir },
    ),
  );
  return { tensors: names.length, models: all.length, method: c.merge_method };
}

let gcFn: (() => void) | null | undefined;
function collectGarbage(): void {
  if (gcFn === undefined) {
    try {
      v8.setFlagsFromString('--expose-gc');
      gcFn = vm.runInNewContext('gc') as () => void;
    } catch {
      gcFn = null;
    }
  }
  gcFn?.();
}

/** merge-lora: the base with one adapter folded in, as a plain checkpoint. */
export async function mergeLora(model: string, adapter: string, out: string, dtype = 'f32'): Promise<MergeResult> {
  return runMerge({ merge_method: 'linear', models: [{ model: `${model}+${adapter}` }], parameters: { normalize: true }, dtype }, out);
}
