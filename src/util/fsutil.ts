import * as fs from 'node:fs';
import * as path from 'node:path';
import { randomBytes } from 'node:crypto';
import { UserError } from './errors.js';

/**
 * Files and directories appear whole or not at all: everything is written under a temporary
 * name next to its destination and renamed into place, so a crash or a failed write never
 * leaves something a later run could mistake for good output.
 */
const TMP_RE = /^\.(.+)\.(\d+)\.[0-9a-f]{8}\.tmp(\.old)?$/;

function tmpName(dest: string): string {
  sweepStale(dest);
  return path.join(path.dirname(dest), `.${path.basename(dest)}.${process.pid}.${randomBytes(4).toString('hex')}.tmp`);
}

function alive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch (e: any) {
    return e.code === 'EPERM';
  }
}

/**
 * Temp files of a writer that died (SIGKILL, power loss) are never read, only wasted space: they
 * are removed the next time something is written beside them, if their process is gone.
 */
function sweepStale(dest: string): void {
  const dir = path.dirname(dest);
  let names: string[];
  try {
    names = fs.readdirSync(dir);
  } catch {
    return;
  }
  const base = path.basename(dest);
  for (const n of names) {
    const m = TMP_RE.exec(n);
    if (m && m[1] === base && Number(m[2]) !== process.pid && !alive(Number(m[2]))) fs.rmSync(path.join(dir, n), { recursive: true, force: true });
  }
}

const IO_CODES: Record<string, string> = {
  ENOSPC: 'no space left on device',
  EDQUOT: 'disk quota exceeded',
  EFBIG: 'file too large',
  EIO: 'input/output error',
  EROFS: 'read-only file system',
  EACCES: 'permission denied',
  EPERM: 'operation not permitted',
};

/** A failed write names its destination and says that what was there before is untouched. */
export function writeError(dest: string, e: any): Error {
  if (e instanceof UserError || !(e?.code in IO_CODES)) return e;
  return new UserError(`${dest}: write failed (${e.code}: ${IO_CODES[e.code]}); nothing was replaced, the previous contents are unchanged`);
}

/**
 * Write `dest` through `write(fd)` into a temp file, fsync it and rename it into place; on any
 * failure the temp file is removed and `dest` is left as it was.
 */
export async function writeFileVia(dest: string, write: (fd: number) => void | Promise<void>): Promise<void> {
  const t = openTemp(dest);
  try {
    await write(t.fd);
  } catch (e) {
    throw t.abort(e);
  }
  t.commit();
}

export function writeFileAtomic(dest: string, data: string | Uint8Array): void {
  const t = openTemp(dest);
  try {
    fs.writeFileSync(t.fd, data);
  } catch (e) {
    throw t.abort(e);
  }
  t.commit();
}

function openTemp(dest: string) {
  let tmp: string;
  let fd: number;
  try {
    fs.mkdirSync(path.dirname(path.resolve(dest)), { recursive: true });
    tmp = tmpName(dest);
    fd = fs.openSync(tmp, 'w');
  } catch (e) {
    throw writeError(dest, e);
  }
  const abort = (e: unknown): Error => {
    try {
      fs.closeSync(fd);
    } catch {
      /* already closed */
    }
    fs.rmSync(tmp, { force: true });
    return writeError(dest, e);
  };
  return {
    fd,
    abort,
    commit() {
      try {
        fs.fsyncSync(fd);
        fs.closeSync(fd);
        fs.renameSync(tmp, dest);
      } catch (e) {
        throw abort(e);
      }
    },
  };
}

/**
 * Build a directory with `fill(tmpDir)` and move it to `dest` in one rename. An existing `dest`
 * is replaced only after the new one is complete.
 */
export async function writeDirAtomic(dest: string, fill: (dir: string) => void | Promise<void>): Promise<void> {
  const abs = path.resolve(dest);
  const tmp = tmpName(abs);
  try {
    fs.mkdirSync(path.dirname(abs), { recursive: true });
    fs.mkdirSync(tmp);
    await fill(tmp);
    if (fs.existsSync(abs)) {
      const old = tmpName(abs) + '.old';
      fs.renameSync(abs, old);
      fs.renameSync(tmp, abs);
      fs.rmSync(old, { recursive: true, force: true });
    } else {
      fs.renameSync(tmp, abs);
    }
  } catch (e) {
    fs.rmSync(tmp, { recursive: true, force: true });
    throw writeError(dest, e);
  }
}

/**
 * Remove a directory so that it vanishes at once: renamed aside first, then deleted. A kill in
 * the middle of a recursive delete would otherwise leave a half-emptied checkpoint or model
 * that still looks like one (its marker file deleted last, or not at all).
 */
export function removeDir(dir: string): void {
  const abs = path.resolve(dir);
  if (!fs.existsSync(abs)) return;
  const aside = tmpName(abs) + '.old';
  fs.renameSync(abs, aside);
  fs.rmSync(aside, { recursive: true, force: true });
}

/** A JSON file, or a UserError naming it: "cannot read (ENOENT)" or "invalid JSON (…)". */
export function readJson(file: string): any {
  let text: string;
  try {
    text = fs.readFileSync(file, 'utf8');
  } catch (e: any) {
    throw new UserError(`${file}: cannot read (${e.code ?? e.message})`);
  }
  try {
    return JSON.parse(text);
  } catch (e: any) {
    throw new UserError(`${file}: invalid JSON (${e.message})`);
  }
}

/**
 * Write all of `buf` at the file's position: one write(2) moves at most 2 GiB − 4 KiB on Linux,
 * and fs.writeSync reports a short count rather than looping (a 7B model's float32 embedding
 * table is 2.6 GB).
 */
export function writeAll(fd: number, buf: Uint8Array): void {
  for (let off = 0; off < buf.length; ) off += fs.writeSync(fd, buf, off, Math.min(buf.length - off, 1 << 30));
}
