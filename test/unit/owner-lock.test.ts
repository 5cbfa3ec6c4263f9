// The lock between processes (common/owner-lock.ts) judges a lock stale by its process; a pid can
// be reused (a restarted container's process is PID 1 again), so the lock names its process's
// start time too, and a process with that pid that started at another time is not its owner.
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { hostname, tmpdir } from 'node:os';
import { join } from 'node:path';
import { test } from 'node:test';
import { processStart } from '../../src/common/atomic-write';
import { tryLock } from '../../src/common/owner-lock';

const onLinux = processStart(process.pid) !== undefined;

test('a lock whose pid now belongs to another process (reused pid) is taken over; its live owner keeps it', {
  skip: onLinux ? false : 'needs /proc',
}, async () => {
  const dir = mkdtempSync(join(tmpdir(), 'il-lock-'));
  const child = spawn(process.execPath, ['-e', 'setTimeout(() => {}, 60000)']);
  try {
    await new Promise((r) => child.once('spawn', r));
    const path = join(dir, 'x.lock');
    const lock = (pid: number, start?: string) =>
      writeFileSync(
        path,
        JSON.stringify({ pid, host: hostname(), ...(start ? { start } : {}), since: 'then', what: 'fitting' }),
      );
    const childStart = processStart(child.pid!)!;
    // its owner, alive: kept
    lock(child.pid!, childStart);
    const held = tryLock(path, 'me');
    assert.equal(typeof held, 'object');
    assert.equal((held as { pid: number }).pid, child.pid);
    // an earlier process with the same pid (another start time): gone, so taken over
    lock(child.pid!, String(Number(childStart) - 1000));
    const taken = tryLock(path, 'me');
    assert.equal(typeof taken, 'function', 'a reused pid does not keep a dead process lock');
    (taken as () => void)();
    // this very process's pid, written by a former process (a restarted container's PID 1 waited forever)
    lock(process.pid, String(Number(processStart(process.pid)) - 1000));
    const mine = tryLock(path, 'me');
    assert.equal(typeof mine, 'function');
    // ... while a lock this process (another thread of it) holds is never taken
    const again = tryLock(path, 'me too');
    assert.equal(typeof again, 'object', 'a held lock is not taken by its own process');
    assert.equal(JSON.parse(readFileSync(path, 'utf8')).start, processStart(process.pid));
    (mine as () => void)();
    // a lock of an earlier version (no start time) of a live pid: kept, as before
    lock(child.pid!);
    assert.equal(typeof tryLock(path, 'me'), 'object');
  } finally {
    child.kill('SIGKILL');
    rmSync(dir, { recursive: true, force: true });
  }
});
