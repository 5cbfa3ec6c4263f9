// What every benchmark report says about where it ran.

import { execFileSync } from 'node:child_process';
import { cpus, hostname } from 'node:os';
import { packageRoot } from '../../src/server/defaults';
import { nativeLapack } from '../../src/server/linalg/native';

/** The checked-out commit, when this is a git checkout. */
export function gitHead(): string | undefined {
  try {
    return execFileSync('git', ['rev-parse', '--short', 'HEAD'], { cwd: packageRoot(), encoding: 'utf8' }).trim();
  } catch {
    return undefined;
  }
}

/** suite, date, host, CPU model and count, Node version and commit: the header of a report. The
 * model matters when comparing with PyTorch: its MKL ran kronfluence's eigendecompositions 1.7×
 * slower on an AMD EPYC VM than on the same-sized VM of another day, where ours moved 1.1×. */
export function reportHeader(suite: string) {
  return {
    suite,
    date: new Date().toISOString(),
    host: hostname(),
    cpu: cpus()[0]?.model,
    cpus: cpus().length,
    node: process.version,
    commit: gitHead(),
    /** the kernels OpenBLAS runs here (LAPACK and BLAS outside ONNX Runtime), null without OpenBLAS */
    openblas_core: nativeLapack()?.core ?? null,
  };
}
