#!/usr/bin/env node
// The CLI entry: runs the esbuild bundle (built by `npm install` / `npm run build`).
// In a source checkout, the TypeScript runs through tsx when there is no bundle or when any
// source file is newer than it: a stale bundle would silently run old code.
import { existsSync, readdirSync, statSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath, pathToFileURL } from 'node:url';

const root = join(dirname(fileURLToPath(import.meta.url)), '..');
const bundle = join(root, 'dist', 'cli.mjs');
const source = join(root, 'src', 'server', 'cli.ts');

/** The newest modification time of the files under `dir` (0 when it does not exist). */
function newest(dir) {
  let t = 0;
  for (const e of readdirSync(dir, { withFileTypes: true })) {
    const p = join(dir, e.name);
    t = Math.max(t, e.isDirectory() ? newest(p) : statSync(p).mtimeMs);
  }
  return t;
}

const checkout = existsSync(source);
const fresh = existsSync(bundle) && (!checkout || newest(join(root, 'src')) <= statSync(bundle).mtimeMs);
if (fresh) {
  await import(pathToFileURL(bundle).href);
} else {
  const { register } = await import('tsx/esm/api');
  register();
  await import(pathToFileURL(source).href);
}
