import * as fs from 'node:fs';
import * as path from 'node:path';
import { EOD, IM_END, IM_START, PAD, ZHINAO_CHAT_TEMPLATE } from './chat.js';

/**
 * The files of a tokenizer prefopt trains: tokenizer.json as given, and a tokenizer_config.json
 * that carries the built-in chat format as its chat_template, so transformers renders the same
 * prompts.
 */
export const SPECIAL_TOKENS = [EOD, PAD, IM_START, IM_END];

export function writeTokenizerFiles(dir: string, json: any): void {
  fs.writeFileSync(path.join(dir, 'tokenizer.json'), JSON.stringify(json));
  const config = {
    tokenizer_class: 'PreTrainedTokenizerFast',
    bos_token: null,
    eos_token: EOD,
    pad_token: PAD,
    unk_token: null,
    additional_special_tokens: [IM_START, IM_END],
    model_max_length: 4096,
    clean_up_tokenization_spaces: false,
    chat_template: ZHINAO_CHAT_TEMPLATE,
  };
  fs.writeFileSync(path.join(dir, 'tokenizer_config.json'), JSON.stringify(config, null, 2) + '\n');
  fs.writeFileSync(path.join(dir, 'special_tokens_map.json'), JSON.stringify({ eos_token: EOD, pad_token: PAD, additional_special_tokens: [IM_START, IM_END] }, null, 2) + '\n');
}
