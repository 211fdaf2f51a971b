import * as fs from 'node:fs';
import * as path from 'node:path';
import { randomBytes } from 'node:crypto';
import { UserError } from './errors.js';

/**
 * Files and directories appear whole or not at all: everything is written under a temporary
 * name next to its destination and renamed into place, so a crash or a failed write never
 * leaves something a later run could mistake for good output.
 */
function tmpName(dest: string): string {
  return path.join(path.dirname(dest), `.${path.basename(dest)}.${process.pid}.${randomBytes(4).toString('hex')}.tmp`);
}

export function writeFileAtomic(dest: string, data: string | Uint8Array): void {
  fs.mkdirSync(path.dirname(path.resolve(dest)), { recursive: true });
  const tmp = tmpName(dest);
  try {
    const fd = fs.openSync(tmp, 'w');
    try {
      fs.writeFileSync(fd, data);
      fs.fsyncSync(fd);
    } finally {
      fs.closeSync(fd);
    }
    fs.renameSync(tmp, dest);
  } catch (e) {
    fs.rmSync(tmp, { force: true });
    throw e;
  }
}

/**
 * Build a directory with `fill(tmpDir)` and move it to `dest` in one rename. An existing `dest`
 * is replaced only after the new one is complete.
 */
export async function writeDirAtomic(dest: string, fill: (dir: string) => void | Promise<void>): Promise<void> {
  const abs = path.resolve(dest);
  fs.mkdirSync(path.dirname(abs), { recursive: true });
  const tmp = tmpName(abs);
  fs.mkdirSync(tmp);
  try {
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
    throw e;
  }
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
