// Fingerprints tie factors, caches and results to the exact model and data they came from,
// so a stale or mismatched factor directory is refused instead of silently misused.
import { createHash } from 'node:crypto';
import { closeSync, openSync, readFileSync, readSync } from 'node:fs';
import { join } from 'node:path';
import type { Checkpoint } from '../model/checkpoint';

const hex16 = (h: ReturnType<typeof createHash>) => h.digest('hex').slice(0, 16);

/**
 * The model: config.json and, per weight file, its safetensors header and size, plus a
 * sample of weight bytes from each tensor (a retrained model has the same header; its bytes
 * differ). Cheap even for multi-GB checkpoints: no full read.
 */
export function modelFingerprint(ck: Checkpoint): string {
  const h = createHash('sha256');
  h.update(readFileSync(join(ck.dir, 'config.json')));
  const buf = Buffer.alloc(64);
  const fds = new Map<string, number>();
  try {
    for (const w of ck.weights.values()) {
      let fd = fds.get(w.file);
      if (fd === undefined) {
        fd = openSync(w.file, 'r');
        fds.set(w.file, fd);
      }
      h.update(`${w.name}:${w.dtype}:${w.shape.join('x')}:`);
      // first and middle 64 bytes of every tensor
      for (const at of [0, Math.floor(w.byteLength / 2)]) {
        const n = readSync(fd, buf, 0, Math.min(64, w.byteLength - at), w.byteOffset + at);
        h.update(buf.subarray(0, n));
      }
    }
  } finally {
    for (const fd of fds.values()) closeSync(fd);
  }
  return hex16(h);
}

/** The data: the ordered content hashes of the examples used, and how they were tokenized. */
export function dataFingerprint(exampleHashes: string[], extra: Record<string, unknown> = {}): string {
  const h = createHash('sha256');
  h.update(JSON.stringify(extra));
  for (const x of exampleHashes) h.update(x);
  return hex16(h);
}
