// ONNX Runtime writes under $HOME and our engine caches graphs: keep both in a temp dir
// per test process so tests never touch the developer's home.
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after } from 'node:test';

export function useTempHome(): string {
  const dir = mkdtempSync(join(tmpdir(), 'il-test-'));
  process.env.INFLUENCE_LENS_CACHE = join(dir, 'cache');
  after(() => rmSync(dir, { recursive: true, force: true }));
  return dir;
}
