// Build the optional native addon (native/: matmul and fused kernels) with node-gyp at install time. It
// never fails the install: without a compiler, or on a platform where the build breaks, prefopt
// runs on the wasm kernels, and `prefopt doctor` says so.
import { spawnSync } from 'node:child_process';
import { existsSync } from 'node:fs';
import { createRequire } from 'node:module';
import * as path from 'node:path';

if (process.env.PREFOPT_SKIP_NATIVE) {
  console.log('prefopt: PREFOPT_SKIP_NATIVE is set; the native kernels are not built');
  process.exit(0);
}
const candidates = [process.env.npm_config_node_gyp, path.join(path.dirname(process.execPath), '..', 'lib', 'node_modules', 'npm', 'node_modules', 'node-gyp', 'bin', 'node-gyp.js')];
try {
  candidates.push(createRequire(import.meta.url).resolve('node-gyp/bin/node-gyp.js'));
} catch {
  /* not installed locally */
}
const gyp = candidates.find((c) => c && existsSync(c));
if (!gyp) {
  console.log('prefopt: node-gyp not found; the native kernels are not built (wasm kernels will be used)');
  process.exit(0);
}
// Build against the headers of the running Node when they are installed beside it (no download).
const prefix = path.join(path.dirname(process.execPath), '..');
const nodedir = process.env.npm_config_nodedir || (existsSync(path.join(prefix, 'include', 'node', 'node_api.h')) ? prefix : '');
const t0 = Date.now();
const r = spawnSync(process.execPath, [gyp, 'rebuild', ...(nodedir ? [`--nodedir=${nodedir}`] : [])], { stdio: ['ignore', 'pipe', 'pipe'], encoding: 'utf8' });
if (r.status === 0) console.log(`prefopt: native kernels built in ${((Date.now() - t0) / 1000).toFixed(1)} s`);
else console.log(`prefopt: the native kernels did not build (wasm kernels will be used):\n${(r.stderr || r.stdout || '').split('\n').slice(-8).join('\n')}`);
