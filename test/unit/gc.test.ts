// Collecting JS garbage between large native allocations (util/gc.ts): the engine notes each run's
// output bytes and collects before a run once enough have piled up, so that earlier runs' outputs
// (1.6 GB a Λ run at the Qwen2.5-0.5B shape) do not stack up under the next run's peak.
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { setImmediate as tick } from 'node:timers/promises';
import { Model, makeBatch } from '../../src/server/model/engine';
import {
  collectGarbage,
  collectWhenBuffersGrew,
  collectWhenPiledUp,
  garbageCollections,
  garbageNoted,
  noteDroppedSoon,
} from '../../src/server/util/gc';
import { isGlibc, runModuleChild } from './helpers/child';
import { useTempHome } from './helpers/env';

useTempHome();

test('collectWhenPiledUp collects only once the noted bytes reach the limit, then starts counting again', () => {
  collectGarbage();
  const before = garbageCollections();
  noteDroppedSoon(600);
  assert.equal(collectWhenPiledUp(1000), false);
  assert.equal(garbageCollections(), before);
  noteDroppedSoon(400);
  assert.equal(collectWhenPiledUp(1000), true);
  assert.equal(garbageCollections(), before + 1);
  assert.equal(garbageNoted(), 0);
  assert.equal(collectWhenPiledUp(1000), false);
});

test('collectWhenBuffersGrew collects only once array buffers grew by the limit since the last collection', () => {
  collectGarbage();
  const before = garbageCollections();
  // a few kilobytes dropped (a tiny model's query rows): not worth a full collection
  let small: Float32Array | undefined = new Float32Array(1024);
  small[0] = 1;
  small = undefined;
  assert.equal(collectWhenBuffersGrew(8 * 2 ** 20), false);
  assert.equal(garbageCollections(), before);
  // 16 MB dropped: collected, and the count starts again from what is left alive
  let big: Float32Array | undefined = new Float32Array(4 * 2 ** 20);
  big[0] = 1;
  big = undefined;
  assert.equal(collectWhenBuffersGrew(8 * 2 ** 20), true);
  assert.equal(garbageCollections(), before + 1);
  assert.equal(collectWhenBuffersGrew(8 * 2 ** 20), false);
  assert.equal(small, undefined);
});

test('collectGarbage frees an unreachable typed array', async () => {
  let big: Float32Array | undefined = new Float32Array(1 << 20);
  const ref = new WeakRef(big);
  big = undefined;
  // a WeakRef's target stays alive until the current job ends
  await tick();
  collectGarbage();
  assert.equal(ref.deref(), undefined);
});

test("a graph run notes its outputs' bytes for the next run's collection", async () => {
  const model = Model.open('test/fixtures/models/llama', { threads: 1, cacheDir: process.env.INFLUENCE_LENS_CACHE });
  const graph = await model.compile({ tokenLoss: true, perToken: true, modules: 'all' });
  const batch = makeBatch([{ ids: [1, 2, 3, 4, 5] }, { ids: [6, 7, 8] }], 0);
  collectGarbage();
  const out = await graph.run(batch);
  // each tensor once: modules that read one input share one (an alias is not more bytes)
  const tensors = new Set(Object.values(out).map((t) => t.data as ArrayBufferView));
  assert.ok(tensors.size < Object.keys(out).length, 'q/k/v and gate/up share their activation rows');
  const bytes = [...tensors].reduce((s, d) => s + d.byteLength, 0);
  assert.ok(bytes > 0);
  assert.equal(garbageNoted(), bytes);
  await graph.run(batch);
  assert.equal(garbageNoted(), 2 * bytes);
});

test("a loop over runs that reads each run's outputs in a function frees them at the next run's collection", async () => {
  const model = Model.open('test/fixtures/models/llama', { threads: 1, cacheDir: process.env.INFLUENCE_LENS_CACHE });
  const graph = await model.compile({ tokenLoss: true, perToken: true, modules: 'all' });
  const batch = makeBatch([{ ids: [1, 2, 3, 4, 5] }, { ids: [6, 7, 8] }], 0);
  const freed: number[] = [];
  const registry = new FinalizationRegistry((i: number) => freed.push(i));
  let sum = 0;
  // as the fit's passes read their runs (RunResult): nothing of a run kept in the loop's variables
  const read = (out: Awaited<ReturnType<typeof graph.run>>, i: number) => {
    registry.register(out['token_nll'].data as Float32Array, i);
    sum += (out['token_nll'].data as Float32Array)[0];
  };
  for (let i = 0; i < 3; i++) {
    // the next run collects, as it would once 64 MiB of outputs had piled up
    noteDroppedSoon(2 ** 40);
    read(await graph.run(batch), i);
  }
  await tick(); // finalizers run as tasks after the collection that found their targets dead
  assert.ok(Number.isFinite(sum));
  // the collection before run i+1 found run i's outputs unreachable (none of the last run's yet)
  assert.deepEqual(freed.sort(), [0, 1]);
});

// In a child process (malloc settings are process-wide): glibc's mmap threshold is first raised, as
// ONNX Runtime's first freed tensor raises it, so that 1 MiB arrays come from the heap; 256 of them
// are touched and dropped, each fenced by a small live array. A bare V8 collection leaves them resident (glibc keeps freed heap pages);
// collectGarbage hands them back.
const CHILD = `
import { readFileSync } from 'node:fs';
import { setFlagsFromString } from 'node:v8';
import { runInNewContext } from 'node:vm';
import { configureMalloc } from './src/server/util/malloc.ts';
import { collectGarbage } from './src/server/util/gc.ts';
const resident = () => Number(readFileSync('/proc/self/statm', 'utf8').split(' ')[1]) * 4096;
configureMalloc();
setFlagsFromString('--expose-gc');
// array buffers freed by the collection itself, not later on a background thread: under load the
// 16 MiB array below was not yet freed after 100 ms, the threshold not yet raised, and the 1 MiB
// arrays came from mmap (a bare collection then handed them back, failing the control)
setFlagsFromString('--no-concurrent-array-buffer-sweeping');
const bareGc = runInNewContext('gc');
let big = new Float64Array(2 << 20); // 16 MiB: freeing a mapped block raises the threshold to its size (up to 32 MiB)
big.fill(1);
big = undefined;
bareGc();
await new Promise((r) => setTimeout(r, 100));
const freed = async (collect) => {
  // each array is followed by a small live one, so that free() cannot merge the freed ones into
  // the heap's top and give them back by itself: only a trim can
  const fences = [];
  let arrays = Array.from({ length: 256 }, () => {
    const a = new Float64Array(1 << 17).fill(1);
    fences.push(new Float64Array(1024).fill(1));
    return a;
  });
  const before = resident();
  arrays = undefined;
  collect();
  const returned = before - resident();
  fences[0][0] = 2;
  return Math.round(returned / 2 ** 20);
};
const bare = await freed(bareGc);
const ours = await freed(collectGarbage);
console.log(JSON.stringify({ bare, ours }));
`;

test('collectGarbage hands the freed arrays back to the system; a bare collection leaves them resident', {
  skip: !isGlibc && 'not glibc',
}, () => {
  const r = runModuleChild(CHILD, { INFLUENCE_LENS_MALLOC: undefined });
  assert.equal(r.status, 0, r.stderr);
  const { bare, ours } = r.out;
  assert.ok(bare < 64, `a bare collection returned ${bare} MiB of 256 (expected glibc to keep them)`);
  assert.ok(ours >= 224, `collectGarbage returned ${ours} MiB of 256`);
});
