// malloc.ts gives ONNX Runtime's freed tensors back to the system (glibc). Checked in child
// processes (the setting is process-wide), one per INFLUENCE_LENS_MALLOC mode:
// - which blocks are mapped: a 4 MiB block is freed, which raises glibc's dynamic mmap threshold
//   past 1 MiB, then 1 MiB blocks are allocated; a chunk header's IS_MMAPPED bit (0x2 in the size
//   word before the pointer) says whether it was mapped ('mmap' fixes the threshold: one is, once
//   the heap's free chunks are used up) or came from the heap ('trim', 'default': none of 64); the
//   block's own header, so other threads cannot change the answer;
// - a long sequence's run (`mapLargeBlocks`): after a 16 MiB block is freed (glibc's threshold
//   rises past 8 MiB), an 8 MiB block is mapped during such a run and comes from the heap after it;
// - what a run's end gives back: 64 touched 1 MiB heap blocks, fenced from the heap's top by a
//   small block (256 KiB from the top, so free() cannot trim them itself), are freed, then `releaseFreedMemory` runs:
//   'trim' returns them (resident memory drops by most of 64 MiB), 'default' keeps them.
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { isGlibc, runModuleChild } from './helpers/child';

const CHILD = `
import { createRequire } from 'node:module';
import { readFileSync } from 'node:fs';
import { configureMalloc, mapLargeBlocks, releaseFreedMemory } from './src/server/util/malloc.ts';
const koffi = createRequire(import.meta.url)('koffi');
const mode = configureMalloc();
const libc = koffi.load('libc.so.6');
const malloc = libc.func('void *malloc(size_t size)');
const free = libc.func('void free(void *ptr)');
const memset = libc.func('void *memset(void *s, int c, size_t n)');
const resident = () => Number(readFileSync('/proc/self/statm', 'utf8').split(' ')[1]) * 4096;
const isMapped = (q) => (BigInt(koffi.decode(q, -8, 'uint64')) & 2n) !== 0n;
free(malloc(4 << 20));
// glibc serves a request from a free heap chunk large enough whatever the threshold (one left by
// Node's start-up failed this once in CI): take up to 64 blocks, so that any such chunks are used
// up before the first block is mapped; with the threshold past 1 MiB none ever is
const probes = [];
let mapped = false;
for (let i = 0; i < 64 && !mapped; i++) {
  probes.push(malloc(1 << 20));
  mapped = isMapped(probes[probes.length - 1]);
}
for (const q of probes) free(q);
const blocks = Array.from({ length: 64 }, () => { const b = malloc(1 << 20); memset(b, 1, 1 << 20); return b; });
const fence = malloc(256 << 10);
for (const b of blocks) free(b);
const before = resident();
releaseFreedMemory();
const returned = before - resident();
free(fence);
// a long sequence's run: 8 MiB blocks mapped during it, from the heap again after it
free(malloc(16 << 20)); // glibc's threshold rises past 8 MiB: an 8 MiB block would come from the heap
const changed = mapLargeBlocks(true);
const during = malloc(8 << 20);
const duringMapped = isMapped(during);
free(during);
mapLargeBlocks(false);
free(malloc(16 << 20));
const after = malloc(8 << 20);
const afterMapped = isMapped(after);
free(after);
console.log(JSON.stringify({ mode, mapped, returnedMiB: Math.round(returned / 2 ** 20), changed, duringMapped, afterMapped }));
`;

const child = (mode?: string) => runModuleChild(CHILD, { INFLUENCE_LENS_MALLOC: mode });

test('malloc modes: trim (default) returns freed heap pages after a run, mmap maps large blocks, default neither', {
  skip: !isGlibc && 'not glibc',
}, () => {
  const trim = child();
  assert.equal(trim.status, 0, trim.stderr);
  assert.equal(trim.out.mode, 'trim');
  assert.equal(trim.out.mapped, false, 'trim leaves the mmap threshold to glibc');
  assert.ok(trim.out.returnedMiB >= 48, `trim returned ${trim.out.returnedMiB} MiB of 64 freed`);
  // a run of one sequence over the budget maps blocks from 4 MiB up; after it they come from the heap
  assert.deepEqual([trim.out.changed, trim.out.duringMapped, trim.out.afterMapped], [true, true, false]);
  const mmap = child('mmap');
  assert.equal(mmap.status, 0, mmap.stderr);
  assert.deepEqual([mmap.out.mode, mmap.out.mapped], ['mmap', true]);
  const plain = child('default');
  assert.equal(plain.status, 0, plain.stderr);
  assert.deepEqual([plain.out.mode, plain.out.mapped], ['default', false]);
  assert.equal(plain.out.changed, false, 'default leaves malloc alone in long runs too');
  assert.ok(plain.out.returnedMiB < 16, `default kept the freed blocks (returned ${plain.out.returnedMiB} MiB)`);
  const bad = child('sometimes');
  assert.notEqual(bad.status, 0);
  assert.match(bad.stderr, /INFLUENCE_LENS_MALLOC="sometimes": use trim \(default\), mmap or default/);
});
