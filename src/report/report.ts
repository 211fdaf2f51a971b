import * as fs from 'node:fs';
import * as path from 'node:path';
import * as vega from 'vega';
import { compile } from 'vega-lite';
import { Resvg } from '@resvg/resvg-js';
import { openDb } from '../store/db.js';
import { reportRows } from '../store/run.js';
import { writeFileAtomic } from '../util/fsutil.js';
import { readMetricsFile } from '../train/trainer.js';
import { UserError } from '../util/errors.js';

/**
 * `prefopt report`: one self-contained report.html for a run directory — loss curves, DPO
 * metrics, reward per on-policy round and the evaluation table — with charts drawn by
 * vega-lite, rendered to SVG headless and rasterised to PNG by resvg.
 */
type Row = Record<string, number | string>;

async function png(spec: Record<string, unknown>): Promise<string> {
  const view = new vega.View(vega.parse(compile({ $schema: 'https://vega.github.io/schema/vega-lite/v6.json', width: 520, height: 220, ...spec } as any).spec), { renderer: 'none' });
  const svg = await view.toSVG();
  view.finalize();
  const buf = new Resvg(svg, { background: 'white', font: { loadSystemFonts: true } }).render().asPng();
  return `data:image/png;base64,${Buffer.from(buf).toString('base64')}`;
}

function readMetrics(file: string, source: string): Row[] {
  return readMetricsFile(file).map((r) => ({ ...r, source }) as Row);
}

const esc = (s: string) => s.replace(/[&<>"]/g, (c) => ({ '&': '&amp;', '<': '&lt;', '>': '&gt;', '"': '&quot;' })[c]!);

export async function writeReport(workdir: string): Promise<string> {
  const dbFile = path.join(workdir, 'prefopt.db');
  if (!fs.existsSync(dbFile)) throw new UserError(`${workdir}: no prefopt.db (not a run directory)`);
  const db = openDb(dbFile);
  let stages: { id: number; name: string; kind: string; status: string; output: string | null }[];
  let metrics: { stage: string; round: number | null; name: string; value: number | null }[];
  let runName = '';
  try {
    ({ runName, stages, metrics } = reportRows(db));
  } finally {
    db.close();
  }
  const train: Row[] = [];
  for (const st of stages) {
    const dir = path.join(workdir, st.name);
    if (st.kind === 'online_dpo') {
      for (const r of fs.existsSync(dir) ? fs.readdirSync(dir).filter((d) => /^round-\d+$/.test(d)).sort() : []) train.push(...readMetrics(path.join(dir, r, 'metrics.jsonl'), `${st.name}/${r}`));
    } else train.push(...readMetrics(path.join(dir, 'metrics.jsonl'), st.name));
  }
  const trainRows = train.filter((r) => r.split === 'train' && typeof r.loss === 'number');
  const dpoRows = train.filter((r) => typeof r['rewards/accuracies'] === 'number').map((r) => ({ ...r, accuracies: r['rewards/accuracies'], margins: r['rewards/margins'] }));
  const rounds = metrics.filter((m) => m.round !== null && /^reward\/(mean|max|min|best_of_k)$/.test(m.name)).map((m) => ({ stage: m.stage, round: m.round!, stat: m.name.slice(7), reward: m.value ?? 0 }));
  const roundTable = roundRows(metrics);
  const evalStages = new Set(stages.filter((s) => s.kind === 'eval').map((s) => s.name));
  const evals = metrics.filter((m) => m.round === null && evalStages.has(m.stage) && /\/(accuracy|mean_reward)$/.test(m.name)).map((m) => ({ model: m.name.split('/')[0], measure: m.name.split('/')[1], value: m.value ?? 0 }));
  const charts: { title: string; img: string }[] = [];
  if (trainRows.length) charts.push({ title: 'Training loss', img: await png({ data: { values: trainRows }, mark: { type: 'line', point: false }, encoding: { x: { field: 'step', type: 'quantitative' }, y: { field: 'loss', type: 'quantitative' }, color: { field: 'source', type: 'nominal' } } }) });
  if (dpoRows.length) charts.push({ title: 'DPO reward accuracy and margin', img: await png({ data: { values: dpoRows }, transform: [{ fold: ['accuracies', 'margins'] }], mark: 'line', encoding: { x: { field: 'step', type: 'quantitative' }, y: { field: 'value', type: 'quantitative' }, color: { field: 'source', type: 'nominal' }, strokeDash: { field: 'key', type: 'nominal' } } }) });
  if (rounds.length) charts.push({ title: 'Sample reward per on-policy round', img: await png({ data: { values: rounds }, mark: { type: 'line', point: true }, encoding: { x: { field: 'round', type: 'ordinal' }, y: { field: 'reward', type: 'quantitative' }, color: { field: 'stat', type: 'nominal' } } }) });
  if (evals.length) charts.push({ title: 'Held-out accuracy and mean reward per model', img: await png({ data: { values: evals }, mark: 'bar', encoding: { x: { field: 'model', type: 'nominal', sort: null }, xOffset: { field: 'measure' }, y: { field: 'value', type: 'quantitative' }, color: { field: 'measure', type: 'nominal' } } }) });
  const evalTable = [...new Set(evals.map((e) => e.model))].map((m) => {
    const get = (k: string) => evals.find((e) => e.model === m && e.measure === k)?.value;
    return `<tr><td>${esc(m)}</td><td>${get('accuracy')?.toFixed(3) ?? '-'}</td><td>${get('mean_reward')?.toFixed(3) ?? '-'}</td></tr>`;
  });
  const html = `<!doctype html><html><head><meta charset="utf-8"><title>prefopt report: ${esc(runName)}</title>
<style>body{font-family:sans-serif;max-width:900px;margin:2em auto}table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:4px 8px;text-align:left}</style></head><body>
<h1>prefopt run ${esc(runName)}</h1>
<h2>Stages</h2><table><tr><th>stage</th><th>type</th><th>status</th><th>output</th></tr>
${stages.map((s) => `<tr><td>${esc(s.name)}</td><td>${esc(s.kind)}</td><td>${esc(s.status)}</td><td>${esc(s.output ?? '')}</td></tr>`).join('\n')}</table>
${evalTable.length ? `<h2>Held-out evaluation</h2><table><tr><th>model</th><th>accuracy</th><th>mean reward</th></tr>${evalTable.join('')}</table>` : ''}
${roundTable}
${charts.map((c) => `<h2>${esc(c.title)}</h2><img alt="${esc(c.title)}" src="${c.img}">`).join('\n')}
</body></html>
`;
  const out = path.join(workdir, 'report.html');
  writeFileAtomic(out, html);
  return out;
}

/** The columns of the per-round table: metric name → heading. */
const ROUND_COLUMNS: [string, string][] = [
  ['reward/mean', 'reward mean'],
  ['reward/min', 'min'],
  ['reward/max', 'max'],
  ['reward/best_of_k', 'best of K'],
  ['eval/accuracy', 'held-out accuracy'],
  ['pairs', 'pairs'],
  ['dropped/tie', 'ties'],
  ['kl', 'KL to reference'],
  ['kl/sft', 'KL to sft-base'],
  ['dpo/rewards/margins', 'DPO margin'],
  ['audit/pair_agreement', 'audit agreement'],
];

/** One row per on-policy round: what it sampled, how it trained, where it ended. */
function roundRows(metrics: { stage: string; round: number | null; name: string; value: number | null }[]): string {
  const keys = [...new Set(metrics.filter((m) => m.round !== null).map((m) => `${m.stage}\u0000${m.round}`))].sort();
  if (!keys.length) return '';
  const cols = ROUND_COLUMNS.filter(([k]) => metrics.some((m) => m.round !== null && m.name === k));
  const rows = keys.map((key) => {
    const [stage, round] = key.split('\u0000');
    const get = (k: string) => metrics.find((m) => m.stage === stage && String(m.round) === round && m.name === k)?.value;
    const cell = (k: string) => {
      const v = get(k);
      return v === undefined || v === null ? '-' : Number.isInteger(v) ? String(v) : v.toFixed(3);
    };
    return `<tr><td>${esc(stage)}</td><td>${round}</td>${cols.map(([k]) => `<td>${cell(k)}</td>`).join('')}</tr>`;
  });
  return `<h2>On-policy rounds</h2><table><tr><th>stage</th><th>round</th>${cols.map(([, h]) => `<th>${esc(h)}</th>`).join('')}</tr>${rows.join('')}</table>`;
}

