// Large typed arrays (covariances, eigenvectors, LAPACK workspaces, query rows, ONNX Runtime's
// outputs: hundreds of MB each at real shapes) live outside V8's heap and are freed only when V8
// next collects, which nothing in a stage's native work (ONNX Runtime runs, LAPACK calls) prompts.
// Between stages the garbage of the last one piled up under the next one's peak: the CLI fit at the
// Qwen2.5-0.5B shape started its Λ pass at 16.3 GB and peaked at 24.1 GB on a 24 GB machine. A stage
// that has dropped large arrays calls collectGarbage before the next allocates; a loop whose every
// iteration drops large results notes their bytes and collects once enough have piled up.
//
// Collecting is not enough by itself: the freed buffers go back to glibc's heap, which keeps
// anything under its dynamic mmap threshold (up to 32 MiB, once ONNX Runtime has freed a large
// tensor) resident, so each collection is followed by malloc_trim (util/malloc.ts). V8 frees array
// buffers on a background thread after a collection by default, too late for the trim that follows
// it (300 freed 6 MB arrays: 1.28 GB resident after gc + trim; 0.05 GB once sweeping is on the main
// thread), hence --no-concurrent-array-buffer-sweeping.
import { setFlagsFromString } from 'node:v8';
import { runInNewContext } from 'node:vm';
import { releaseFreedMemory } from './malloc';

let gc: (() => void) | undefined;
let noted = 0;
let collections = 0;
/** the array buffers alive right after the last collection */
let buffersAfterCollection = 0;

/**
 * A full garbage collection now, and the freed memory handed back to the system (V8's `gc`, exposed
 * once through its flag; no command-line flag needed).
 */
export function collectGarbage(): void {
  if (!gc) {
    setFlagsFromString('--expose-gc');
    setFlagsFromString('--no-concurrent-array-buffer-sweeping');
    gc = runInNewContext('gc') as () => void;
  }
  gc();
  releaseFreedMemory();
  noted = 0;
  collections++;
  buffersAfterCollection = process.memoryUsage().arrayBuffers;
}

/**
 * Collects when the array buffers (alive, or garbage not yet collected) have grown by `limit`
 * bytes since the last collection. For a step that drops arrays whose size it does not track
 * (explain's query rows): a full collection costs time in proportion to the heap, so one per
 * query over a batch of thousands of queries, whose states all stay alive to the end, grew the
 * batch's time with the square of its size; at real model shapes the rows are hundreds of MB and
 * this collects as before.
 */
export function collectWhenBuffersGrew(limit: number): boolean {
  if (process.memoryUsage().arrayBuffers - buffersAfterCollection < limit) return false;
  collectGarbage();
  return true;
}

/** `bytes` of results that will be garbage once their caller is done with them (a run's outputs). */
export function noteDroppedSoon(bytes: number): void {
  noted += bytes;
}

/**
 * Collects when what was noted since the last collection has reached `limit` bytes; call it before
 * the next large allocation (a run), when the previous results are no longer referenced.
 */
export function collectWhenPiledUp(limit: number): boolean {
  if (noted < limit) return false;
  collectGarbage();
  return true;
}

/** Bytes noted since the last collection (for tests). */
export function garbageNoted(): number {
  return noted;
}

/** How many collections this process has made through this module (for tests). */
export function garbageCollections(): number {
  return collections;
}
