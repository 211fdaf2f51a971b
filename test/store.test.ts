import { describe, expect, it } from 'vitest';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import Database from 'better-sqlite3';
import { SCHEMA_VERSION, openDb, tx } from '../src/store/db.js';
import { ensureRun, ensureStage } from '../src/store/run.js';

const tmp = () => fs.mkdtempSync(path.join(os.tmpdir(), 'prefopt-db-'));

describe('run database', () => {
  it('migrates a new file, enforces foreign keys and unique keys, and rolls back failed transactions', () => {
    const f = path.join(tmp(), 'r.db');
    const db = openDb(f);
    expect(db.pragma('user_version', { simple: true })).toBe(SCHEMA_VERSION);
    expect(db.pragma('journal_mode', { simple: true })).toBe('wal');
    const run = ensureRun(db, 'x', 1);
    expect(ensureRun(db, 'x', 1)).toBe(run);
    const st = ensureStage(db, run, 's', 'online_dpo', {});
    expect(() => db.prepare("INSERT INTO rounds (stage_id, round, step) VALUES (999, 1, 'sample')").run()).toThrow(/FOREIGN KEY/);
    db.prepare("INSERT INTO rounds (stage_id, round, step) VALUES (?, 1, 'sample')").run(st.id);
    expect(() => db.prepare("INSERT INTO rounds (stage_id, round, step) VALUES (?, 1, 'sample')").run(st.id)).toThrow(/UNIQUE/);
    expect(() => tx(db, () => {
      db.prepare("INSERT INTO rounds (stage_id, round, step) VALUES (?, 2, 'sample')").run(st.id);
      throw new Error('crash in the middle');
    })).toThrow(/crash in the middle/);
    expect((db.prepare('SELECT COUNT(*) n FROM rounds').get() as any).n).toBe(1);
    db.close();
  });

  it('refuses a newer schema, a corrupted file and a locked database with clear messages', () => {
    const d = tmp();
    const newer = path.join(d, 'newer.db');
    const raw = new Database(newer);
    raw.pragma(`user_version = ${SCHEMA_VERSION + 1}`);
    raw.close();
    expect(() => openDb(newer)).toThrow(new RegExp(`${newer}: database schema version ${SCHEMA_VERSION + 1} is newer than this prefopt understands`));
    const bad = path.join(d, 'bad.db');
    fs.writeFileSync(bad, Buffer.from('this is not a database at all, just some bytes '.repeat(200)));
    expect(() => openDb(bad)).toThrow(new RegExp(`${bad}: .*not a valid SQLite database`));
    const locked = path.join(d, 'locked.db');
    openDb(locked).close();
    const holder = new Database(locked);
    holder.pragma('journal_mode = DELETE');
    holder.exec('BEGIN EXCLUSIVE');
    const t0 = Date.now();
    expect(() => {
      const db = new Database(locked, { timeout: 200 });
      try {
        tx(db, () => db.prepare("INSERT INTO runs (name) VALUES ('y')").run());
      } finally {
        db.close();
      }
    }).toThrow(/locked by another process/);
    expect(Date.now() - t0).toBeLessThan(5000);
    holder.exec('ROLLBACK');
    holder.close();
  });
});
