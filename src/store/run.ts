import { DB, tx } from './db.js';

/** Small typed helpers over the run database, shared by the recipe runner and the stages. */
export interface StageRow {
  id: number;
  run_id: number;
  name: string;
  kind: string;
  status: 'pending' | 'running' | 'done' | 'failed';
  config_json: string | null;
  output: string | null;
  result_json: string | null;
}

export function ensureRun(db: DB, name: string, seed: number, recipe?: { hash: string; json: string }): number {
  return tx(db, () => {
    const row = db.prepare('SELECT id FROM runs WHERE name = ?').get(name) as { id: number } | undefined;
    if (row) return row.id;
    return Number(db.prepare('INSERT INTO runs (name, seed, recipe_hash, recipe_json) VALUES (?, ?, ?, ?)').run(name, seed, recipe?.hash ?? null, recipe?.json ?? null).lastInsertRowid);
  });
}

export function ensureStage(db: DB, runId: number, name: string, kind: string, config: unknown): StageRow {
  return tx(db, () => {
    const get = () => db.prepare('SELECT * FROM stages WHERE run_id = ? AND name = ?').get(runId, name) as StageRow | undefined;
    const row = get();
    if (row) return row;
    db.prepare("INSERT INTO stages (run_id, name, kind, status, config_json) VALUES (?, ?, ?, 'pending', ?)").run(runId, name, kind, JSON.stringify(config));
    return get()!;
  });
}

export function setStage(db: DB, stageId: number, status: StageRow['status'], fields: { output?: string; result?: unknown } = {}): void {
  tx(db, () => {
    const now = "datetime('now')";
    db.prepare(
      `UPDATE stages SET status = ?, output = COALESCE(?, output), result_json = COALESCE(?, result_json),
       started_at = CASE WHEN ? = 'running' AND started_at IS NULL THEN ${now} ELSE started_at END,
       finished_at = CASE WHEN ? IN ('done','failed') THEN ${now} ELSE finished_at END WHERE id = ?`,
    ).run(status, fields.output ?? null, fields.result === undefined ? null : JSON.stringify(fields.result), status, status, stageId);
  });
}

export function logEvent(db: DB, stageId: number | null, kind: string, payload: unknown): void {
  db.prepare('INSERT INTO events (stage_id, kind, json) VALUES (?, ?, ?)').run(stageId, kind, JSON.stringify(payload));
}

export function putMetrics(db: DB, stageId: number, round: number | null, values: Record<string, number | null | undefined>): void {
  const st = db.prepare('INSERT INTO metrics (stage_id, round, name, value) VALUES (?, ?, ?, ?) ON CONFLICT (stage_id, round, name) DO UPDATE SET value = excluded.value');
  for (const [k, v] of Object.entries(values)) if (v !== undefined) st.run(stageId, round, k, v === null || !Number.isFinite(v) ? null : v);
}

export function getMetrics(db: DB, stageId: number, round: number | null): Record<string, number | null> {
  const rows = db.prepare('SELECT name, value FROM metrics WHERE stage_id = ? AND round IS ?').all(stageId, round) as { name: string; value: number | null }[];
  return Object.fromEntries(rows.map((r) => [r.name, r.value]));
}

/** Forget everything a stage stored (a forced rerun starts it from scratch). */
export function resetStage(db: DB, stageId: number): void {
  tx(db, () => {
    const rounds = 'SELECT id FROM rounds WHERE stage_id = ?';
    db.prepare(`DELETE FROM pairs WHERE round_id IN (${rounds})`).run(stageId);
    db.prepare(`DELETE FROM scores WHERE sample_id IN (SELECT id FROM samples WHERE round_id IN (${rounds}))`).run(stageId);
    db.prepare(`DELETE FROM samples WHERE round_id IN (${rounds})`).run(stageId);
    db.prepare(`DELETE FROM round_prompts WHERE round_id IN (${rounds})`).run(stageId);
    db.prepare('DELETE FROM rounds WHERE stage_id = ?').run(stageId);
    db.prepare('DELETE FROM prompts WHERE stage_id = ?').run(stageId);
    db.prepare('DELETE FROM metrics WHERE stage_id = ?').run(stageId);
    db.prepare('DELETE FROM checkpoints WHERE stage_id = ?').run(stageId);
    db.prepare("UPDATE stages SET status = 'pending', fingerprint = NULL, output = NULL, result_json = NULL, started_at = NULL, finished_at = NULL WHERE id = ?").run(stageId);
  });
}

/** A stage's recorded output directory, by run and stage name (null when it has none yet). */
export function stageOutput(db: DB, runId: number, name: string): string | null {
  const row = db.prepare('SELECT output FROM stages WHERE run_id = ? AND name = ?').get(runId, name) as { output: string | null } | undefined;
  return row?.output ?? null;
}

export function stageIdByName(db: DB, runId: number, name: string): number | null {
  const row = db.prepare('SELECT id FROM stages WHERE run_id = ? AND name = ?').get(runId, name) as { id: number } | undefined;
  return row?.id ?? null;
}

export function setStageConfig(db: DB, stageId: number, config: unknown): void {
  db.prepare('UPDATE stages SET config_json = ? WHERE id = ?').run(JSON.stringify(config), stageId);
}

/** The policy a stage's round n left (its adapter path) and the round's step. */
export function roundOfStage(db: DB, runId: number, stage: string, n: number): { policy_path: string | null; step: string } | undefined {
  return db
    .prepare('SELECT r.policy_path, r.step FROM rounds r JOIN stages s ON s.id = r.stage_id WHERE s.run_id = ? AND s.name = ? AND r.round = ?')
    .get(runId, stage, n) as { policy_path: string | null; step: string } | undefined;
}

export function runByName(db: DB, name: string): { id: number; recipe_hash: string; recipe_json: string } | undefined {
  return db.prepare('SELECT id, recipe_hash, recipe_json FROM runs WHERE name = ?').get(name) as { id: number; recipe_hash: string; recipe_json: string } | undefined;
}

export function setRunRecipe(db: DB, runId: number, hash: string, json: string): void {
  tx(db, () => db.prepare('UPDATE runs SET recipe_hash = ?, recipe_json = ? WHERE id = ?').run(hash, json, runId));
}

/** What the report draws: the first run's name, every stage, every metric with its stage's name. */
export function reportRows(db: DB): { runName: string; stages: any[]; metrics: { stage: string; round: number | null; name: string; value: number | null }[] } {
  return {
    runName: (db.prepare('SELECT name FROM runs ORDER BY id LIMIT 1').get() as { name: string } | undefined)?.name ?? '',
    stages: db.prepare('SELECT id, name, kind, status, output FROM stages ORDER BY id').all() as any[],
    metrics: db.prepare('SELECT s.name AS stage, m.round, m.name, m.value FROM metrics m JOIN stages s ON s.id = m.stage_id').all() as any[],
  };
}

/** The cached reference log-probs of a pair under a reference model, if computed before. */
export function refLogps(db: DB, refHash: string, pairHash: string): { chosen: number; rejected: number } | undefined {
  return db.prepare('SELECT chosen, rejected FROM ref_logps WHERE ref_hash = ? AND pair_hash = ?').get(refHash, pairHash) as { chosen: number; rejected: number } | undefined;
}

/** Store reference log-probs of pairs, in one transaction. */
export function storeRefLogps(db: DB, refHash: string, rows: { pairHash: string; chosen: number; rejected: number }[]): void {
  tx(db, () => {
    const put = db.prepare('INSERT OR IGNORE INTO ref_logps (ref_hash, pair_hash, chosen, rejected) VALUES (?, ?, ?, ?)');
    for (const r of rows) put.run(refHash, r.pairHash, r.chosen, r.rejected);
  });
}
