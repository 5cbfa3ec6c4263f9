// Tests of process-wide settings (malloc, V8 flags) run their code in a child process: the
// repository's TypeScript through tsx, an ES module given as a string.
import { spawnSync } from 'node:child_process';

/** glibc's allocator (malloc_trim, mmap thresholds) is what the memory tests exercise */
export const isGlibc =
  process.platform === 'linux' &&
  !!(process.report.getReport() as { header?: { glibcVersionRuntime?: string } }).header?.glibcVersionRuntime;

/**
 * Runs `code` (an ES module; imports relative to the repository root) in a fresh Node process
 * with this process's environment, `env` applied on top (undefined deletes a variable). `out` is
 * the last line of its stdout parsed as JSON, null when the child failed.
 */
export function runModuleChild(code: string, env: Record<string, string | undefined> = {}) {
  const childEnv: NodeJS.ProcessEnv = { ...process.env };
  for (const [k, v] of Object.entries(env)) {
    if (v === undefined) delete childEnv[k];
    else childEnv[k] = v;
  }
  const r = spawnSync(process.execPath, ['--import', 'tsx', '--input-type=module', '-e', code], {
    env: childEnv,
    encoding: 'utf8',
  });
  return {
    status: r.status,
    stderr: r.stderr,
    out: r.status === 0 ? JSON.parse(r.stdout.trim().split('\n').pop()!) : null,
  };
}
