import { describe, expect, it } from 'vitest';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { DEFAULT_MAKE_DATA, makeData } from '../src/quickstart/make-data.js';
import { TextTokenizer } from '../src/tokenizer/tokenizer.js';

describe('embedded default data', () => {
  it('is deterministic, keeps held-out questions out of training, and matches the shipped data/quickstart', async () => {
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
    const held = new Set([...lines('eval.jsonl'), ...lines('prompts.jsonl')].map((r) => r.prompt[0].content));
    const sft = JSON.parse(fs.readFileSync(path.join(d, 'a', 'sft.json'), 'utf8'));
    expect(sft.filter((c: any) => held.has(c.conversations[0].value))).toEqual([]);
    expect(lines('prefs.jsonl').filter((p) => held.has(p.prompt[0].content))).toEqual([]);
    // Both languages, all kinds, numbers kept as single tokens.
    expect(new Set(lines('eval.jsonl').map((r) => `${r.kind}/${r.lang}`)).size).toBe(6);
    const tok = TextTokenizer.load(path.join(d, 'a', 'tokenizer'));
    expect(tok.encode('7').length).toBe(1);
    expect(tok.decode(tok.encode('答案是 7。'))).toBe('答案是 7。');
  });
});
