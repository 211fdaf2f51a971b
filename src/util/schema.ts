/**
 * A small schema language for recipes: every problem is reported with its field path, what was
 * expected and what was found, and all problems are reported at once.
 */
export type Spec =
  | { kind: 'string'; enum?: string[] }
  | { kind: 'number'; min?: number; max?: number; exclusiveMin?: boolean; exclusiveMax?: boolean; int?: boolean }
  | { kind: 'boolean' }
  | { kind: 'strings' }
  | { kind: 'object'; fields: Record<string, Spec>; required?: string[]; open?: boolean }
  | { kind: 'map'; of: Spec }
  | { kind: 'list'; of: Spec }
  | { kind: 'any' };

export interface Problem {
  path: string;
  expected: string;
  found: unknown;
}

export const str = (e?: string[]): Spec => ({ kind: 'string', enum: e });
export const num = (o: { min?: number; max?: number; exclusiveMin?: boolean; exclusiveMax?: boolean } = {}): Spec => ({ kind: 'number', ...o });
export const int = (o: { min?: number; max?: number } = {}): Spec => ({ kind: 'number', int: true, ...o });
export const bool: Spec = { kind: 'boolean' };
export const strings: Spec = { kind: 'strings' };
export const obj = (fields: Record<string, Spec>, required: string[] = [], open = false): Spec => ({ kind: 'object', fields, required, open });

export function describe(s: Spec): string {
  switch (s.kind) {
    case 'string':
      return s.enum ? s.enum.map((x) => JSON.stringify(x)).join(' | ') : 'a string';
    case 'number': {
      const lo = s.min !== undefined ? (s.exclusiveMin ? `> ${s.min}` : `≥ ${s.min}`) : '';
      const hi = s.max !== undefined ? (s.exclusiveMax ? `< ${s.max}` : `≤ ${s.max}`) : '';
      return `${s.int ? 'an integer' : 'a number'}${lo || hi ? ' ' + [lo, hi].filter(Boolean).join(' and ') : ''}`;
    }
    case 'boolean':
      return 'true or false';
    case 'strings':
      return 'a list of strings';
    case 'object':
      return 'a mapping';
    case 'map':
      return 'a mapping';
    case 'list':
      return 'a list';
    case 'any':
      return 'anything';
  }
}

export function check(v: unknown, s: Spec, path: string, out: Problem[]): void {
  const bad = (): void => void out.push({ path, expected: describe(s), found: v });
  switch (s.kind) {
    case 'string':
      if (typeof v !== 'string' || (s.enum && !s.enum.includes(v))) bad();
      return;
    case 'number':
      if (typeof v !== 'number' || !Number.isFinite(v) || (s.int && !Number.isInteger(v)) || (s.min !== undefined && (s.exclusiveMin ? v <= s.min : v < s.min)) || (s.max !== undefined && (s.exclusiveMax ? v >= s.max : v > s.max))) bad();
      return;
    case 'boolean':
      if (typeof v !== 'boolean') bad();
      return;
    case 'strings':
      if (!Array.isArray(v) || v.some((x) => typeof x !== 'string')) bad();
      return;
    case 'any':
      return;
    case 'list':
      if (!Array.isArray(v)) return bad();
      v.forEach((x, i) => check(x, s.of, `${path}[${i}]`, out));
      return;
    case 'map':
      if (!v || typeof v !== 'object' || Array.isArray(v)) return bad();
      for (const [k, x] of Object.entries(v)) check(x, s.of, `${path}.${k}`, out);
      return;
    case 'object': {
      if (!v || typeof v !== 'object' || Array.isArray(v)) return bad();
      const o = v as Record<string, unknown>;
      for (const k of s.required ?? []) if (o[k] === undefined) out.push({ path: `${path}.${k}`, expected: `${describe(s.fields[k])} (required)`, found: undefined });
      for (const [k, x] of Object.entries(o)) {
        const f = s.fields[k];
        if (!f) {
          if (!s.open) out.push({ path: `${path}.${k}`, expected: `one of the known fields (${Object.keys(s.fields).join(', ')})`, found: `unknown field "${k}"` });
          continue;
        }
        if (x !== undefined && x !== null) check(x, f, `${path}.${k}`, out);
      }
    }
  }
}

export function formatProblems(file: string, ps: Problem[]): string {
  return ps.map((p) => `${file}: ${p.path.replace(/^\./, '')}: expected ${p.expected}, found ${p.found === undefined ? 'nothing' : JSON.stringify(p.found)}`).join('\n');
}

/**
 * A table of options, each declared once: the config key, the recipe field (the CLI flag is its
 * kebab-case), the allowed values and the help. Recipe schemas, flags and range checks are all
 * read from such tables (train/options, dpo/loss, lora/lora).
 */
export interface OptionRow<K extends string> {
  key: K;
  field: string;
  /** The CLI flag without "--", where it is not the field in kebab-case (LoRA's `lora-r` for `lora.r`). */
  flag?: string;
  /**
   * Its name in Hugging Face's configs (TRL's DPOConfig and the TrainingArguments under it, PEFT's
   * LoraConfig) where that is not the field; null where they have no such setting. Used by the
   * trainer-command config file (stages/trl-config).
   */
  hf?: string | null;
  spec: Spec;
  help: string;
}

/** The recipe schema of a table's fields. */
export function fieldsOf(rows: OptionRow<string>[]): Record<string, Spec> {
  return Object.fromEntries(rows.map((o) => [o.field, o.spec]));
}

/** The first value of `c` that breaks its row's spec, as "field: expected …, found …", or null. */
export function firstViolation<K extends string>(rows: OptionRow<K>[], c: Record<K, unknown>): string | null {
  for (const o of rows) {
    const problems: Problem[] = [];
    check(c[o.key], o.spec, o.field, problems);
    if (problems.length) return `${o.field}: expected ${problems[0].expected}, found ${JSON.stringify(problems[0].found)}`;
  }
  return null;
}

/** A row's CLI flag name (without "--"). */
export const flagOf = (o: OptionRow<string>) => o.flag ?? o.field.replace(/_/g, '-');

/** A recipe field or flag name as commander stores it: rpo_alpha or rpo-alpha → rpoAlpha. */
export const camel = (name: string) => name.replace(/[_-](\w)/g, (_, c: string) => c.toUpperCase());

/** A table's values from parsed CLI options (commander's camelCase) or a recipe stage (snake_case), over `base`. */
export function valuesFrom<K extends string, C extends Record<K, unknown>>(rows: OptionRow<K>[], o: Record<string, any>, base: C, from: 'flags' | 'recipe'): C {
  const c: any = { ...base };
  for (const row of rows) {
    const v = o[from === 'flags' ? camel(flagOf(row)) : row.field];
    if (v !== undefined) c[row.key] = v;
  }
  return c;
}
