import { describe, expect, it } from 'vitest';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import * as tf from '@tensorflow/tfjs-core';
import { loadConversations, packRows, tokenizeConversation } from '../src/data/conversations.js';
import { makeBatch } from '../src/infer/batch.js';
import { completionLogprobs } from '../src/infer/logprobs.js';
import { Decoder } from '../src/model/decoder.js';
import { loadModel, saveModel } from '../src/model/load.js';
import { DEFAULT_SFT, runSft } from '../src/stages/sft.js';
import { DEFAULT_SYSTEM } from '../src/tokenizer/chat.js';
import { ARCH_SPECS, makeTestModel } from './helpers/models.js';
import { smallTokenizer } from './helpers/tokenizer.js';
import { parseConfig, presetConfig } from '../src/model/config.js';
import { Rng } from '../src/util/rng.js';

const tmp = () => fs.mkdtempSync(path.join(os.tmpdir(), 'prefopt-sft-'));
const IGNORE = -100;

describe('SFT labels', () => {
  it('mask exactly what the 360Zhinao finetune script masks', () => {
    const { tok } = smallTokenizer();
    const conv = { id: 1, where: 'x', messages: [
      { role: 'user', content: 'What is 1 plus 2?' },
      { role: 'assistant', content: 'The answer is 3.' },
      { role: 'user', content: '你好' },
      { role: 'assistant', content: '答案是 3。' },
    ] };
    const row = tokenizeConversation(tok, conv);
    // The script's own formulation (preprocess() in finetune.py), with the default system message.
    const imStart = tok.id('<|im_start|>')!;
    const imEnd = tok.id('<|im_end|>')!;
    const nl = tok.encode('\n');
    const input: number[] = [];
    const target: number[] = [];
    const system = [imStart, ...tok.encode('system'), ...nl, ...tok.encode(DEFAULT_SYSTEM), imEnd, ...nl];
    input.push(...system);
    target.push(imStart, ...Array(system.length - 3).fill(IGNORE), imEnd, ...nl);
    for (const m of conv.messages) {
      const role = [imStart, ...tok.encode(m.role)];
      const ids = [...role, ...nl, ...tok.encode(m.content), imEnd, ...nl];
      input.push(...ids);
      if (m.role === 'user') target.push(imStart, ...Array(ids.length - 3).fill(IGNORE), imEnd, ...nl);
      else target.push(imStart, ...Array(role.length).fill(IGNORE), ...ids.slice(role.length + 1, -2), imEnd, ...nl);
    }
    expect(row.ids).toEqual(input);
    expect(row.weights).toEqual(target.map((t) => (t === IGNORE ? 0 : 1)));
    // And, read back as text, the trained tokens are the assistant answers plus the turn markers.
    const trainedText = tok.decode(row.ids.filter((_, i) => row.weights[i] && ![imStart, imEnd].includes(row.ids[i])));
    expect(trainedText.replace(/\n/g, '')).toBe('The answer is 3.答案是 3。');
  });

  it('rejects bad rows by file and row, or skips and counts them', () => {
    const d = tmp();
    const f = path.join(d, 'c.jsonl');
    const good = { id: 1, conversations: [{ from: 'user', value: 'hi' }, { from: 'assistant', value: 'yo' }] };
    const bad: [unknown, RegExp][] = [
      ['not json', /invalid JSON/],
      [{ id: 2, conversations: [] }, /empty conversation/],
      [{ id: 3, conversations: [{ from: 'robot', value: 'x' }, { from: 'assistant', value: 'y' }] }, /unknown role "robot"/],
      [{ id: 4, conversations: [{ from: 'user', value: 'x' }] }, /does not end with an assistant turn/],
      [{ id: 5 }, /expected "conversations"/],
    ];
    for (const [row, msg] of bad) {
      fs.writeFileSync(f, JSON.stringify(good) + '\n' + (typeof row === 'string' ? row : JSON.stringify(row)) + '\n');
      expect(() => loadConversations(f)).toThrow(new RegExp(`${f}:2: .*${msg.source}`));
    }
    fs.writeFileSync(f, [good, bad[1][0], bad[2][0], good].map((r) => JSON.stringify(r)).join('\n'));
    const rep = loadConversations(f, true);
    expect(rep.items).toHaveLength(2);
    expect(rep.skipped.map((s) => s.where)).toEqual([`${f}:2`, `${f}:3`]);
    // OpenAI-style rows and the seed's JSON array read the same.
    fs.writeFileSync(f, JSON.stringify({ messages: [{ role: 'user', content: 'hi' }, { role: 'assistant', content: 'yo' }] }));
    const arr = path.join(d, 'c.json');
    fs.writeFileSync(arr, JSON.stringify([good]));
    expect(loadConversations(f).items[0].messages).toEqual(loadConversations(arr).items[0].messages);
  });
});

describe('packing', () => {
  it('keeps conversations whole and never attends across them', () => {
    const { cfg, w } = makeTestModel(ARCH_SPECS['llama GQA untied'], 4);
    const model = Decoder.fromHF(cfg, (n) => w.get(n)!);
    const a = { ids: [3, 4, 5, 6], weights: [1, 1, 1, 1] };
    const b = { ids: [7, 8, 9], weights: [1, 1, 1] };
    const c = { ids: Array(9).fill(2), weights: Array(9).fill(1) };
    const { packed, dropped } = packRows([a, b, c], 8);
    expect(dropped).toBe(1); // c is longer than max_len: dropped, never split
    expect(packed).toHaveLength(1);
    expect(packed[0].ids).toEqual([3, 4, 5, 6, 7, 8, 9]);
    expect(packed[0].segments).toEqual([0, 0, 0, 0, 1, 1, 1]);
    expect(packed[0].weights).toEqual([0, 1, 1, 1, 0, 1, 1]);
    const hidden = (rows: typeof packed) => {
      const sb = makeBatch(rows);
      const h = tf.tidy(() => model.hidden(sb));
      const d = h.dataSync();
      h.dispose();
      return { d, T: sb.len };
    };
    const D = cfg.hidden_size;
    const p = hidden(packed);
    const alone = hidden([{ ids: b.ids, weights: b.weights }]);
    for (let t = 0; t < 3; t++) {
      for (let k = 0; k < D; k++) expect(p.d[(4 + t) * D + k]).toBeCloseTo(alone.d[t * D + k], 4);
    }
    model.dispose();
  });
});

describe('SFT stage', () => {
  it('raises held-out assistant log-likelihood, resumes, and writes a loadable checkpoint', async () => {
    const d = tmp();
    const { dir: tokDir, tok } = smallTokenizer(['What is 1 plus 2? The answer is 3.', 'What is 4 plus 4? The answer is 8.'], 300);
    const rng = new Rng(1);
    const conv = (i: number) => {
      const a = rng.int(5);
      const b = rng.int(5);
      return { id: i, conversations: [{ from: 'user', value: `What is ${a} plus ${b}?` }, { from: 'assistant', value: `The answer is ${a + b}.` }] };
    };
    fs.writeFileSync(path.join(d, 'train.json'), JSON.stringify(Array.from({ length: 48 }, (_, i) => conv(i))));
    fs.writeFileSync(path.join(d, 'eval.jsonl'), Array.from({ length: 8 }, (_, i) => JSON.stringify(conv(100 + i))).join('\n'));
    const raw = presetConfig('qwen2', { hidden_size: 32, intermediate_size: 64, num_hidden_layers: 2, num_attention_heads: 4, num_key_value_heads: 2, max_position_embeddings: 128, rope_theta: 10000, tie_word_embeddings: true }, tok.vocabSize, { eos: tok.id('<eod>'), pad: tok.id('<pad>') });
    const base = Decoder.init(parseConfig(raw), 0);
    await saveModel(base, path.join(d, 'base'), { copyFrom: tokDir });
    base.dispose();
    const heldOut = (dir: string) => {
      const m = loadModel(dir);
      const rows = fs.readFileSync(path.join(d, 'eval.jsonl'), 'utf8').trim().split('\n').map((l) => {
        const r = tokenizeConversation(tok, { id: 0, where: '', messages: JSON.parse(l).conversations.map((t: any) => ({ role: t.from, content: t.value })) });
        const cut = r.ids.lastIndexOf(tok.id('<|im_start|>')!) + 3; // after "<|im_start|>assistant\n"
        return { prompt: r.ids.slice(0, cut), completion: r.ids.slice(cut) };
      });
      const s = completionLogprobs(m, rows).reduce((a, r) => a + r.logp, 0) / rows.length;
      m.dispose();
      return s;
    };
    const cfg = { ...DEFAULT_SFT, model: path.join(d, 'base'), data: path.join(d, 'train.json'), evalData: path.join(d, 'eval.jsonl'), out: path.join(d, 'sft'), batchSize: 4, train: { ...DEFAULT_SFT.train, lr: 3e-3, epochs: 2, warmupRatio: 0.1, saveSteps: 10, loggingSteps: 5, seed: 7 } };
    const res = await runSft(cfg);
    expect(res.steps).toBe(24);
    const before = heldOut(path.join(d, 'base'));
    const after = heldOut(path.join(d, 'sft'));
    expect(after).toBeGreaterThan(before + 5); // nats per answer
    // A resumed run (from checkpoint-20) ends with the same weights as the uninterrupted one.
    const weights1 = fs.readFileSync(path.join(d, 'sft', 'model.safetensors'));
    fs.rmSync(path.join(d, 'sft', 'config.json'));
    const res2 = await runSft({ ...cfg, resume: true });
    expect(res2.history.map((h) => h.step)).toEqual([24]); // only steps 21..24 ran
    expect(res2.lastLoss).toBe(res.lastLoss);
    expect(fs.readFileSync(path.join(d, 'sft', 'model.safetensors')).equals(weights1)).toBe(true);
  });
});
