// Caches never serve stale or damaged data: the graph cache is keyed by the weights'
// content (not path/size/mtime), a damaged cached graph is rebuilt, hub-cache symlinks are
// followed, and gradient stores / factor files are checksummed and checked for NaN/Inf.
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import {
  cpSync,
  existsSync,
  mkdirSync,
  readdirSync,
  readFileSync,
  renameSync,
  statSync,
  symlinkSync,
  truncateSync,
  utimesSync,
  writeFileSync,
} from 'node:fs';
import { join } from 'node:path';
import { test } from 'node:test';
import { type FactorArguments, loadFactors, saveFactors } from '../../src/server/attribution/ekfac/factors-io';
import { DEFAULT_DAMPING } from '../../src/server/attribution/ekfac/precondition';
import { modelFingerprint } from '../../src/server/attribution/fingerprint';
import { GradientStore } from '../../src/server/index/gradient-store';
import { openCheckpoint } from '../../src/server/model/checkpoint';
import { contentDigest, sha256File } from '../../src/server/model/content-digest';
import { Model } from '../../src/server/model/engine';
import {
  DATA_SHA256,
  readSafetensorsHeader,
  readTensor,
  type TensorToWrite,
  writeSafetensors,
} from '../../src/server/model/safetensors';
import { useTempHome } from './helpers/env';
import { loadGolden } from './helpers/golden';

const home = useTempHome();
const FIXTURE = 'test/fixtures/models/llama';
let n = 0;
const fresh = (name: string) => {
  const d = join(home, `${n++}-${name}`);
  mkdirSync(d, { recursive: true });
  return d;
};

async function totalLoss(dir: string, cacheDir: string, notices: string[] = []): Promise<number> {
  const model = Model.open(dir, { threads: 1, cacheDir, notice: (l) => notices.push(l) });
  const out = await (await model.compile({ tokenLoss: true })).run(loadGolden('llama').batch);
  return (out.loss.data as Float32Array).reduce((a, b) => a + b, 0);
}

/** The fixture's weights with every byte of tensor data changed, same size. */
function otherWeights(path: string): Buffer {
  const bytes = readFileSync(path);
  const h = readSafetensorsHeader(path);
  const f = new Float32Array(bytes.buffer, bytes.byteOffset + h.dataStart, (bytes.length - h.dataStart) / 4);
  for (let i = 0; i < f.length; i++) f[i] = -f[i] * 1.5;
  return bytes;
}

test('graph cache: weights replaced by a file of the same size and mtime are not served stale', async () => {
  const cache = fresh('cache');
  const dir = fresh('model');
  cpSync(FIXTURE, dir, { recursive: true });
  const file = join(dir, 'model.safetensors');
  const before = await totalLoss(dir, cache);
  const { mtimeNs } = statSync(file, { bigint: true });
  // mv + touch -r: another file of the same size takes the old one's place and mtime
  const replacement = join(dir, 'new.safetensors');
  writeFileSync(replacement, otherWeights(file));
  execFileSync('touch', ['-r', file, replacement]); // nanosecond mtime, as the shell command
  renameSync(replacement, file);
  assert.equal(statSync(file, { bigint: true }).mtimeNs, mtimeNs);
  const after = await totalLoss(dir, cache);
  const reference = await totalLoss(dir, fresh('clean-cache'));
  assert.notEqual(after, before, 'the old weights were used');
  assert.equal(after, reference);
});

test('model fingerprint (keys factors and gradient stores): any changed weight byte changes it', () => {
  const dir = fresh('model');
  cpSync(FIXTURE, dir, { recursive: true });
  const file = join(dir, 'model.safetensors');
  const before = modelFingerprint(openCheckpoint(dir));
  // one value a quarter into the embedding (neither its first nor its middle bytes), mtime kept
  const t = readSafetensorsHeader(file).tensors.get('model.embed_tokens.weight')!;
  const bytes = readFileSync(file);
  const at = t.byteOffset + Math.floor(t.byteLength / 16) * 4;
  bytes.writeFloatLE(bytes.readFloatLE(at) + 1, at);
  const edited = join(dir, 'edited');
  writeFileSync(edited, bytes);
  execFileSync('touch', ['-r', file, edited]);
  renameSync(edited, file);
  assert.notEqual(modelFingerprint(openCheckpoint(dir)), before);
});

test('content digest: remembered per file identity once the file has settled, recomputed when the bytes change', (t) => {
  const cache = fresh('cache');
  const f = join(fresh('d'), 'x.bin');
  writeFileSync(f, 'first');
  const d1 = contentDigest(f, cache);
  assert.equal(d1, sha256File(f));
  // changed moments ago: a program writing through a memory map could still change its bytes
  // without moving its mtime or ctime, so nothing is remembered yet
  assert.ok(!existsSync(join(cache, 'digests')));
  // two minutes on (the kernel has written the pages back): remembered and reused
  const now = Date.now();
  t.mock.method(Date, 'now', () => now + 120_000);
  assert.equal(contentDigest(f, cache), d1);
  assert.equal(readdirSync(join(cache, 'digests')).length, 1);
  assert.equal(contentDigest(f, cache), d1);
  // same size, mtime restored (cp -p / touch -r): the ctime still moves on
  const { atime, mtime } = statSync(f);
  writeFileSync(f, 'other');
  utimesSync(f, atime, mtime);
  assert.notEqual(contentDigest(f, cache), d1);
  assert.equal(contentDigest(f, cache), sha256File(f));
});

test('graph cache: a truncated cached graph is rebuilt with a one-line notice', async () => {
  const cache = fresh('cache');
  const before = await totalLoss(FIXTURE, cache);
  const graphs = join(cache, 'graphs');
  const onnx = readdirSync(graphs).flatMap((d) =>
    readdirSync(join(graphs, d))
      .filter((f) => f.endsWith('.onnx'))
      .map((f) => join(graphs, d, f)),
  );
  assert.equal(onnx.length, 1);
  truncateSync(onnx[0], Math.floor(statSync(onnx[0]).size / 2));
  const notices: string[] = [];
  assert.equal(await totalLoss(FIXTURE, cache, notices), before);
  assert.equal(notices.length, 1);
  assert.match(notices[0], /damaged.*rebuilt/);
  assert.ok(!notices[0].includes('\n'));
});

test('graph cache: a Hugging Face hub-cache snapshot (relative symlinks into blobs) loads', async () => {
  const repo = join(fresh('hub'), 'models--someone--tiny-llama');
  const snap = join(repo, 'snapshots', 'abc123');
  mkdirSync(join(repo, 'blobs'), { recursive: true });
  mkdirSync(snap, { recursive: true });
  for (const f of readdirSync(FIXTURE)) {
    const blob = sha256File(join(FIXTURE, f));
    cpSync(join(FIXTURE, f), join(repo, 'blobs', blob));
    symlinkSync(join('..', '..', 'blobs', blob), join(snap, f));
  }
  assert.equal(await totalLoss(snap, fresh('cache')), await totalLoss(FIXTURE, fresh('cache')));
  // the repository folder itself is refused with the snapshot to pass instead
  assert.throws(
    () => Model.open(repo),
    (e: Error) => e.message.includes('hub-cache folder') && e.message.includes(snap) && !e.message.includes('\n'),
  );
});

async function smallStore(dir: string) {
  const model = Model.open(FIXTURE, { threads: 1 });
  const examples = [
    { ids: [5, 9, 14, 3, 7], weights: [1, 1, 1, 1, 0] },
    { ids: [2, 8, 4], weights: [1, 1, 0] },
  ];
  const identity = { modelFingerprint: 'm', dataFingerprint: 'd', k: 4, seed: 0, modules: 'mlp' as const };
  const store = await GradientStore.build(model, examples, identity);
  store.save(dir);
  return { identity, store, file: join(dir, 'gradient_store.safetensors') };
}

test('gradient store: rows overwritten with NaN (header intact) are detected and the store rebuilt', async () => {
  const dir = fresh('store');
  const { identity, file } = await smallStore(dir);
  assert.ok(GradientStore.load(dir, identity));
  const h = readSafetensorsHeader(file);
  const t = [...h.tensors.values()].find((x) => x.name.startsWith('rows.'))!;
  const bytes = readFileSync(file);
  bytes.writeFloatLE(Number.NaN, t.byteOffset);
  writeFileSync(file, bytes);
  const notices: string[] = [];
  assert.equal(
    GradientStore.load(dir, identity, (l) => notices.push(l)),
    null,
  );
  assert.equal(notices.length, 1);
  assert.ok(notices[0].includes(file), notices[0]);
});

test('gradient store: NaN in a store whose checksum matches is an error naming the file', async () => {
  const dir = fresh('store');
  const { identity, file } = await smallStore(dir);
  // re-write the same store with one NaN row value (fp16 0x7e00), through the normal writer (valid checksum)
  const h = readSafetensorsHeader(file);
  const tensors: Record<string, TensorToWrite> = {};
  for (const name of h.tensors.keys()) tensors[name] = readTensor(h, name);
  const rows = [...h.tensors.keys()].find((x) => x.startsWith('rows.'))!;
  (tensors[rows].data as Uint16Array)[0] = 0x7e00;
  const { [DATA_SHA256]: _, ...meta } = h.metadata;
  writeSafetensors(file, tensors, meta, { checksum: true });
  assert.throws(
    () => GradientStore.load(dir, identity),
    (e: Error) => e.message.includes(file) && /NaN/.test(e.message),
  );
});

const ARGS: FactorArguments = {
  strategy: 'ekfac',
  labels: 'sampled',
  damping: DEFAULT_DAMPING,
  modules: ['m'],
  maxExamples: null,
  seed: 0,
};

function tinyFactors(value = 1) {
  return {
    args: ARGS,
    fingerprint: null,
    modules: {
      m: {
        name: 'm',
        dA: 2,
        dOut: 1,
        lambda: { sum: Float64Array.from([value, 2]), count: 3 },
        eigen: {
          qA: Float64Array.from([1, 0, 0, 1]),
          eigA: Float64Array.from([1, 2]),
          qS: Float64Array.from([1]),
          eigS: Float64Array.from([1]),
        },
      },
    },
  };
}

test('factors: a damaged factor file or one holding NaN/Inf is an error naming the file', () => {
  const dir = fresh('factors');
  saveFactors(dir, tinyFactors());
  assert.equal(loadFactors(dir).modules.m.lambda!.sum[0], 1);
  // damaged bytes under an intact header
  const file = join(dir, 'lambda_matrix.safetensors');
  const bytes = readFileSync(file);
  const h = readSafetensorsHeader(file);
  bytes.writeDoubleLE(Number.NaN, h.dataStart);
  writeFileSync(file, bytes);
  assert.throws(
    () => loadFactors(dir),
    (e: Error) => e.message.includes(file) && /checksum/.test(e.message),
  );
  // NaN / Inf written as such (e.g. by another tool, no checksum)
  for (const bad of [Number.NaN, Number.POSITIVE_INFINITY]) {
    writeSafetensors(file, { m: { dtype: 'F64', shape: [1, 2], data: Float64Array.from([bad, 2]) } });
    assert.throws(
      () => loadFactors(dir),
      (e: Error) => e.message.includes(file) && e.message.includes(String(bad)),
    );
  }
});

test('factors: files of two fits of the same model and data (another seed) are never read together', () => {
  const a = fresh('fit-seed0');
  const b = fresh('fit-seed1');
  const fp = 'aaaaaaaaaaaaaaaa:bbbbbbbbbbbbbbbb';
  saveFactors(a, { ...tinyFactors(1), args: { ...ARGS, seed: 0 }, fingerprint: fp });
  saveFactors(b, { ...tinyFactors(5), args: { ...ARGS, seed: 1 }, fingerprint: fp });
  assert.equal(loadFactors(a).modules.m.lambda!.sum[0], 1);
  // seed 1's Λ beside seed 0's eigenvectors and arguments
  cpSync(join(b, 'lambda_matrix.safetensors'), join(a, 'lambda_matrix.safetensors'));
  assert.throws(
    () => loadFactors(a),
    (e: Error) => /lambda_matrix\.safetensors was written by another fit/.test(e.message) && e.message.includes(a),
  );
});

test('tokenizer: its files are in the tokenization key (factors and stores made with another tokenizer are stale)', async () => {
  const { loadTokenizer } = await import('../../src/server/model/tokenizer');
  const { tokenizationKey } = await import('../../src/server/data/tokenize');
  const dir = fresh('tok');
  cpSync(FIXTURE, dir, { recursive: true });
  const before = tokenizationKey(loadTokenizer(dir));
  assert.deepEqual(tokenizationKey(loadTokenizer(dir)), before, 'the same files, the same key');
  // the same ids for ordinary text, another file: e.g. two vocabulary entries swapped
  const tj = JSON.parse(readFileSync(join(dir, 'tokenizer.json'), 'utf8'));
  const vocab = tj.model.vocab as Record<string, number>;
  const [x, y] = Object.keys(vocab).slice(-2);
  [vocab[x], vocab[y]] = [vocab[y], vocab[x]];
  writeFileSync(join(dir, 'tokenizer.json'), JSON.stringify(tj));
  assert.notDeepEqual(tokenizationKey(loadTokenizer(dir)), before);
  // tokenizer_config.json counts too
  cpSync(join(FIXTURE, 'tokenizer.json'), join(dir, 'tokenizer.json'));
  assert.deepEqual(tokenizationKey(loadTokenizer(dir)), before);
  const cfg = JSON.parse(readFileSync(join(dir, 'tokenizer_config.json'), 'utf8'));
  writeFileSync(join(dir, 'tokenizer_config.json'), JSON.stringify({ ...cfg, model_max_length: 17 }));
  assert.notDeepEqual(tokenizationKey(loadTokenizer(dir)), before);
});
