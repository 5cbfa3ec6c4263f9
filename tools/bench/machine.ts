// What every benchmark report says about where it ran.
import { execFileSync } from 'node:child_process';
import { cpus, hostname } from 'node:os';
import { packageRoot } from '../../src/server/defaults';

/** The checked-out commit, when this is a git checkout. */
export function gitHead(): string | undefined {
  try {
    return execFileSync('git', ['rev-parse', '--short', 'HEAD'], { cwd: packageRoot(), encoding: 'utf8' }).trim();
  } catch {
    return undefined;
  }
}

/** suite, date, host, CPU count, Node version and commit: the header of a report. */
export function reportHeader(suite: string) {
  return {
    suite,
    date: new Date().toISOString(),
    host: hostname(),
    cpus: cpus().length,
    node: process.version,
    commit: gitHead(),
  };
}
