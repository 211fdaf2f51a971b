/**
 * A deterministic byte-level BPE trainer, so the embedded default can make its own tokenizer.
 * The output is a standard `tokenizer.json` (BPE model, Qwen2-style split regex with single
 * digits, ByteLevel mapping) that Hugging Face tokenizers — Rust, Python and JS — load as is.
 */

/** GPT-2's reversible byte → printable-character map. */
export function bytesToUnicode(): string[] {
  const bs: number[] = [];
  for (let i = 33; i <= 126; i++) bs.push(i);
  for (let i = 161; i <= 172; i++) bs.push(i);
  for (let i = 174; i <= 255; i++) bs.push(i);
  const cs = [...bs];
  let n = 0;
  for (let b = 0; b < 256; b++) {
    if (!bs.includes(b)) {
      bs.push(b);
      cs.push(256 + n++);
    }
  }
  const out = new Array<string>(256);
  bs.forEach((b, i) => (out[b] = String.fromCodePoint(cs[i])));
  return out;
}

/**
 * Qwen2's split pattern as llama.cpp spells it (its `qwen2` pre-tokenizer): the (?i:) group of
 * the tokenizer.json original is written out per letter, since JS regexes lack it on Node 20.
 * Tokenizers prefopt trains carry exactly this string, so a GGUF export names it exactly
 * (docs/REFERENCE.md §12).
 */
export const SPLIT_PATTERN = "(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+";

/** The same with up to three digits kept together (Llama 3's grouping), so frequent numbers become single tokens. */
export const SPLIT_PATTERN_GROUPED_DIGITS = SPLIT_PATTERN.replace('|\\p{N}|', '|\\p{N}{1,3}|');

export interface BpeTrainOptions {
  vocabSize: number;
  specialTokens: string[];
  minFrequency?: number;
  /** 'single' (Qwen2-style, the default) or 'grouped' digits. */
  digits?: 'single' | 'grouped';
}

export function pretokenize(text: string, pattern = SPLIT_PATTERN): string[] {
  return text.match(new RegExp(pattern, 'gu')) ?? [];
}

/**
 * Classic BPE: repeatedly merge the most frequent adjacent pair, ties broken by the pair's text
 * so the result never depends on iteration order.
 */
export function trainBpe(texts: string[], opts: BpeTrainOptions): Record<string, any> {
  const b2u = bytesToUnicode();
  const enc = new TextEncoder();
  const pattern = opts.digits === 'grouped' ? SPLIT_PATTERN_GROUPED_DIGITS : SPLIT_PATTERN;
  const wordCounts = new Map<string, number>();
  // Special tokens are matched whole at encode time: keep their text out of the merges.
  const specials = opts.specialTokens.map((t) => t.replace(/[.*+?^${}()|[\]\\]/g, '\\$&'));
  const splitter = specials.length ? new RegExp(specials.join('|'), 'g') : null;
  for (const t of texts) {
    for (const piece of splitter ? t.split(splitter) : [t]) for (const w of pretokenize(piece, pattern)) wordCounts.set(w, (wordCounts.get(w) ?? 0) + 1);
  }
  const words: { syms: string[]; n: number }[] = [...wordCounts.entries()]
    .sort((a, b) => (a[0] < b[0] ? -1 : 1))
    .map(([w, n]) => ({ syms: Array.from(enc.encode(w), (b) => b2u[b]), n }));
  const vocab: Record<string, number> = {};
  for (let b = 0; b < 256; b++) vocab[b2u[b]] = b;
  const merges: string[] = [];
  const target = opts.vocabSize - opts.specialTokens.length;
  const minFreq = opts.minFrequency ?? 2;
  while (Object.keys(vocab).length < target) {
    const counts = new Map<string, number>();
    for (const w of words) {
      for (let i = 0; i + 1 < w.syms.length; i++) {
        const k = w.syms[i] + ' ' + w.syms[i + 1];
        counts.set(k, (counts.get(k) ?? 0) + w.n);
      }
    }
    let best = '';
    let bestN = 0;
    for (const [k, n] of counts) if (n > bestN || (n === bestN && k < best)) [best, bestN] = [k, n];
    if (bestN < minFreq) break;
    const [a, b] = best.split(' ');
    const merged = a + b;
    merges.push(best);
    if (!(merged in vocab)) vocab[merged] = Object.keys(vocab).length;
    for (const w of words) {
      const s = w.syms;
      const out: string[] = [];
      for (let i = 0; i < s.length; i++) {
        if (i + 1 < s.length && s[i] === a && s[i + 1] === b) {
          out.push(merged);
          i++;
        } else out.push(s[i]);
      }
      w.syms = out;
    }
  }
  const addedTokens = opts.specialTokens.map((content, i) => ({
    id: Object.keys(vocab).length + i,
    content,
    single_word: false,
    lstrip: false,
    rstrip: false,
    normalized: false,
    special: true,
  }));
  const byteLevel = { type: 'ByteLevel', add_prefix_space: false, trim_offsets: false, use_regex: false };
  return {
    version: '1.0',
    truncation: null,
    padding: null,
    added_tokens: addedTokens,
    normalizer: null,
    pre_tokenizer: {
      type: 'Sequence',
      pretokenizers: [{ type: 'Split', pattern: { Regex: pattern }, behavior: 'Isolated', invert: false }, byteLevel],
    },
    post_processor: byteLevel,
    decoder: byteLevel,
    model: {
      type: 'BPE',
      dropout: null,
      unk_token: null,
      continuing_subword_prefix: '',
      end_of_word_suffix: '',
      fuse_unk: false,
      byte_fallback: false,
      ignore_merges: false,
      vocab,
      merges,
    },
  };
}
