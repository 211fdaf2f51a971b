import { describe, expect, it } from 'vitest';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { DEFAULT_MAKE_DATA, makeData } from '../src/quickstart/make-data.js';
import { TextTokenizer } from '../src/tokenizer/tokenizer.js';

describe('embedded default data', () => {
  it('is deterministic, keeps evaluation questions out of training (their other-language twins in), and matches the shipped data/quickstart', async () => {
    const d = fs.mkdtempSync(path.join(os.tmpdir(), 'prefopt-data-'));
    await makeData({ ...DEFAULT_MAKE_DATA, out: path.join(d, 'a') });
    await makeData({ ...DEFAULT_MAKE_DATA, out: path.join(d, 'b') });
    for (const f of ['sft.json', 'prefs.jsonl', 'prompts.jsonl', 'eval.jsonl', 'tokenizer/tokenizer.json', 'model.json']) {
      const a = fs.readFileSync(path.join(d, 'a', f));
      expect(a.equals(fs.readFileSync(path.join(d, 'b', f))), f).toBe(true);
      // The repository ships exactly what the generator makes.
      expect(a.equals(fs.readFileSync(path.join('data/quickstart', f))), `data/quickstart/${f} is stale: run prefopt make-data`).toBe(true);
    }
    const lines = (f: string) => fs.readFileSync(path.join(d, 'a', f), 'utf8').trim().split('\n').map((l) => JSON.parse(l));
    const evalQs = lines('eval.jsonl').map((r) => r.prompt[0].content as string);
    const held = new Set(evalQs);
    const sft = JSON.parse(fs.readFileSync(path.join(d, 'a', 'sft.json'), 'utf8'));
    const sftQs = new Set<string>(sft.map((c: any) => c.conversations[0].value));
    expect([...sftQs].filter((q) => held.has(q))).toEqual([]);
    expect(lines('prefs.jsonl').filter((p) => held.has(p.prompt[0].content))).toEqual([]);
    expect(lines('prompts.jsonl').filter((p) => held.has(p.prompt[0].content))).toEqual([]);
    // Each evaluation question's other-language version is in the SFT data (rebuilt by hand).
    const other = (q: string) => {
      const n = (q.match(/\d+/g) ?? []).map(Number);
      if (/larger/.test(q)) return `${n[0]} 和 ${n[1]} 哪个更大？`;
      if (/smaller/.test(q)) return `${n[0]} 和 ${n[1]} 哪个更小？`;
      if (/comes after/.test(q)) return `${n[0]} 后面的数是几？`;
      if (/更大/.test(q)) return `Which is larger, ${n[0]} or ${n[1]}?`;
      if (/更小/.test(q)) return `Which is smaller, ${n[0]} or ${n[1]}?`;
      return `What number comes after ${n[0]}?`;
    };
    expect(evalQs.filter((q) => !sftQs.has(other(q)))).toEqual([]);
    // Every kind is trained (the old split held out every "next" question).
    for (const k of [/larger|更大/, /smaller|更小/, /comes after|后面/]) expect([...sftQs].some((q) => k.test(q))).toBe(true);
    // Both languages, all kinds, numbers kept as single tokens.
    expect(new Set(lines('eval.jsonl').map((r) => `${r.kind}/${r.lang}`)).size).toBe(6);
    const tok = TextTokenizer.load(path.join(d, 'a', 'tokenizer'));
    expect(tok.encode('7').length).toBe(1);
    expect(tok.decode(tok.encode('答案是 7。'))).toBe('答案是 7。');
  });
});
