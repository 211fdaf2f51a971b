import * as tf from '@tensorflow/tfjs-core';
import { Decoder } from '../src/model/decoder.js';
import { ARCH_CLASS, parseConfig } from '../src/model/config.js';
import { mm } from '../src/engine/ops.js';
import { SeqBatch, makeBatch, promptCompletionRow } from '../src/infer/batch.js';
import { Policy, needTokenizer, openPolicy } from '../src/model/policy.js';
import { completionText, encodePair, promptText } from '../src/data/encode.js';
import { UserError } from '../src/util/errors.js';
import { Rng } from '../src/util/rng.js';
import { Prompt, Scorer } from './scorer.js';
import { filesHash } from '../src/dpo/logps.js';
import { weightFiles } from '../src/stages/dpo.js';

/**
 * Bradley–Terry reward model: the decoder backbone plus a scalar head read at the last
 * non-padding token, saved like transformers' `…ForSequenceClassification` (`score.weight`
 * [1, hidden], `num_labels: 1`) so both sides load it.
 */
export function toRewardConfig(raw: Record<string, any>): Record<string, any> {
  const cfg = parseConfig(raw);
  const out: Record<string, any> = { ...raw, architectures: [ARCH_CLASS[cfg.arch].replace('ForCausalLM', 'ForSequenceClassification')], num_labels: 1, id2label: { 0: 'LABEL_0' }, label2id: { LABEL_0: 0 } };
  return out;
}

/** A causal LM turned into a reward model: lm_head dropped, a fresh score head N(0, 0.02). */
export function rewardModelFrom(lm: Decoder, seed: number): Decoder {
  if (lm.cfg.head === 'score') return lm;
  const cfg = parseConfig(toRewardConfig(lm.cfg.raw));
  const params = new Map(lm.params);
  const half = new Map(lm.half);
  const head = params.get('lm_head.weight');
  if (head) {
    head.dispose();
    params.delete('lm_head.weight');
  }
  half.delete('lm_head.weight');
  const rng = new Rng(seed, 'score-head');
  const w = tf.tensor2d(Float32Array.from({ length: cfg.hidden_size }, () => rng.normal() * 0.02), [cfg.hidden_size, 1]);
  params.set('score.weight', tf.variable(w, true));
  w.dispose();
  return new Decoder(cfg, params, half);
}

/** Rewards [B] at each row's last real token. */
export function rewards(model: Decoder, sb: SeqBatch): tf.Tensor1D {
  const { batch: B, len: T } = sb;
  const pick = new Float32Array(B * T);
  for (let b = 0; b < B; b++) {
    let last = 0;
    for (let t = 0; t < T; t++) if (sb.valid![b * T + t]) last = t;
    pick[b * T + last] = 1;
  }
  const h = model.hidden(sb);
  const hl = tf.sum(tf.mul(h, tf.tensor3d(pick, [B, T, 1])), 1) as tf.Tensor2D; // [B, D]
  return tf.reshape(mm(hl, model.p('score.weight') as unknown as tf.Tensor2D), [B]) as tf.Tensor1D;
}

/** `model:DIR` — score (prompt, completion) texts with a trained reward model. */
export class BtScorer implements Scorer {
  readonly name: string;
  readonly version: string;
  private policy: Policy;

  constructor(
    readonly dir: string,
    private batchSize = 16,
  ) {
    this.policy = openPolicy(dir);
    if (this.policy.model.cfg.head !== 'score') throw new UserError(`${dir}: not a reward model (config.json architectures must be …ForSequenceClassification)`);
    needTokenizer(this.policy, 'scoring text');
    this.name = `model:${dir}`;
    this.version = filesHash(weightFiles(dir)).slice(0, 16);
  }

  async score(prompt: Prompt, completions: string[]): Promise<number[]> {
    const tok = this.policy.tok!;
    const pt = promptText(tok, prompt, this.name);
    const ctx = this.policy.model.cfg.max_position_embeddings;
    const rows = completions.map((c) => {
      const ct = completionText(tok, prompt, Array.isArray(prompt) ? [{ role: 'assistant', content: c }] : c, this.name, 'completion');
      const { prompt: p, completion } = encodePair(tok, pt, ct);
      const ids = [...p, ...completion].slice(-ctx);
      return { ids, weights: ids.map(() => 0) };
    });
    return this.scoreIds(rows.map((r) => r.ids));
  }

  scoreIds(seqs: number[][]): number[] {
    const out: number[] = [];
    for (let i = 0; i < seqs.length; i += this.batchSize) {
      const sb = makeBatch(seqs.slice(i, i + this.batchSize).map((ids) => promptCompletionRow(ids, [])), this.policy.padId);
      const r = tf.tidy(() => rewards(this.policy.model, sb));
      out.push(...Array.from(r.dataSync()));
      r.dispose();
    }
    return out;
  }

  close(): void {
    this.policy.model.dispose();
  }
}
