import { describe, expect, it } from 'vitest';
import * as fs from 'node:fs';
import * as path from 'node:path';
import ts from 'typescript';

/*
 * The layering the code keeps (docs and issue 21): SQL only in src/store, no function longer
 * than 100 lines in src/ or rm/, and nothing below the CLI/recipe layer importing the CLI's
 * command modules. Checked on the sources, so a change that breaks one fails here.
 */
function sources(dir: string): string[] {
  return fs.readdirSync(dir, { withFileTypes: true }).flatMap((e) => (e.isDirectory() ? sources(path.join(dir, e.name)) : e.name.endsWith('.ts') ? [path.join(dir, e.name)] : []));
}
const files = [...sources('src'), ...sources('rm')];

describe('code structure', () => {
  it('SQL statements are prepared only in src/store', () => {
    const outside = files.filter((f) => !f.startsWith(path.join('src', 'store')) && /\.prepare\(/.test(fs.readFileSync(f, 'utf8')));
    expect(outside).toEqual([]);
  });

  it('no function in src/ or rm/ is longer than 100 lines', () => {
    const long: string[] = [];
    for (const f of files) {
      const sf = ts.createSourceFile(f, fs.readFileSync(f, 'utf8'), ts.ScriptTarget.Latest, true);
      const visit = (n: ts.Node): void => {
        if (ts.isFunctionDeclaration(n) || ts.isMethodDeclaration(n) || ts.isArrowFunction(n) || ts.isFunctionExpression(n)) {
          const a = sf.getLineAndCharacterOfPosition(n.getStart()).line;
          const b = sf.getLineAndCharacterOfPosition(n.getEnd()).line;
          if (b - a + 1 > 100) long.push(`${f}:${a + 1} (${b - a + 1} lines)`);
        }
        ts.forEachChild(n, visit);
      };
      visit(sf);
    }
    expect(long).toEqual([]);
  });

  it('only the CLI and recipe layer import src/commands or src/cli.ts', () => {
    const layer = (f: string) => f === path.join('src', 'cli.ts') || f.startsWith(path.join('src', 'commands')) || f.startsWith(path.join('src', 'recipe'));
    const bad = files.filter((f) => !layer(f) && /from '(\.\.?\/)+(src\/)?(commands\/|cli\.js)/.test(fs.readFileSync(f, 'utf8')));
    expect(bad).toEqual([]);
  });
});
