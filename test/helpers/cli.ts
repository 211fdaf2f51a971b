import { spawn, spawnSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as path from 'node:path';

const BIN = path.resolve('bin/prefopt.js');

/** The built CLI, run as a user would (npm test builds dist/ first). */
export function prefopt(args: string[], opts: { cwd?: string; env?: Record<string, string> } = {}) {
  const r = spawnSync(process.execPath, [BIN, ...args], { cwd: opts.cwd, env: { ...process.env, ...opts.env }, encoding: 'utf8', timeout: 300_000 });
  return { code: r.status, stdout: r.stdout, stderr: r.stderr };
}

export interface AsyncRunOptions {
  /** SIGKILL after this many milliseconds. */
  killAfterMs?: number;
  /**
   * SIGKILL `delayMs` after the `nth` temp file or directory (a name containing ".tmp") appears
   * in `dir`: aims the kill into a write.
   */
  killOnTemp?: { dir: string; nth: number; delayMs: number };
  /** SIGKILL `delayMs` after stderr first contains `text`: aims the kill just after a logged event. */
  killOnStderr?: { text: string; delayMs: number };
  /** RLIMIT_FSIZE in KiB (SIGXFSZ ignored): writes past it fail with EFBIG, like a full disk. */
  fileSizeLimitKb?: number;
}

export interface AsyncRun {
  code: number | null;
  killed: boolean;
  /** The killed process left a temp file in killOnTemp.dir: the kill landed inside a write. */
  tempAtKill: boolean;
  stderr: string;
}

const hasTemp = (dir: string) => {
  try {
    return fs.readdirSync(dir).some((n) => n.includes('.tmp'));
  } catch {
    return false;
  }
};

/** The CLI as a child process that a test can kill at a chosen moment. */
export function prefoptAsync(args: string[], o: AsyncRunOptions = {}): Promise<AsyncRun> {
  return new Promise((resolve) => {
    const child =
      o.fileSizeLimitKb !== undefined
        ? spawn('bash', ['-c', `trap '' XFSZ; ulimit -f ${o.fileSizeLimitKb}; exec "$0" "$@"`, process.execPath, BIN, ...args], { stdio: ['ignore', 'ignore', 'pipe'] })
        : spawn(process.execPath, [BIN, ...args], { stdio: ['ignore', 'ignore', 'pipe'] });
    let stderr = '';
    let killed = false;
    let tempAtKill = false;
    const kill = () => {
      if (child.exitCode !== null || killed) return;
      killed = true;
      child.kill('SIGKILL');
    };
    let aimed = false;
    child.stderr.on('data', (c) => {
      stderr += c;
      if (o.killOnStderr && !aimed && stderr.includes(o.killOnStderr.text)) {
        aimed = true;
        setTimeout(kill, o.killOnStderr.delayMs);
      }
    });
    const timer = o.killAfterMs !== undefined ? setTimeout(kill, o.killAfterMs) : null;
    let watcher: fs.FSWatcher | null = null;
    if (o.killOnTemp) {
      const { dir, nth, delayMs } = o.killOnTemp;
      fs.mkdirSync(dir, { recursive: true });
      let seen = 0;
      watcher = fs.watch(dir, (_ev, name) => {
        if (name && name.includes('.tmp') && ++seen === nth) setTimeout(kill, delayMs);
      });
    }
    child.on('exit', (code) => {
      if (timer) clearTimeout(timer);
      watcher?.close();
      // Temp files outlive only a writer killed in the middle of a write.
      if (killed && o.killOnTemp) tempAtKill = hasTemp(o.killOnTemp.dir);
      resolve({ code, killed: killed && code === null, tempAtKill, stderr });
    });
  });
}
