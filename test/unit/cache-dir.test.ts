// Where caches go: $INFLUENCE_LENS_CACHE, or ~/.cache/influence-lens when it is unset or empty
// (an empty value, as for every INFLUENCE_LENS_* setting, is unset: it put the cache's digests/
// and graphs/ folders into whatever folder the command ran in).
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { existsSync, mkdtempSync, readdirSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import { test } from 'node:test';

const cli = resolve('src/server/cli.ts');

for (const value of ['', '  ']) {
  test(`INFLUENCE_LENS_CACHE=${JSON.stringify(value)} is unset: the cache goes to ~/.cache/influence-lens, not the working folder`, () => {
    const home = mkdtempSync(join(tmpdir(), 'il-cache-home-'));
    const cwd = mkdtempSync(join(tmpdir(), 'il-cache-cwd-'));
    const r = spawnSync(
      process.execPath,
      [
        '--import',
        import.meta.resolve('tsx'),
        cli,
        'gradients',
        '--model',
        resolve('test/fixtures/models/llama'),
        '--text',
        'a few words',
        '--out',
        join(home, 'g.safetensors'),
      ],
      { cwd, encoding: 'utf8', env: { ...process.env, HOME: home, INFLUENCE_LENS_CACHE: value } },
    );
    assert.equal(r.status, 0, r.stderr);
    assert.deepEqual(readdirSync(cwd), []);
    assert.ok(existsSync(join(home, '.cache', 'influence-lens', 'digests')));
  });
}
