// Bundles the CLI/server and the VS Code extension with esbuild.
// Native modules (onnxruntime-node, koffi) and `vscode` stay external: they are
// loaded from node_modules / the editor at run time.

import { copyFileSync, existsSync } from 'node:fs';
import { build } from 'esbuild';

const external = ['onnxruntime-node', 'koffi', 'vscode'];
// jsonc-parser's `main` is a UMD build whose require() calls esbuild cannot follow: bundle its ESM build
const alias = { 'jsonc-parser': 'jsonc-parser/lib/esm/main.js' };
const common = {
  bundle: true,
  platform: 'node',
  target: 'node20',
  sourcemap: true,
  external,
  alias,
  logLevel: 'warning',
};

await build({
  ...common,
  entryPoints: ['src/server/cli.ts'],
  outfile: 'dist/cli.mjs',
  format: 'esm',
  // Bundled CJS dependencies call require(); give the ESM bundle one.
  banner: { js: "import { createRequire as __cr } from 'node:module'; const require = __cr(import.meta.url);" },
});
// The service's worker threads (src/server/service/worker-service.ts looks for it beside cli.mjs).
await build({
  ...common,
  entryPoints: ['src/server/service/service-worker.ts'],
  outfile: 'dist/service-worker.mjs',
  format: 'esm',
  banner: { js: "import { createRequire as __cr } from 'node:module'; const require = __cr(import.meta.url);" },
});
if (existsSync('src/extension/extension.ts')) {
  await build({ ...common, entryPoints: ['src/extension/extension.ts'], outfile: 'dist/extension.cjs', format: 'cjs' });
}
// influence-lens.json validation in the editor (contributes.jsonValidation)
copyFileSync('influence-lens.schema.json', 'media/influence-lens.schema.json');
// The results panel's page: one script and one stylesheet (with the codicon font) in media/.
if (existsSync('src/webview/main.ts')) {
  await build({
    entryPoints: ['src/webview/main.ts'],
    outfile: 'media/webview.js',
    bundle: true,
    platform: 'browser',
    format: 'iife',
    target: 'chrome120',
    minify: true,
    sourcemap: true,
    loader: { '.ttf': 'file' },
    assetNames: '[name]',
    logLevel: 'warning',
  });
}
