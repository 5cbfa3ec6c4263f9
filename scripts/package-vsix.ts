// Packages the extension as a .vsix with @vscode/vsce, from a staging folder holding only what the
// extension runs: dist/extension.cjs, media/ (built by scripts/build.mjs), README and a
// package.json without the npm package's `files`/`bin`/dependencies (vsce refuses `files` next to
// .vscodeignore, and the bundle is self-contained).
//
//   npm run package:vsix      (node --import tsx scripts/package-vsix.ts [--out F] [--vsce <path to vsce>])
//   npm run package:vsix -- --target linux-x64|linux-arm64|darwin-arm64|darwin-x64|win32-x64
//     a platform VSIX that carries its server (stageServer below): installs alone, no checkout
import { spawnSync } from 'node:child_process';
import { cpSync, existsSync, mkdirSync, mkdtempSync, readFileSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join, resolve } from 'node:path';
import { parseArgs } from 'node:util';

const ROOT = resolve(import.meta.dirname, '..');

/** VS Code's platform targets we ship, with Node's platform/arch names. */
export const TARGETS = {
  'linux-x64': ['linux', 'x64'],
  'linux-arm64': ['linux', 'arm64'],
  'darwin-arm64': ['darwin', 'arm64'],
  'darwin-x64': ['darwin', 'x64'],
  'win32-x64': ['win32', 'x64'],
} as const;
export type Target = keyof typeof TARGETS;

export function packageVsix(out: string, vsce = defaultVsce(), target?: Target): string {
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
      filter: (p) =>
        !p.endsWith('.map') && !p.endsWith('.gitignore') && !p.endsWith('.npmignore') && !p.endsWith('media/README.md'),
    });
    cpSync(join(ROOT, 'README.md'), join(stage, 'README.md'));
    writeFileSync(join(stage, '.vscodeignore'), '**/*.map\n');
    if (target) stageServer(stage, target);
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
        ...(target ? ['--target', target] : []),
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

/**
 * The server inside a platform VSIX: the CLI bundle (dist/cli.mjs, one esbuild file), the
 * embedded default model and data, and the two native dependencies for this target only:
 * onnxruntime-node (its JS, onnxruntime-common, the N-API binding and runtime library of
 * bin/napi-v6/<platform>/<arch>; no CUDA provider) and koffi (its JS and the prebuilt
 * koffi.node from @koromix/koffi-<platform>-<arch>). Nothing is downloaded at install or run
 * time; a koffi prebuild for another platform is fetched here, at packaging time, with `npm pack`.
 * The extension finds it as <extension>/server/cli.mjs (src/extension/client/index.ts); `serve`
 * starts its worker threads from server/service-worker.mjs beside it.
 */
export function stageServer(stage: string, target: Target): void {
  const [platform, arch] = TARGETS[target];
  if (!existsSync(join(ROOT, 'dist/cli.mjs'))) throw new Error('dist/cli.mjs is missing: run `npm run build` first');
  // under server/: vsce leaves out a top-level node_modules, and the bundle resolves its natives from server/node_modules
  cpSync(join(ROOT, 'dist/cli.mjs'), join(stage, 'server/cli.mjs'));
  // `serve` runs the service in worker threads, loaded from the bundle's folder
  cpSync(join(ROOT, 'dist/service-worker.mjs'), join(stage, 'server/service-worker.mjs'));
  cpSync(join(ROOT, 'assets/default'), join(stage, 'assets/default'), { recursive: true });
  const nm = join(stage, 'server/node_modules');
  const ort = join(ROOT, 'node_modules/onnxruntime-node');
  const ortBin = join(ort, 'bin/napi-v6', platform, arch);
  if (!existsSync(ortBin))
    throw new Error(
      `onnxruntime-node ${readJson(join(ort, 'package.json')).version} ships no binary for ${platform}/${arch} (${ortBin}); ` +
        `cannot package ${target}`,
    );
  cpSync(ort, join(nm, 'onnxruntime-node'), {
    recursive: true,
    filter: (p) => {
      const rel = p.slice(ort.length);
      if (rel.startsWith('/bin/'))
        return (
          rel === '/bin/napi-v6' ||
          (`${rel}/`.startsWith(`/bin/napi-v6/${platform}/`) &&
            (rel.split('/').length <= 4 || rel.startsWith(`/bin/napi-v6/${platform}/${arch}`)))
        );
      return !rel.startsWith('/script') && !rel.endsWith('.map') && !rel.endsWith('.ts');
    },
  });
  cpSync(join(ROOT, 'node_modules/onnxruntime-common'), join(nm, 'onnxruntime-common'), {
    recursive: true,
    filter: (p) => !p.endsWith('.map') && !p.endsWith('.ts') && !p.includes('/lib/'),
  });
  const koffi = join(ROOT, 'node_modules/koffi');
  const version = readJson(join(koffi, 'package.json')).version as string;
  cpSync(koffi, join(nm, 'koffi'), {
    recursive: true,
    filter: (p) => {
      const rel = p.slice(koffi.length);
      return !/^\/(vendor|doc|build)(\/|$)/.test(rel) && !/\.(cc|hh|h|c|S|asm|txt|md|d\.ts)$/.test(rel);
    },
  });
  const triplet = `${platform}_${arch}`;
  const dest = join(nm, 'koffi/build/koffi', triplet);
  mkdirSync(dest, { recursive: true });
  cpSync(koffiPrebuild(`${platform}-${arch}`, triplet, version), join(dest, 'koffi.node'));
}

/** koffi.node for a platform: from the installed @koromix package, else `npm pack`ed into .cache. */
function koffiPrebuild(pkgSuffix: string, triplet: string, version: string): string {
  const local = join(ROOT, 'node_modules/@koromix', `koffi-${pkgSuffix}`, triplet, 'koffi.node');
  if (existsSync(local) && readJson(join(dirname(dirname(local)), 'package.json')).version === version) return local;
  const cache = join(ROOT, '.cache/vsix-prebuilds', `koffi-${pkgSuffix}-${version}`);
  const file = join(cache, 'package', triplet, 'koffi.node');
  if (existsSync(file)) return file;
  mkdirSync(cache, { recursive: true });
  const pack = spawnSync('npm', ['pack', `@koromix/koffi-${pkgSuffix}@${version}`, '--pack-destination', cache], {
    encoding: 'utf8',
  });
  if (pack.status !== 0) throw new Error(`npm pack @koromix/koffi-${pkgSuffix}@${version} failed: ${pack.stderr}`);
  const tgz = pack.stdout.trim().split('\n').at(-1)!;
  const tar = spawnSync('tar', ['xzf', join(cache, tgz), '-C', cache], { encoding: 'utf8' });
  if (tar.status !== 0 || !existsSync(file)) throw new Error(`no ${triplet}/koffi.node in ${tgz}: ${tar.stderr}`);
  return file;
}

function readJson(p: string) {
  return JSON.parse(readFileSync(p, 'utf8'));
}

/** vsce from the e2e tools (test/e2e/install.sh), else on PATH. */
export function defaultVsce(): string {
  const tools = process.env.E2E_TOOLS ?? join(ROOT, '.cache/e2e-tools');
  const p = join(tools, 'node_modules/.bin/vsce');
  if (existsSync(p)) return p;
  return 'vsce';
}

if (import.meta.filename === process.argv[1]) {
  const { values } = parseArgs({
    options: { out: { type: 'string' }, vsce: { type: 'string' }, target: { type: 'string' } },
  });
  const t = values.target;
  if (t !== undefined && !(t in TARGETS))
    throw new Error(`--target must be one of ${Object.keys(TARGETS).join(', ')} (got "${t}")`);
  const out = packageVsix(
    values.out ?? join(ROOT, t ? `influence-lens-${t}.vsix` : 'influence-lens.vsix'),
    values.vsce,
    t as Target | undefined,
  );
  console.log(`wrote ${out} (${(statSync(out).size / 2 ** 20).toFixed(1)} MiB)`);
}
