import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { Decoder } from '../../src/model/decoder.js';
import { parseConfig, presetConfig } from '../../src/model/config.js';
import { saveModel } from '../../src/model/load.js';
import { smallTokenizer } from './tokenizer.js';

/** A tiny chat model (2 layers unless asked) with a real tokenizer, prompts with answers, and a deterministic module scorer. */
export async function onlineFixture(layers = 2) {
  const d = fs.mkdtempSync(path.join(os.tmpdir(), 'prefopt-online-'));
  const { dir: tokDir, tok } = smallTokenizer(['What is 1 plus 2? The answer is 3.', 'Say yes or no. yes no maybe'], 300);
  const raw = presetConfig('llama', { hidden_size: 32, intermediate_size: 64, num_hidden_layers: layers, num_attention_heads: 4, num_key_value_heads: 2, max_position_embeddings: 256, rope_theta: 10000, tie_word_embeddings: true }, tok.vocabSize, { eos: tok.id('<eod>'), pad: tok.id('<pad>') });
  const m = Decoder.init(parseConfig(raw), 3, 0.2);
  await saveModel(m, path.join(d, 'base'), { copyFrom: tokDir, generationConfig: { eos_token_id: tok.stopIds(), pad_token_id: tok.id('<pad>') } });
  m.dispose();
  const prompts = Array.from({ length: 6 }, (_, i) => JSON.stringify({ prompt: `What is ${i} plus 2?`, answer: String(i + 2) }));
  fs.writeFileSync(path.join(d, 'prompts.jsonl'), prompts.join('\n') + '\n');
  // Rewards from the text alone: deterministic, and varied enough across samples.
  fs.writeFileSync(path.join(d, 'scorer.mjs'), 'export default (p, cs) => cs.map((c) => (c.match(/[aeiou]/g) || []).length % 4);\n');
  return { d, base: path.join(d, 'base'), prompts: path.join(d, 'prompts.jsonl'), scorer: `module:${path.join(d, 'scorer.mjs')}` };
}

export function onlineArgs(f: Awaited<ReturnType<typeof onlineFixture>>, workdir: string, extra: string[] = []): string[] {
  return ['online', '--model', f.base, '--prompts', f.prompts, '--scorer', f.scorer, '--rounds', '2', '--samples-per-prompt', '3', '--workdir', workdir, '--max-new-tokens', '6', '--lr', '5e-3', '--batch-size', '2', '--save-steps', '1', '--seed', '7', ...extra];
}
