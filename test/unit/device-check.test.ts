// The GPU check (scripts/device-check.sh / .ts) runs where no CI machine can: on a GPU. Its whole
// path is run here on the CPU against itself (`cpu` named as the device to check), so that a
// change elsewhere cannot break it unseen before it meets a GPU; and the wrapper's refusal where
// there is no GPU is checked as it is.
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { existsSync } from 'node:fs';
import { test } from 'node:test';
import { useTempHome } from './helpers/env';

const home = useTempHome();
const env = { ...process.env, INFLUENCE_LENS_CACHE: `${home}/cache` };

test('device-check.ts runs engine, fit and batch explain on a device and compares its scores with the CPU run', () => {
  const r = spawnSync(
    process.execPath,
    ['--import', 'tsx', 'scripts/device-check.ts', 'assets/default/finetuned', 'cpu'],
    { encoding: 'utf8', env, timeout: 600_000 },
  );
  assert.equal(r.status, 0, `${r.stdout}\n${r.stderr}`);
  const lines = r.stdout.trim().split('\n');
  assert.equal(lines[0], 'cpu: available');
  const rate = /^cpu\s+engine\s+(\d+) tokens\/s\s+fit\s+(\d+) tokens\/s\s+explain\s+([\d.]+) candidates\/s/;
  assert.match(lines[1], rate);
  assert.match(lines[2], rate);
  for (const x of rate.exec(lines[2])!.slice(1)) assert.ok(Number(x) > 0, lines[2]);
  // the same device twice: the same scores, so every query agrees
  assert.match(lines[2], /×cpu: [\d.]+ \/ [\d.]+ \/ [\d.]+ {3}Spearman vs cpu 1\.0000, 1\.0000, 1\.0000, 1\.0000 ok$/);
});

test('device-check.ts with a device this build does not have says so and exits 2', () => {
  const r = spawnSync(
    process.execPath,
    ['--import', 'tsx', 'scripts/device-check.ts', 'assets/default/finetuned', 'cuda'],
    { encoding: 'utf8', env, timeout: 120_000 },
  );
  if (r.status === 0) return; // a machine with the CUDA provider installed: the first test's path
  assert.equal(r.status, 2, `${r.stdout}\n${r.stderr}`);
  assert.match(r.stdout, /^cuda: NOT available — /m);
  assert.match(r.stdout, /FAIL: no GPU execution provider works on this machine/);
});

test('device-check.sh on a machine without a GPU exits 2 with the reason', {
  skip:
    existsSync('/dev/dri') || spawnSync('sh', ['-c', 'command -v nvidia-smi']).status === 0
      ? 'this machine has a GPU'
      : false,
}, () => {
  const r = spawnSync('bash', ['scripts/device-check.sh', 'assets/default/finetuned'], { encoding: 'utf8', env });
  assert.equal(r.status, 2);
  assert.match(r.stderr, /no GPU here \(no nvidia-smi, no \/dev\/dri\): this check needs a machine with a GPU/);
});
