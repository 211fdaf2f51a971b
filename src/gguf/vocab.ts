import * as fs from 'node:fs';
import * as path from 'node:path';
import { ModelConfig } from '../model/config.js';
import { SPLIT_PATTERN, SPLIT_PATTERN_GROUPED_DIGITS } from '../tokenizer/bpe.js';
import { ZHINAO_CHAT_TEMPLATE } from '../tokenizer/chat.js';
import { ownChatTemplate, tokenString } from '../tokenizer/tokenizer.js';
import { UserError } from '../util/errors.js';
import { readJson } from '../util/fsutil.js';
import { MetaValue, bool, str, u32 } from './format.js';

/**
 * A checkpoint's tokenizer as llama.cpp's `gpt2` (byte-level BPE) vocabulary
 * (docs/REFERENCE.md §12): every id's token text and type, the merges, the special ids, and the
 * name of the pre-tokenizer, which llama.cpp knows by name rather than by its regex.
 */

/** llama.cpp's token types. */
export const TOKEN_TYPE = { NORMAL: 1, CONTROL: 3, USER_DEFINED: 4, UNUSED: 5 } as const;

const CONTRACTIONS_HF = "(?i:'s|'t|'re|'ve|'m|'ll|'d)";
const CONTRACTIONS_JS = "(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])";
/** What prefopt's trainer wrote before it took llama.cpp's spelling: differs on mixed-case contractions ("'lL") only. */
const CONTRACTIONS_OLD = "'(?:[sdmtSDMT]|ll|ve|re|LL|VE|RE)";
const GPT2 = "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+";

/**
 * Pre-tokenizers llama.cpp knows by name and the tokenizer.json settings that split text the
 * same way: the split regex (Hugging Face's (?i:) spelling or the spelled-out one JS needs) and
 * whether BPE first looks the whole piece up in the vocabulary (`ignore_merges`, Llama 3's).
 * `dbrx` is Llama 3's regex without that lookup, which is what prefopt's grouped-digit tokenizers
 * (`make-data`) are.
 */
export const PRE_TOKENIZERS: { regex: string; ignoreMerges: boolean; name: string }[] = [
  ...[CONTRACTIONS_HF, CONTRACTIONS_JS].flatMap((c) => [
    { regex: SPLIT_PATTERN_GROUPED_DIGITS.replace(CONTRACTIONS_JS, c), ignoreMerges: true, name: 'llama-bpe' },
    { regex: SPLIT_PATTERN_GROUPED_DIGITS.replace(CONTRACTIONS_JS, c), ignoreMerges: false, name: 'dbrx' },
  ]),
  ...[CONTRACTIONS_HF, CONTRACTIONS_JS, CONTRACTIONS_OLD].map((c) => ({ regex: SPLIT_PATTERN.replace(CONTRACTIONS_JS, c), ignoreMerges: false, name: 'qwen2' })),
  { regex: GPT2, ignoreMerges: false, name: 'gpt-2' },
];

/** The regex of a byte-level BPE tokenizer.json's pre-tokenizer, or a reason it has none. */
function splitRegex(pre: any): string | null {
  const parts: any[] = pre?.type === 'Sequence' ? pre.pretokenizers : pre ? [pre] : [];
  const split = parts.find((p) => p?.type === 'Split');
  if (split) return split.pattern?.Regex ?? null;
  const bl = parts.find((p) => p?.type === 'ByteLevel');
  // A lone ByteLevel with use_regex splits with GPT-2's pattern.
  return bl && bl.use_regex !== false ? GPT2 : null;
}

/** Tokens transformers' converter treats as control tokens even when not marked special. */
function looksSpecial(t: string): boolean {
  return ['<pad>', '<mask>'].includes(t) || (t.startsWith('<|') && t.endsWith('|>')) || (t.startsWith('<unused') && t.endsWith('>'));
}

export interface VocabOptions {
  /** Overrides the pre-tokenizer name found from the regex. */
  pre?: string;
}

export function tokenizerMetadata(dir: string, cfg: ModelConfig, opts: VocabOptions = {}): [string, MetaValue][] {
  const file = path.join(dir, 'tokenizer.json');
  if (!fs.existsSync(file)) throw new UserError(`${dir}: no tokenizer.json; a GGUF file carries its tokenizer, so the checkpoint needs one`);
  const json = readJson(file);
  const cfgFile = path.join(dir, 'tokenizer_config.json');
  const tcfg = fs.existsSync(cfgFile) ? readJson(cfgFile) : {};
  const model = json?.model;
  if (model?.type !== 'BPE') throw new UserError(`${file}: model type ${JSON.stringify(model?.type)} is not supported for GGUF export (byte-level BPE only)`);
  const regex = splitRegex(json.pre_tokenizer);
  const ignoreMerges = model.ignore_merges === true;
  const pre = opts.pre ?? PRE_TOKENIZERS.find((p) => p.regex === regex && p.ignoreMerges === ignoreMerges)?.name;
  if (!pre) {
    throw new UserError(
      `${file}: pre-tokenizer ${JSON.stringify(regex ?? json.pre_tokenizer?.type)}${ignoreMerges ? ' with ignore_merges' : ''} matches none llama.cpp knows by name ` +
        `(${[...new Set(PRE_TOKENIZERS.map((p) => p.name))].join(', ')}); pass --tokenizer-pre NAME if you know its llama.cpp name`,
    );
  }

  const V = cfg.vocab_size;
  const tokens: (string | undefined)[] = new Array(V);
  const types = new Int32Array(V).fill(TOKEN_TYPE.UNUSED);
  const place = (t: string, id: number, type: number) => {
    if (!Number.isInteger(id) || id < 0 || id >= V) throw new UserError(`${file}: token ${JSON.stringify(t)} has id ${id}, outside the model's vocab_size ${V}`);
    tokens[id] = t;
    types[id] = type;
  };
  for (const [t, id] of Object.entries<number>(model.vocab ?? {})) place(t, id, TOKEN_TYPE.NORMAL);
  for (const a of json.added_tokens ?? []) place(a.content, a.id, a.special || looksSpecial(a.content) ? TOKEN_TYPE.CONTROL : TOKEN_TYPE.USER_DEFINED);
  const filled = Array.from(tokens, (t, i) => t ?? `[PAD${i}]`);
  const merges = (model.merges ?? []).map((m: any) => (Array.isArray(m) ? m.join(' ') : String(m)));

  const idOf = (v: any): number | null => {
    const t = tokenString(v);
    if (!t) return null;
    const i = filled.indexOf(t);
    return i >= 0 ? i : null;
  };
  const firstId = (x: any): number | null => (Array.isArray(x) ? x[0] ?? null : typeof x === 'number' ? x : null);
  const special: [string, number | null][] = [
    ['bos', idOf(tcfg.bos_token) ?? firstId(cfg.bos_token_id)],
    ['eos', idOf(tcfg.eos_token) ?? firstId(cfg.eos_token_id)],
    ['padding', idOf(tcfg.pad_token) ?? firstId(cfg.pad_token_id)],
  ];
  const meta: [string, MetaValue][] = [
    ['tokenizer.ggml.model', str('gpt2')],
    ['tokenizer.ggml.pre', str(pre)],
    ['tokenizer.ggml.tokens', { type: 'string[]', value: filled }],
    ['tokenizer.ggml.token_type', { type: 'i32[]', value: types }],
    ['tokenizer.ggml.merges', { type: 'string[]', value: merges }],
  ];
  for (const [k, id] of special) if (id !== null) meta.push([`tokenizer.ggml.${k}_token_id`, u32(id)]);
  const addBos = addsBos(json, tcfg);
  if (addBos !== null) meta.push(['tokenizer.ggml.add_bos_token', bool(addBos)]);
  // The template prefopt renders chats with, so llama.cpp's prompts are prefopt's.
  meta.push(['tokenizer.chat_template', str(ownChatTemplate(tcfg) ?? ZHINAO_CHAT_TEMPLATE)]);
  return meta;
}

/** add_bos_token as transformers decides it: the config's flag, else the post-processor's template. */
function addsBos(json: any, tcfg: any): boolean | null {
  if (typeof tcfg.add_bos_token === 'boolean') return tcfg.add_bos_token;
  const posts: any[] = json.post_processor?.type === 'Sequence' ? json.post_processor.processors : [json.post_processor];
  const tp = posts.find((p) => p?.type === 'TemplateProcessing');
  if (!tp) return null;
  return !!tp.single?.[0]?.SpecialToken;
}
