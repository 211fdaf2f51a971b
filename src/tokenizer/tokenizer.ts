import * as fs from 'node:fs';
import * as path from 'node:path';
import { Tokenizer } from '@huggingface/tokenizers';
import { Template } from '@huggingface/jinja';
import { UserError } from '../util/errors.js';
import { readJson } from '../util/fsutil.js';
import { Message, ROLES, STOP_TOKENS, formatChat } from './chat.js';

/**
 * A checkpoint's tokenizer: `tokenizer.json` + `tokenizer_config.json` through
 * @huggingface/tokenizers, and the chat format — the checkpoint's own `chat_template` when it has
 * one (rendered with @huggingface/jinja), else the built-in Zhinao format.
 */
export class TextTokenizer {
  private tok: Tokenizer;
  private template: Template | null;
  readonly specialIds: Set<number>;

  constructor(
    readonly dir: string,
    json: any,
    readonly config: any,
  ) {
    try {
      this.tok = new Tokenizer(json, config);
    } catch (e: any) {
      throw new UserError(`${path.join(dir, 'tokenizer.json')}: cannot build a tokenizer (${e.message})`);
    }
    const tpl = typeof config.chat_template === 'string' ? config.chat_template : null;
    try {
      this.template = tpl ? new Template(tpl) : null;
    } catch (e: any) {
      throw new UserError(`${path.join(dir, 'tokenizer_config.json')}: chat_template does not parse (${e.message})`);
    }
    this.specialIds = new Set((json.added_tokens ?? []).filter((t: any) => t.special).map((t: any) => t.id));
  }

  static exists(dir: string): boolean {
    return fs.existsSync(path.join(dir, 'tokenizer.json'));
  }

  static load(dir: string): TextTokenizer {
    const f = path.join(dir, 'tokenizer.json');
    if (!fs.existsSync(f)) throw new UserError(`${dir}: no tokenizer.json (pass token-id rows, or a checkpoint with tokenizer files)`);
    const json = readJson(f);
    if (!json?.model) throw new UserError(`${f}: not a tokenizer.json (no "model")`);
    const cf = path.join(dir, 'tokenizer_config.json');
    const config = fs.existsSync(cf) ? readJson(cf) : {};
    return new TextTokenizer(dir, json, config);
  }

  encode(text: string): number[] {
    return this.tok.encode(text, { add_special_tokens: false }).ids;
  }

  decode(ids: number[], skipSpecial = false): string {
    if (ids.length === 0) return ''; // tokenizers.js refuses an empty list
    return this.tok.decode(ids, { skip_special_tokens: skipSpecial, clean_up_tokenization_spaces: false });
  }

  id(token: string): number | undefined {
    return this.tok.token_to_id(token);
  }

  get vocabSize(): number {
    let n = 0;
    for (const id of this.tok.get_vocab().values()) n = Math.max(n, id + 1);
    return n;
  }

  /** Chat text for `messages`, ending with the assistant header when asked. */
  applyChat(messages: Message[], addGenerationPrompt: boolean): string {
    for (const [i, m] of messages.entries()) {
      if (!m || typeof m.content !== 'string' || !ROLES.has(m.role)) {
        throw new UserError(`message ${i}: expected {"role": system|user|assistant, "content": string}, found ${JSON.stringify(m)?.slice(0, 80)}`);
      }
    }
    if (!this.template) return formatChat(messages, addGenerationPrompt);
    return this.template.render({
      messages,
      add_generation_prompt: addGenerationPrompt,
      bos_token: tokenString(this.config.bos_token),
      eos_token: tokenString(this.config.eos_token),
    });
  }

  /** Ids that end generation: the format's stop tokens and the tokenizer's eos. */
  stopIds(): number[] {
    const out = new Set<number>();
    for (const t of [...STOP_TOKENS, tokenString(this.config.eos_token)]) {
      const id = t ? this.id(t) : undefined;
      if (id !== undefined) out.add(id);
    }
    return [...out];
  }
}

function tokenString(t: any): string {
  if (typeof t === 'string') return t;
  if (t && typeof t.content === 'string') return t.content;
  return '';
}
