// Large typed arrays (covariances, eigenvectors, LAPACK workspaces, query rows: hundreds of MB
// each at real shapes) live outside V8's heap and are freed only when V8 next collects, which
// nothing in a stage's native work (ONNX Runtime runs, LAPACK calls) prompts. Between stages the
// garbage of the last one piled up under the next one's peak: the CLI fit at the Qwen2.5-0.5B
// shape started its Λ pass at 14.6 GB and peaked at 24.3 GB on a 24 GB machine. A stage that has
// dropped large arrays calls this before the next allocates.
import { setFlagsFromString } from 'node:v8';
import { runInNewContext } from 'node:vm';

let gc: (() => void) | undefined;

/** A full garbage collection now (V8's `gc`, exposed once through its flag; no command-line flag needed). */
export function collectGarbage(): void {
  if (!gc) {
    setFlagsFromString('--expose-gc');
    gc = runInNewContext('gc') as () => void;
  }
  gc();
}
