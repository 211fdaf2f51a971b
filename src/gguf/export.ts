import * as path from 'node:path';
import { checkShapes } from '../io/checkpoint.js';
import { readTensor } from '../io/safetensors.js';
import { ModelInput } from '../merge/merge.js';
import { expectedShapes, ModelConfig } from '../model/config.js';
import { loraScale, readPeftAdapter } from '../lora/lora.js';
import { UserError } from '../util/errors.js';
import { OptionRow, bool, firstViolation, str as strSpec } from '../util/schema.js';
import { Progress } from '../util/log.js';
import { GgmlType, GgufTensor, MetaValue, f32, str, u32, writeGguf } from './format.js';
import { GgufArch, PlanEntry, archMetadata, ggufArchOf, modelPlan, planFor, ropeFactors, takeRows } from './arch.js';
import { tokenizerMetadata } from './vocab.js';

/**
 * `export-gguf`: a checkpoint (optionally with a LoRA adapter folded in) as one GGUF file
 * llama.cpp runs, or an adapter alone as a GGUF LoRA llama.cpp applies at run time
 * (docs/REFERENCE.md §12). Tensors are read, reordered and encoded one at a time.
 */
export const GGUF_DTYPES = ['f32', 'f16', 'bf16', 'q8_0'] as const;
export type GgufDtype = (typeof GGUF_DTYPES)[number];

const TYPE_OF: Record<GgufDtype, GgmlType> = { f32: 'F32', f16: 'F16', bf16: 'BF16', q8_0: 'Q8_0' };
/** llama.cpp's general.file_type for each (LLAMA_FTYPE_ALL_F32, MOSTLY_F16, MOSTLY_Q8_0, MOSTLY_BF16). */
const FILE_TYPE: Record<GgufDtype, number> = { f32: 0, f16: 1, q8_0: 7, bf16: 32 };

export interface GgufSettings {
  dtype: GgufDtype;
  /** Write the adapter alone, as a GGUF LoRA, instead of folding it into the model. */
  loraOnly: boolean;
  /** llama.cpp's pre-tokenizer name, when the tokenizer's regex is not one prefopt recognises ('' = recognise it). */
  tokenizerPre: string;
}

/** The settings' flags, recipe fields and checks (the model, adapter and output are named per command or stage). */
export const GGUF_OPTIONS: OptionRow<keyof GgufSettings>[] = [
  { key: 'dtype', field: 'dtype', spec: strSpec([...GGUF_DTYPES]), help: `${GGUF_DTYPES.join(' | ')} for the matrices (default f32; vectors stay f32)` },
  { key: 'loraOnly', field: 'lora_only', spec: bool, help: 'write the adapter alone as a GGUF LoRA, which llama.cpp applies at run time' },
  { key: 'tokenizerPre', field: 'tokenizer_pre', spec: strSpec(), help: "llama.cpp's pre-tokenizer name, when prefopt does not recognise the tokenizer's regex" },
];
export const DEFAULT_GGUF: GgufSettings = { dtype: 'f32', loraOnly: false, tokenizerPre: '' };

export interface GgufExportOptions extends GgufSettings {
  model: string;
  adapter?: string;
  out: string;
}

export interface GgufExportResult {
  file: string;
  arch: GgufArch;
  tensors: number;
  bytes: number;
  kind: 'model' | 'lora';
}

/**
 * Matrices take the requested type; vectors (norms, biases, rope factors) stay F32 as llama.cpp's
 * converter leaves them, and Q8_0 falls back to F16 where rows are not whole blocks of 32.
 */
export function storageType(dtype: GgufDtype, ne: number[]): GgmlType {
  if (ne.length === 1) return 'F32';
  const t = TYPE_OF[dtype];
  return t === 'Q8_0' && ne[0] % 32 !== 0 ? 'F16' : t;
}


function generalMetadata(arch: GgufArch, name: string, type: 'model' | 'adapter'): [string, MetaValue][] {
  return [
    ['general.architecture', str(arch)],
    ['general.type', str(type)],
    ['general.name', str(name)],
  ];
}

export async function exportGguf(o: GgufExportOptions): Promise<GgufExportResult> {
  const bad = firstViolation(GGUF_OPTIONS, o);
  if (bad) throw new UserError(bad);
  const dtype = o.dtype;
  if (o.loraOnly && !o.adapter) throw new UserError('--lora-only needs --adapter');
  // The checkpoint's headers are read once; a folded-in adapter is read with them.
  const input = new ModelInput(o.model, o.model, o.loraOnly ? undefined : o.adapter);
  checkShapes(o.model, input.cfg, input.src);
  const cfg = input.cfg;
  const arch = ggufArchOf(cfg, o.model);
  const { meta, tensors } = o.loraOnly ? loraFile(cfg, arch, o.model, o.adapter!, dtype) : modelFile(input, arch, o, dtype);
  const bar = new Progress('export-gguf', tensors.length);
  const bytes = await writeGguf(o.out, meta, tensors, (i) => bar.tick(i + 1));
  bar.done();
  return { file: o.out, arch, tensors: tensors.length, bytes, kind: o.loraOnly ? 'lora' : 'model' };
}

/** The model's tensors through their plan; one source tensor is kept while its parts are written. */
function modelFile(input: ModelInput, arch: GgufArch, o: GgufExportOptions, dtype: GgufDtype): { meta: [string, MetaValue][]; tensors: GgufTensor[] } {
  const cfg = input.cfg;
  const shapes = expectedShapes(cfg);
  let cached: { name: string; data: Float32Array } | null = null;
  const read = (name: string) => {
    if (cached?.name !== name) cached = { name, data: input.read(name) };
    return cached.data;
  };
  const tensors: GgufTensor[] = modelPlan(cfg, arch).map((e: PlanEntry) => {
    const shape = shapes.get(e.source)!;
    const rows = e.rows?.length ?? shape[0];
    const ne = shape.length === 1 ? [rows] : [shape[1], rows];
    return { name: e.gguf, ne, type: storageType(dtype, ne), produce: () => takeRows(read(e.source), e.rows, shape[1] ?? 1) };
  });
  const factors = ropeFactors(cfg);
  if (factors) tensors.push({ name: 'rope_freqs.weight', ne: [factors.length], type: 'F32', produce: () => factors });
  const meta: [string, MetaValue][] = [
    ...generalMetadata(arch, path.basename(path.resolve(o.model)), 'model'),
    ['general.file_type', u32(FILE_TYPE[dtype])],
    ['general.quantization_version', u32(2)],
    ...archMetadata(cfg, arch),
    ...tokenizerMetadata(o.model, cfg, { pre: o.tokenizerPre || undefined }),
  ];
  return { meta, tensors };
}

/**
 * A PEFT adapter as llama.cpp's LoRA: `<tensor>.lora_a` [r, in] and `<tensor>.lora_b` [out, r] per
 * target, B's rows reordered or split exactly as the target's rows are, and an alpha that makes
 * llama.cpp's scale alpha / r equal the adapter's (alpha / √r under rsLoRA).
 */
function loraFile(cfg: ModelConfig, arch: GgufArch, model: string, adapterDir: string, dtype: GgufDtype): { meta: [string, MetaValue][]; tensors: GgufTensor[] } {
  const a = readPeftAdapter(adapterDir);
  const shapes = expectedShapes(cfg);
  const r = a.cfg.r;
  const tensors: GgufTensor[] = [];
  for (const [mod, keys] of a.modules) {
    const target = `${mod}.weight`;
    const shape = shapes.get(target);
    if (!shape || shape.length !== 2) throw new UserError(`${a.file}: targets "${mod}", which is not a linear layer of ${model}`);
    const [out, inp] = shape;
    const sa = a.st.tensors.get(keys.A)!.shape;
    const sb = a.st.tensors.get(keys.B)!.shape;
    if (sa.join() !== [r, inp].join() || sb.join() !== [out, r].join()) {
      throw new UserError(`${a.file}: "${mod}" has lora_A [${sa}] and lora_B [${sb}]; ${model}'s [${shape}] with r ${r} needs [${r},${inp}] and [${out},${r}]`);
    }
    for (const e of planFor(cfg, arch, target)) {
      const ne = [r, e.rows?.length ?? out];
      tensors.push({ name: `${e.gguf}.lora_a`, ne: [inp, r], type: storageType(dtype, [inp, r]), produce: () => readTensor(a.st, keys.A) });
      tensors.push({ name: `${e.gguf}.lora_b`, ne, type: storageType(dtype, ne), produce: () => takeRows(readTensor(a.st, keys.B), e.rows, r) });
    }
  }
  const meta: [string, MetaValue][] = [
    ...generalMetadata(arch, path.basename(path.resolve(adapterDir)), 'adapter'),
    ['adapter.type', str('lora')],
    ['adapter.lora.alpha', f32(loraScale(a.cfg) * r)],
  ];
  return { meta, tensors };
}
