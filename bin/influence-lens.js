#!/usr/bin/env node
// The CLI entry: runs the esbuild bundle (built by `npm install` / `npm run build`).
// In a source checkout without a bundle, fall back to running the TypeScript through tsx.
import { existsSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath, pathToFileURL } from 'node:url';

const root = join(dirname(fileURLToPath(import.meta.url)), '..');
const bundle = join(root, 'dist', 'cli.mjs');
if (existsSync(bundle)) {
  await import(pathToFileURL(bundle).href);
} else {
  const { register } = await import('tsx/esm/api');
  register();
  await import(pathToFileURL(join(root, 'src', 'server', 'cli.ts')).href);
}
