import * as fs from 'node:fs';
import { UserError } from '../util/errors.js';

/**
 * JSON Lines input. Every row carries its 1-based line number so errors can name it; blank
 * lines are skipped. Invalid UTF-8 is an error (a silent U+FFFD would change the data).
 */
export interface Row<T = any> {
  line: number;
  value: T;
}

export function readText(file: string): string {
  let buf: Buffer;
  try {
    buf = fs.readFileSync(file);
  } catch (e: any) {
    throw new UserError(`${file}: cannot read (${e.code ?? e.message})`);
  }
  try {
    return new TextDecoder('utf-8', { fatal: true }).decode(buf);
  } catch {
    const dec = new TextDecoder('utf-8', { fatal: true });
    let line = 1;
    for (let from = 0; from < buf.length; line++) {
      const nl = buf.indexOf(10, from);
      const to = nl === -1 ? buf.length : nl;
      try {
        dec.decode(buf.subarray(from, to));
      } catch {
        break;
      }
      from = to + 1;
    }
    throw new UserError(`${file}:${line}: invalid UTF-8`);
  }
}

export function readJsonl<T = any>(file: string): Row<T>[] {
  const text = readText(file);
  const rows: Row<T>[] = [];
  const lines = text.split('\n');
  for (let i = 0; i < lines.length; i++) {
    const s = lines[i].trim();
    if (!s) continue;
    try {
      rows.push({ line: i + 1, value: JSON.parse(s) });
    } catch (e: any) {
      throw new UserError(`${file}:${i + 1}: invalid JSON (${e.message})`);
    }
  }
  return rows;
}

/** A JSON array file or JSON Lines, by content. */
export function readRecords<T = any>(file: string): Row<T>[] {
  const text = readText(file);
  if (text.trimStart().startsWith('[')) {
    let arr: any;
    try {
      arr = JSON.parse(text);
    } catch (e: any) {
      throw new UserError(`${file}: invalid JSON (${e.message})`);
    }
    return (arr as T[]).map((value, i) => ({ line: i + 1, value }));
  }
  return readJsonl<T>(file);
}

export function toJsonl(rows: unknown[]): string {
  return rows.map((r) => JSON.stringify(r)).join('\n') + (rows.length ? '\n' : '');
}
