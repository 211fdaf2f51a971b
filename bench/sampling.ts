/**
 * Turning a row of logits into a token on the host (infer/sampling: temperature, top-k, top-p,
 * the draw), at Qwen2's vocabulary of 151,936, side by side with transformers' warpers in PyTorch
 * on the same rows (bench/sampling_ref.py): each a decoding step's host work per sequence on any
 * backend. LM-like rows: a Gaussian body (σ 2) and a few likely tokens. The fastest of 5 passes
 * over the rows; appended to bench/RESULTS.md.
 */
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { spawnSync } from 'node:child_process';
import { DEFAULT_SAMPLING, sampleToken } from '../src/infer/sampling.js';
import { Rng } from '../src/util/rng.js';
import { packageRoot } from '../src/util/package-root.js';

const V = 151_936;
const ROWS = 8;
const rng = new Rng(3);
const rows = Array.from({ length: ROWS }, (_, r) => Float32Array.from({ length: V }, (_, i) => rng.normal() * 2 + (i % 9973 === 5 + r ? 12 : 0)));
// Qwen's generation_config (top_k 20, top_p 0.8, temperature 0.7) among them.
const SETTINGS: [string, number, number, number][] = [
  ['temperature 1', 1, 0, 1],
  ['top_p 0.95, T 0.7', 0.7, 0, 0.95],
  ['top_k 20, top_p 0.8, T 0.7', 0.7, 20, 0.8],
  ['top_k 50', 1, 50, 1],
];

const file = path.join(fs.mkdtempSync(path.join(os.tmpdir(), 'prefopt-sampling-')), 'rows.f32');
fs.writeFileSync(file, Buffer.concat(rows.map((r) => Buffer.from(r.buffer))));
const r = spawnSync('/usr/bin/python3', [path.join(packageRoot(), 'bench', 'sampling_ref.py'), file, String(V), JSON.stringify(SETTINGS)], { encoding: 'utf8' });
fs.rmSync(path.dirname(file), { recursive: true });
const torch = r.status === 0 ? r.stdout.trim().split('\n').map((l) => JSON.parse(l)) : null;
if (!torch) process.stderr.write(`PyTorch reference skipped: ${(r.stderr || String(r.error ?? '')).trim().split('\n').at(-1)}\n`);

const draw = new Rng(0);
const lines = [
  '',
  `## ${new Date().toISOString()} — sampling a token from 151,936 logits (host)`,
  '',
  `Machine: ${os.cpus()[0]?.model.trim() ?? 'unknown'} x${os.cpus().length}, node ${process.version}${torch ? `, PyTorch ${torch[0].torch} (${torch[0].blas})` : ''}. ${ROWS} LM-like rows (a Gaussian body, σ 2, and one likely token each); per row, the fastest of 5 passes. PyTorch: transformers' warpers (TopK's k-th value as a floor, TopP's sort of the whole vocabulary) and torch.multinomial.`,
  '',
  '| setting | prefopt ms/row | PyTorch ms/row | ratio (PyTorch / prefopt) |',
  '|---|---|---|---|',
];
SETTINGS.forEach(([name, temperature, topK, topP], i) => {
  const p = { ...DEFAULT_SAMPLING, temperature, topK, topP };
  let best = Infinity;
  for (let pass = 0; pass < 6; pass++) {
    const t0 = performance.now();
    for (const row of rows) sampleToken(row, p, draw);
    if (pass > 0) best = Math.min(best, (performance.now() - t0) / ROWS); // the first pass warms up
  }
  const ref = torch?.[i]?.ms_per_row;
  lines.push(`| ${name} | ${best.toFixed(2)} | ${ref === undefined ? '—' : ref.toFixed(2)} | ${ref === undefined ? '—' : (ref / best).toFixed(2)} |`);
});
fs.appendFileSync(path.join(packageRoot(), 'bench', 'RESULTS.md'), lines.join('\n') + '\n');
process.stdout.write(lines.join('\n') + '\n');
