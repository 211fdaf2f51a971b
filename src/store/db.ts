import * as fs from 'node:fs';
import * as path from 'node:path';
import Database from 'better-sqlite3';
import { UserError } from '../util/errors.js';

/**
 * The run database (one SQLite file per run directory, WAL, foreign keys on). Every unit of work
 * is committed in a transaction and guarded by a unique key, so a run killed at any moment
 * resumes by skipping what is committed and can never store a thing twice.
 */
export type DB = Database.Database;

/** Versioned migrations: index i upgrades user_version i → i+1. Never edit a shipped one. */
const MIGRATIONS: string[] = [
  `
  CREATE TABLE runs (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    recipe_hash TEXT,
    recipe_json TEXT,
    seed INTEGER NOT NULL DEFAULT 0,
    created_at TEXT NOT NULL DEFAULT (datetime('now'))
  );
  CREATE TABLE stages (
    id INTEGER PRIMARY KEY,
    run_id INTEGER NOT NULL REFERENCES runs(id),
    name TEXT NOT NULL,
    kind TEXT NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('pending','running','done','failed')),
    config_json TEXT,
    fingerprint TEXT,
    output TEXT,
    result_json TEXT,
    started_at TEXT,
    finished_at TEXT,
    UNIQUE (run_id, name)
  );
  CREATE TABLE rounds (
    id INTEGER PRIMARY KEY,
    stage_id INTEGER NOT NULL REFERENCES stages(id),
    round INTEGER NOT NULL,
    step TEXT NOT NULL CHECK (step IN ('sample','score','select','train','evaluate','done')),
    policy_path TEXT,
    reference TEXT,
    started_at TEXT NOT NULL DEFAULT (datetime('now')),
    finished_at TEXT,
    UNIQUE (stage_id, round)
  );
  CREATE TABLE prompts (
    id INTEGER PRIMARY KEY,
    stage_id INTEGER NOT NULL REFERENCES stages(id),
    idx INTEGER NOT NULL,
    prompt_json TEXT NOT NULL,
    prompt_ids TEXT NOT NULL,
    answer TEXT,
    UNIQUE (stage_id, idx)
  );
  CREATE TABLE round_prompts (
    round_id INTEGER NOT NULL REFERENCES rounds(id),
    prompt_id INTEGER NOT NULL REFERENCES prompts(id),
    position INTEGER NOT NULL,
    PRIMARY KEY (round_id, prompt_id),
    UNIQUE (round_id, position)
  );
  CREATE TABLE samples (
    id INTEGER PRIMARY KEY,
    round_id INTEGER NOT NULL REFERENCES rounds(id),
    prompt_id INTEGER NOT NULL REFERENCES prompts(id),
    k INTEGER NOT NULL,
    text TEXT NOT NULL,
    token_ids TEXT NOT NULL,
    finish_reason TEXT NOT NULL,
    sampler_json TEXT NOT NULL,
    seed INTEGER NOT NULL,
    UNIQUE (round_id, prompt_id, k)
  );
  CREATE TABLE scores (
    id INTEGER PRIMARY KEY,
    sample_id INTEGER NOT NULL REFERENCES samples(id),
    scorer TEXT NOT NULL,
    scorer_version TEXT NOT NULL,
    reward REAL NOT NULL,
    UNIQUE (sample_id, scorer, scorer_version)
  );
  CREATE TABLE pairs (
    id INTEGER PRIMARY KEY,
    round_id INTEGER NOT NULL REFERENCES rounds(id),
    prompt_id INTEGER NOT NULL REFERENCES prompts(id),
    chosen_sample_id INTEGER NOT NULL REFERENCES samples(id),
    rejected_sample_id INTEGER NOT NULL REFERENCES samples(id),
    margin REAL NOT NULL,
    rule TEXT NOT NULL,
    UNIQUE (round_id, prompt_id),
    CHECK (chosen_sample_id != rejected_sample_id)
  );
  CREATE TABLE ref_logps (
    ref_hash TEXT NOT NULL,
    pair_hash TEXT NOT NULL,
    chosen REAL NOT NULL,
    rejected REAL NOT NULL,
    PRIMARY KEY (ref_hash, pair_hash)
  );
  CREATE TABLE checkpoints (
    id INTEGER PRIMARY KEY,
    stage_id INTEGER REFERENCES stages(id),
    round INTEGER,
    kind TEXT NOT NULL,
    path TEXT NOT NULL,
    sha256 TEXT NOT NULL,
    created_at TEXT NOT NULL DEFAULT (datetime('now')),
    UNIQUE (path, sha256)
  );
  CREATE TABLE metrics (
    id INTEGER PRIMARY KEY,
    stage_id INTEGER REFERENCES stages(id),
    round INTEGER,
    name TEXT NOT NULL,
    value REAL,
    json TEXT,
    UNIQUE (stage_id, round, name)
  );
  CREATE TABLE events (
    id INTEGER PRIMARY KEY,
    ts TEXT NOT NULL DEFAULT (datetime('now')),
    stage_id INTEGER REFERENCES stages(id),
    kind TEXT NOT NULL,
    json TEXT
  );
  `,
];

export const SCHEMA_VERSION = MIGRATIONS.length;

export function openDb(file: string): DB {
  fs.mkdirSync(path.dirname(path.resolve(file)), { recursive: true });
  let db: DB;
  try {
    db = new Database(file, { timeout: 5000 });
    db.pragma('journal_mode = WAL');
    db.pragma('foreign_keys = ON');
    db.pragma('synchronous = NORMAL');
  } catch (e: any) {
    throw new UserError(`${file}: cannot open the run database (${dbMessage(e)})`);
  }
  try {
    const v = db.pragma('user_version', { simple: true }) as number;
    if (v > SCHEMA_VERSION) throw new UserError(`${file}: database schema version ${v} is newer than this prefopt understands (${SCHEMA_VERSION}); upgrade prefopt`);
    for (let i = v; i < SCHEMA_VERSION; i++) {
      db.transaction(() => {
        db.exec(MIGRATIONS[i]);
        db.pragma(`user_version = ${i + 1}`);
      })();
    }
  } catch (e: any) {
    db.close();
    if (e instanceof UserError) throw e;
    throw new UserError(`${file}: ${dbMessage(e)}`);
  }
  return db;
}

function dbMessage(e: any): string {
  const code = e?.code ?? '';
  if (code === 'SQLITE_BUSY' || code === 'SQLITE_LOCKED') return 'the database is locked by another process';
  if (code === 'SQLITE_NOTADB' || code === 'SQLITE_CORRUPT') return 'the file is not a valid SQLite database (corrupted?)';
  if (code === 'SQLITE_FULL' || code.startsWith('SQLITE_IOERR')) return `write failed (${code}: disk full, file too large or I/O error); the transaction was rolled back, the run stays resumable`;
  return e?.message ?? String(e);
}

/** Run `f` in a transaction, translating SQLite failures into clear errors. */
export function tx<T>(db: DB, f: () => T): T {
  try {
    return db.transaction(f)();
  } catch (e: any) {
    if (e instanceof UserError || !e?.code?.startsWith?.('SQLITE')) throw e;
    throw new UserError(`${db.name}: ${dbMessage(e)}`);
  }
}
