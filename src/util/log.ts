/**
 * Human-readable progress on a TTY, one JSON object per event with --json. Everything goes to
 * stderr so stdout stays clean for command results.
 */
let jsonMode = false;
let quiet = false;

export function setLogMode(opts: { json?: boolean; quiet?: boolean }): void {
  jsonMode = !!opts.json;
  quiet = !!opts.quiet;
}


export function log(event: string, fields: Record<string, unknown> = {}, message?: string): void {
  if (quiet) return;
  if (jsonMode) {
    process.stderr.write(JSON.stringify({ ts: new Date().toISOString(), event, ...fields }) + '\n');
  } else {
    const tail = Object.entries(fields)
      .map(([k, v]) => `${k}=${typeof v === 'number' ? fmt(v) : typeof v === 'string' ? v : JSON.stringify(v)}`)
      .join(' ');
    process.stderr.write(`[prefopt] ${message ?? event}${tail ? ' ' + tail : ''}\n`);
  }
}

function fmt(v: number): string {
  if (Number.isInteger(v)) return String(v);
  return Math.abs(v) >= 1e-3 && Math.abs(v) < 1e5 ? v.toFixed(4) : v.toExponential(3);
}

/** A progress bar that draws only on a TTY and never in --json mode. */
export class Progress {
  private start = Date.now();
  private last = 0;
  private readonly live: boolean;
  constructor(
    private label: string,
    private total: number,
  ) {
    this.live = !!process.stderr.isTTY && !jsonMode && !quiet;
  }
  tick(done: number, extra = ''): void {
    if (!this.live) return;
    const now = Date.now();
    if (now - this.last < 100 && done < this.total) return;
    this.last = now;
    const frac = this.total ? Math.min(1, done / this.total) : 0;
    const width = 24;
    const bar = '#'.repeat(Math.round(frac * width)).padEnd(width, '.');
    const el = (now - this.start) / 1000;
    const eta = frac > 0 ? el / frac - el : 0;
    process.stderr.write(`\r${this.label} [${bar}] ${done}/${this.total} ${el.toFixed(0)}s eta ${eta.toFixed(0)}s ${extra}`.slice(0, (process.stderr.columns ?? 120) - 1));
  }
  done(): void {
    if (this.live) process.stderr.write('\n');
  }
}
