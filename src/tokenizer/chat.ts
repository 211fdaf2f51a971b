/**
 * The 360Zhinao chat format (docs/REFERENCE.md §4), ChatML-like. This is the one place the format's
 * strings are spelled out; the same text is also written as a Jinja `chat_template` so that
 * transformers' apply_chat_template produces identical prompts.
 */
export interface Message {
  role: string;
  content: string;
}

export const IM_START = '<|im_start|>';
export const IM_END = '<|im_end|>';
export const EOD = '<eod>';
export const PAD = '<pad>';
export const DEFAULT_SYSTEM = 'You are a helpful assistant.';
export const ROLES = new Set(['system', 'user', 'assistant']);
export const STOP_TOKENS = [IM_END, IM_START, EOD];

export function withDefaultSystem(messages: Message[]): Message[] {
  return messages.length && messages[0].role === 'system' ? messages : [{ role: 'system', content: DEFAULT_SYSTEM }, ...messages];
}

export function formatTurn(m: Message): string {
  return `${IM_START}${m.role}\n${m.content}${IM_END}\n`;
}

export function formatChat(messages: Message[], addGenerationPrompt: boolean): string {
  let s = withDefaultSystem(messages).map(formatTurn).join('');
  if (addGenerationPrompt) s += `${IM_START}assistant\n`;
  return s;
}

export const ZHINAO_CHAT_TEMPLATE =
  "{%- if not messages or messages[0]['role'] != 'system' %}{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{%- endif %}" +
  "{%- for message in messages %}{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}{%- endfor %}" +
  "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}";
