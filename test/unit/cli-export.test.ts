// influence-lens export on the command line: never replaces a file without --force, never the
// dataset or a flags file (not even with --force).
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { test } from 'node:test';
import { lineHash } from '../../src/extension/flags/hash';
import { useTempHome } from './helpers/env';

const home = useTempHome();
const run = (...args: string[]) =>
  spawnSync(process.execPath, ['--import', 'tsx', 'src/server/cli.ts', 'export', ...args], {
    encoding: 'utf8',
    env: { ...process.env, HOME: home },
  });

test('export: an existing output is replaced only with --force; a flags file or the dataset never', () => {
  const d = (n: string) => join(home, n);
  const bad = '{"prompt":"bad","completion":"c"}';
  writeFileSync(d('train.jsonl'), `{"prompt":"a","completion":"b"}\n${bad}\n`);
  writeFileSync(d('train.exclude.jsonl'), `${JSON.stringify({ hash: lineHash(bad), line: 2 })}\n`);
  const other = '{"hash":"1111111111111111","line":1}\n';
  writeFileSync(d('other.exclude.jsonl'), other);
  writeFileSync(d('valid.jsonl'), 'MY VALIDATION SET\n');
  writeFileSync(d('train.cleaned.jsonl'), 'my earlier copy, edited by hand\n');

  const kept = run('--data', d('train.jsonl'));
  assert.equal(kept.status, 1);
  assert.match(kept.stderr, /train\.cleaned\.jsonl exists: pass --force to replace it, or --out another file/);
  assert.equal(readFileSync(d('train.cleaned.jsonl'), 'utf8'), 'my earlier copy, edited by hand\n');
  assert.equal(run('--data', d('train.jsonl'), '--out', d('valid.jsonl')).status, 1);
  assert.equal(readFileSync(d('valid.jsonl'), 'utf8'), 'MY VALIDATION SET\n');
  for (const out of ['other.exclude.jsonl', 'train.exclude.jsonl', 'train.jsonl']) {
    const r = run('--data', d('train.jsonl'), '--out', d(out), '--force');
    assert.equal(r.status, 1, out);
    assert.match(r.stderr, /refusing to write the cleaned copy over/);
  }
  assert.equal(readFileSync(d('other.exclude.jsonl'), 'utf8'), other);

  const forced = run('--data', d('train.jsonl'), '--force');
  assert.equal(forced.status, 0, forced.stderr);
  assert.equal(readFileSync(d('train.cleaned.jsonl'), 'utf8'), '{"prompt":"a","completion":"b"}\n');
  // a new file needs no --force
  assert.equal(run('--data', d('train.jsonl'), '--out', d('fresh.jsonl')).status, 0);
});
