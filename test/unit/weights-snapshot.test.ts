// The graphs read the weights through ONNX Runtime, which maps the file: they must read a private
// snapshot, so that a weight file rewritten in place (save_pretrained into the same folder, cp
// over it, a truncation) never changes or kills a running session, and a folder with the same
// bytes is never served another folder's new ones.
import assert from 'node:assert/strict';
import fs, {
  cpSync,
  linkSync,
  readdirSync,
  readFileSync,
  rmSync,
  statSync,
  truncateSync,
  writeFileSync,
} from 'node:fs';
import { syncBuiltinESMExports } from 'node:module';
import { join } from 'node:path';
import { test } from 'node:test';
import { modelFingerprint } from '../../src/server/attribution/fingerprint';
import { contentDigest, copyHashing, FileChangedError, movedSincePinned } from '../../src/server/model/content-digest';
import { Model } from '../../src/server/model/engine';
import { readSafetensorsHeader } from '../../src/server/model/safetensors';
import { useTempHome } from './helpers/env';
import { loadGolden } from './helpers/golden';

const home = useTempHome();
const FIXTURE = 'test/fixtures/models/llama';
const batch = loadGolden('llama').batch;
let n = 0;

function copy(): string {
  const dir = join(home, `m${n++}`);
  cpSync(FIXTURE, dir, { recursive: true });
  return dir;
}

/** The fixture's weight file with every value × factor (same size). */
function scaled(factor: number): Buffer {
  const bytes = readFileSync(join(FIXTURE, 'model.safetensors'));
  const h = readSafetensorsHeader(join(FIXTURE, 'model.safetensors'));
  const f = new Float32Array(bytes.buffer, bytes.byteOffset + h.dataStart, (bytes.length - h.dataStart) / 4);
  for (let i = 0; i < f.length; i++) f[i] *= factor;
  return bytes;
}

const open = (dir: string, cacheDir: string) => Model.open(dir, { threads: 1, cacheDir });
const nllOf = async (g: Awaited<ReturnType<Model['compile']>>) =>
  Array.from((await g.run(batch)).token_nll.data as Float32Array);

test('a weight file rewritten in place, then truncated, under a compiled graph: the graph keeps its bytes', async () => {
  const dir = copy();
  const cacheDir = join(home, 'cache-a');
  const g = await open(dir, cacheDir).compile({ tokenLoss: true });
  const before = await nllOf(g);
  const file = join(dir, 'model.safetensors');
  writeFileSync(file, scaled(1.5)); // same path, same inode: what save_pretrained and cp do
  assert.deepEqual(await nllOf(g), before);
  truncateSync(file, 0); // a mapped file shrinking under a session was a bus error
  assert.deepEqual(await nllOf(g), before);
  // the new bytes are what a model opened now reads
  writeFileSync(file, scaled(1.5));
  assert.notDeepEqual(await nllOf(await open(dir, cacheDir).compile({ tokenLoss: true })), before);
});

test('two folders with the same bytes: one rewritten in place never changes what the other serves', async () => {
  const a = copy();
  const b = copy();
  const cacheDir = join(home, 'cache-b'); // shared, as the default cache is
  const mb = open(b, cacheDir);
  const gb = await mb.compile({ tokenLoss: true });
  const before = await nllOf(gb);
  await nllOf(await open(a, cacheDir).compile({ tokenLoss: true }));
  writeFileSync(join(a, 'model.safetensors'), scaled(1.3));
  await nllOf(await open(a, cacheDir).compile({ tokenLoss: true }));
  assert.deepEqual(await nllOf(gb), before);
  // a graph B compiles now opens the weights again: they must still be B's bytes
  assert.deepEqual(await nllOf(await mb.compile({ tokenLoss: true, hidden: true })), before);
  assert.deepEqual(await nllOf(await open(b, cacheDir).compile({ tokenLoss: true })), before);
});

test("a hard link to the user's file in the cache (an older version's) is replaced by a snapshot", async () => {
  const dir = copy();
  const cacheDir = join(home, 'cache-c');
  const before = await nllOf(await open(dir, cacheDir).compile({ tokenLoss: true }));
  const graphs = join(cacheDir, 'graphs');
  const [id] = readdirSync(graphs);
  const snapshot = join(graphs, id, 'w0-model.safetensors');
  rmSync(snapshot);
  linkSync(join(dir, 'model.safetensors'), snapshot);
  const g = await open(dir, cacheDir).compile({ tokenLoss: true });
  assert.notEqual(statSync(snapshot).ino, statSync(join(dir, 'model.safetensors')).ino);
  assert.equal(statSync(snapshot).nlink, 1);
  writeFileSync(join(dir, 'model.safetensors'), scaled(2));
  assert.deepEqual(await nllOf(g), before);
});

test('a weight file changed after the fingerprint was taken is refused at the snapshot, never served under it', async () => {
  const dir = copy();
  const cacheDir = join(home, 'cache-d');
  const m = open(dir, cacheDir);
  const fp = modelFingerprint(m.checkpoint, cacheDir); // what factors and stores are keyed by
  writeFileSync(join(dir, 'model.safetensors'), scaled(1.5));
  await assert.rejects(m.compile({ tokenLoss: true }), /changed while it was being read/);
  assert.equal(modelFingerprint(m.checkpoint, cacheDir), fp);
  // a model opened now has the new bytes and their fingerprint
  const fresh = open(dir, cacheDir);
  assert.notEqual(modelFingerprint(fresh.checkpoint, cacheDir), fp);
  await fresh.compile({ tokenLoss: true });
});

test('a weight file cut short after its header was read is refused, not handed to ONNX Runtime', async () => {
  const dir = copy();
  const m = open(dir, join(home, 'cache-e'));
  const file = join(dir, 'model.safetensors');
  truncateSync(file, Math.floor(statSync(file).size / 2));
  await assert.rejects(m.compile({ tokenLoss: true }), /is shorter \(\d+ bytes\) than its tensors need/);
});

test('copyHashing: a file that shrinks while it is copied is refused (no endless loop), one written to as well', () => {
  const src = join(home, 'big.bin');
  writeFileSync(src, Buffer.alloc(20 << 20, 7));
  const real = fs as unknown as Record<string, (...a: unknown[]) => unknown>;
  const readSync = real.readSync;
  let calls = 0;
  real.readSync = (...args: unknown[]) => {
    if (calls++ === 1) truncateSync(src, 1 << 20); // shrinks after the first piece
    return readSync(...args);
  };
  syncBuiltinESMExports();
  try {
    assert.throws(
      () => copyHashing(src, join(home, 'copy-1')),
      (e: Error) => e instanceof FileChangedError && /shrank/.test(e.message),
    );
  } finally {
    real.readSync = readSync;
    syncBuiltinESMExports();
  }
  writeFileSync(src, Buffer.alloc(20 << 20, 7));
  real.readSync = (...args: unknown[]) => {
    if (calls++ === 1) fs.appendFileSync(src, 'x'); // written to after the first piece
    return readSync(...args);
  };
  calls = 0;
  syncBuiltinESMExports();
  try {
    assert.throws(() => copyHashing(src, join(home, 'copy-2')), /written to while it was being read/);
  } finally {
    real.readSync = readSync;
    syncBuiltinESMExports();
  }
});

test('a folder retrained again and again keeps one snapshot; a folder of the same bytes elsewhere keeps it alive', async () => {
  const dir = copy();
  const twin = copy();
  const cacheDir = join(home, 'cache-f');
  const snapshots = () => readdirSync(join(cacheDir, 'graphs')).length;
  await open(twin, cacheDir).compile({ tokenLoss: true });
  await open(dir, cacheDir).compile({ tokenLoss: true }); // the same bytes: the same snapshot
  assert.equal(snapshots(), 1);
  for (const factor of [1.1, 1.2, 1.3]) {
    writeFileSync(join(dir, 'model.safetensors'), scaled(factor));
    await open(dir, cacheDir).compile({ tokenLoss: true });
  }
  // the twin's (the original bytes) and the latest retraining's
  assert.equal(snapshots(), 2);
  const g = await open(twin, cacheDir).compile({ tokenLoss: true });
  assert.deepEqual(
    await nllOf(g),
    await nllOf(await open(FIXTURE, join(home, 'cache-g')).compile({ tokenLoss: true })),
  );
});

test('no room for a snapshot: the graphs read the file through a hard link, and say so', async () => {
  const dir = copy();
  const cacheDir = join(home, 'cache-h');
  const notices: string[] = [];
  const real = fs as unknown as Record<string, (...a: unknown[]) => unknown>;
  const statfs = real.statfsSync;
  real.statfsSync = (...args: unknown[]) => ({ ...(statfs(...args) as object), bavail: 0 });
  syncBuiltinESMExports();
  try {
    const m = Model.open(dir, { threads: 1, cacheDir, notice: (l) => notices.push(l) });
    const g = await m.compile({ tokenLoss: true });
    assert.match(notices.join('\n'), /could not snapshot .*bytes free.*do not rewrite it in place/);
    const [id] = readdirSync(join(cacheDir, 'graphs'));
    assert.equal(
      statSync(join(cacheDir, 'graphs', id, 'w0-model.safetensors')).ino,
      statSync(join(dir, 'model.safetensors')).ino,
    );
    assert.deepEqual(
      await nllOf(g),
      await nllOf(await open(FIXTURE, join(home, 'cache-i')).compile({ tokenLoss: true })),
    );
  } finally {
    real.statfsSync = statfs;
    syncBuiltinESMExports();
  }
});

test('movedSincePinned names a file rewritten after its digest was pinned (the server then opens it again)', () => {
  const dir = copy();
  const cacheDir = join(home, 'cache-j');
  const m = open(dir, cacheDir);
  modelFingerprint(m.checkpoint, cacheDir);
  assert.deepEqual(movedSincePinned(m.checkpoint, cacheDir), []);
  writeFileSync(join(dir, 'model.safetensors'), scaled(1.5));
  assert.deepEqual(movedSincePinned(m.checkpoint, cacheDir), [join(dir, 'model.safetensors')]);
});

test('a cache folder that cannot be written only costs the digests being remembered', () => {
  const notADir = join(home, 'cache-is-a-file');
  writeFileSync(notADir, '');
  const file = join(FIXTURE, 'config.json');
  assert.match(contentDigest(file, notADir), /^[0-9a-f]{64}$/);
});

test('a compiled graph that cannot be written says which folder and what to do', async () => {
  const dir = copy();
  const cacheDir = join(home, 'cache-k');
  await open(dir, cacheDir).compile({ tokenLoss: true });
  const [id] = readdirSync(join(cacheDir, 'graphs'));
  for (const f of readdirSync(join(cacheDir, 'graphs', id)))
    if (f.endsWith('.onnx')) rmSync(join(cacheDir, 'graphs', id, f));
  const real = fs as unknown as Record<string, (...a: unknown[]) => unknown>;
  const openSync = real.openSync;
  real.openSync = (...args: unknown[]) => {
    if (String(args[0]).includes('.onnx') && /w/.test(String(args[1])))
      throw Object.assign(new Error('no space left on device'), { code: 'ENOSPC' });
    return openSync(...args);
  };
  syncBuiltinESMExports();
  try {
    await assert.rejects(
      open(dir, cacheDir).compile({ tokenLoss: true }),
      /could not write the compiled graph .*\.onnx \(no space left on device\): free space in the cache folder, or point INFLUENCE_LENS_CACHE/,
    );
  } finally {
    real.openSync = openSync;
    syncBuiltinESMExports();
  }
});
