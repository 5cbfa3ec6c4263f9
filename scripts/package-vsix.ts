// Packages the extension as a .vsix with @vscode/vsce, from a staging folder holding only what the
// extension runs: dist/extension.cjs, media/ (built by scripts/build.mjs), README and a
// package.json without the npm package's `files`/`bin`/dependencies (vsce refuses `files` next to
// .vscodeignore, and the bundle is self-contained).
//
//   npm run package:vsix      (node --import tsx scripts/package-vsix.ts [--out F] [--vsce <path to vsce>])
import { spawnSync } from 'node:child_process';
import { cpSync, existsSync, mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join, resolve } from 'node:path';
import { parseArgs } from 'node:util';

const ROOT = resolve(import.meta.dirname, '..');

export function packageVsix(out: string, vsce = defaultVsce()): string {
  for (const f of ['dist/extension.cjs', 'media/webview.js', 'media/webview.css'])
    if (!existsSync(join(ROOT, f))) throw new Error(`${f} is missing: run \`npm run build\` first`);
  const stage = mkdtempSync(join(tmpdir(), 'il-vsix-'));
  try {
    const pkg = JSON.parse(readFileSync(join(ROOT, 'package.json'), 'utf8'));
    for (const k of ['files', 'bin', 'scripts', 'dependencies', 'devDependencies', 'type']) delete pkg[k];
    writeFileSync(join(stage, 'package.json'), `${JSON.stringify(pkg, null, 2)}\n`);
    mkdirSync(join(stage, 'dist'));
    cpSync(join(ROOT, 'dist/extension.cjs'), join(stage, 'dist/extension.cjs'));
    cpSync(join(ROOT, 'media'), join(stage, 'media'), {
      recursive: true,
      filter: (p) => !p.endsWith('.map') && !p.endsWith('.gitignore') && !p.endsWith('media/README.md'),
    });
    cpSync(join(ROOT, 'README.md'), join(stage, 'README.md'));
    writeFileSync(join(stage, '.vscodeignore'), '**/*.map\n');
    mkdirSync(dirname(resolve(out)), { recursive: true });
    const r = spawnSync(
      vsce,
      [
        'package',
        '--no-dependencies',
        '--allow-missing-repository',
        '--skip-license',
        '--no-rewrite-relative-links',
        '-o',
        resolve(out),
      ],
      { cwd: stage, encoding: 'utf8' },
    );
    if ((r.error as NodeJS.ErrnoException | undefined)?.code === 'ENOENT')
      throw new Error(
        `${vsce} not found: run \`bash test/e2e/install.sh\` (installs @vscode/vsce) or pass --vsce <path>`,
      );
    if (r.status !== 0) throw new Error(`vsce failed:\n${r.stdout}\n${r.stderr}`);
    return resolve(out);
  } finally {
    rmSync(stage, { recursive: true, force: true });
  }
}

/** vsce from the e2e tools (test/e2e/install.sh), else on PATH. */
export function defaultVsce(): string {
  const tools = process.env.E2E_TOOLS ?? join(ROOT, '.cache/e2e-tools');
  const p = join(tools, 'node_modules/.bin/vsce');
  if (existsSync(p)) return p;
  return 'vsce';
}

if (import.meta.filename === process.argv[1]) {
  const { values } = parseArgs({ options: { out: { type: 'string' }, vsce: { type: 'string' } } });
  const out = packageVsix(values.out ?? join(ROOT, 'influence-lens.vsix'), values.vsce);
  console.log(`wrote ${out}`);
}
