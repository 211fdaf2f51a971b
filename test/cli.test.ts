import { describe, expect, it } from 'vitest';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { prefopt } from './helpers/cli.js';

describe('prefopt CLI: foundation commands', () => {
  const d = fs.mkdtempSync(path.join(os.tmpdir(), 'prefopt-cli-'));
  const data = path.join(d, 'text.jsonl');
  fs.writeFileSync(data, Array.from({ length: 40 }, (_, i) => JSON.stringify({ text: `What is ${i} plus ${i + 1}? 答案是 ${2 * i + 1}。` })).join('\n'));

  it('doctor names the backend and why the others were skipped', () => {
    const r = prefopt(['--json', 'doctor']);
    expect(r.code).toBe(0);
    const rep = JSON.parse(r.stdout);
    expect(['tensorflow-gpu', 'tensorflow', 'wasm', 'native', 'cpu']).toContain(rep.backend);
    expect(rep.tried.at(-1).ok).toBe(true);
    // The GPU state is said as it is: no NVIDIA driver on this machine, no tfjs-node-gpu loaded.
    const driver = fs.existsSync('/proc/driver/nvidia/version');
    expect(rep.gpu.nvidia_driver === null).toBe(!driver);
    if (rep.backend !== 'tensorflow-gpu') expect(rep.gpu.status).toMatch(/^no GPU path: tfjs-node-gpu needs CUDA 11\.2/);
    const cpu = prefopt(['--json', 'doctor'], { env: { PREFOPT_BACKEND: 'cpu' } });
    expect(JSON.parse(cpu.stdout).backend).toBe('cpu');
    const bad = prefopt(['--backend', 'tpu', 'doctor']);
    expect(bad.code).toBe(2);
    expect(bad.stderr).toMatch(/unknown backend "tpu"/);
  });

  it('trains a tokenizer, initialises each architecture, scores and samples', () => {
    expect(prefopt(['train-tokenizer', '--data', data, '--vocab-size', '300', '--out', path.join(d, 'tok')]).code).toBe(0);
    for (const arch of ['llama', 'qwen2', 'qwen3', 'zhinao']) {
      const out = path.join(d, arch);
      const r = prefopt(['init-model', '--arch', arch, '--preset', 'tiny', '--tokenizer', path.join(d, 'tok'), '--out', out, '--seed', '3']);
      expect(r.code, r.stderr).toBe(0);
      const cfg = JSON.parse(fs.readFileSync(path.join(out, 'config.json'), 'utf8'));
      expect(cfg.model_type).toBe(arch);
      expect(fs.existsSync(path.join(out, 'tokenizer.json'))).toBe(true);
    }
    const rows = path.join(d, 'rows.jsonl');
    fs.writeFileSync(rows, [JSON.stringify({ prompt_ids: [1, 2, 3], completion_ids: [4, 5] }), JSON.stringify({ prompt: [{ role: 'user', content: 'What is 1 plus 2?' }], completion: '答案是 3。' })].join('\n'));
    const lp = prefopt(['logprobs', '--model', path.join(d, 'zhinao'), '--input', rows]);
    expect(lp.code, lp.stderr).toBe(0);
    const lines = lp.stdout.trim().split('\n').map((l) => JSON.parse(l));
    expect(lines).toHaveLength(2);
    expect(lines[0].n_tokens).toBe(2);
    expect(lines[0].logp).toBeCloseTo(lines[0].token_logps[0] + lines[0].token_logps[1], 5);
    const g1 = prefopt(['--json', 'generate', '--model', path.join(d, 'llama'), '--prompt', 'What is 2 plus 2?', '--n', '2', '--max-new-tokens', '8', '--seed', '5']);
    const g2 = prefopt(['--json', 'generate', '--model', path.join(d, 'llama'), '--prompt', 'What is 2 plus 2?', '--n', '2', '--max-new-tokens', '8', '--seed', '5']);
    expect(g1.code, g1.stderr).toBe(0);
    expect(g1.stdout).toBe(g2.stdout);
    expect(JSON.parse(g1.stdout).samples).toHaveLength(2);
  });

  it('bad rows name the file and line and exit non-zero without output', () => {
    const rows = path.join(d, 'bad.jsonl');
    const out = path.join(d, 'lp-out.jsonl');
    fs.writeFileSync(rows, '{"prompt_ids":[1],"completion_ids":[2]}\n{"prompt_ids":[1],"completion_ids":[99999]}\n');
    const r = prefopt(['logprobs', '--model', path.join(d, 'zhinao'), '--input', rows, '--out', out]);
    expect(r.code).toBe(2);
    expect(r.stderr).toContain(`${rows}:2: "completion_ids" holds token id 99999`);
    expect(fs.existsSync(out)).toBe(false);
    fs.writeFileSync(rows, '{"prompt_ids":[1],"completion_ids":[2]}\nnot json\n');
    expect(prefopt(['logprobs', '--model', path.join(d, 'zhinao'), '--input', rows]).stderr).toContain(`${rows}:2: invalid JSON`);
  });
});
