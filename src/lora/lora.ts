import * as fs from 'node:fs';
import * as path from 'node:path';
import * as tf from '@tensorflow/tfjs-core';
import { Decoder, LinearAdapter } from '../model/decoder.js';
import { transpose2d } from '../engine/native.js';
import { loraLinear, onRows } from '../engine/ops.js';
import { SafetensorsFile, readHeader, readTensor, writeSafetensors } from '../io/safetensors.js';
import { checkFinite } from '../io/checkpoint.js';
import { readJson, writeDirAtomic } from '../util/fsutil.js';
import { UserError } from '../util/errors.js';
import { OptionRow, bool, firstViolation, int, num, strings, valuesFrom } from '../util/schema.js';
import { Rng } from '../util/rng.js';
import { RngHooks } from '../engine/checkpoint.js';
import { dropout } from '../engine/dropout.js';
import type { Weight } from '../engine/half.js';

/**
 * LoRA (docs/REFERENCE.md §7): y = W·x + s·B·A·dropout(x), s = alpha/r (rsLoRA: alpha/√r), A [r, in]
 * Kaiming-uniform, B [out, r] zeros — a new adapter changes nothing. The base stays frozen;
 * only A and B are variables handed to the trainer. Kept transposed in memory like every weight.
 * Files follow PEFT: adapter_config.json + adapter_model.safetensors, keys
 * `base_model.model.<module>.lora_{A,B}.weight`.
 */
export interface LoraConfig {
  r: number;
  alpha: number;
  dropout: number;
  targets: string[];
  useRslora: boolean;
}

/** Empty targets mean the attention projections of the architecture. */
export const DEFAULT_LORA: LoraConfig = { r: 8, alpha: 16, dropout: 0.05, targets: [], useRslora: false };

/** The adapter settings: recipe fields of a stage's `lora` mapping, `--lora-*` flags, and their ranges. */
export const LORA_OPTIONS: OptionRow<keyof LoraConfig>[] = [
  { key: 'r', field: 'r', flag: 'lora-r', spec: int({ min: 1 }), help: 'LoRA rank (default 8)' },
  { key: 'alpha', field: 'alpha', hf: 'lora_alpha', flag: 'lora-alpha', spec: num({ min: 0, exclusiveMin: true }), help: 'LoRA alpha: updates scale by alpha / r (default 16)' },
  { key: 'dropout', field: 'dropout', hf: 'lora_dropout', flag: 'lora-dropout', spec: num({ min: 0, max: 1, exclusiveMax: true }), help: "dropout on the adapter's input (default 0.05)" },
  { key: 'targets', field: 'targets', hf: 'target_modules', flag: 'lora-targets', spec: strings, help: 'comma-separated modules (q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj; qkv_proj on Zhinao); default the attention projections' },
  { key: 'useRslora', field: 'use_rslora', spec: bool, help: 'scale by alpha / √r (rsLoRA)' },
];

export function validateLora(c: LoraConfig, where = ''): LoraConfig {
  const bad = firstViolation(LORA_OPTIONS, c as unknown as Record<keyof LoraConfig, unknown>);
  if (bad) throw new UserError(`${where}lora.${bad}`);
  return c;
}

/** A LoraConfig from CLI flags or a recipe stage's `lora` mapping, over `base`, range-checked. */
export function loraFrom(o: Record<string, any>, base: LoraConfig = DEFAULT_LORA, from: 'flags' | 'recipe' = 'flags', where = ''): LoraConfig {
  return validateLora(valuesFrom(LORA_OPTIONS, o, base, from), where);
}

export function defaultTargets(arch: string): string[] {
  return arch === 'zhinao' ? ['qkv_proj', 'o_proj'] : ['q_proj', 'k_proj', 'v_proj', 'o_proj'];
}

const PREFIX = 'base_model.model.';

export class LoraAdapter implements LinearAdapter {
  /** module → [A^T (in×r), B^T (r×out)] */
  readonly weights = new Map<string, { a: tf.Variable; b: tf.Variable }>();
  training = false;
  private stream: Rng | null = null;
  baseModelName = '';

  constructor(readonly cfg: LoraConfig) {}

  get scale(): number {
    return loraScale(this.cfg);
  }

  /** Linear modules of `model` matched by the target names (the last path component). */
  static modulesFor(model: Decoder, targets: string[]): string[] {
    const mods = model.names().filter((n) => n.endsWith('_proj.weight')).map((n) => n.slice(0, -'.weight'.length));
    const set = new Set(targets);
    const hit = mods.filter((m) => set.has(m.split('.').at(-1)!));
    for (const t of targets) {
      if (!mods.some((m) => m.endsWith('.' + t))) {
        const have = [...new Set(mods.map((m) => m.split('.').at(-1)))].join(', ');
        throw new UserError(`LoRA target "${t}" matches no module of this ${model.cfg.arch} model (it has ${have})`);
      }
    }
    return hit;
  }

  /** A fresh adapter with PEFT's initialisation. */
  static create(model: Decoder, cfg: LoraConfig, seed: number): LoraAdapter {
    validateLora(cfg);
    if (!cfg.targets.length) cfg = { ...cfg, targets: defaultTargets(model.cfg.arch) };
    const ad = new LoraAdapter(cfg);
    for (const m of LoraAdapter.modulesFor(model, cfg.targets)) {
      const [inDim, outDim] = model.shapeOf(`${m}.weight`);
      const bound = 1 / Math.sqrt(inDim); // kaiming_uniform_(a=√5) on [r, in]
      const rng = new Rng(seed, 'lora', m);
      const a = new Float32Array(inDim * cfg.r).map(() => (rng.next() * 2 - 1) * bound);
      ad.set(m, tf.tensor2d(a, [inDim, cfg.r]), tf.zeros([cfg.r, outDim]));
    }
    return ad;
  }

  private set(module: string, aT: tf.Tensor, bT: tf.Tensor): void {
    this.weights.set(module, { a: tf.variable(aT, true), b: tf.variable(bT, true) });
    aT.dispose();
    bT.dispose();
  }

  targets(module: string): boolean {
    return this.weights.has(module);
  }

  /** Dropout draws come from this stream while training (seeded per micro-batch by the trainer). */
  setTraining(training: boolean, rng: Rng | null = null): void {
    this.training = training;
    this.stream = rng;
  }

  /** The dropout stream's state, for a checkpointed layer to draw the same masks again. */
  readonly rng: RngHooks = {
    save: () => this.stream?.state() ?? null,
    restore: (s) => {
      if (this.stream && s) this.stream.setState(s as number[]);
    },
  };

  variables(prefix: string): tf.Variable[] {
    return [...this.weights].filter(([m]) => m.startsWith(prefix)).flatMap(([, w]) => [w.a, w.b]);
  }

  linear(module: string, x: tf.Tensor, w: Weight, bias: tf.Tensor | null): tf.Tensor {
    const lw = this.weights.get(module)!;
    return onRows(x, (x2) => {
      const dropped = this.training && this.cfg.dropout > 0 && this.stream ? (dropout(x2, this.cfg.dropout, this.stream.nextU32()) as tf.Tensor2D) : null;
      return loraLinear(x2, w, bias, lw.a as unknown as tf.Tensor2D, lw.b as unknown as tf.Tensor2D, this.scale, dropped);
    });
  }

  params(): Map<string, tf.Variable> {
    const m = new Map<string, tf.Variable>();
    for (const [mod, w] of this.weights) {
      m.set(`${PREFIX}${mod}.lora_A.weight`, w.a);
      m.set(`${PREFIX}${mod}.lora_B.weight`, w.b);
    }
    return m;
  }

  /** s·(B·A) in memory layout ([in, out]) for merging into the base weight. */
  delta(module: string): tf.Tensor2D {
    const w = this.weights.get(module)!;
    return tf.tidy(() => tf.mul(tf.matMul(w.a, w.b), this.scale) as tf.Tensor2D);
  }

  peftConfig(): Record<string, unknown> {
    return {
      peft_type: 'LORA',
      task_type: 'CAUSAL_LM',
      base_model_name_or_path: this.baseModelName,
      r: this.cfg.r,
      lora_alpha: this.cfg.alpha,
      lora_dropout: this.cfg.dropout,
      target_modules: [...new Set([...this.weights.keys()].map((m) => m.split('.').at(-1)!))].sort(),
      bias: 'none',
      use_rslora: this.cfg.useRslora,
      fan_in_fan_out: false,
      inference_mode: true,
      modules_to_save: null,
      init_lora_weights: true,
    };
  }

  /** Write a PEFT adapter directory atomically. */
  async save(dir: string): Promise<void> {
    await writeDirAtomic(dir, async (tmp) => {
      fs.writeFileSync(path.join(tmp, 'adapter_config.json'), JSON.stringify(this.peftConfig(), null, 2) + '\n');
      const entries: { name: string; shape: number[] }[] = [];
      const get = new Map<string, () => Float32Array>();
      for (const [mod, w] of [...this.weights].sort((x, y) => (x[0] < y[0] ? -1 : 1))) {
        const [inDim, r] = w.a.shape as number[];
        const outDim = (w.b.shape as number[])[1];
        entries.push({ name: `${PREFIX}${mod}.lora_A.weight`, shape: [r, inDim] });
        get.set(`${PREFIX}${mod}.lora_A.weight`, () => transpose2d(w.a.dataSync() as Float32Array, inDim, r));
        entries.push({ name: `${PREFIX}${mod}.lora_B.weight`, shape: [outDim, r] });
        get.set(`${PREFIX}${mod}.lora_B.weight`, () => transpose2d(w.b.dataSync() as Float32Array, r, outDim));
      }
      await writeSafetensors(path.join(tmp, 'adapter_model.safetensors'), entries, 'F32', (n) => get.get(n)!());
    });
  }

  /** Read a PEFT adapter (ours or PEFT's own) for `model`, checking targets and shapes. */
  static load(model: Decoder, dir: string): LoraAdapter {
    const { cfg, baseModelName, st, file: wfile, modules: byModule } = readPeftAdapter(dir);
    const ad = new LoraAdapter(cfg);
    ad.baseModelName = baseModelName;
    // A NaN or Inf in an adapter is refused by name, as in a checkpoint (model/load).
    const read = (key: string) => {
      const data = readTensor(st, key);
      checkFinite(key, wfile, data);
      return data;
    };
    try {
      for (const [mod, keys] of byModule) {
        if (!model.names().includes(`${mod}.weight`)) throw new UserError(`${wfile}: module "${mod}" does not exist in the model (${model.cfg.arch}); wrong base model?`);
        const [inDim, outDim] = model.shapeOf(`${mod}.weight`);
        const aShape = st.tensors.get(keys.A)!.shape;
        const bShape = st.tensors.get(keys.B)!.shape;
        if (aShape.join() !== [cfg.r, inDim].join()) throw new UserError(`${wfile}: "${keys.A}" has shape [${aShape}], expected [${cfg.r}, ${inDim}] (r=${cfg.r})`);
        if (bShape.join() !== [outDim, cfg.r].join()) throw new UserError(`${wfile}: "${keys.B}" has shape [${bShape}], expected [${outDim}, ${cfg.r}] (r=${cfg.r})`);
        ad.set(mod, tf.tensor2d(transpose2d(read(keys.A), cfg.r, inDim), [inDim, cfg.r]), tf.tensor2d(transpose2d(read(keys.B), outDim, cfg.r), [cfg.r, outDim]));
      }
    } catch (e) {
      ad.dispose();
      throw e;
    }
    if (!cfg.targets.length) cfg.targets = [...new Set([...ad.weights.keys()].map((m) => m.split('.').at(-1)!))];
    return ad;
  }

  dispose(): void {
    for (const w of this.weights.values()) {
      w.a.dispose();
      w.b.dispose();
    }
    this.weights.clear();
  }
}

/** s = alpha / r, or alpha / √r with rsLoRA. */
export function loraScale(cfg: LoraConfig): number {
  return cfg.useRslora ? cfg.alpha / Math.sqrt(cfg.r) : cfg.alpha / cfg.r;
}

export interface PeftAdapterFiles {
  cfg: LoraConfig;
  baseModelName: string;
  /** adapter_model.safetensors and its header. */
  file: string;
  st: SafetensorsFile;
  /** Module name → its lora_A and lora_B tensor keys. */
  modules: Map<string, { A: string; B: string }>;
}

/**
 * A PEFT LoRA adapter directory, validated: the config fields prefopt can honour, and every
 * tensor grouped by module. PEFT writes `.lora_A.weight` or, in older versions,
 * `.lora_A.<adapter>.weight`; anything else in the file is an error, never silently dropped.
 */
export function readPeftAdapter(dir: string): PeftAdapterFiles {
  const cfgFile = path.join(dir, 'adapter_config.json');
  if (!fs.existsSync(cfgFile)) throw new UserError(`${dir}: not a PEFT adapter directory (no adapter_config.json)`);
  const pc = readJson(cfgFile);
  if (pc.peft_type && pc.peft_type !== 'LORA') throw new UserError(`${cfgFile}: peft_type "${pc.peft_type}" is not supported (only LORA)`);
  if (pc.fan_in_fan_out) throw new UserError(`${cfgFile}: fan_in_fan_out adapters are not supported`);
  if (pc.bias && pc.bias !== 'none') throw new UserError(`${cfgFile}: bias "${pc.bias}" is not supported (only "none")`);
  if (!(Number.isInteger(pc.r) && pc.r > 0)) throw new UserError(`${cfgFile}: "r" must be a positive integer`);
  const cfg: LoraConfig = {
    r: pc.r,
    alpha: pc.lora_alpha ?? pc.r,
    dropout: pc.lora_dropout ?? 0,
    targets: Array.isArray(pc.target_modules) ? pc.target_modules : [],
    useRslora: !!pc.use_rslora,
  };
  const file = path.join(dir, 'adapter_model.safetensors');
  if (!fs.existsSync(file)) throw new UserError(`${dir}: no adapter_model.safetensors`);
  const st = readHeader(file);
  const partial = new Map<string, { A?: string; B?: string }>();
  for (const key of st.tensors.keys()) {
    const m = /^(?:base_model\.model\.)?(.+)\.lora_([AB])(?:\.[^.]+)?\.weight$/.exec(key);
    if (!m) throw new UserError(`${file}: tensor "${key}" is not a LoRA A/B weight`);
    const e = partial.get(m[1]) ?? {};
    e[m[2] as 'A' | 'B'] = key;
    partial.set(m[1], e);
  }
  const modules = new Map<string, { A: string; B: string }>();
  for (const [mod, keys] of partial) {
    if (!keys.A || !keys.B) throw new UserError(`${file}: module "${mod}" lacks lora_${keys.A ? 'B' : 'A'}`);
    modules.set(mod, { A: keys.A, B: keys.B });
  }
  if (modules.size === 0) throw new UserError(`${file}: holds no LoRA weights`);
  return { cfg, baseModelName: pc.base_model_name_or_path ?? '', file, st, modules };
}

/** Attach `adapter` to `model` (the base is frozen), returning a switch for the reference pass. */
export function attach(model: Decoder, adapter: LoraAdapter): void {
  model.setTrainable(false);
  model.adapter = adapter;
  model.adapterEnabled = true;
}

/** Run `f` with the adapter switched off: the base model exactly, no second copy in memory. */
export function withAdapterOff<T>(model: Decoder, f: () => T): T {
  const was = model.adapterEnabled;
  model.adapterEnabled = false;
  try {
    return f();
  } finally {
    model.adapterEnabled = was;
  }
}

/** Fold the adapter into the base weights in place: W' = W + s·B·A (memory layout: W + s·Aᵀ·Bᵀ). */
export function mergeInto(model: Decoder, adapter: LoraAdapter): void {
  for (const mod of adapter.weights.keys()) {
    const w = model.float32(`${mod}.weight`); // a 16-bit base takes the sum in float32
    const d = adapter.delta(mod);
    const next = tf.add(w, d);
    w.assign(next);
    next.dispose();
    d.dispose();
  }
}
