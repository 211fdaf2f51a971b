import { spawnSync } from 'node:child_process';
import * as path from 'node:path';

/** The built CLI, run as a user would (npm test builds dist/ first). */
export function prefopt(args: string[], opts: { cwd?: string; env?: Record<string, string> } = {}) {
  const bin = path.resolve('bin/prefopt.js');
  const r = spawnSync(process.execPath, [bin, ...args], { cwd: opts.cwd, env: { ...process.env, ...opts.env }, encoding: 'utf8', timeout: 300_000 });
  return { code: r.status, stdout: r.stdout, stderr: r.stderr };
}

