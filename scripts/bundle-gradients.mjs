// tfjs-core's Node entry registers no gradients and its ESM files cannot be imported by Node
// directly (extensionless imports), so the gradient definitions are bundled once at build time
// into vendor/tfjs-gradients.js. Registration goes into the registry every copy of core shares.
import { build } from 'esbuild';
import { createRequire } from 'node:module';
import * as path from 'node:path';
import { fileURLToPath } from 'node:url';

const root = path.dirname(path.dirname(fileURLToPath(import.meta.url)));
const require = createRequire(import.meta.url);
const core = path.dirname(require.resolve('@tensorflow/tfjs-core/package.json'));
await build({
  entryPoints: [path.join(core, 'dist', 'register_all_gradients.js')],
  bundle: true,
  platform: 'node',
  format: 'esm',
  outfile: path.join(root, 'vendor', 'tfjs-gradients.js'),
  logLevel: 'warning',
  legalComments: 'none',
});
