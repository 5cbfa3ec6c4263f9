// The one lock between processes in this project (the fit job's stages and partials, the flags
// sidecar): a file naming its owner (pid, host, since when), created whole or not at all (written
// to a temporary, then hard-linked into place, which fails when the lock exists). A lock whose
// process is gone (kill -9, out of memory) is taken over at once, so a rerun after a crash
// resumes without waiting; a live owner's lock is never taken, however long it holds it.
//
// Why not proper-lockfile: it judges a lock stale by its mtime, which a timer of the holder
// refreshes. A fit blocks its event loop for minutes (LAPACK eigendecompositions, writing
// gigabytes of factors), and a suspended process (a laptop lid, SIGSTOP) refreshes nothing, so a
// second process would take over a lock that is still held and both would write (flags were
// lost that way). Here staleness is whether the owner's process exists, which can be told only on
// the owner's host: a lock of another host is never taken over (the message says which file to
// delete if that machine's process is gone). A pid can be reused (a restarted container's process
// is PID 1 again, a busy machine wraps pids): the lock also records its process's start time
// (Linux: /proc/<pid>/stat), and a process with that pid but another start time is not its owner.

import { linkSync, lstatSync, readdirSync, readFileSync, renameSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { hostname } from 'node:os';
import { join } from 'node:path';
import { notWritable, processAlive, processStart, tempPathFor } from './atomic-write';

export interface LockOwner {
  pid: number;
  host: string;
  /** the process's start time in clock ticks since boot, where the system says it (Linux) */
  start?: string;
  /** the boot the start time counts from (Linux's boot_id) */
  boot?: string;
  /** ISO time the lock was taken */
  since: string;
  /** what the owner does under it, in words */
  what: string;
}

export type Release = () => void;

/** Takes the lock at `path`, or returns its live owner (its file when unreadable: never guessed stale). */
export function tryLock(path: string, what: string): Release | LockOwner {
  const start = processStart(process.pid);
  const me: LockOwner = {
    pid: process.pid,
    host: hostname(),
    ...(start !== undefined ? { start, boot: bootId() } : {}),
    since: new Date().toISOString(),
    what,
  };
  const text = JSON.stringify(me);
  for (let attempt = 0; ; attempt++) {
    if (createExclusive(path, text))
      return () => {
        // only our own lock (it cannot have been taken over while this process lives)
        if (readText(path) === text) rmSync(path, { force: true });
      };
    if (legacyLockFolder(path)) {
      // proper-lockfile (the flags sidecar's lock before this one) made a folder here and its live
      // holders refresh its mtime every few seconds: one untouched for LEGACY_STALE_MS is dead
      if (Date.now() - statSync(path).mtimeMs < LEGACY_STALE_MS || attempt >= 3)
        return { pid: 0, host: '?', since: '?', what: `an older Influence Lens's lock folder ${path}` };
      rmSync(path, { recursive: true, force: true });
      continue;
    }
    const heldText = readText(path);
    if (heldText === undefined) continue; // released meanwhile: try again
    const owner = parseOwner(heldText);
    if (!owner) return { pid: 0, host: '?', since: '?', what: `an unreadable lock file ${path}` };
    if (!isStale(owner) || attempt >= 3) return owner;
    removeIfStill(path, heldText);
  }
}

/** How long a lock folder of the older lock (proper-lockfile) may go untouched before it is dead. */
const LEGACY_STALE_MS = 10_000;

function legacyLockFolder(path: string): boolean {
  try {
    return lstatSync(path).isDirectory();
  } catch {
    return false;
  }
}

/** Creates `path` holding `text` unless it exists (then false). */
function createExclusive(path: string, text: string): boolean {
  const tmp = tempPathFor(path);
  try {
    writeFileSync(tmp, text, { flag: 'wx' });
  } catch (e) {
    throw notWritable(e, path);
  }
  try {
    linkSync(tmp, path);
    return true;
  } catch (e) {
    const code = (e as NodeJS.ErrnoException).code;
    if (code === 'EEXIST') return false;
    if (code !== 'EPERM' && code !== 'ENOTSUP' && code !== 'ENOSYS') throw e;
  } finally {
    rmSync(tmp, { force: true });
  }
  // a file system without hard links: an exclusive create, then the write (a kill between the two
  // leaves an empty lock, which is refused as unreadable, naming the file)
  try {
    writeFileSync(path, text, { flag: 'wx' });
    return true;
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code === 'EEXIST') return false;
    throw e;
  }
}

/** Removes the locks in `dir` (named `<prefix>…lock`) whose process is gone (left by a kill -9); live ones stay. */
export function removeStaleLocks(dir: string, prefix: string): void {
  for (const name of readdirSync(dir)) {
    if (!name.startsWith(prefix) || !name.endsWith('.lock')) continue;
    const path = join(dir, name);
    const text = readText(path);
    const owner = text === undefined ? null : parseOwner(text);
    if (owner && isStale(owner)) removeIfStill(path, text!);
  }
}

/**
 * Whether the lock's process is gone (known only for a lock of this host): no process has its pid,
 * or the one that has it (this very process included: a restarted container's PID 1) started at
 * another time or in another boot, so the pid was reused. Threads of one process share its pid and
 * start time: a lock another thread holds is never taken.
 */
function isStale(owner: LockOwner): boolean {
  if (owner.host !== hostname()) return false;
  if (!processAlive(owner.pid)) return true;
  if (owner.start === undefined) return false; // a lock of an earlier version: the pid is all it says
  const b = bootId();
  if (owner.boot !== undefined && b !== undefined && owner.boot !== b) return true;
  const now = processStart(owner.pid);
  return now !== undefined && now !== owner.start;
}

let boot: string | undefined | null = null;
function bootId(): string | undefined {
  if (boot === null)
    try {
      boot = readFileSync('/proc/sys/kernel/random/boot_id', 'utf8').trim();
    } catch {
      boot = undefined;
    }
  return boot;
}

/**
 * Moves a stale lock aside and removes it, only if it still holds `held`. Two processes judging
 * the same dead lock at once can still both move a lock; the window is between the read and the
 * rename.
 */
function removeIfStill(path: string, held: string): void {
  const aside = tempPathFor(path);
  try {
    if (readText(path) === held) renameSync(path, aside);
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code !== 'ENOENT') throw e;
  }
  rmSync(aside, { force: true });
}

/**
 * Waits for the lock at `path` (polling; the event loop keeps running), saying once whom it waits
 * for. Throws the signal's reason when aborted while waiting.
 */
export async function waitLock(
  path: string,
  what: string,
  o: { log?: (line: string) => void; signal?: AbortSignal; pollMs?: number } = {},
): Promise<Release> {
  let said = false;
  for (;;) {
    o.signal?.throwIfAborted();
    const got = tryLock(path, what);
    if (typeof got === 'function') return got;
    if (!said) {
      o.log?.(`waiting for ${describeOwner(got)} (its lock is ${path}; delete that file only if no such process runs)`);
      said = true;
    }
    await new Promise((r) => setTimeout(r, o.pollMs ?? 200));
  }
}

export function describeOwner(o: LockOwner): string {
  return o.pid ? `process ${o.pid} on ${o.host} (${o.what}, since ${o.since})` : o.what;
}

function readText(path: string): string | undefined {
  try {
    return readFileSync(path, 'utf8');
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code === 'ENOENT') return undefined;
    throw e;
  }
}

function parseOwner(text: string): LockOwner | null {
  try {
    const o = JSON.parse(text) as Partial<LockOwner>;
    if (Number.isInteger(o.pid) && typeof o.host === 'string')
      return {
        pid: o.pid!,
        host: o.host,
        ...(typeof o.start === 'string' ? { start: o.start } : {}),
        ...(typeof o.boot === 'string' ? { boot: o.boot } : {}),
        since: String(o.since),
        what: String(o.what),
      };
  } catch {}
  return null;
}
