// The layers, as rules on imports (docs/ARCHITECTURE.md draws them). Every relative import
// (static, dynamic, `export … from`, type-only included) of every file under src/ is resolved
// and checked, so a shortcut across a layer fails here instead of in a review.
import assert from 'node:assert/strict';
import { readdirSync, readFileSync, statSync } from 'node:fs';
import { dirname, join, relative, resolve } from 'node:path';
import { test } from 'node:test';
import ts from 'typescript';

const ROOT = process.cwd();

function files(dir: string): string[] {
  return readdirSync(dir).flatMap((name) => {
    const p = join(dir, name);
    if (statSync(p).isDirectory()) return files(p);
    return /\.(ts|mts|cts)$/.test(name) && !name.endsWith('.d.ts') ? [p] : [];
  });
}

/** [importing file, imported path] for every relative import, paths relative to the repository. */
function imports(): Array<[string, string]> {
  const out: Array<[string, string]> = [];
  for (const f of files(join(ROOT, 'src'))) {
    const info = ts.preProcessFile(readFileSync(f, 'utf8'), true, true);
    for (const spec of info.importedFiles.map((i) => i.fileName))
      if (spec.startsWith('.')) out.push([relative(ROOT, f), relative(ROOT, resolve(dirname(f), spec))]);
  }
  return out;
}

const all = imports();
const under = (p: string, dir: string) => p === dir || p.startsWith(`${dir}/`);

/** Fails listing every import from `from` into one of `banned`. */
function forbid(from: string[], banned: string[], why: string) {
  const bad = all.filter(([f, to]) => from.some((d) => under(f, d)) && banned.some((d) => under(to, d)));
  assert.deepEqual(
    bad.map(([f, to]) => `${f} -> ${to}`),
    [],
    why,
  );
}

test('the scan sees the imports (a rule that matches nothing cannot pass by accident)', () => {
  assert.ok(all.length > 200, `${all.length} imports`);
  assert.ok(all.some(([f, to]) => under(f, 'src/extension') && under(to, 'src/transport')));
  assert.ok(all.some(([f, to]) => under(f, 'src/server/service') && under(to, 'src/server/attribution')));
});

test('the extension imports nothing under src/server/ (it talks to the server over the protocol)', () => {
  forbid(['src/extension', 'src/webview'], ['src/server'], 'the editor side reaches into the server');
});

test('nothing under src/ imports tools/ (the product does not ship the tooling)', () => {
  forbid(['src'], ['tools', 'test'], 'product code imports developer tooling');
});

test('the engine (model, attribution, linalg, data, index) never imports transport, service or CLI', () => {
  forbid(
    ['src/server/model', 'src/server/attribution', 'src/server/linalg', 'src/server/data', 'src/server/index'],
    ['src/transport', 'src/server/service', 'src/server/cli', 'src/extension'],
    'the engine depends on how requests arrive',
  );
});

test('protocol, common and transport are shared ground: they import no side', () => {
  forbid(
    ['src/protocol'],
    ['src/common', 'src/transport', 'src/server', 'src/extension', 'src/webview'],
    'the protocol is plain declarations',
  );
  forbid(['src/common'], ['src/transport', 'src/server', 'src/extension', 'src/webview'], 'common code takes a side');
  forbid(['src/transport'], ['src/server', 'src/extension', 'src/webview'], 'the transport knows an application');
});
