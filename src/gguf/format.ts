import { writeAll, writeFileVia } from '../util/fsutil.js';
import { encodeTensor } from './quant.js';

/**
 * GGUF version 3, written by hand (docs/REFERENCE.md §12): magic, version, counts, typed
 * metadata, tensor infos, then the tensors' data, each at an offset aligned to
 * `general.alignment` (32). Offsets follow from the shapes alone, so the header goes out first and
 * the tensors are produced one at a time after it.
 */
export const GGML_TYPE = { F32: 0, F16: 1, Q8_0: 8, BF16: 30 } as const;
export type GgmlType = keyof typeof GGML_TYPE;

export const ALIGNMENT = 32;

/** A metadata value and the GGUF type it is written as. */
export type MetaValue =
  | { type: 'u32' | 'i32' | 'f32'; value: number }
  | { type: 'bool'; value: boolean }
  | { type: 'string'; value: string }
  | { type: 'string[]'; value: string[] }
  | { type: 'i32[]' | 'f32[]'; value: ArrayLike<number> };

export const u32 = (value: number): MetaValue => ({ type: 'u32', value });
export const f32 = (value: number): MetaValue => ({ type: 'f32', value });
export const str = (value: string): MetaValue => ({ type: 'string', value });
export const bool = (value: boolean): MetaValue => ({ type: 'bool', value });

const VALUE_TYPE = { u32: 4, i32: 5, f32: 6, bool: 7, string: 8, array: 9 } as const;

/** One tensor of the file: `ne` in ggml order (innermost dimension first, the reverse of torch's). */
export interface GgufTensor {
  name: string;
  ne: number[];
  type: GgmlType;
  /** Its values in row-major order (torch layout), asked for only when its turn comes. */
  produce: () => Float32Array;
}

/** Bytes per block and values per block of each type. */
const BLOCK: Record<GgmlType, [number, number]> = { F32: [4, 1], F16: [2, 1], BF16: [2, 1], Q8_0: [34, 32] };

export function tensorBytes(type: GgmlType, ne: number[]): number {
  const [bytes, per] = BLOCK[type];
  if (ne[0] % per !== 0) throw new Error(`${type} needs the first dimension to be a multiple of ${per}, found ${ne[0]}`);
  return (ne.reduce((a, b) => a * b, 1) / per) * bytes;
}

const align = (n: number) => Math.ceil(n / ALIGNMENT) * ALIGNMENT;

/** Little-endian byte builder for the header. */
class Bytes {
  private parts: Buffer[] = [];
  length = 0;
  private push(b: Buffer): void {
    this.parts.push(b);
    this.length += b.length;
  }
  private fixed(bytes: number, write: (b: Buffer) => void): void {
    const b = Buffer.alloc(bytes);
    write(b);
    this.push(b);
  }
  u32(v: number): void {
    this.fixed(4, (b) => b.writeUInt32LE(v));
  }
  i32(v: number): void {
    this.fixed(4, (b) => b.writeInt32LE(v));
  }
  f32(v: number): void {
    this.fixed(4, (b) => b.writeFloatLE(v));
  }
  u64(v: number): void {
    this.fixed(8, (b) => b.writeBigUInt64LE(BigInt(v)));
  }
  u8(v: number): void {
    this.push(Buffer.from([v]));
  }
  string(s: string): void {
    const b = Buffer.from(s, 'utf8');
    this.u64(b.length);
    this.push(b);
  }
  raw(b: Buffer): void {
    this.push(b);
  }
  buffer(): Buffer {
    return Buffer.concat(this.parts, this.length);
  }
}

function writeValue(out: Bytes, v: MetaValue): void {
  switch (v.type) {
    case 'u32':
      out.u32(VALUE_TYPE.u32);
      return out.u32(v.value);
    case 'i32':
      out.u32(VALUE_TYPE.i32);
      return out.i32(v.value);
    case 'f32':
      out.u32(VALUE_TYPE.f32);
      return out.f32(v.value);
    case 'bool':
      out.u32(VALUE_TYPE.bool);
      return out.u8(v.value ? 1 : 0);
    case 'string':
      out.u32(VALUE_TYPE.string);
      return out.string(v.value);
    case 'string[]':
      out.u32(VALUE_TYPE.array);
      out.u32(VALUE_TYPE.string);
      out.u64(v.value.length);
      for (const s of v.value) out.string(s);
      return;
    case 'i32[]':
    case 'f32[]': {
      out.u32(VALUE_TYPE.array);
      out.u32(v.type === 'i32[]' ? VALUE_TYPE.i32 : VALUE_TYPE.f32);
      out.u64(v.value.length);
      const b = Buffer.alloc(4 * v.value.length);
      for (let i = 0; i < v.value.length; i++) {
        if (v.type === 'i32[]') b.writeInt32LE(v.value[i], 4 * i);
        else b.writeFloatLE(v.value[i], 4 * i);
      }
      return out.raw(b);
    }
  }
}

/** The header (through the padding before the data) and each tensor's offset in the data section. */
export function ggufHeader(meta: [string, MetaValue][], tensors: GgufTensor[]): { header: Buffer; offsets: number[]; dataBytes: number } {
  const out = new Bytes();
  out.raw(Buffer.from('GGUF', 'ascii'));
  out.u32(3);
  out.u64(tensors.length);
  out.u64(meta.length);
  const keys = new Set<string>();
  for (const [k, v] of meta) {
    if (keys.has(k)) throw new Error(`duplicate GGUF metadata key ${k}`);
    keys.add(k);
    out.string(k);
    writeValue(out, v);
  }
  const offsets: number[] = [];
  let off = 0;
  const names = new Set<string>();
  for (const t of tensors) {
    if (names.has(t.name)) throw new Error(`duplicate GGUF tensor ${t.name}`);
    names.add(t.name);
    out.string(t.name);
    out.u32(t.ne.length);
    for (const d of t.ne) out.u64(d);
    out.u32(GGML_TYPE[t.type]);
    out.u64(off);
    offsets.push(off);
    off = align(off + tensorBytes(t.type, t.ne));
  }
  out.raw(Buffer.alloc(align(out.length) - out.length));
  return { header: out.buffer(), offsets, dataBytes: off };
}

/**
 * Write a GGUF file through a temporary file renamed into place: a failure at any tensor leaves
 * no partial file. Only one tensor's values and bytes are in memory at a time.
 */
export async function writeGguf(file: string, meta: [string, MetaValue][], tensors: GgufTensor[], onTensor?: (i: number) => void): Promise<number> {
  const { header, offsets, dataBytes } = ggufHeader(meta, tensors);
  await writeFileVia(file, (fd) => {
    writeAll(fd, header);
    let pos = 0;
    tensors.forEach((t, i) => {
      if (offsets[i] > pos) writeAll(fd, Buffer.alloc(offsets[i] - pos));
      const values = t.produce();
      const numel = t.ne.reduce((a, b) => a * b, 1);
      if (values.length !== numel) throw new Error(`tensor ${t.name}: ${values.length} values for ne [${t.ne}]`);
      const bytes = encodeTensor(values, t.type);
      writeAll(fd, bytes);
      pos = offsets[i] + bytes.length;
      onTensor?.(i);
    });
    if (dataBytes > pos) writeAll(fd, Buffer.alloc(dataBytes - pos));
  });
  return header.length + dataBytes;
}
