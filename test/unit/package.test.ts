// The package as users meet it: npm commands in the checkout print no warnings of ours, and the
// packed CLI installs into an empty folder and runs the demo (`npx influence-lens` outside the repo).
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { mkdirSync, readdirSync } from 'node:fs';
import { join, resolve } from 'node:path';
import { test } from 'node:test';
import { useTempHome } from './helpers/env';

const home = useTempHome();
const root = resolve('.');
// npm's own update notice is not ours; the user's real npm cache keeps installs offline-capable.
const npmEnv = {
  ...process.env,
  ONNXRUNTIME_NODE_INSTALL: 'skip',
  npm_config_update_notifier: 'false',
  npm_config_audit: 'false',
  npm_config_fund: 'false',
};

test('npx in the checkout prints no npm warning (no unknown project config)', () => {
  const r = spawnSync('npx', ['influence-lens', '--help'], { cwd: root, encoding: 'utf8', env: npmEnv });
  assert.equal(r.status, 0, r.stderr);
  assert.match(r.stdout, /usage: influence-lens/);
  assert.doesNotMatch(r.stderr, /npm warn/i, r.stderr);
});

test('npm pack → npm install in an empty folder → npx influence-lens demo', { timeout: 1_800_000 }, () => {
  // the npm cache npm already uses here (npm ci filled it), so the install needs no network
  const cache = spawnSync('npm', ['config', 'get', 'cache'], { encoding: 'utf8', env: npmEnv }).stdout.trim();
  const packDir = join(home, 'pack');
  mkdirSync(packDir);
  // npm pack runs `prepare` (the build), so the tarball holds what this checkout builds now
  const pack = spawnSync('npm', ['pack', '--json', '--pack-destination', packDir], {
    cwd: root,
    encoding: 'utf8',
    env: npmEnv,
    maxBuffer: 64 << 20,
  });
  assert.equal(pack.status, 0, pack.stderr);
  const info = JSON.parse(pack.stdout.slice(pack.stdout.indexOf('[')))[0] as {
    filename: string;
    files: Array<{ path: string }>;
  };
  const files = info.files.map((f) => f.path);
  for (const need of [
    'bin/influence-lens.js',
    'dist/cli.mjs',
    'dist/extension.cjs',
    'media/webview.js',
    'media/webview.css',
    'media/codicon.ttf',
    'media/influence-lens.schema.json',
    'assets/default/finetuned/model.safetensors',
    'assets/default/pretrained/model.safetensors',
    'assets/default/data/finetune.jsonl',
  ])
    assert.ok(files.includes(need), `the package lacks ${need}`);
  // assets/nonlex is bench eval's (tools/bench), which the package does not ship
  const stray = files.filter((f) => /^(test|tools|src|scripts|bench|docs|assets\/nonlex)\/|\.map$/.test(f));
  assert.deepEqual(stray, [], 'nothing from the checkout but what the CLI runs');

  const app = join(home, 'app');
  mkdirSync(app);
  const install = spawnSync(
    'npm',
    ['install', '--prefer-offline', '--no-audit', '--no-fund', join(packDir, info.filename)],
    { cwd: app, encoding: 'utf8', env: { ...npmEnv, npm_config_cache: cache } },
  );
  assert.equal(install.status, 0, install.stderr);
  assert.deepEqual(
    readdirSync(app).sort(),
    ['node_modules', 'package-lock.json', 'package.json'],
    'npm made a project of the empty folder',
  );
  const demo = spawnSync('npx', ['influence-lens', 'demo'], {
    cwd: app,
    encoding: 'utf8',
    env: {
      ...npmEnv,
      npm_config_cache: cache,
      HOME: join(home, 'user'),
      INFLUENCE_LENS_CACHE: join(home, 'user-cache'),
    },
    maxBuffer: 64 << 20,
  });
  assert.equal(demo.status, 0, demo.stderr);
  assert.doesNotMatch(demo.stderr, /npm warn/i);
  assert.match(demo.stdout, /completion: " Sydney"/);
  assert.match(demo.stdout, /planted sources in the top 10: [34] of 4/);
  assert.match(demo.stdout, /5\. Ask again\s+completion: " Canberra"/);
});
