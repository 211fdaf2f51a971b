import { describe, expect, it } from 'vitest';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { readHeader, readTensor, writeSafetensors, f32ToF16, f16ToF32, f32ToBf16Bits } from '../src/io/safetensors.js';
import { openCheckpoint, writeCheckpointFiles } from '../src/io/checkpoint.js';
import { loadModel, saveModel } from '../src/model/load.js';
import { Decoder } from '../src/model/decoder.js';
import { ARCH_SPECS, makeTestModel } from './helpers/models.js';

const tmp = () => fs.mkdtempSync(path.join(os.tmpdir(), 'prefopt-st-'));

/** Build a raw safetensors file from a header object and a data buffer. */
function rawFile(file: string, header: any, data: Buffer, headerLenOverride?: number) {
  const h = Buffer.from(JSON.stringify(header));
  const len = Buffer.alloc(8);
  len.writeBigUInt64LE(BigInt(headerLenOverride ?? h.length));
  fs.writeFileSync(file, Buffer.concat([len, h, data]));
}

describe('bf16 and f16 conversion', () => {
  it('rounds to nearest even exactly as hand-computed', () => {
    const bits = (x: number) => new Uint32Array(new Float32Array([x]).buffer)[0];
    // 1 + 2^-8 is exactly halfway between bf16 1.0 and 1+2^-7: ties to even → 1.0 (0x3f80).
    expect(f32ToBf16Bits(bits(1 + 2 ** -8))).toBe(0x3f80);
    // 1 + 3·2^-8 is halfway between 1+2^-7 (odd mantissa) and 1+2^-6: ties to even → 0x3f82.
    expect(f32ToBf16Bits(bits(1 + 3 * 2 ** -8))).toBe(0x3f82);
    // Just above halfway rounds up.
    expect(f32ToBf16Bits(bits(1 + 2 ** -8 + 2 ** -20))).toBe(0x3f81);
    expect(f32ToBf16Bits(bits(-2.5))).toBe(0xc020);
    expect(f32ToBf16Bits(bits(NaN)) & 0x7fc0).toBe(0x7fc0);
  });
  it('f16 round trips representable values and rounds others to nearest even', () => {
    for (const v of [0, 1, -1, 0.5, 65504, -65504, 2 ** -14, 2 ** -24, 1.5, 3.140625]) expect(f16ToF32(f32ToF16(v))).toBe(v);
    expect(f16ToF32(f32ToF16(1 + 2 ** -11))).toBe(1); // halfway, ties to even
    expect(f16ToF32(f32ToF16(1 + 3 * 2 ** -11))).toBe(1 + 2 ** -9);
    expect(f16ToF32(f32ToF16(1e6))).toBe(Infinity);
  });
});

describe('safetensors files', () => {
  it('round trip F32 exactly, F16/BF16 within their precision, with padded headers', async () => {
    const d = tmp();
    const data = Float32Array.from({ length: 37 }, (_, i) => Math.sin(i) * 3);
    for (const dt of ['F32', 'F16', 'BF16'] as const) {
      const f = path.join(d, `x-${dt}.safetensors`);
      await writeSafetensors(f, [{ name: 'a', shape: [37] }, { name: 'b.c', shape: [1, 37] }], dt, () => data);
      const buf = fs.readFileSync(f);
      expect(Number(buf.readBigUInt64LE(0)) % 8).toBe(0);
      const st = readHeader(f);
      expect(st.metadata).toEqual({ format: 'pt' });
      const back = readTensor(st, 'b.c');
      const tol = dt === 'F32' ? 0 : dt === 'F16' ? 2e-3 : 1.6e-2;
      for (let i = 0; i < 37; i++) expect(Math.abs(back[i] - data[i])).toBeLessThanOrEqual(tol * Math.max(1, Math.abs(data[i])));
    }
  });

  it('rejects each kind of corruption with a message naming the file and tensor', () => {
    const d = tmp();
    const f = path.join(d, 'bad.safetensors');
    const cases: [string, () => void, RegExp][] = [
      ['too short', () => fs.writeFileSync(f, Buffer.alloc(4)), /truncated/],
      ['header past end', () => rawFile(f, { a: { dtype: 'F32', shape: [1], data_offsets: [0, 4] } }, Buffer.alloc(4), 10_000), /runs past the end/],
      ['truncated data', () => rawFile(f, { a: { dtype: 'F32', shape: [4], data_offsets: [0, 16] } }, Buffer.alloc(8)), /tensor "a".*past the end/],
      ['overlap', () => rawFile(f, { a: { dtype: 'F32', shape: [2], data_offsets: [0, 8] }, b: { dtype: 'F32', shape: [2], data_offsets: [4, 12] } }, Buffer.alloc(12)), /overlaps/],
      ['unknown dtype', () => rawFile(f, { a: { dtype: 'Q4', shape: [1], data_offsets: [0, 4] } }, Buffer.alloc(4)), /tensor "a": unsupported dtype/],
      ['size mismatch', () => rawFile(f, { a: { dtype: 'F32', shape: [3], data_offsets: [0, 8] } }, Buffer.alloc(8)), /tensor "a": data_offsets span 8 bytes/],
      ['gap', () => rawFile(f, { a: { dtype: 'F32', shape: [1], data_offsets: [4, 8] } }, Buffer.alloc(8)), /gap/],
      ['trailing bytes', () => rawFile(f, { a: { dtype: 'F32', shape: [1], data_offsets: [0, 4] } }, Buffer.alloc(12)), /not covered/],
      ['not json', () => rawFile(f, '{nope' as any, Buffer.alloc(0)), /header/],
    ];
    for (const [label, make, msg] of cases) {
      make();
      let err: any;
      try {
        readHeader(f);
      } catch (e) {
        err = e;
      }
      expect(err, label).toBeDefined();
      expect(err.message, label).toContain(f);
      expect(err.message, label).toMatch(msg);
    }
  });
});

describe('checkpoint directories', () => {
  it('save → load round trip is exact and logits match; sharded output loads the same', async () => {
    const { cfg, w } = makeTestModel(ARCH_SPECS['zhinao fused qkv GQA']);
    const m = Decoder.fromHF(cfg, (n) => w.get(n)!);
    const d = tmp();
    await saveModel(m, path.join(d, 'one'));
    await saveModel(m, path.join(d, 'sharded'), { maxShardBytes: 20_000 });
    expect(fs.existsSync(path.join(d, 'sharded', 'model.safetensors.index.json'))).toBe(true);
    for (const sub of ['one', 'sharded']) {
      const back = loadModel(path.join(d, sub));
      for (const [name, t] of w) expect(Array.from(back.hfData(name))).toEqual(Array.from(t.data));
      back.dispose();
    }
    m.dispose();
  });

  it('rejects a missing tensor, a wrong shape, NaN weights and an index pointing at a missing file', async () => {
    const { raw, cfg, w } = makeTestModel(ARCH_SPECS['llama GQA untied']);
    const entries = [...w].map(([name, t]) => ({ name, shape: t.shape }));
    const d = tmp();
    const write = async (sub: string, ents: typeof entries, get = (n: string) => w.get(n)!.data, shard?: number) => {
      const dir = path.join(d, sub);
      await writeCheckpointFiles(dir, raw, ents, get, { maxShardBytes: shard });
      return dir;
    };
    const missing = await write('missing', entries.filter((e) => e.name !== 'model.layers.1.mlp.up_proj.weight'));
    expect(() => openCheckpoint(missing)).toThrow(/missing tensor "model.layers.1.mlp.up_proj.weight"/);
    const wrong = path.join(d, 'wrong');
    await writeCheckpointFiles(wrong, { ...raw, intermediate_size: raw.intermediate_size + 1 }, entries, (n) => w.get(n)!.data);
    expect(() => openCheckpoint(wrong)).toThrow(/gate_proj.weight" has shape \[72,32\] but config.json implies \[73,32\]/);
    const nan = await write('nan', entries, (n) => (n === 'model.norm.weight' ? new Float32Array(w.get(n)!.data.length).fill(NaN) : w.get(n)!.data));
    expect(() => loadModel(nan)).toThrow(/model.norm.weight" holds a non-finite value/);
    const sharded = await write('sharded', entries, undefined, 10_000);
    const idx = JSON.parse(fs.readFileSync(path.join(sharded, 'model.safetensors.index.json'), 'utf8'));
    fs.rmSync(path.join(sharded, Object.values<string>(idx.weight_map)[0]));
    expect(() => openCheckpoint(sharded)).toThrow(/which does not exist/);
    expect(cfg.arch).toBe('llama');
  });
});
