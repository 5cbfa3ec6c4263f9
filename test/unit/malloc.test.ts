// malloc.ts fixes glibc's mmap threshold so that freed tensors leave the process. Checked in a
// child process (the setting is process-wide): a 4 MiB block is freed, which raises glibc's
// dynamic threshold past 1 MiB, then a 1 MiB block is allocated; its chunk header's IS_MMAPPED
// bit (0x2 in the size word just before the pointer) says whether it was mapped (threshold fixed)
// or taken from the heap (default). The header, not a process-wide count such as mallinfo2's, so
// that other threads' allocations cannot change the answer.
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { test } from 'node:test';

const CHILD = `
import { createRequire } from 'node:module';
import { fixMmapThreshold } from './src/server/model/onnx/malloc.ts';
const koffi = createRequire(import.meta.url)('koffi');
const fixed = fixMmapThreshold();
const libc = koffi.load('libc.so.6');
const malloc = libc.func('void *malloc(size_t size)');
const free = libc.func('void free(void *ptr)');
free(malloc(4 << 20));
const p = malloc(1 << 20);
const mapped = (BigInt(koffi.decode(p, -8, 'uint64')) & 2n) !== 0n;
free(p);
console.log(JSON.stringify({ fixed, mapped }));
`;

function child(env: Record<string, string>) {
  const r = spawnSync(process.execPath, ['--import', 'tsx', '--input-type=module', '-e', CHILD], {
    env: { ...process.env, ...env },
    encoding: 'utf8',
  });
  assert.equal(r.status, 0, r.stderr);
  return JSON.parse(r.stdout.trim().split('\n').pop()!) as { fixed: boolean; mapped: boolean };
}

const glibc =
  process.platform === 'linux' &&
  !!(process.report.getReport() as { header?: { glibcVersionRuntime?: string } }).header?.glibcVersionRuntime;

test('a freed large block no longer raises the mmap threshold (glibc)', { skip: !glibc && 'not glibc' }, () => {
  assert.deepEqual(child({}), { fixed: true, mapped: true });
  // the default behaviour, which the fix exists for: after a 4 MiB free, 1 MiB comes from the heap
  assert.deepEqual(child({ INFLUENCE_LENS_MALLOC: 'default' }), { fixed: false, mapped: false });
});
