import * as fs from 'node:fs';
import * as path from 'node:path';
import { Tokenizer } from '@huggingface/tokenizers';
import { Template } from '@huggingface/jinja';
import { UserError } from '../util/errors.js';
import { readJson } from '../util/fsutil.js';
import { Message, ROLES, STOP_TOKENS, ZHINAO_CHAT_TEMPLATE, formatChat } from './chat.js';
import type { ChatRenderer } from '../data/chat-labels.js';

/**
 * A checkpoint's tokenizer: `tokenizer.json` + `tokenizer_config.json` through
 * @huggingface/tokenizers, and the chat format — the checkpoint's own `chat_template` when it has
 * one (rendered with @huggingface/jinja), else the built-in Zhinao format.
 */
export class TextTokenizer implements ChatRenderer {
  private tok: Tokenizer;
  private template: Template | null;
  /** The template with its `{% generation %}` blocks turned into markers (null without such blocks). */
  private generationTemplate: Template | null = null;
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
    const tpl = ownChatTemplate(config);
    try {
      this.template = tpl ? new Template(tpl) : null;
      if (tpl && GENERATION_TAG.test(tpl)) this.generationTemplate = new Template(markGeneration(tpl));
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

  /**
   * True when chats use the built-in Zhinao format: no chat_template, or the one prefopt writes.
   * SFT then keeps the seed's labels (data/conversations); any other template labels by its renders.
   */
  get builtinFormat(): boolean {
    const tpl = ownChatTemplate(this.config);
    return tpl === null || tpl === ZHINAO_CHAT_TEMPLATE;
  }

  /**
   * Chat text for `messages`, ending with the assistant header when asked, and without it when
   * not: a template that appends the generation prompt to every render (Llama 3 base's) would
   * otherwise end each finished conversation with the next turn's header, which SFT labels and
   * pair completions would then train.
   */
  applyChat(messages: Message[], addGenerationPrompt: boolean): string {
    const s = this.renderRaw(messages, addGenerationPrompt);
    const dangling = addGenerationPrompt ? '' : this.danglingPrompt();
    return dangling && s.endsWith(dangling) ? s.slice(0, -dangling.length) : s;
  }

  /** The template's own output, as transformers renders it. */
  private renderRaw(messages: Message[], addGenerationPrompt: boolean): string {
    checkMessages(messages);
    if (!this.template) return formatChat(messages, addGenerationPrompt);
    return this.template.render(this.context(messages, addGenerationPrompt));
  }

  renderGeneration(messages: Message[]): { text: string; spans: [number, number][] } | null {
    if (!this.generationTemplate) return null;
    checkMessages(messages);
    if (messages.some((m) => m.content.includes(GEN_START) || m.content.includes(GEN_END))) {
      throw new UserError('a message holds the control characters U+0002/U+0003, which mark generation blocks');
    }
    const marked = this.generationTemplate.render({ ...this.context(messages, false), [GEN_VARS[0]]: GEN_START, [GEN_VARS[1]]: GEN_END });
    let text = '';
    const spans: [number, number][] = [];
    let open = -1;
    for (const ch of marked) {
      if (ch === GEN_START) open = text.length;
      else if (ch === GEN_END) {
        if (open >= 0 && text.length > open) spans.push([open, text.length]);
        open = -1;
      } else text += ch;
    }
    return { text, spans };
  }

  /** The variables transformers gives a chat template. */
  private context(messages: Message[], addGenerationPrompt: boolean): Record<string, unknown> {
    return {
      messages,
      add_generation_prompt: addGenerationPrompt,
      bos_token: tokenString(this.config.bos_token),
      eos_token: tokenString(this.config.eos_token),
    };
  }

  /**
   * What the template writes after an assistant's text, split at the special token that closes
   * the turn (<|im_end|>, <|eot_id|>, <end_of_turn>): that token's id and the text after it.
   * Null when a probe exchange does not render or no special token follows the text.
   */
  private turnEnd(): { id: number; after: string } | null {
    if (this.turnEndCache !== undefined) return this.turnEndCache;
    const probe = 'prefopt-probe-7f3a';
    let found: { id: number; after: string } | null = null;
    try {
      const text = this.renderRaw([{ role: 'user', content: 'x' }, { role: 'assistant', content: probe }], false);
      const at = text.lastIndexOf(probe);
      const tail = at < 0 ? '' : text.slice(at + probe.length);
      const ids = this.encode(tail);
      if (ids.length && this.specialIds.has(ids[0])) {
        const s = this.decode([ids[0]]);
        found = { id: ids[0], after: tail.startsWith(s) ? tail.slice(s.length) : '' };
      }
    } catch {
      found = null;
    }
    return (this.turnEndCache = found);
  }
  private turnEndCache: { id: number; after: string } | null | undefined;

  /** The special token that closes an assistant turn in this template, if any. */
  endOfTurnIds(): number[] {
    const e = this.turnEnd();
    return e ? [e.id] : [];
  }

  /**
   * The generation prompt the template appends to every render, add_generation_prompt or not:
   * what follows the end-of-turn token when a render without the flag equals one with it. ''
   * for templates that honour the flag.
   */
  private danglingPrompt(): string {
    if (this.danglingCache !== undefined) return this.danglingCache;
    const e = this.turnEnd();
    let found = '';
    if (e?.after) {
      try {
        const user = [{ role: 'user', content: 'x' }];
        const withGen = this.renderRaw(user, true);
        if (withGen === this.renderRaw(user, false) && withGen.endsWith(e.after)) found = e.after;
      } catch {
        found = '';
      }
    }
    return (this.danglingCache = found);
  }
  private danglingCache: string | undefined;

  /** Ids that end generation: the format's stop tokens, the tokenizer's eos and the template's end of turn. */
  stopIds(): number[] {
    const out = new Set<number>();
    for (const t of [...STOP_TOKENS, tokenString(this.config.eos_token)]) {
      const id = t ? this.id(t) : undefined;
      if (id !== undefined) out.add(id);
    }
    for (const id of this.endOfTurnIds()) out.add(id);
    return [...out];
  }
}

function checkMessages(messages: Message[]): void {
  for (const [i, m] of messages.entries()) {
    if (!m || typeof m.content !== 'string' || !ROLES.has(m.role)) {
      throw new UserError(`message ${i}: expected {"role": system|user|assistant, "content": string}, found ${JSON.stringify(m)?.slice(0, 80)}`);
    }
  }
}

const GENERATION_TAG = /{%-?\s*generation\s*-?%}/;
const GEN_START = '\u0002';
const GEN_END = '\u0003';
const GEN_VARS = ['__prefopt_generation_start', '__prefopt_generation_end'];

/**
 * `{% generation %}…{% endgeneration %}` (TRL's assistant-only loss) as expressions that print
 * markers. The tags' own whitespace control, and the lstrip_blocks / trim_blocks that
 * transformers renders with, move onto the expressions, which those options do not touch.
 */
export function markGeneration(src: string): string {
  return src.replace(/^([ \t]*)(?={%-?\s*(?:end)?generation\s*-?%})|{%(-?)\s*(end)?generation\s*(-?)%}(\n?)/gm, (m, indent, l, end, r) => {
    if (indent !== undefined) return ''; // lstrip_blocks
    const v = end ? GEN_VARS[1] : GEN_VARS[0];
    return `{{${l} ${v} ${r}}}`; // trim_blocks drops the newline after a block tag
  });
}

/** A tokenizer_config.json's own chat template (a string), or null: chats then use the built-in format. */
export function ownChatTemplate(config: any): string | null {
  return typeof config.chat_template === 'string' ? config.chat_template : null;
}

/** A special token as tokenizer_config.json writes it, a string or {content}; '' when absent. */
export function tokenString(t: any): string {
  if (typeof t === 'string') return t;
  if (t && typeof t.content === 'string') return t.content;
  return '';
}
