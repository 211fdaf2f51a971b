import { describe, expect, it } from 'vitest';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { trainBpe, pretokenize } from '../src/tokenizer/bpe.js';
import { TextTokenizer } from '../src/tokenizer/tokenizer.js';
import { formatChat, ZHINAO_CHAT_TEMPLATE } from '../src/tokenizer/chat.js';
import { writeTokenizerFiles, SPECIAL_TOKENS } from '../src/tokenizer/files.js';
import { encodePair } from '../src/data/encode.js';

const corpus = [
  'What is 12 plus 30? The answer is 42.',
  '请计算 12 加 30。答案是 42。',
  "It's a café — naïve façade 🦊🚀 emoji.",
  'line one\nline two\n\n  indented',
];

function makeTok(vocab = 400) {
  const json = trainBpe(Array.from({ length: 30 }, () => corpus).flat(), { vocabSize: vocab, specialTokens: SPECIAL_TOKENS });
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'prefopt-tok-'));
  writeTokenizerFiles(dir, json);
  return { json, dir, tok: TextTokenizer.load(dir) };
}

describe('BPE trainer and tokenizer', () => {
  it('is deterministic', () => {
    const a = trainBpe(corpus, { vocabSize: 320, specialTokens: SPECIAL_TOKENS });
    const b = trainBpe([...corpus], { vocabSize: 320, specialTokens: SPECIAL_TOKENS });
    expect(JSON.stringify(a)).toBe(JSON.stringify(b));
  });

  it('splits digits one by one and keeps CJK runs together', () => {
    expect(pretokenize('x 123')).toEqual(['x', ' ', '1', '2', '3']);
    expect(pretokenize('你好世界')).toEqual(['你好世界']);
  });

  it('round trips CJK, emoji, accents, whitespace and unseen text', () => {
    const { tok } = makeTok();
    for (const s of [...corpus, '全新的文字 🧪 zebra Ω', '   ', 'a\tb\r\nc']) {
      expect(tok.decode(tok.encode(s))).toBe(s);
    }
  });

  it('keeps special tokens whole and can skip them when decoding', () => {
    const { tok } = makeTok();
    const s = '<|im_start|>user\n你好<|im_end|>\n';
    const ids = tok.encode(s);
    expect(ids[0]).toBe(tok.id('<|im_start|>'));
    expect(ids).toContain(tok.id('<|im_end|>'));
    expect(tok.decode(ids)).toBe(s);
    expect(tok.decode(ids, true)).toBe('user\n你好\n');
  });

  it('learns merges: frequent words become single tokens', () => {
    const { tok } = makeTok(500);
    expect(tok.encode(' answer').length).toBe(1);
    expect(tok.encode(' answer').length).toBeLessThan(new TextEncoder().encode(' answer').length);
  });

  it('renders the chat template exactly like the built-in Zhinao format', () => {
    const { tok } = makeTok();
    const convs = [
      [{ role: 'user', content: 'hi' }],
      [{ role: 'system', content: 'Be brief.' }, { role: 'user', content: '1+1?' }, { role: 'assistant', content: '2' }, { role: 'user', content: '再来' }],
    ];
    for (const m of convs) {
      for (const gen of [true, false]) expect(tok.applyChat(m, gen)).toBe(formatChat(m, gen));
    }
    expect(formatChat([{ role: 'user', content: 'hi' }], true)).toBe('<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n');
    expect(ZHINAO_CHAT_TEMPLATE).toContain('add_generation_prompt');
  });

  it('splits prompt and completion ids so that they concatenate to the full text', () => {
    const { tok } = makeTok();
    const p = tok.applyChat([{ role: 'user', content: 'What is 12 plus 30?' }], true);
    const { prompt, completion } = encodePair(tok, p, 'The answer is 42.<|im_end|>\n');
    expect(tok.decode([...prompt, ...completion])).toBe(p + 'The answer is 42.<|im_end|>\n');
    expect(tok.decode(prompt)).toBe(p);
  });

  it('reports missing and corrupt tokenizer files by path', () => {
    const d = fs.mkdtempSync(path.join(os.tmpdir(), 'prefopt-tok-'));
    expect(() => TextTokenizer.load(d)).toThrow(new RegExp(`${d}: no tokenizer.json`));
    fs.writeFileSync(path.join(d, 'tokenizer.json'), '{"model": ');
    expect(() => TextTokenizer.load(d)).toThrow(/tokenizer.json: invalid JSON/);
  });
});
