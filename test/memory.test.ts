import { describe, expect, it } from 'vitest';
import * as tf from '@tensorflow/tfjs-core';
import { Decoder } from '../src/model/decoder.js';
import { makeBatch } from '../src/infer/batch.js';
import { sftLoss } from '../src/stages/sft.js';
import { LoraAdapter, attach } from '../src/lora/lora.js';
import { checkpoint } from '../src/engine/checkpoint.js';
import { Rng } from '../src/util/rng.js';
import { ARCH_SPECS, makeTestModel } from './helpers/models.js';

/*
 * Bounded activations: recomputing layers in the backward pass (checkpointing) and running the
 * LM head in chunks are two formulations of the same function, so they must give the loss and
 * every gradient of the plain pass — bit for bit where the arithmetic is the same, and within
 * float32 summation order where the chunked head splits a product.
 */
function load(spec: (typeof ARCH_SPECS)[string]) {
  const { cfg, w } = makeTestModel(spec, 3, 0.2);
  return Decoder.fromHF(cfg, (n) => w.get(n)!, true);
}

/**
 * Freeze `model` and attach a rank-4 adapter on `targets`. With `bSeed`, B gets random values
 * (PEFT starts it at zero, which would make A's gradient zero and the comparison empty).
 */
function withLora(model: Decoder, targets: string[], dropout: number, bSeed?: number): LoraAdapter {
  model.setTrainable(false);
  const ad = LoraAdapter.create(model, { r: 4, alpha: 8, dropout, targets, useRslora: false }, 5);
  if (bSeed !== undefined) for (const w of ad.weights.values()) w.b.assign(tf.randomNormal(w.b.shape, 0, 0.3, 'float32', bSeed));
  attach(model, ad);
  return ad;
}

function batchFor(vocab: number) {
  const rng = new Rng(7);
  const rows = [9, 6, 11].map((n) => {
    const ids = Array.from({ length: n }, () => 2 + Math.floor(rng.next() * (vocab - 2)));
    return { ids, weights: ids.map((_, t) => (t >= 3 ? 1 : 0)) };
  });
  return makeBatch(rows, 0);
}

/** The SFT loss and its gradients for `vars`, as host arrays. */
function lossAndGrads(model: Decoder, vars: tf.Variable[], sb: ReturnType<typeof makeBatch>, before?: () => void) {
  return tf.tidy(() => {
    before?.();
    const { value, grads } = tf.variableGrads(() => sftLoss(model, sb), vars);
    return { loss: value.dataSync()[0], grads: vars.map((v) => grads[v.name].dataSync()) };
  });
}

function expectClose(a: ArrayLike<number>, b: ArrayLike<number>, tol: number, what: string) {
  expect(a.length, what).toBe(b.length);
  let worst = 0;
  for (let i = 0; i < a.length; i++) worst = Math.max(worst, Math.abs(a[i] - b[i]) / (1 + Math.abs(b[i])));
  expect(worst, what).toBeLessThanOrEqual(tol);
}

describe('activation checkpointing', () => {
  for (const name of ['qwen2 biases tied rope 1e6', 'zhinao fused qkv GQA', 'qwen3 q/k norms, head_dim 12 apart from hidden / heads, tied']) {
    it(`full-model gradients are the same with and without it: ${name}`, () => {
      const model = load(ARCH_SPECS[name]);
      const sb = batchFor(model.cfg.vocab_size);
      const vars = [...model.params.values()];
      const plain = lossAndGrads(model, vars, sb);
      model.checkpointLayers = true;
      const ck = lossAndGrads(model, vars, sb);
      expect(ck.loss).toBe(plain.loss);
      vars.forEach((_, i) => expectClose(ck.grads[i], plain.grads[i], 1e-6, [...model.params.keys()][i]));
      // The gradients are not trivially zero: the comparison has something to compare.
      expect(plain.grads.some((g) => g.some((x) => Math.abs(x) > 1e-4))).toBe(true);
      model.dispose();
    });
  }

  it('LoRA gradients with dropout replay the same masks in the recompute', () => {
    const model = load(ARCH_SPECS['llama GQA untied']);
    const ad = withLora(model, ['q_proj', 'v_proj', 'down_proj'], 0.3, 11);
    const vars = [...ad.params().values()];
    const sb = batchFor(model.cfg.vocab_size);
    const run = () => lossAndGrads(model, vars, sb, () => ad.setTraining(true, new Rng(99)));
    const plain = run();
    model.checkpointLayers = true;
    const ck = run();
    expect(ck.loss).toBe(plain.loss);
    vars.forEach((_, i) => expectClose(ck.grads[i], plain.grads[i], 1e-6, `lora ${i}`));
    // Dropout is live: another stream gives another loss.
    const other = lossAndGrads(model, vars, sb, () => ad.setTraining(true, new Rng(100)));
    expect(other.loss).not.toBe(plain.loss);
    model.dispose();
    ad.dispose();
  });

  it('the outer tape survives a checkpoint inside it and frees every tensor', () => {
    const x = tf.variable(tf.tensor1d([0.5, -1, 2]));
    const before = tf.memory().numTensors;
    const f = (t: tf.Tensor) => tf.mul(tf.sin(t), tf.square(t));
    const g = tf.tidy(() => {
      const { grads } = tf.variableGrads(() => tf.sum(tf.mul(checkpoint(f, tf.exp(x), []), 3)) as tf.Scalar, [x]);
      return grads[x.name].arraySync() as number[];
    });
    // d/dx 3·sin(eˣ)·e²ˣ = 3·(cos(eˣ)·e³ˣ + 2·sin(eˣ)·e²ˣ)
    const want = [0.5, -1, 2].map((v) => 3 * (Math.cos(Math.exp(v)) * Math.exp(3 * v) + 2 * Math.sin(Math.exp(v)) * Math.exp(2 * v)));
    expectClose(g, want, 1e-5, 'chain rule through the recompute');
    expect(tf.memory().numTensors).toBe(before);
    x.dispose();
  });
});

describe('chunked LM head', () => {
  for (const name of ['qwen2 biases tied rope 1e6', 'llama GQA untied']) {
    it(`values and gradients equal the whole head (chunks of 1, 4 and 7 rows): ${name}`, () => {
      const model = load(ARCH_SPECS[name]);
      const sb = batchFor(model.cfg.vocab_size);
      const vars = [...model.params.values()];
      const whole = lossAndGrads(model, vars, sb);
      for (const rows of [1, 4, 7]) {
        model.headChunkBytes = rows * 4 * model.cfg.vocab_size;
        expect(model.headChunkRows()).toBe(rows);
        const ch = lossAndGrads(model, vars, sb);
        expect(Math.abs(ch.loss - whole.loss)).toBeLessThanOrEqual(1e-6 * Math.abs(whole.loss));
        vars.forEach((_, i) => expectClose(ch.grads[i], whole.grads[i], 1e-6, `${rows} rows: ${[...model.params.keys()][i]}`));
      }
      model.dispose();
    });
  }

  it('a frozen head (LoRA) takes its slope from the forward pass: same loss and adapter gradients as the whole head', () => {
    for (const name of ['qwen2 biases tied rope 1e6', 'llama GQA untied']) {
      const model = load(ARCH_SPECS[name]);
      const ad = withLora(model, ['q_proj', 'o_proj', 'up_proj'], 0, 12);
      const vars = [...ad.params().values()];
      const sb = batchFor(model.cfg.vocab_size);
      const whole = lossAndGrads(model, vars, sb);
      for (const rows of [1, 5]) {
        model.headChunkBytes = rows * 4 * model.cfg.vocab_size;
        const ch = lossAndGrads(model, vars, sb);
        expect(Math.abs(ch.loss - whole.loss)).toBeLessThanOrEqual(1e-6 * Math.abs(whole.loss));
        vars.forEach((_, i) => expectClose(ch.grads[i], whole.grads[i], 1e-6, `${name}, ${rows} rows: lora ${i}`));
      }
      expect(whole.grads.some((g) => g.some((x) => Math.abs(x) > 1e-4))).toBe(true);
      model.dispose();
      ad.dispose();
    }
  });
});

describe('memory estimate and the up-front check', () => {
  it('counts parameters and terms by hand for a small config', async () => {
    const { estimateMemory, paramCount, loraParamCount, activationFloats, RUNTIME_BYTES, SLACK, parseBytes } = await import('../src/model/memory.js');
    const { cfg } = makeTestModel(ARCH_SPECS['llama GQA untied']); // D 32, I 72, L 2, H 4, KV 2, hd 8, V 50, untied, no biases
    const perLayer = 32 * 32 + 2 * (32 * 16) + 32 * 32 + 3 * 32 * 72 + 2 * 32;
    expect(paramCount(cfg)).toBe(2 * 50 * 32 + 32 + 2 * perLayer);
    expect(loraParamCount(cfg, { r: 4, targets: ['q_proj', 'down_proj'] })).toBe(2 * (4 * (32 + 32) + 4 * (72 + 32)));
    expect(activationFloats(cfg)).toBe(7 * 32 + 3 * 32 + 4 * 16 + 3 * 72);
    const e = estimateMemory(cfg, { kind: 'lora', rows: 4, len: 10, checkpointing: true, lora: { r: 4, targets: ['q_proj', 'down_proj'] } });
    const N = 40;
    const tensors = {
      weights: 4 * paramCount(cfg),
      training_state: 4 * 3 * loraParamCount(cfg, { r: 4, targets: ['q_proj', 'down_proj'] }),
      activations: 4 * N * 32 * 2 + 2 * 4 * activationFloats(cfg) * N,
      lm_head: 3 * 4 * N * 50,
    };
    const sum = Object.values(tensors).reduce((a, b) => a + b, 0);
    const rest = sum - tensors.weights;
    expect(e.parts).toEqual({ ...tensors, slack: Math.round(SLACK * rest), runtime: RUNTIME_BYTES });
    expect(e.total).toBe(Object.values(e.parts).reduce((a, b) => a + b, 0));
    // Without checkpointing every layer's activations are kept; full SFT adds AdamW's state for every weight.
    expect(estimateMemory(cfg, { kind: 'full', rows: 4, len: 10, gradAccum: 2 }).parts.activations).toBe(2 * 4 * activationFloats(cfg) * N);
    expect(estimateMemory(cfg, { kind: 'full', rows: 4, len: 10, gradAccum: 2 }).parts.training_state).toBe(4 * 4 * paramCount(cfg));
    expect(estimateMemory(cfg, { kind: 'full', rows: 4, len: 10 }).parts.head_grads).toBe(3 * 4 * 50 * 32);
    // A bf16 checkpoint's matrices (every linear, the embedding, the untied head) at 2 bytes when
    // frozen; the norms stay float32, and full SFT trains (so widens) everything.
    const matrices = 2 * 50 * 32 + 2 * (32 * 32 + 2 * (32 * 16) + 32 * 32 + 3 * 32 * 72);
    for (const kind of ['lora', 'logprobs', 'generate'] as const) expect(estimateMemory(cfg, { kind, rows: 4, len: 10, halfWeights: true }).parts.weights, kind).toBe(4 * paramCount(cfg) - 2 * matrices);
    expect(estimateMemory(cfg, { kind: 'full', rows: 4, len: 10, halfWeights: true }).parts.weights).toBe(4 * paramCount(cfg));
    expect([parseBytes('12GiB'), parseBytes('800MB'), parseBytes('1e9'), parseBytes('lots')]).toEqual([12 * 2 ** 30, 800e6, 1e9, null]);
  });

  it('a job too big for the machine stops before loading: the estimate, exit 2, nothing written', async () => {
    const { prefopt } = await import('./helpers/cli.js');
    const { onlineFixture } = await import('./helpers/online-fixture.js');
    const fs = await import('node:fs');
    const path = await import('node:path');
    const f = await onlineFixture();
    const pairs = path.join(f.d, 'big-pairs.jsonl');
    fs.writeFileSync(pairs, JSON.stringify({ prompt_ids: [3, 4, 5], chosen_ids: [6, 7], rejected_ids: [8, 9] }) + '\n');
    const convs = path.join(f.d, 'big-convs.jsonl');
    fs.writeFileSync(convs, JSON.stringify({ conversations: [{ from: 'user', value: 'What is 1 plus 2?' }, { from: 'assistant', value: '3' }] }) + '\n');
    for (const [cmd, data] of [['dpo', pairs], ['sft', convs]] as const) {
      const out = path.join(f.d, `too-big-${cmd}`);
      const r = prefopt([cmd, '--model', f.base, '--data', data, '--out', out], { env: { PREFOPT_MEMORY_LIMIT: '200MB' } });
      expect(r.code, r.stderr).toBe(2);
      expect(r.stderr).toMatch(new RegExp(`${cmd} on .* needs about [\\d.]+ GiB \\(weights [\\d.]+ GiB, .*runtime [\\d.]+ GiB\\), more than the 0\\.19 GiB this machine allows \\(PREFOPT_MEMORY_LIMIT\\)`));
      expect(fs.existsSync(out)).toBe(false);
    }
    const lpRows = path.join(f.d, 'lp.jsonl');
    fs.writeFileSync(lpRows, JSON.stringify({ prompt_ids: [3, 4], completion_ids: [5] }) + '\n');
    const lpOut = path.join(f.d, 'lp-out.jsonl');
    for (const args of [['logprobs', '--model', f.base, '--input', lpRows, '--out', lpOut], ['generate', '--model', f.base, '--prompt', 'hi', '--max-new-tokens', '4'], ['rm', 'train', '--model', f.base, '--data', pairs, '--out', path.join(f.d, 'too-big-rm')]]) {
      const r = prefopt(args, { env: { PREFOPT_MEMORY_LIMIT: '200MB' } });
      expect(r.code, `${args[0]}: ${r.stderr}`).toBe(2);
      expect(r.stderr).toMatch(/needs about [\d.]+ GiB .*more than the 0\.19 GiB this machine allows/);
      expect(r.stdout).toBe('');
    }
    expect(fs.existsSync(lpOut) || fs.existsSync(path.join(f.d, 'too-big-rm'))).toBe(false);
    // Under the limit the same jobs run.
    expect(prefopt(['logprobs', '--model', f.base, '--input', lpRows, '--out', lpOut], { env: { PREFOPT_MEMORY_LIMIT: '4GiB' } }).code).toBe(0);
    const doc = prefopt(['doctor', '--model', f.base, '--json'], { env: { PREFOPT_MEMORY_LIMIT: '200MB' } });
    const rep = JSON.parse(doc.stdout).memory;
    expect(rep.jobs.map((j: any) => j.fits)).toEqual([false, false, false]);
  });
});

describe('memory across steps', () => {
  it('tf.memory() is flat across LoRA training steps with checkpointing, dropout and a chunked head', () => {
    const model = load(ARCH_SPECS['qwen2 biases tied rope 1e6']);
    const ad = withLora(model, ['q_proj', 'v_proj', 'gate_proj', 'down_proj'], 0.1);
    model.checkpointLayers = true;
    model.headChunkBytes = 3 * 4 * model.cfg.vocab_size;
    const vars = [...ad.params().values()];
    const sb = batchFor(model.cfg.vocab_size);
    const seen: [number, number][] = [];
    for (let step = 0; step < 4; step++) {
      tf.tidy(() => {
        ad.setTraining(true, new Rng(step));
        const { value, grads } = tf.variableGrads(() => sftLoss(model, sb), vars);
        for (const v of vars) v.assign(tf.sub(v, tf.mul(grads[v.name], 0.01)));
        value.dispose();
      });
      seen.push([tf.memory().numTensors, tf.memory().numBytes]);
    }
    expect(new Set(seen.map((s) => s.join())).size, JSON.stringify(seen)).toBe(1);
    model.dispose();
    ad.dispose();
  });

  it('a LoRA DPO step on a generated ~110M-parameter checkpoint stays under 1.1 GB peak RSS and under its estimate (child process)', async () => {
    const { prefopt } = await import('./helpers/cli.js');
    const { smallTokenizer } = await import('./helpers/tokenizer.js');
    const { spawnSync } = await import('node:child_process');
    const fs = await import('node:fs');
    const os = await import('node:os');
    const path = await import('node:path');
    const d = fs.mkdtempSync(path.join(os.tmpdir(), 'prefopt-rss-'));
    const { dir: tokDir } = smallTokenizer();
    const cfgFile = path.join(d, 'cfg.json');
    fs.writeFileSync(cfgFile, JSON.stringify({ hidden_size: 768, intermediate_size: 2048, num_hidden_layers: 12, num_attention_heads: 12, num_key_value_heads: 4, max_position_embeddings: 1024, rope_theta: 10000, tie_word_embeddings: true, vocab_size: 32000 }));
    const model = path.join(d, 'm');
    const init = prefopt(['init-model', '--arch', 'qwen2', '--config', cfgFile, '--tokenizer', tokDir, '--out', model, '--json']);
    expect(init.code, init.stderr).toBe(0);
    expect(JSON.parse(init.stderr.trim().split('\n').at(-1)!).params).toBeGreaterThan(100e6);
    const rng = new Rng(3);
    const ids = (n: number) => Array.from({ length: n }, () => 5 + Math.floor(rng.next() * 30000));
    const pairs = path.join(d, 'pairs.jsonl');
    fs.writeFileSync(pairs, Array.from({ length: 4 }, () => JSON.stringify({ prompt_ids: ids(32), chosen_ids: ids(96), rejected_ids: ids(96) })).join('\n') + '\n');
    const args = ['dpo', '--model', model, '--data', pairs, '--out', path.join(d, 'out'), '--batch-size', '2', '--max-steps', '2', '--eval-ratio', '0', '--lora-r', '8', '--lora-targets', 'q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj', '--quiet'];
    const cli = path.resolve('dist/src/cli.js');
    const script = `const { main } = await import(${JSON.stringify(cli)}); const rc = await main(['node', 'prefopt', ...${JSON.stringify(args)}]); process.stdout.write(JSON.stringify({ rc, maxrss: process.resourceUsage().maxRSS * 1024 }));`;
    const r = spawnSync(process.execPath, ['--input-type=module', '-e', script], { encoding: 'utf8', timeout: 300_000 });
    expect(r.status, r.stderr).toBe(0);
    const { rc, maxrss } = JSON.parse(r.stdout);
    expect(rc, r.stderr).toBe(0);
    expect(fs.existsSync(path.join(d, 'out', 'adapter_model.safetensors'))).toBe(true);
    // Measured 0.81 GB here (wasm, native kernels); the estimate the job was checked against
    // must not be below what it used.
    expect(maxrss).toBeLessThan(1.1e9);
    const { estimateMemory } = await import('../src/model/memory.js');
    const { loadConfig } = await import('../src/io/checkpoint.js');
    const est = estimateMemory(loadConfig(model), { kind: 'lora', rows: 4, len: 224, checkpointing: true, lora: { r: 8, targets: ['q_proj', 'k_proj', 'v_proj', 'o_proj', 'gate_proj', 'up_proj', 'down_proj'] } });
    expect(est.total).toBeGreaterThan(maxrss);
    fs.rmSync(d, { recursive: true, force: true });
  }, 600_000);
});
