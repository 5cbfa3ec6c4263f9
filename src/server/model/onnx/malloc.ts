// glibc's malloc serves large blocks with mmap and gives them back to the system when freed,
// but it raises that threshold to each mapped block it frees (up to 32 MiB on 64-bit). After
// ONNX Runtime's first run with the arena off, every tensor up to 32 MiB comes from the heap, and
// a freed heap block stays resident: at the Pythia-70M shape with 2,048-token sequences a Λ run
// left 1.0 GB resident between runs, and the next run peaked 1.0 GB higher (2.66 GB against
// 1.71 GB with the threshold fixed, same time). Setting the threshold (to glibc's own initial
// 128 KiB) turns the adjustment off, as M_MMAP_THRESHOLD in mallopt(3) documents.
// INFLUENCE_LENS_MALLOC=default leaves malloc as it is. Other C libraries are left alone.
import { createRequire } from 'node:module';

const M_MMAP_THRESHOLD = -3;
const THRESHOLD = 128 * 1024;

let done: boolean | undefined;

/** Fix glibc's mmap threshold once per process; true when it was set. */
export function fixMmapThreshold(): boolean {
  if (done !== undefined) return done;
  done = false;
  if ((process.env.INFLUENCE_LENS_MALLOC ?? '').trim().toLowerCase() === 'default') return done;
  if (process.platform !== 'linux') return done;
  const header = (process.report?.getReport() as { header?: { glibcVersionRuntime?: string } } | undefined)?.header;
  if (!header?.glibcVersionRuntime) return done;
  try {
    const koffi: typeof import('koffi') = createRequire(import.meta.url)('koffi');
    const mallopt = koffi.load('libc.so.6').func('int mallopt(int param, int value)') as (
      p: number,
      v: number,
    ) => number;
    done = mallopt(M_MMAP_THRESHOLD, THRESHOLD) === 1;
  } catch {
    // koffi is optional (as for LAPACK): without it malloc keeps its default behaviour
  }
  return done;
}
