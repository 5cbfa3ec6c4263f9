// Giving ONNX Runtime's freed tensors back to the system (glibc only; other C libraries are left
// alone). glibc serves large blocks with mmap and unmaps them when freed, but it raises that
// threshold to each mapped block it frees (up to 32 MiB on 64-bit): after ONNX Runtime's first run
// with its arena off, every tensor up to 32 MiB comes from the heap, and freed heap blocks stay
// resident. At the Pythia-70M shape with 2,048-token sequences a Λ run left 1.0 GB resident
// between runs, and the next run peaked 1.0 GB higher (2.66 GB against 1.71 GB).
//
// INFLUENCE_LENS_MALLOC chooses what to do about it:
// - 'trim' (default): after each run, malloc_trim(0) hands the heap's free pages back (madvise),
//   so nothing stays resident between runs, while within a run freed blocks are reused as usual;
// - 'mmap': the mmap threshold fixed at glibc's initial 128 KiB (mallopt(3) M_MMAP_THRESHOLD turns
//   the adjustment off): every large tensor is mapped and unmapped, the lowest peak but a page
//   fault for every page of every tensor (fit passes ~12% and scoring ~28% slower at 70M);
// - 'default': malloc as it is.
//
// In 'trim' mode a run of one sequence too long for the run budget (`mapLargeBlocks`) maps blocks
// from 4 MiB up, and the threshold goes back to 32 MiB (the adjustment's ceiling) after it: within
// such a run, freed mid-size tensors left the heap fragmented, and at 2,048 tokens of Pythia-70M a
// covariance run peaked 0.3-0.4 GB higher from the heap (+1.51 GB against +1.13 GB over the process
// before it; `bench/results/2026-12-04-vm-long-sequences-malloc.md`). Tensors of short batches stay
// on the heap: mapping them cost a page fault per page of every per-example matrix of the Λ pass.
import { createRequire } from 'node:module';
import { EnvSettingError } from './env';

export type MallocMode = 'trim' | 'mmap' | 'default';

const M_MMAP_THRESHOLD = -3;
const THRESHOLD = 128 * 1024;
/** blocks mapped during a long sequence's run, and the fixed threshold after it (glibc's dynamic ceiling) */
const LONG_RUN_THRESHOLD = 4 * 2 ** 20;
const CEILING = 32 * 2 ** 20;

interface Libc {
  mallopt: (param: number, value: number) => number;
  mallocTrim: (pad: number) => number;
}

let libc: Libc | null | undefined;
let configured: MallocMode | undefined;

/** The mode INFLUENCE_LENS_MALLOC asks for; an unknown value is refused by name. */
export function mallocMode(): MallocMode {
  const v = (process.env.INFLUENCE_LENS_MALLOC ?? '').trim().toLowerCase();
  if (v === '' || v === 'trim') return 'trim';
  if (v === 'mmap' || v === 'default') return v;
  throw new EnvSettingError(
    `INFLUENCE_LENS_MALLOC="${process.env.INFLUENCE_LENS_MALLOC}": use trim (default), mmap or default`,
  );
}

function glibc(): Libc | null {
  if (libc !== undefined) return libc;
  libc = null;
  if (process.platform !== 'linux') return libc;
  const header = (process.report?.getReport() as { header?: { glibcVersionRuntime?: string } } | undefined)?.header;
  if (!header?.glibcVersionRuntime) return libc;
  try {
    const koffi: typeof import('koffi') = createRequire(import.meta.url)('koffi');
    const c = koffi.load('libc.so.6');
    libc = {
      mallopt: c.func('int mallopt(int param, int value)') as Libc['mallopt'],
      mallocTrim: c.func('int malloc_trim(size_t pad)') as Libc['mallocTrim'],
    };
  } catch {
    // koffi is optional (as for LAPACK): without it malloc keeps its default behaviour
  }
  return libc;
}

/** Applies the mode once per process (sessions call it when they open); returns what is in effect. */
export function configureMalloc(): MallocMode {
  if (configured) return configured;
  const mode = mallocMode();
  const c = glibc();
  configured = !c ? 'default' : mode === 'mmap' && c.mallopt(M_MMAP_THRESHOLD, THRESHOLD) !== 1 ? 'default' : mode;
  return configured;
}

/**
 * In 'trim' mode, before (`on`) and after a run of one over-budget sequence: blocks from 4 MiB up are
 * mapped (and unmapped when freed) during the run; after it the threshold is fixed at 32 MiB.
 * Returns whether it changed anything (false in the other modes or without glibc).
 */
export function mapLargeBlocks(on: boolean): boolean {
  if (configureMalloc() !== 'trim') return false;
  const c = glibc();
  return !!c && c.mallopt(M_MMAP_THRESHOLD, on ? LONG_RUN_THRESHOLD : CEILING) === 1;
}

/** After a run: in 'trim' mode, hand the heap's free pages back to the system. */
export function releaseFreedMemory(): void {
  if (configured === 'trim') glibc()?.mallocTrim(0);
}
