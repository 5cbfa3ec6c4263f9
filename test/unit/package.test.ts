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
