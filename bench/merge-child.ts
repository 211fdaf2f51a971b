/** Runs in its own process so its peak RSS is the merge's alone: `node merge-child.js OUT BASE M1 M2` (no args: baseline). */
import { runMerge } from '../src/merge/merge.js';

const [out, base, m1, m2] = process.argv.slice(2);
if (out) {
  await runMerge({ merge_method: 'ties', base_model: base, models: [{ model: m1, parameters: { weight: 1, density: 0.5 } }, { model: m2, parameters: { weight: 1, density: 0.5 } }] }, out);
}
process.stdout.write(JSON.stringify({ maxRssMb: process.resourceUsage().maxRSS / 1024 }) + '\n');
