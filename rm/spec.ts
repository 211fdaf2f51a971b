import * as fs from 'node:fs';
import * as path from 'node:path';
import { pathToFileURL } from 'node:url';
import { UserError } from '../src/util/errors.js';
import { BUILTINS } from './rules.js';
import { BtScorer } from './bt.js';
import { DEFAULT_HTTP, HttpScorer, HttpScorerOptions } from './http.js';
import { Prompt, PromptRow, Scorer, checkScores, promptLabel } from './scorer.js';

/**
 * Scorer specs, the same on the command line and in recipes:
 *   model:DIR                 a Bradley–Terry reward model checkpoint
 *   module:PATH[#exportName]  a JS/TS module exporting fn(prompt, completions, row?) → number[]
 *   http:URL or a bare http(s)://… URL   a reward-model server (see rm/http.ts for the protocol)
 *   builtin:NAME              a built-in rule (exact_answer, length)
 */
export async function makeScorer(spec: string, opts: { http?: Partial<HttpScorerOptions>; baseDir?: string } = {}): Promise<Scorer> {
  const i = spec.indexOf(':');
  if (i < 0) throw new UserError(`scorer "${spec}": expected model:DIR, module:PATH[#export], http:URL or builtin:NAME`);
  const kind = spec.slice(0, i);
  const rest = spec.slice(i + 1);
  const resolve = (p: string) => (opts.baseDir && !path.isAbsolute(p) ? path.join(opts.baseDir, p) : p);
  switch (kind) {
    case 'model':
      return new BtScorer(resolve(rest));
    case 'builtin': {
      const make = BUILTINS[rest];
      if (!make) throw new UserError(`scorer "${spec}": unknown built-in (have ${Object.keys(BUILTINS).join(', ')})`);
      return make();
    }
    case 'http':
    case 'https':
      // "http:URL" with a full URL after the colon, or a bare "http(s)://..." URL.
      return new HttpScorer(/^https?:\/\//.test(rest) ? rest : spec, { ...DEFAULT_HTTP, ...opts.http });
    case 'module':
      return moduleScorer(resolve(rest.split('#')[0]), rest.includes('#') ? rest.slice(rest.indexOf('#') + 1) : 'default');
    default:
      throw new UserError(`scorer "${spec}": unknown kind "${kind}" (model, module, http, builtin)`);
  }
}

async function moduleScorer(file: string, exportName: string): Promise<Scorer> {
  const abs = path.resolve(file);
  if (!fs.existsSync(abs)) throw new UserError(`scorer module ${file}: file not found`);
  let mod: any;
  try {
    if (/\.[cm]?ts$/.test(abs)) {
      const { tsImport } = await import('tsx/esm/api');
      mod = await tsImport(pathToFileURL(abs).href, import.meta.url);
    } else mod = await import(pathToFileURL(abs).href);
  } catch (e: any) {
    throw new UserError(`scorer module ${file}: failed to load (${e?.message ?? e})`);
  }
  const fn = mod?.[exportName] ?? (exportName === 'default' ? mod?.default?.default : undefined);
  if (typeof fn !== 'function') throw new UserError(`scorer module ${file}: export "${exportName}" is not a function`);
  const label = `module:${file}#${exportName}`;
  const stat = fs.statSync(abs);
  return {
    name: label,
    version: `${stat.size}-${Math.round(stat.mtimeMs)}`,
    async score(prompt: Prompt, completions: string[], row?: PromptRow) {
      let out: unknown;
      try {
        out = await fn(prompt, completions, row);
      } catch (e: any) {
        throw new UserError(`${label} threw on the sample for prompt ${promptLabel(prompt)}: ${e?.message ?? e}`);
      }
      return checkScores(out, completions.length, label, `prompt ${promptLabel(prompt)}`);
    },
  };
}
