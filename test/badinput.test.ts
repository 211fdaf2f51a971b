import { describe, expect, it } from 'vitest';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { prefopt } from './helpers/cli.js';
import { onlineFixture } from './helpers/online-fixture.js';
import { writeSafetensors } from '../src/io/safetensors.js';

/**
 * Bad inputs, generated here rather than shipped as blobs: each case must exit non-zero with one
 * clear message naming the file, row or field, and leave no output behind.
 */
describe('bad-input corpus through the CLI', () => {
  it('data files: invalid JSON, missing fields, empty strings, unknown roles, a 10 MB row, invalid UTF-8, mixed formats', async () => {
    const f = await onlineFixture();
    const d = f.d;
    const w = (name: string, text: string | Buffer) => {
      const p = path.join(d, name);
      fs.writeFileSync(p, text);
      return p;
    };
    const conv = (u: string, a: string) => JSON.stringify({ conversations: [{ from: 'user', value: u }, { from: 'assistant', value: a }] });
    const big = 'x'.repeat(10 * 1024 * 1024);
    const cases: { args: (file: string, out: string) => string[]; file: string; msg: RegExp }[] = [
      { file: w('c1.jsonl', conv('a', 'b') + '\n{"conversations": [\n'), args: (x, o) => ['sft', '--model', f.base, '--data', x, '--out', o], msg: /c1\.jsonl:2: invalid JSON/ },
      { file: w('c2.jsonl', conv('a', 'b') + '\n' + JSON.stringify({ conversations: [{ from: 'user' }] }) + '\n'), args: (x, o) => ['sft', '--model', f.base, '--data', x, '--out', o], msg: /c2\.jsonl:2: conversations\[0\] must be \{"from": string, "value": string\}/ },
      { file: w('c3.jsonl', JSON.stringify({ conversations: [{ from: 'wizard', value: 'a' }, { from: 'assistant', value: 'b' }] })), args: (x, o) => ['sft', '--model', f.base, '--data', x, '--out', o], msg: /c3\.jsonl:1: turn 0: unknown role "wizard"/ },
      { file: w('c4.jsonl', Buffer.concat([Buffer.from(conv('a', 'b') + '\n'), Buffer.from([0x7b, 0x22, 0xff, 0xfe, 0x22, 0x7d, 0x0a])])), args: (x, o) => ['sft', '--model', f.base, '--data', x, '--out', o], msg: /c4\.jsonl:2: invalid UTF-8/ },
      { file: w('c5.jsonl', conv('a', 'b') + '\n' + JSON.stringify({ prompt: 'q', chosen: 'a', rejected: 'b' }) + '\n'), args: (x, o) => ['sft', '--model', f.base, '--data', x, '--out', o], msg: /c5\.jsonl:2: expected "conversations" \(seed format\) or "messages"/ },
      { file: w('p1.jsonl', JSON.stringify({ prompt: 'q', chosen: 'a' })), args: (x, o) => ['dpo', '--model', f.base, '--data', x, '--out', o], msg: /p1\.jsonl:1: missing "rejected"/ },
      { file: w('p2.jsonl', JSON.stringify({ prompt: 7, chosen: 'a', rejected: 'b' })), args: (x, o) => ['dpo', '--model', f.base, '--data', x, '--out', o], msg: /p2\.jsonl:1: "prompt" must be a string or a list/ },
      { file: w('p3.jsonl', JSON.stringify({ prompt: 'q', chosen: '', rejected: 'b' }) + '\n' + JSON.stringify({ prompt: 'q', chosen: 'same', rejected: 'same' })), args: (x, o) => ['dpo', '--model', f.base, '--data', x, '--out', o, '--strict'], msg: /p3\.jsonl:1: empty completion/ },
      { file: w('l1.jsonl', JSON.stringify({ prompt: big, completion: 'x' }) + '\n' + '{"prompt": ""'), args: (x, o) => ['logprobs', '--model', f.base, '--input', x, '--out', o], msg: /l1\.jsonl:2: invalid JSON/ },
      { file: w('q1.jsonl', JSON.stringify({ prompt: '' })), args: (x, o) => ['online', '--model', f.base, '--prompts', x, '--scorer', 'builtin:length', '--workdir', o], msg: /q1\.jsonl:1: "prompt" is empty/ },
      { file: w('s1.jsonl', JSON.stringify({ prompt: 'q', completion: 3 })), args: (x, o) => ['rm', 'score', '--scorer', 'builtin:length', '--input', x, '--out', o], msg: /s1\.jsonl:1: "completion" must be a string/ },
      { file: path.join(d, 'missing.jsonl'), args: (x, o) => ['sft', '--model', f.base, '--data', x, '--out', o], msg: /missing\.jsonl: cannot read \(ENOENT\)/ },
    ];
    for (const c of cases) {
      const out = path.join(d, 'out-' + path.basename(c.file));
      const r = prefopt(c.args(c.file, out));
      expect(r.code, `${path.basename(c.file)}: ${r.stderr.slice(-300)}`).toBe(2);
      expect(r.stderr, path.basename(c.file)).toMatch(c.msg);
      expect(r.stderr.trim().split('\n').filter((l) => l.startsWith('prefopt: error')).length).toBe(1);
      for (const leftover of ['config.json', 'adapter_config.json', 'model.safetensors', 'adapter_model.safetensors']) expect(fs.existsSync(path.join(out, leftover)), `${out}/${leftover}`).toBe(false);
      if (!c.args(c.file, out).includes('--workdir')) expect(fs.existsSync(out) && fs.statSync(out).isFile()).toBe(false);
    }
    console.log(`bad-input corpus: ${cases.length} data-file cases through the CLI`);
  }, 120_000);

  it('checkpoints, adapters and tokenizers that do not fit are refused by path', async () => {
    const f = await onlineFixture();
    const d = f.d;
    const rows = path.join(d, 'r.jsonl');
    fs.writeFileSync(rows, JSON.stringify({ prompt_ids: [1, 2], completion_ids: [3] }));
    const broken = path.join(d, 'broken');
    fs.cpSync(f.base, broken, { recursive: true });
    const st = path.join(broken, 'model.safetensors');
    fs.truncateSync(st, fs.statSync(st).size - 100);
    expect(prefopt(['logprobs', '--model', broken, '--input', rows]).stderr).toMatch(new RegExp(`${st}: tensor ".*": data runs past the end of the file \\(truncated\\?\\)`));
    const notok = path.join(d, 'notok');
    fs.cpSync(f.base, notok, { recursive: true });
    fs.writeFileSync(path.join(notok, 'tokenizer.json'), '{"model": {"type": "BPE", "vocab": 5');
    expect(prefopt(['generate', '--model', notok, '--prompt', 'hi']).stderr).toMatch(/tokenizer\.json: invalid JSON/);
    const cfgBad = path.join(d, 'cfgbad');
    fs.cpSync(f.base, cfgBad, { recursive: true });
    fs.writeFileSync(path.join(cfgBad, 'config.json'), JSON.stringify({ ...JSON.parse(fs.readFileSync(path.join(f.base, 'config.json'), 'utf8')), architectures: ['GPT2LMHeadModel'], model_type: 'gpt2' }));
    expect(prefopt(['logprobs', '--model', cfgBad, '--input', rows]).stderr).toMatch(/config\.json: unsupported architecture \["GPT2LMHeadModel"\]/);
    expect(prefopt(['logprobs', '--model', f.base, '--adapter', path.join(d, 'nope'), '--input', rows]).stderr).toMatch(/nope: not a PEFT adapter directory/);
    // An adapter holding a NaN: refused by file and tensor, as a checkpoint's would be.
    const nan = path.join(d, 'nan-adapter');
    fs.mkdirSync(nan);
    fs.writeFileSync(path.join(nan, 'adapter_config.json'), JSON.stringify({ peft_type: 'LORA', r: 2, lora_alpha: 4, target_modules: ['q_proj'] }));
    const mod = 'base_model.model.model.layers.0.self_attn.q_proj';
    const b = new Float32Array(32 * 2).fill(0.1);
    b[5] = NaN;
    const data: Record<string, Float32Array> = { [`${mod}.lora_A.weight`]: new Float32Array(2 * 32).fill(0.1), [`${mod}.lora_B.weight`]: b };
    await writeSafetensors(path.join(nan, 'adapter_model.safetensors'), [{ name: `${mod}.lora_A.weight`, shape: [2, 32] }, { name: `${mod}.lora_B.weight`, shape: [32, 2] }], 'F32', (n) => data[n]);
    expect(prefopt(['logprobs', '--model', f.base, '--adapter', nan, '--input', rows]).stderr).toMatch(/adapter_model\.safetensors: tensor "base_model\.model\.model\.layers\.0\.self_attn\.q_proj\.lora_B\.weight" holds a non-finite value \(NaN\) at index 5/);
  }, 60_000);
});
