import { describe, expect, it } from 'vitest';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { DEFAULT_MAKE_DATA, makeData } from '../src/quickstart/make-data.js';
import { TextTokenizer } from '../src/tokenizer/tokenizer.js';

describe('embedded default data', () => {
  it('is deterministic, keeps evaluation questions out of training (two-number ones keep their other-language twins in), and matches the shipped data/quickstart', async () => {
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
    // Nearly every two-number evaluation question's other-language version is in the SFT data
    // (rebuilt by hand; 360 distinct such questions, ~2,000 draws); three-number questions are rarer in SFT (a quarter of the two-number rate) and many
    // distinct, so theirs mostly are not: those measure the skill itself.
    const other = (q: string) => {
      const n = (q.match(/\d+/g) ?? []).map(Number);
      if (/larger/.test(q)) return `${n[0]} 和 ${n[1]} 哪个更大？`;
      if (/smaller/.test(q)) return `${n[0]} 和 ${n[1]} 哪个更小？`;
      if (/更大/.test(q)) return `Which is larger, ${n[0]} or ${n[1]}?`;
      if (/更小/.test(q)) return `Which is smaller, ${n[0]} or ${n[1]}?`;
      return null;
    };
    const two = evalQs.filter((q) => other(q) !== null);
    expect(two.length).toBeGreaterThan(30);
    expect(two.filter((q) => !sftQs.has(other(q)!)).length).toBeLessThanOrEqual(0.05 * two.length);
    // Every kind is in the SFT data, three-number questions at a quarter of the others' rate and
    // answered with a random one of their numbers (the careless labeller): SFT cannot learn them.
    const count = (re: RegExp) => [...sft].filter((c: any) => re.test(c.conversations[0].value)).length;
    const [larger, smaller, largest, smallest] = [/larger|更大/, /smaller|更小/, /largest|最大/, /smallest|最小/].map(count);
    for (const n of [larger, smaller, largest, smallest]) expect(n).toBeGreaterThan(0);
    expect((largest + smallest) / (larger + smaller)).toBeGreaterThan(0.18);
    expect((largest + smallest) / (larger + smaller)).toBeLessThan(0.32);
    const three = sft.filter((c: any) => /largest|smallest|最大|最小/.test(c.conversations[0].value));
    const rightThree = three.filter((c: any) => {
      const n = (c.conversations[0].value.match(/\d+/g) ?? []).map(Number);
      const want = /largest|最大/.test(c.conversations[0].value) ? Math.max(...n) : Math.min(...n);
      return c.conversations[1].value.includes(` ${want}`);
    }).length;
    // A random one of three numbers is right a third of the time.
    expect(rightThree / three.length).toBeGreaterThan(0.25);
    expect(rightThree / three.length).toBeLessThan(0.42);
    // The human preference pairs cover the two-number questions only; the on-policy prompts all kinds.
    expect(lines('prefs.jsonl').filter((p) => /largest|smallest|最大|最小/.test(p.prompt[0].content))).toEqual([]);
    expect(new Set(lines('prompts.jsonl').map((r) => r.kind))).toEqual(new Set(['max', 'min', 'max3', 'min3']));
    // Both languages, all kinds in the evaluation; numbers kept as single tokens.
    expect(new Set(lines('eval.jsonl').map((r) => `${r.kind}/${r.lang}`)).size).toBe(8);
    const tok = TextTokenizer.load(path.join(d, 'a', 'tokenizer'));
    expect(tok.encode('7').length).toBe(1);
    expect(tok.decode(tok.encode('答案是 7。'))).toBe('答案是 7。');
  });
});
