// How a client finds a running server: the server writes {url, token, pid, protocolVersion}
// to a file only its user can read (0600, in a 0700 directory), and removes it on a clean
// shutdown. The extension may instead spawn the server with INFLUENCE_LENS_TOKEN set.
import { randomBytes } from 'node:crypto';
import { chmodSync, mkdirSync, readFileSync, rmSync, statSync } from 'node:fs';
import { homedir } from 'node:os';
import { dirname, join } from 'node:path';
import { writeFileAtomic } from '../common/atomic-write';
import { PROTOCOL_VERSION } from '../protocol/rpc';

export interface DiscoveryInfo {
  /** ws://host:port/ */
  url: string;
  /** send as `Authorization: Bearer <token>` */
  token: string;
  pid: number;
  protocolVersion: number;
}

export const TOKEN_ENV = 'INFLUENCE_LENS_TOKEN';

/** ~/.cache/influence-lens/server.json ($HOME is honoured). */
export function defaultDiscoveryFile(): string {
  return join(homedir(), '.cache', 'influence-lens', 'server.json');
}

/** 32 random bytes, base64url (43 characters). */
export function newToken(): string {
  return randomBytes(32).toString('base64url');
}

/** The token from INFLUENCE_LENS_TOKEN when set (checked), else a fresh random one. */
export function resolveToken(env: NodeJS.ProcessEnv = process.env): string {
  const t = env[TOKEN_ENV];
  if (t === undefined || t === '') return newToken();
  checkToken(t, TOKEN_ENV);
  return t;
}

export function checkToken(t: string, what = 'the token'): void {
  if (t.length < 16) throw new Error(`${what} is too short: use at least 16 characters (32 random bytes is best)`);
  if (t.length > 512) throw new Error(`${what} is too long (at most 512 characters)`);
  if (!/^[\x21-\x7e]+$/.test(t)) throw new Error(`${what} may only contain visible ASCII characters (no spaces)`);
}

/**
 * Writes the file atomically with mode 0600, in a directory made 0700 when created. The default
 * directory (~/.cache/influence-lens, ours alone) is made 0700 even when it already existed with
 * looser bits; a directory the user chose is theirs, and left as it is.
 */
export function writeDiscoveryFile(file: string, info: DiscoveryInfo): void {
  const dir = dirname(file);
  mkdirSync(dir, { recursive: true, mode: 0o700 });
  if (dir === dirname(defaultDiscoveryFile()) && process.platform !== 'win32') chmodSync(dir, 0o700);
  writeFileAtomic(file, `${JSON.stringify(info, null, 2)}\n`, { mode: 0o600 });
  chmodSync(file, 0o600); // in case the umask took bits away
}

/**
 * Reads a discovery file; undefined when it does not exist. Throws with a clear message when it
 * is malformed or readable by others (then the token is not secret any more).
 */
export function readDiscoveryFile(file: string = defaultDiscoveryFile()): DiscoveryInfo | undefined {
  let text: string;
  try {
    text = readFileSync(file, 'utf8');
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code === 'ENOENT') return undefined;
    throw e;
  }
  if (process.platform !== 'win32' && (statSync(file).mode & 0o077) !== 0)
    throw new Error(`${file} is readable by other users; delete it and restart the server`);
  let v: Partial<DiscoveryInfo>;
  try {
    v = JSON.parse(text);
  } catch {
    throw new Error(`${file} is not valid JSON; delete it and restart the server`);
  }
  if (typeof v?.url !== 'string' || typeof v.token !== 'string' || typeof v.pid !== 'number')
    throw new Error(`${file} lacks url, token or pid; delete it and restart the server`);
  return { url: v.url, token: v.token, pid: v.pid, protocolVersion: v.protocolVersion ?? PROTOCOL_VERSION };
}

/** Removes the file if it is still ours (another server may have replaced it since). */
export function removeDiscoveryFile(file: string, token: string): void {
  try {
    const v = JSON.parse(readFileSync(file, 'utf8'));
    if (v?.token !== token) return;
    rmSync(file, { force: true });
  } catch {
    // missing or unreadable: nothing of ours to remove
  }
}
