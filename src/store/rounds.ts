import { DB, tx } from './db.js';

/**
 * The on-policy rounds' rows in the run database (docs/REFERENCE.md §6): prompts, rounds and
 * their step, samples, scores, pairs, checkpoints. Typed queries only; the caller decides what
 * goes in one transaction (these run inside the caller's tx where they write).
 */
export type RoundStep = 'sample' | 'score' | 'select' | 'train' | 'evaluate' | 'done';

export interface RoundRow {
  id: number;
  step: RoundStep;
  policy_path: string | null;
}

export interface RoundPrompt {
  id: number;
  idx: number;
  prompt_ids: string;
  prompt_json: string;
}

export interface PromptInsert {
  idx: number;
  json: string;
  ids: number[];
  answer: string | null;
}

export function stageFingerprint(db: DB, stageId: number): string | null {
  return (db.prepare('SELECT fingerprint FROM stages WHERE id = ?').get(stageId) as { fingerprint: string | null }).fingerprint;
}

export function setStageFingerprint(db: DB, stageId: number, fp: string): void {
  tx(db, () => db.prepare('UPDATE stages SET fingerprint = ? WHERE id = ?').run(fp, stageId));
}

/** Store the stage's prompts once (a prompt already stored keeps its row). */
export function storePrompts(db: DB, stageId: number, prompts: PromptInsert[]): void {
  tx(db, () => {
    const ins = db.prepare('INSERT OR IGNORE INTO prompts (stage_id, idx, prompt_json, prompt_ids, answer) VALUES (?, ?, ?, ?, ?)');
    for (const p of prompts) ins.run(stageId, p.idx, p.json, JSON.stringify(p.ids), p.answer);
  });
}

/** The round's row, created at step 'sample' the first time. */
export function ensureRound(db: DB, stageId: number, round: number, reference: string): void {
  tx(db, () => db.prepare("INSERT OR IGNORE INTO rounds (stage_id, round, step, reference) VALUES (?, ?, 'sample', ?)").run(stageId, round, reference));
}

export function getRound(db: DB, stageId: number, round: number): RoundRow {
  return db.prepare('SELECT id, step, policy_path FROM rounds WHERE stage_id = ? AND round = ?').get(stageId, round) as RoundRow;
}

export function setRoundStep(db: DB, roundId: number, step: RoundStep): void {
  db.prepare(`UPDATE rounds SET step = ?${step === 'done' ? ", finished_at = datetime('now')" : ''} WHERE id = ?`).run(step, roundId);
}

export function setRoundPolicy(db: DB, roundId: number, path: string | null): void {
  db.prepare('UPDATE rounds SET policy_path = ? WHERE id = ?').run(path, roundId);
}

/** Fix the round's prompt list once: `indices` (prompt idx values) in order; a list already fixed stays. */
export function fixRoundPrompts(db: DB, stageId: number, roundId: number, indices: () => number[]): void {
  tx(db, () => {
    const have = db.prepare('SELECT COUNT(*) n FROM round_prompts WHERE round_id = ?').get(roundId) as { n: number };
    if (have.n > 0) return;
    const ids = db.prepare('SELECT id, idx FROM prompts WHERE stage_id = ?').all(stageId) as { id: number; idx: number }[];
    const byIdx = new Map(ids.map((x) => [x.idx, x.id]));
    const ins = db.prepare('INSERT INTO round_prompts (round_id, prompt_id, position) VALUES (?, ?, ?)');
    indices().forEach((idx, pos) => ins.run(roundId, byIdx.get(idx)!, pos));
  });
}

export function roundPrompts(db: DB, roundId: number): RoundPrompt[] {
  return db
    .prepare('SELECT p.id, p.idx, p.prompt_ids, p.prompt_json FROM round_prompts rp JOIN prompts p ON p.id = rp.prompt_id WHERE rp.round_id = ? ORDER BY rp.position')
    .all(roundId) as RoundPrompt[];
}

/** Prompts of the round that already have all k samples (a resumed round skips them). */
export function promptsSampled(db: DB, roundId: number, k: number): Set<number> {
  const rows = db.prepare('SELECT prompt_id FROM samples WHERE round_id = ? GROUP BY prompt_id HAVING COUNT(*) = ?').all(roundId, k) as { prompt_id: number }[];
  return new Set(rows.map((x) => x.prompt_id));
}

export interface SampleInsert {
  promptId: number;
  k: number;
  text: string;
  ids: number[];
  finishReason: string;
  settings: string;
  seed: number;
}

export function storeSamples(db: DB, roundId: number, rows: SampleInsert[]): void {
  tx(db, () => {
    const ins = db.prepare('INSERT INTO samples (round_id, prompt_id, k, text, token_ids, finish_reason, sampler_json, seed) VALUES (?, ?, ?, ?, ?, ?, ?, ?)');
    for (const s of rows) ins.run(roundId, s.promptId, s.k, s.text, JSON.stringify(s.ids), s.finishReason, s.settings, s.seed);
  });
}

/** Samples not yet scored by (scorer, version), with their prompt, by prompt and k. */
export function unscoredSamples(db: DB, roundId: number, scorer: string, version: string): { id: number; prompt_id: number; k: number; text: string; prompt_json: string }[] {
  return db
    .prepare(
      `SELECT s.id, s.prompt_id, s.k, s.text, p.prompt_json FROM samples s JOIN prompts p ON p.id = s.prompt_id
       WHERE s.round_id = ? AND NOT EXISTS (SELECT 1 FROM scores x WHERE x.sample_id = s.id AND x.scorer = ? AND x.scorer_version = ?)
       ORDER BY s.prompt_id, s.k`,
    )
    .all(roundId, scorer, version) as { id: number; prompt_id: number; k: number; text: string; prompt_json: string }[];
}

export function storeScores(db: DB, scorer: string, version: string, rows: { sampleId: number; reward: number }[]): void {
  tx(db, () => {
    const ins = db.prepare('INSERT INTO scores (sample_id, scorer, scorer_version, reward) VALUES (?, ?, ?, ?)');
    for (const r of rows) ins.run(r.sampleId, scorer, version, r.reward);
  });
}

/** The round's samples with their reward from (scorer, version), by prompt and k. */
export function scoredSamples(db: DB, roundId: number, scorer: string, version: string): { id: number; prompt_id: number; k: number; token_ids: string; reward: number }[] {
  return db
    .prepare('SELECT s.id, s.prompt_id, s.k, s.token_ids, x.reward FROM samples s JOIN scores x ON x.sample_id = s.id AND x.scorer = ? AND x.scorer_version = ? WHERE s.round_id = ? ORDER BY s.prompt_id, s.k')
    .all(scorer, version, roundId) as { id: number; prompt_id: number; k: number; token_ids: string; reward: number }[];
}

export function storePair(db: DB, roundId: number, p: { promptId: number; chosen: number; rejected: number; margin: number; rule: string }): void {
  db.prepare('INSERT INTO pairs (round_id, prompt_id, chosen_sample_id, rejected_sample_id, margin, rule) VALUES (?, ?, ?, ?, ?, ?)').run(roundId, p.promptId, p.chosen, p.rejected, p.margin, p.rule);
}

/** The round's pairs as token ids (prompt, chosen, rejected JSON), by prompt. */
export function roundPairs(db: DB, roundId: number): { prompt_ids: string; chosen: string; rejected: string; idx: number }[] {
  return db
    .prepare(
      `SELECT p.prompt_ids, cs.token_ids AS chosen, rs.token_ids AS rejected, p.idx FROM pairs x
       JOIN prompts p ON p.id = x.prompt_id JOIN samples cs ON cs.id = x.chosen_sample_id JOIN samples rs ON rs.id = x.rejected_sample_id
       WHERE x.round_id = ? ORDER BY x.prompt_id`,
    )
    .all(roundId) as { prompt_ids: string; chosen: string; rejected: string; idx: number }[];
}

/** Every sample of the round with its prompt's ids, in sampling order. */
export function roundSampleIds(db: DB, roundId: number): { prompt_ids: string; token_ids: string }[] {
  return db.prepare('SELECT p.prompt_ids, s.token_ids FROM samples s JOIN prompts p ON p.id = s.prompt_id WHERE s.round_id = ? ORDER BY s.id').all(roundId) as { prompt_ids: string; token_ids: string }[];
}

export function recordCheckpoint(db: DB, stageId: number, round: number, kind: string, path: string, sha256: string): void {
  db.prepare('INSERT OR IGNORE INTO checkpoints (stage_id, round, kind, path, sha256) VALUES (?, ?, ?, ?, ?)').run(stageId, round, kind, path, sha256);
}

/** The audit scorer's rewards of each pair's chosen and rejected sample. */
export function pairScores(db: DB, roundId: number, scorer: string, version: string): { c: number; r: number }[] {
  return db
    .prepare(
      `SELECT c.reward AS c, r.reward AS r FROM pairs p
       JOIN scores c ON c.sample_id = p.chosen_sample_id AND c.scorer = ? AND c.scorer_version = ?
       JOIN scores r ON r.sample_id = p.rejected_sample_id AND r.scorer = ? AND r.scorer_version = ?
       WHERE p.round_id = ?`,
    )
    .all(scorer, version, scorer, version, roundId) as { c: number; r: number }[];
}

/** Two scorers' rewards of every sample of the round that both scored. */
export function bothScores(db: DB, roundId: number, a: { name: string; version: string }, b: { name: string; version: string }): { m: number; x: number }[] {
  return db
    .prepare(
      `SELECT a.reward AS m, b.reward AS x FROM samples s
       JOIN scores a ON a.sample_id = s.id AND a.scorer = ? AND a.scorer_version = ?
       JOIN scores b ON b.sample_id = s.id AND b.scorer = ? AND b.scorer_version = ?
       WHERE s.round_id = ?`,
    )
    .all(a.name, a.version, b.name, b.version, roundId) as { m: number; x: number }[];
}

/** Every stored pair with its round, prompt, texts, ids and first rewards, for export (optionally one round). */
export function exportedPairs(db: DB, round: number | null): any[] {
  return db
    .prepare(
      `SELECT r.round, p.idx, p.prompt_json, cs.text AS chosen, rs.text AS rejected, cs.token_ids AS chosen_ids, rs.token_ids AS rejected_ids, p.prompt_ids, x.margin, x.rule,
              (SELECT reward FROM scores WHERE sample_id = cs.id ORDER BY id LIMIT 1) AS chosen_reward,
              (SELECT reward FROM scores WHERE sample_id = rs.id ORDER BY id LIMIT 1) AS rejected_reward
       FROM pairs x JOIN rounds r ON r.id = x.round_id JOIN prompts p ON p.id = x.prompt_id
       JOIN samples cs ON cs.id = x.chosen_sample_id JOIN samples rs ON rs.id = x.rejected_sample_id
       WHERE (? IS NULL OR r.round = ?) ORDER BY r.round, p.idx`,
    )
    .all(round, round) as any[];
}

export interface StatusRound {
  round: number;
  step: RoundStep;
  samples: number;
  scores: number;
  pairs: number;
  metrics: Record<string, number | null>;
}

/** Runs, their stages (status, output, stage metrics) and each stage's rounds with their counts and metrics. */
export function runStatus(db: DB): any[] {
  const metricsOf = (rows: any[]) => Object.fromEntries(rows.map((m) => [m.name, m.value]));
  const runs = db.prepare('SELECT id, name, seed, created_at FROM runs ORDER BY id').all() as any[];
  for (const run of runs) {
    run.stages = db.prepare('SELECT id, name, kind, status, output, started_at, finished_at FROM stages WHERE run_id = ? ORDER BY id').all(run.id);
    for (const st of run.stages) {
      const rounds = db.prepare('SELECT id, round, step FROM rounds WHERE stage_id = ? ORDER BY round').all(st.id) as any[];
      st.rounds = rounds.map((r): StatusRound => {
        const count = (sql: string) => (db.prepare(sql).get(r.id) as { n: number }).n;
        return {
          round: r.round,
          step: r.step,
          samples: count('SELECT COUNT(*) n FROM samples WHERE round_id = ?'),
          scores: count('SELECT COUNT(*) n FROM scores x JOIN samples s ON s.id = x.sample_id WHERE s.round_id = ?'),
          pairs: count('SELECT COUNT(*) n FROM pairs WHERE round_id = ?'),
          metrics: metricsOf(db.prepare('SELECT name, value FROM metrics WHERE stage_id = ? AND round = ?').all(st.id, r.round) as any[]),
        };
      });
      st.metrics = metricsOf(db.prepare('SELECT name, value FROM metrics WHERE stage_id = ? AND round IS NULL').all(st.id) as any[]);
      delete st.id;
    }
    delete run.id;
  }
  return runs;
}
