// Runs every test file under test/ (except the Python oracle) with Node's test runner.
// Node 20's `--test` does not expand globs or pick up .ts files, so we list them here.
import { spawnSync } from 'node:child_process';
import { readdirSync, statSync } from 'node:fs';
import { join } from 'node:path';

function find(dir) {
  const out = [];
  for (const name of readdirSync(dir)) {
    const p = join(dir, name);
    if (name === 'oracle' || name === 'fixtures' || name === 'node_modules') continue;
    if (statSync(p).isDirectory()) out.push(...find(p));
    // *.e2e.ts: the editor end to end (skips without its tools; see test/e2e/install.sh)
    else if (name.endsWith('.test.ts') || name.endsWith('.e2e.ts')) out.push(p);
  }
  return out.sort();
}
const only = process.argv.slice(2);
const files = only.length ? only : find('test');
const r = spawnSync(process.execPath, ['--import', 'tsx', '--test', '--test-concurrency=1', ...files], {
  stdio: 'inherit',
});
process.exit(r.status ?? 1);
