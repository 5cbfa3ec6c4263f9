// The CLI as a user runs it: a child process (the repository's TypeScript through tsx, so no
// build is needed) with a test's temporary HOME, its exit code and both outputs returned.
import { spawnSync } from 'node:child_process';

export interface CliRun {
  code: number | null;
  out: string;
  err: string;
}

/** `influence-lens <args>` run with HOME = `home` and `env` on top of this process's environment. */
export function cliIn(home: string, env: Record<string, string> = {}, timeoutMs?: number) {
  return (...args: string[]): CliRun => {
    const r = spawnSync(process.execPath, ['--import', 'tsx', 'src/server/cli.ts', ...args], {
      encoding: 'utf8',
      env: { ...process.env, HOME: home, ...env },
      ...(timeoutMs ? { timeout: timeoutMs } : {}),
    });
    return { code: r.status, out: r.stdout, err: r.stderr };
  };
}
