/**
 * The host's share of a GPU training step, side by side with PyTorch's, on a machine without a
 * GPU: the 0.5B LoRA DPO step of bench/cuda-check.ts (4 pairs × 256 tokens, r 16 on every linear,
 * dropout 0.05, reference cached) issued to prefopt's dry cuda device (PREFOPT_CUDA_DEVICE=dry:
 * every kernel, product and copy issued, none run) and PyTorch's on its meta device (every op
 * dispatched and shaped, none computed; bench/torch_ref.py). Neither pays a driver's launch cost.
 * A GPU step cannot take less than its host's time, so at these sizes, where kernels are short,
 * this ratio bounds how far prefopt's cuda backend can fall behind PyTorch eager for want of
 * host speed. Each side in its own process, the fastest of 20 calls (PyTorch: 10); appended to
 * bench/RESULTS.md.
 */
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { spawnSync } from 'node:child_process';
import { packageRoot } from '../src/util/package-root.js';

const root = packageRoot();

/** The JSON lines a child printed; it must have exited 0. */
function jsonLines(what: string, r: ReturnType<typeof spawnSync>): Record<string, any>[] {
  if (r.status !== 0) throw new Error(`${what} failed (exit ${r.status}): ${String(r.stderr ?? '').slice(-1500)}`);
  return String(r.stdout ?? '').split('\n').filter((l) => l.startsWith('{')).map((l) => JSON.parse(l));
}

const run = (cmd: string, args: string[], env: Record<string, string>) => spawnSync(cmd, args, { encoding: 'utf8', env: { ...process.env, ...env }, maxBuffer: 1 << 24 });
const lora = jsonLines('cuda-check on the dry device', run(process.execPath, [path.join(root, 'dist', 'bench', 'cuda-check.js'), 'time', '--reps', '20'], { PREFOPT_CUDA_DEVICE: 'dry' })).find((o) => o.job === 'lora_dpo');
if (!lora?.seconds) throw new Error('cuda-check on the dry device gave no LoRA DPO figure');
const torch = jsonLines('torch_ref.py on the meta device', run('/usr/bin/python3', [path.join(root, 'bench', 'torch_ref.py'), 'real', 'lora_dpo'], { TORCH_DEVICE: 'meta' })).at(-1);
if (!torch?.seconds) throw new Error('torch_ref.py on the meta device gave no figure');

const ms = (s: number) => (s * 1000).toFixed(1);
const lines = [
  '',
  `## ${new Date().toISOString()} — host floor of a GPU step (no GPU)`,
  '',
  `Machine: ${os.cpus()[0]?.model.trim() ?? 'unknown'} x${os.cpus().length}, node ${process.version}, PyTorch ${torch.torch}. The 0.5B LoRA DPO step (4 pairs × 256 tokens, r 16 on 7 linears, dropout 0.05, reference cached) issued with nothing computed: prefopt to its dry cuda device, PyTorch eager to its meta device (bf16; AdamW tensor by tensor, its foreach form having no meta kernels in 1.13). The fastest of 20 calls (PyTorch: 10) after a warm-up, each side in its own process; neither includes a driver's launch cost.`,
  '',
  '| measure | prefopt | PyTorch | ratio (PyTorch / prefopt) |',
  '|---|---|---|---|',
  `| host time of one step, ms | ${ms(lora.seconds)} | ${ms(torch.seconds)} | ${(torch.seconds / lora.seconds).toFixed(2)} |`,
  // Each wait drains the device's queue (docs/REFERENCE.md §11, "Waits"); PyTorch's step is timed without reading anything back.
  `| waits for the device in one step | ${lora.waits_per_call} | — | |`,
];
fs.appendFileSync(path.join(root, 'bench', 'RESULTS.md'), lines.join('\n') + '\n');
process.stdout.write(lines.join('\n') + '\n');
