import * as fs from 'node:fs';
import { UserError } from '../util/errors.js';
import { writeAll, writeFileVia } from '../util/fsutil.js';

/**
 * safetensors, read and written by hand (docs/REFERENCE.md §3): u64 LE header length, JSON header,
 * then one data buffer. Readers validate everything a corrupt or hostile file can get wrong
 * before any tensor is used; tensors are read one at a time so merges can stream.
 */
export type DType = 'F32' | 'F16' | 'BF16' | 'F64' | 'I32' | 'I64';
const DTYPE_BYTES: Record<DType, number> = { F32: 4, F16: 2, BF16: 2, F64: 8, I32: 4, I64: 8 };

export interface TensorInfo {
  name: string;
  dtype: DType;
  shape: number[];
  begin: number; // absolute file offset
  end: number;
}

export interface SafetensorsFile {
  file: string;
  tensors: Map<string, TensorInfo>;
  metadata: Record<string, string> | null;
}

const MAX_HEADER = 100 * 1024 * 1024;

export function readHeader(file: string): SafetensorsFile {
  let fd: number;
  try {
    fd = fs.openSync(file, 'r');
  } catch (e: any) {
    throw new UserError(`${file}: cannot open (${e.code ?? e.message})`);
  }
  try {
    const size = fs.fstatSync(fd).size;
    if (size < 8) throw new UserError(`${file}: truncated safetensors file (${size} bytes, no header length)`);
    const lenBuf = Buffer.alloc(8);
    fs.readSync(fd, lenBuf, 0, 8, 0);
    const n = lenBuf.readBigUInt64LE(0);
    if (n > BigInt(MAX_HEADER)) throw new UserError(`${file}: header length ${n} is implausibly large`);
    const hlen = Number(n);
    if (8 + hlen > size) throw new UserError(`${file}: header length ${hlen} runs past the end of the file (${size} bytes)`);
    const hbuf = Buffer.alloc(hlen);
    fs.readSync(fd, hbuf, 0, hlen, 8);
    const text = hbuf.toString('utf8');
    if (!text.startsWith('{')) throw new UserError(`${file}: header does not start with '{'`);
    let header: any;
    try {
      header = JSON.parse(text);
    } catch (e: any) {
      throw new UserError(`${file}: header is not valid JSON (${e.message})`);
    }
    if (!header || typeof header !== 'object' || Array.isArray(header)) throw new UserError(`${file}: header is not a JSON object`);
    const dataStart = 8 + hlen;
    const dataLen = size - dataStart;
    const tensors = new Map<string, TensorInfo>();
    let metadata: Record<string, string> | null = null;
    for (const [name, v] of Object.entries<any>(header)) {
      if (name === '__metadata__') {
        if (v === null || typeof v !== 'object' || Array.isArray(v) || Object.values(v).some((x) => typeof x !== 'string')) {
          throw new UserError(`${file}: __metadata__ must map strings to strings`);
        }
        metadata = v;
        continue;
      }
      if (!v || typeof v !== 'object') throw new UserError(`${file}: tensor "${name}": entry is not an object`);
      const dtype = v.dtype as DType;
      if (!(dtype in DTYPE_BYTES)) throw new UserError(`${file}: tensor "${name}": unsupported dtype ${JSON.stringify(v.dtype)}`);
      if (!Array.isArray(v.shape) || v.shape.some((d: any) => !Number.isInteger(d) || d < 0)) {
        throw new UserError(`${file}: tensor "${name}": bad shape ${JSON.stringify(v.shape)}`);
      }
      const off = v.data_offsets;
      if (!Array.isArray(off) || off.length !== 2 || !off.every((x: any) => Number.isInteger(x) && x >= 0) || off[1] < off[0]) {
        throw new UserError(`${file}: tensor "${name}": bad data_offsets ${JSON.stringify(off)}`);
      }
      const numel = v.shape.reduce((a: number, b: number) => a * b, 1);
      if (off[1] - off[0] !== numel * DTYPE_BYTES[dtype]) {
        throw new UserError(`${file}: tensor "${name}": data_offsets span ${off[1] - off[0]} bytes but shape ${JSON.stringify(v.shape)} × ${dtype} needs ${numel * DTYPE_BYTES[dtype]}`);
      }
      if (off[1] > dataLen) throw new UserError(`${file}: tensor "${name}": data runs past the end of the file (truncated?)`);
      tensors.set(name, { name, dtype, shape: v.shape, begin: dataStart + off[0], end: dataStart + off[1] });
    }
    // The buffer must be covered exactly once: sort by offset and walk it.
    const sorted = [...tensors.values()].sort((a, b) => a.begin - b.begin || a.end - b.end);
    let pos = dataStart;
    for (const t of sorted) {
      if (t.begin < pos) throw new UserError(`${file}: tensor "${t.name}" overlaps the tensor before it`);
      if (t.begin > pos) throw new UserError(`${file}: gap in the data buffer before tensor "${t.name}"`);
      pos = t.end;
    }
    if (pos !== size) throw new UserError(`${file}: ${size - pos} bytes after the last tensor are not covered by the header`);
    return { file, tensors, metadata };
  } finally {
    fs.closeSync(fd);
  }
}

/** Read one tensor as float32 (integer dtypes are converted too). */
export function readTensor(st: SafetensorsFile, name: string): Float32Array {
  const t = st.tensors.get(name);
  if (!t) throw new UserError(`${st.file}: no tensor "${name}"`);
  // F32 is read straight into the array that is returned: no second copy of a large tensor.
  if (t.dtype === 'F32') return new Float32Array(readBytes(st, name, t).buffer);
  return decode(readBytes(st, name, t), t.dtype);
}

/** A tensor's bytes as the file holds them, with their dtype. */
export function readEncoded(st: SafetensorsFile, name: string): EncodedTensor {
  const t = st.tensors.get(name);
  if (!t) throw new UserError(`${st.file}: no tensor "${name}"`);
  return { bytes: readBytes(st, name, t), dtype: t.dtype };
}

/** Read a BF16 or F16 tensor's bits as they are, into the array that is returned. */
export function readHalfBits(st: SafetensorsFile, name: string): Uint16Array {
  const t = st.tensors.get(name);
  if (!t) throw new UserError(`${st.file}: no tensor "${name}"`);
  if (t.dtype !== 'BF16' && t.dtype !== 'F16') throw new Error(`${st.file}: tensor "${name}" is ${t.dtype}, not a 16-bit float`);
  const buf = readBytes(st, name, t);
  return new Uint16Array(buf.buffer, buf.byteOffset, buf.length / 2);
}

/** The tensor's bytes in a fresh, 4-byte-aligned buffer of its own. */
function readBytes(st: SafetensorsFile, name: string, t: TensorInfo): Buffer {
  const len = t.end - t.begin;
  const buf = Buffer.from(new ArrayBuffer(len));
  const fd = fs.openSync(st.file, 'r');
  try {
    let got = 0;
    while (got < len) {
      const n = fs.readSync(fd, buf, got, len - got, t.begin + got);
      if (n === 0) throw new UserError(`${st.file}: tensor "${name}": file ended early`);
      got += n;
    }
  } finally {
    fs.closeSync(fd);
  }
  return buf;
}

export function decode(buf: Buffer, dtype: DType): Float32Array {
  // Hosts are little-endian (x86-64, arm64), like the format: copy into aligned typed arrays.
  const n = buf.length / DTYPE_BYTES[dtype];
  const aligned = buf.buffer.slice(buf.byteOffset, buf.byteOffset + buf.length);
  if (dtype === 'F32') return new Float32Array(aligned);
  const out = new Float32Array(n);
  switch (dtype) {
    case 'F64':
      for (let i = 0; i < n; i++) out[i] = buf.readDoubleLE(i * 8);
      break;
    case 'F16': {
      const h = new Uint16Array(aligned);
      for (let i = 0; i < n; i++) out[i] = f16ToF32(h[i]);
      break;
    }
    case 'BF16': {
      const h = new Uint16Array(aligned);
      const u = new Uint32Array(out.buffer);
      for (let i = 0; i < n; i++) u[i] = h[i] << 16;
      break;
    }
    case 'I32':
      for (let i = 0; i < n; i++) out[i] = buf.readInt32LE(i * 4);
      break;
    case 'I64':
      for (let i = 0; i < n; i++) out[i] = Number(buf.readBigInt64LE(i * 8));
      break;
  }
  return out;
}

export function encode(data: Float32Array, dtype: DType): Buffer {
  const n = data.length;
  if (dtype === 'F32') return Buffer.from(data.buffer, data.byteOffset, data.byteLength);
  const buf = Buffer.alloc(n * DTYPE_BYTES[dtype]);
  switch (dtype) {
    case 'F64':
      for (let i = 0; i < n; i++) buf.writeDoubleLE(data[i], i * 8);
      break;
    case 'F16': {
      const h = new Uint16Array(buf.buffer, buf.byteOffset, n);
      for (let i = 0; i < n; i++) h[i] = f32ToF16(data[i]);
      break;
    }
    case 'BF16': {
      const u = new Uint32Array(data.buffer, data.byteOffset, n);
      const h = new Uint16Array(buf.buffer, buf.byteOffset, n);
      for (let i = 0; i < n; i++) h[i] = f32ToBf16Bits(u[i]);
      break;
    }
    case 'I32':
      for (let i = 0; i < n; i++) buf.writeInt32LE(Math.round(data[i]), i * 4);
      break;
    case 'I64':
      for (let i = 0; i < n; i++) buf.writeBigInt64LE(BigInt(Math.round(data[i])), i * 8);
      break;
  }
  return buf;
}

/** f32 bit pattern → bf16 bits, round to nearest even; NaN stays a quiet NaN. */
export function f32ToBf16Bits(bits: number): number {
  if ((bits & 0x7f800000) === 0x7f800000 && (bits & 0x007fffff) !== 0) return ((bits >>> 16) | 0x0040) & 0xffff;
  const rounding = 0x7fff + ((bits >>> 16) & 1);
  return ((bits + rounding) >>> 16) & 0xffff;
}

const f32 = new Float32Array(1);
const u32 = new Uint32Array(f32.buffer);

export function f32ToF16(v: number): number {
  f32[0] = v;
  const x = u32[0];
  const sign = (x >>> 16) & 0x8000;
  const exp = (x >>> 23) & 0xff;
  let mant = x & 0x7fffff;
  if (exp === 0xff) return sign | 0x7c00 | (mant ? 0x200 : 0);
  let e = exp - 127 + 15;
  if (e >= 0x1f) return sign | 0x7c00; // overflow → inf
  if (e <= 0) {
    if (e < -10) return sign; // underflow → ±0
    mant |= 0x800000;
    const shift = 14 - e;
    let h = mant >>> shift;
    const rem = mant & ((1 << shift) - 1);
    const half = 1 << (shift - 1);
    if (rem > half || (rem === half && (h & 1))) h++;
    return sign | h;
  }
  let h = (e << 10) | (mant >>> 13);
  const rem = mant & 0x1fff;
  if (rem > 0x1000 || (rem === 0x1000 && (h & 1))) h++; // may carry into the exponent: still correct
  return sign | h;
}

export function f16ToF32(h: number): number {
  const sign = h & 0x8000 ? -1 : 1;
  const exp = (h >>> 10) & 0x1f;
  const mant = h & 0x3ff;
  if (exp === 0) return sign * mant * 2 ** -24;
  if (exp === 0x1f) return mant ? NaN : sign * Infinity;
  return sign * (1 + mant / 1024) * 2 ** (exp - 15);
}

export interface WriteEntry {
  name: string;
  shape: number[];
}

/** A tensor's values to write: float32 (encoded to the file's dtype), or bytes already in it. */
export type TensorData = Float32Array | EncodedTensor;
export interface EncodedTensor {
  bytes: Uint8Array;
  dtype: DType;
}

/**
 * Stream tensors into a safetensors file: the header is written first from the shapes, then each
 * tensor's data is asked for in turn, so only one tensor is in memory. Written under a temporary
 * name and renamed into place.
 */
export async function writeSafetensors(
  file: string,
  entries: WriteEntry[],
  dtype: DType,
  getData: (name: string) => TensorData | Promise<TensorData>,
  metadata: Record<string, string> = { format: 'pt' },
): Promise<void> {
  const names = new Set<string>();
  const header: Record<string, any> = { __metadata__: metadata };
  let off = 0;
  for (const e of entries) {
    if (names.has(e.name)) throw new Error(`duplicate tensor name ${e.name}`);
    names.add(e.name);
    const bytes = e.shape.reduce((a, b) => a * b, 1) * DTYPE_BYTES[dtype];
    header[e.name] = { dtype, shape: e.shape, data_offsets: [off, off + bytes] };
    off += bytes;
  }
  let htext = JSON.stringify(header);
  htext += ' '.repeat((8 - (Buffer.byteLength(htext) % 8)) % 8);
  const hbuf = Buffer.from(htext, 'utf8');
  const lenBuf = Buffer.alloc(8);
  lenBuf.writeBigUInt64LE(BigInt(hbuf.length));
  await writeFileVia(file, async (fd) => {
    writeAll(fd, lenBuf);
    writeAll(fd, hbuf);
    for (const e of entries) {
      const data = await getData(e.name);
      const numel = e.shape.reduce((a, b) => a * b, 1);
      if (data instanceof Float32Array) {
        if (data.length !== numel) throw new Error(`tensor ${e.name}: ${data.length} values for shape ${JSON.stringify(e.shape)}`);
        writeAll(fd, encode(data, dtype));
      } else {
        if (data.dtype !== dtype || data.bytes.length !== numel * DTYPE_BYTES[dtype]) throw new Error(`tensor ${e.name}: ${data.bytes.length} bytes of ${data.dtype} for ${dtype} ${JSON.stringify(e.shape)}`);
        writeAll(fd, data.bytes);
      }
    }
  });
}

export function dtypeFromName(s: string): DType {
  const m: Record<string, DType> = { f32: 'F32', float32: 'F32', fp32: 'F32', f16: 'F16', float16: 'F16', fp16: 'F16', bf16: 'BF16', bfloat16: 'BF16' };
  const d = m[s.toLowerCase()];
  if (!d) throw new UserError(`unknown dtype "${s}": expected f32, f16 or bf16`);
  return d;
}

export const TORCH_DTYPE: Record<string, string> = { F32: 'float32', F16: 'float16', BF16: 'bfloat16' };
