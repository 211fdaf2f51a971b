import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { trainBpe } from '../../src/tokenizer/bpe.js';
import { TextTokenizer } from '../../src/tokenizer/tokenizer.js';
import { SPECIAL_TOKENS, writeTokenizerFiles } from '../../src/tokenizer/files.js';

/** A small byte-level tokenizer written to a temp dir (deterministic). */
export function smallTokenizer(texts: string[] = ['What is 1 plus 2? The answer is 3.', '你好，世界。答案是 3。'], vocab = 320, digits: 'single' | 'grouped' = 'single') {
  const json = trainBpe(Array.from({ length: 20 }, () => texts).flat(), { vocabSize: vocab, specialTokens: SPECIAL_TOKENS, digits });
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'prefopt-tok-'));
  writeTokenizerFiles(dir, json);
  return { dir, tok: TextTokenizer.load(dir) };
}
