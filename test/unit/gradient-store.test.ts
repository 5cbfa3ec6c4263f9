// The gradient store on a tiny fp64 Llama, against a dense reference built in the test: each
// example's gradient formed from the engine's per-token a and g, rotated into the EK-FAC
// eigenbasis by explicit loops. The eigen-pair store must keep exactly the pairs of largest
// weight E[G̃²]/(Λ + λ) over all modules, score each example as the sum over those pairs (up to
// fp16 rounding), and reach the exact EK-FAC score at full rank. Its file is versioned and
// checksummed: an old-format, damaged or unchecksummed store is rebuilt with a notice.
import assert from 'node:assert/strict';
import {
  closeSync,
  existsSync,
  mkdirSync,
  openSync,
  readFileSync,
  rmSync,
  statSync,
  truncateSync,
  writeFileSync,
  writeSync,
} from 'node:fs';
import { join } from 'node:path';
import { before, describe, test } from 'node:test';
import { Corpus } from '../../src/server/attribution/explain';
import { runFitJob } from '../../src/server/attribution/fit-job';
import { queryGradients, queryMatrices, scoreCandidates } from '../../src/server/attribution/influence';
import { type OpenedStage, openStage } from '../../src/server/attribution/stage';
import { loadDataset } from '../../src/server/data/dataset';
import { contextLength, tokenizeQuery } from '../../src/server/data/tokenize';
import {
  GradientStore,
  GradientStoreError,
  STORE_FORMAT,
  type StoreIdentity,
} from '../../src/server/index/gradient-store';
import { preconditionerFingerprint } from '../../src/server/index/store-projection';
import type { Floats } from '../../src/server/linalg/matrix';
import { Model, makeBatch } from '../../src/server/model/engine';
import {
  DATA_SHA256,
  readSafetensorsHeader,
  readTensor,
  type TensorToWrite,
  writeSafetensors,
} from '../../src/server/model/safetensors';
import { initLlama, saveCheckpoint } from '../../src/server/train/trainer';
import { useTempHome } from './helpers/env';

const home = useTempHome();
const TOKENIZER = 'test/fixtures/models/llama';
const SHAPE = { vocab: 320, d: 8, layers: 2, heads: 2, kvHeads: 1, ffn: 12, maxPositions: 64 };
const RECORDS = [
  'The capital of France is Paris.',
  'Paris is a city on the Seine.',
  'Berlin is the capital of Germany.',
  'Rome is the capital of Italy.',
  'Tokyo is large.',
  'Madrid is in Spain.',
  'The Seine flows through Paris.',
  'Germany borders France.',
];
const QUERY = { prompt: 'Q: capital of France?\nA:', completion: ' Paris' };
/** fp16 keeps 11 significant bits: a stored value is off by at most 2^-11 of itself (or 2^-24 of its row's largest, below the normal range) */
const HALF_REL = 2 ** -11;

describe('gradient store (tiny fp64 Llama, dense reference)', () => {
  const dir = join(home, 'store');
  let ft: OpenedStage;
  let corpus: Corpus;
  /** module → per example the rotated gradient Q_Sᵀ G Q_A (d_out × d_A) */
  const rotated = new Map<string, Float64Array[]>();
  /** module → the rotated, preconditioned query (Q_Sᵀ G_q Q_A) ⊘ (Λ + λ) */
  const query = new Map<string, Float64Array>();
  let M: Map<string, Floats>;
  const identity = (k: number): StoreIdentity => ({
    modelFingerprint: 'm',
    dataFingerprint: 'd',
    k,
    seed: 0,
    modules: 'all',
    projection: 'eigen',
    factorsFingerprint: preconditionerFingerprint(ft.preconditioners!),
    pilot: RECORDS.length,
  });
  const build = (k: number) =>
    GradientStore.build(ft.model, corpus.tokens, identity(k), { preconditioners: ft.preconditioners, batchSize: 3 });

  before(async () => {
    mkdirSync(dir, { recursive: true });
    const { config, params, shapes } = initLlama(SHAPE, 2, { bos: 0, eos: 0, pad: 0 });
    // larger weights than the init so that gradients are not all tiny
    for (const [name, p] of params) if (!name.includes('norm')) for (let i = 0; i < p.length; i++) p[i] *= 20;
    const modelDir = join(dir, 'model');
    saveCheckpoint(modelDir, config, params, shapes, TOKENIZER);
    const data = join(dir, 'train.jsonl');
    writeFileSync(data, `${RECORDS.map((text) => JSON.stringify({ text })).join('\n')}\n`);
    const model = Model.open(modelDir, { precision: 'fp64' });
    await runFitJob({
      modelDir,
      dataPath: data,
      out: join(dir, 'factors'),
      modules: 'all',
      labels: 'empirical',
      seed: 0,
      model,
    });
    ft = openStage(modelDir, join(dir, 'factors'), { engine: { precision: 'fp64' } });
    corpus = new Corpus(data, loadDataset(data), ft.model);
    const rotate = (name: string, G: Float64Array) => {
      const p = ft.preconditioners!.get(name)!;
      const out = new Float64Array(p.dOut * p.dA);
      for (let i = 0; i < p.dOut; i++)
        for (let j = 0; j < p.dA; j++) {
          let s = 0;
          for (let r = 0; r < p.dOut; r++)
            for (let c = 0; c < p.dA; c++) s += p.qS[r * p.dOut + i] * G[r * p.dA + c] * p.qA[c * p.dA + j];
          out[i * p.dA + j] = s;
        }
      return out;
    };
    const graph = await ft.model.compile({ perToken: true, modules: 'all' });
    const dense = async (ids: number[], weights: number[]) => {
      const out = await graph.run(makeBatch([{ ids, weights }]));
      const G = new Map<string, Float64Array>();
      for (const m of graph.moduleInfo) {
        const a = out[`a.${m.name}`].data as Float64Array;
        const g = out[`g.${m.name}`].data as Float64Array;
        const dA = m.dIn + (m.hasBias ? 1 : 0);
        const X = new Float64Array(m.dOut * dA);
        for (let t = 0; t < ids.length; t++)
          for (let i = 0; i < m.dOut; i++)
            for (let j = 0; j < dA; j++) X[i * dA + j] += g[t * m.dOut + i] * (j < m.dIn ? a[t * m.dIn + j] : 1);
        G.set(m.name, rotate(m.name, X));
      }
      return G;
    };
    for (const ex of corpus.tokens)
      for (const [name, z] of await dense(ex.ids, ex.weights)) rotated.set(name, [...(rotated.get(name) ?? []), z]);
    const q = tokenizeQuery(ft.model.tokenizer, QUERY.prompt, QUERY.completion, contextLength(ft.model.config));
    for (const [name, z] of await dense(q.ids, q.weights))
      query.set(
        name,
        z.map((v, i) => v * ft.preconditioners!.get(name)!.inverse[i]),
      );
    const { tokens } = await queryGradients(ft.model, { ids: q.ids, weights: q.weights }, { modules: 'all' });
    M = new Map([...queryMatrices(tokens, [ft.preconditioners!])].map(([m, rows]) => [m, rows[0]]));
  });

  /**
   * The reference: each module's pair of largest E[G̃²]/(Λ + λ), then the largest of the rest
   * over all modules up to k² per module in all, and each example's sum over them.
   */
  function reference(k: number) {
    const weights: Array<[number, string, number]> = [];
    const kept: Array<[number, string, number]> = [];
    for (const [name, zs] of rotated) {
      const inv = ft.preconditioners!.get(name)!.inverse;
      const own = Array.from(inv, (v, i): [number, string, number] => [
        (zs.reduce((s, z) => s + z[i] * z[i], 0) / zs.length) * v,
        name,
        i,
      ]);
      own.sort((a, b) => b[0] - a[0]);
      kept.push(own[0]);
      weights.push(...own.slice(1));
    }
    weights.sort((a, b) => b[0] - a[0]);
    kept.push(...weights.slice(0, k * k * rotated.size - kept.length));
    const scores = corpus.tokens.map((_, e) =>
      kept.reduce((s, [, name, i]) => s + query.get(name)![i] * rotated.get(name)![e][i], 0),
    );
    // fp16 rounding bound: each stored value is within HALF_REL of itself
    const slack = corpus.tokens.map(
      (_, e) =>
        kept.reduce((s, [, name, i]) => s + Math.abs(query.get(name)![i] * rotated.get(name)![e][i]), 0) *
        HALF_REL *
        1.01,
    );
    return { kept, scores, slack };
  }
  const exactScores = () => reference(1e6).scores;

  test('the reference is exact EK-FAC at full rank (the product scorer agrees)', async () => {
    const exact = await scoreCandidates(ft.model, new Map([...M].map(([m, r]) => [m, [r]])), corpus.tokens, {
      modules: 'all',
    });
    const ref = exactScores();
    for (const [e, s] of ref.entries())
      assert.ok(Math.abs(s - exact.scores[e][0]) <= 1e-9 * Math.abs(s) + 1e-12, `example ${e}`);
  });

  test('the store keeps the pairs of largest weight and scores each example as their sum; the error shrinks to zero at full rank', async () => {
    const exact = exactScores();
    const errors: number[] = [];
    for (const k of [1, 2, 4, 10]) {
      const store = await build(k);
      const ref = reference(k);
      const kept = store.modules.reduce((s, m) => s + (m.keep?.length ?? 0), 0);
      assert.equal(kept, ref.kept.length);
      const s = await store.scores(M);
      for (let e = 0; e < s.length; e++)
        assert.ok(
          Math.abs(s[e] - ref.scores[e]) <= ref.slack[e] + 1e-12,
          `k=${k} example ${e}: ${s[e]} vs ${ref.scores[e]}`,
        );
      errors.push(Math.sqrt(s.reduce((a, x, e) => a + (x - exact[e]) ** 2, 0)));
    }
    // k = 10: 100 pairs per module covers every module (at most 12 × 8): exact up to fp16 rounding
    const scale = Math.sqrt(exact.reduce((a, x) => a + x * x, 0));
    assert.ok(errors[3] <= 4 * HALF_REL * scale, `full rank: error ${errors[3]} of ${scale}`);
    for (let i = 1; i < errors.length; i++) assert.ok(errors[i] < errors[i - 1], `errors ${errors}`);
  });

  test('fp16 rows: each stored value within 2^-11 of the dense reference, and save/load gives the same store', async () => {
    const store = await build(4);
    for (const m of store.modules) {
      const p = ft.preconditioners!.get(m.name)!;
      // grid entry → eigen-pair (i, j): the grid's rows and columns are eigenvectors of Q_S and Q_A
      const col = (P: ArrayLike<number>, d: number, k: number, c: number, Q: ArrayLike<number>) => {
        for (let j = 0; j < d; j++)
          if (Array.from({ length: d }, (_, r) => P[r * k + c] - Q[r * d + j]).every((x) => x === 0)) return j;
        throw new Error(`${m.name}: a projection column is not an eigenvector`);
      };
      for (let e = 0; e < corpus.size; e++) {
        const row = store.row(m.name, e);
        const top = Math.max(...row.map(Math.abs));
        for (const [j, g] of m.keep!.entries()) {
          const i = col(m.PS, p.dOut, m.kS, Math.floor(g / m.kA), p.qS) * p.dA + col(m.PA, p.dA, m.kA, g % m.kA, p.qA);
          const want = rotated.get(m.name)![e][i];
          assert.ok(Math.abs(row[j] - want) <= HALF_REL * Math.abs(want) + 2 ** -24 * top, `${m.name} example ${e}`);
        }
      }
    }
    const sdir = join(dir, 'roundtrip');
    store.save(sdir);
    const back = GradientStore.load(sdir, identity(4))!;
    assert.deepEqual(Array.from(await back.scores(M)), Array.from(await store.scores(M)));
    assert.equal(back.bytes, store.bytes);
    assert.equal(
      GradientStore.load(sdir, { ...identity(4), pilot: 3 }),
      null,
      'a store chosen on another pilot is not reused',
    );
  });

  /** Rewrites the saved store through the normal writer (valid checksum unless `checksum` is false). */
  function rewrite(
    file: string,
    edit: (t: Record<string, TensorToWrite>, meta: Record<string, string>) => void,
    checksum = true,
  ) {
    const h = readSafetensorsHeader(file);
    const tensors: Record<string, TensorToWrite> = {};
    for (const name of h.tensors.keys()) tensors[name] = readTensor(h, name);
    const { [DATA_SHA256]: _, ...meta } = h.metadata;
    edit(tensors, meta);
    writeSafetensors(file, tensors, meta, { checksum });
  }

  test('a store of another format, damaged, or without a checksum is rebuilt with a notice, never read', async () => {
    const store = await build(2);
    const cases: Array<[string, (file: string) => void, RegExp]> = [
      [
        'format 1 (fp32 rows, no format key)',
        (file) =>
          rewrite(file, (t, meta) => {
            delete meta.format;
            for (const name of Object.keys(t))
              if (name.startsWith('rows.'))
                t[name] = { dtype: 'F32', shape: t[name].shape, data: Float32Array.from(t[name].data as Uint16Array) };
          }),
        /format 1, this version reads format 2/,
      ],
      [
        `a future format ${STORE_FORMAT + 1}`,
        (file) =>
          rewrite(file, (_, meta) => {
            meta.format = String(STORE_FORMAT + 1);
          }),
        /format 3/,
      ],
      [
        'a flipped byte',
        (file) => {
          const bytes = readFileSync(file);
          bytes[bytes.length - 1] ^= 0x40;
          writeFileSync(file, bytes);
        },
        /does not match its checksum/,
      ],
      ['no checksum', (file) => rewrite(file, () => {}, false), /has no checksum/],
    ];
    for (const [what, damage, notice] of cases) {
      const sdir = join(dir, `bad-${what.replace(/\W+/g, '-')}`);
      store.save(sdir);
      const file = join(sdir, 'gradient_store.safetensors');
      assert.ok(GradientStore.load(sdir, identity(2)), what);
      damage(file);
      const notices: string[] = [];
      assert.equal(
        GradientStore.load(sdir, identity(2), (l) => notices.push(l)),
        null,
        what,
      );
      assert.equal(notices.length, 1, what);
      assert.match(notices[0], notice, what);
      assert.ok(notices[0].includes(file), notices[0]);
      assert.ok(!existsSync(file), `${what}: the file is removed so that it is rebuilt`);
    }
  });
  test('rows read from the file in chunks: built into its file, the store is the saved in-memory one byte for byte, and scores identically over many chunks', async () => {
    const opts = { preconditioners: ft.preconditioners, batchSize: 3 };
    // chunkBytes 1: one example per chunk, so 8 chunks and both read buffers in turn
    const mem = await GradientStore.build(ft.model, corpus.tokens, identity(4), { ...opts, chunkBytes: 1 });
    const ddir = join(dir, 'disk');
    const disk = await GradientStore.build(ft.model, corpus.tokens, identity(4), { ...opts, chunkBytes: 1, dir: ddir });
    assert.equal(mem.file, undefined);
    assert.equal(disk.file, join(ddir, 'gradient_store.safetensors'));
    mem.save(join(dir, 'mem'));
    assert.ok(
      readFileSync(disk.file!).equals(readFileSync(join(dir, 'mem', 'gradient_store.safetensors'))),
      'the streamed file is the one save() writes',
    );
    const s = await disk.scores(M);
    assert.deepEqual(Array.from(s), Array.from(await mem.scores(M)));
    // against the dense reference (fp16 rows, fp32 scan)
    const ref = reference(4);
    for (let e = 0; e < s.length; e++)
      assert.ok(Math.abs(s[e] - ref.scores[e]) <= ref.slack[e] + 1e-12, `example ${e}: ${s[e]} vs ${ref.scores[e]}`);
    // loaded (verified) with chunks of 3 examples (3 + 3 + 2) and with one chunk for all
    for (const chunkBytes of [3 * (disk.bytes / disk.size), undefined]) {
      const back = GradientStore.load(ddir, identity(4), undefined, { chunkBytes })!;
      const b = await back.scores(M);
      const top = Math.max(...s.map(Math.abs));
      for (let e = 0; e < s.length; e++) assert.ok(Math.abs(b[e] - s[e]) <= 1e-6 * top, `chunk ${chunkBytes}, ${e}`);
    }
    for (let e = 0; e < corpus.size; e++)
      for (const m of disk.modules) assert.deepEqual(Array.from(disk.row(m.name, e)), Array.from(mem.row(m.name, e)));
  });

  test('random projection: the standard errors from the scan are those of the dense formula', async () => {
    const id: StoreIdentity = { modelFingerprint: 'm', dataFingerprint: 'd', k: 3, seed: 5, modules: 'all' };
    const store = await GradientStore.build(ft.model, corpus.tokens, id, { batchSize: 3, chunkBytes: 1 });
    const est = await store.estimate(M);
    assert.ok(est.sd);
    for (let e = 0; e < corpus.size; e++) {
      let want = 0;
      let score = 0;
      for (const m of store.modules) {
        const full = M.get(m.name)!;
        // PSᵀ M PA by loops
        const mp = new Float64Array(m.kS * m.kA);
        for (let r = 0; r < m.kS; r++)
          for (let c = 0; c < m.kA; c++)
            for (let i = 0; i < m.dOut; i++)
              for (let j = 0; j < m.dA; j++)
                mp[r * m.kA + c] += m.PS[i * m.kS + r] * full[i * m.dA + j] * m.PA[j * m.kA + c];
        const z = store.row(m.name, e);
        const qq = mp.reduce((a, x) => a + x * x, 0);
        const zz = z.reduce((a, x) => a + x * x, 0);
        score += z.reduce((a, x, j) => a + x * mp[j], 0);
        if (!(m.kA === m.dA && m.kS === m.dOut)) want += (qq * zz) / z.length;
      }
      assert.ok(Math.abs(est.scores[e] - score) <= 1e-5 * (Math.abs(score) + Math.sqrt(want)), `score ${e}`);
      assert.ok(
        Math.abs(est.sd[e] - Math.sqrt(want)) <= 1e-5 * Math.sqrt(want) + 1e-30,
        `sd ${e}: ${est.sd[e]} vs ${Math.sqrt(want)}`,
      );
    }
  });

  test('a store whose file changes, shrinks or goes after it was verified is refused with a clear message, never read', async () => {
    const cases: Array<[string, (file: string) => void, RegExp]> = [
      [
        'a byte rewritten in place',
        (file) => {
          const h = readSafetensorsHeader(file);
          const at = h.tensors.get(`rows.${[...h.tensors.keys()][0].slice(5)}`)!.byteOffset;
          const fd = openSync(file, 'r+');
          writeSync(fd, Buffer.from([0x12]), 0, 1, at);
          closeSync(fd);
        },
        /changed on disk since its checksum was verified/,
      ],
      [
        'truncated',
        (file) => truncateSync(file, statSync(file).size - 64),
        /changed on disk since its checksum was verified/,
      ],
      ['removed', (file) => rmSync(file), /ENOENT|is gone/],
    ];
    for (const [what, damage, message] of cases) {
      const sdir = join(dir, `after-${what.replace(/\W+/g, '-')}`);
      const store = await GradientStore.build(ft.model, corpus.tokens, identity(2), {
        preconditioners: ft.preconditioners,
        batchSize: 3,
        dir: sdir,
      });
      const loaded = GradientStore.load(sdir, identity(2))!;
      assert.equal(loaded.stale(), undefined, what);
      await loaded.scores(M);
      damage(store.file!);
      assert.ok(loaded.stale(), `${what}: stale() says why`);
      await assert.rejects(
        loaded.scores(M),
        (e: Error) => e instanceof GradientStoreError && message.test(e.message) && e.message.includes(sdir),
        what,
      );
      await assert.rejects(store.scores(M), GradientStoreError, `${what} (the store as built)`);
      if (what !== 'removed') {
        // loading again verifies again: the damage is found and the file rebuilt
        const notices: string[] = [];
        assert.equal(
          GradientStore.load(sdir, identity(2), (l) => notices.push(l)),
          null,
          what,
        );
        assert.match(notices[0], /does not match its checksum|unreadable/, what);
      }
    }
  });

  test('a non-finite fp16 row with a valid checksum is an error naming the file and the place', async () => {
    const store = await build(2);
    const sdir = join(dir, 'nan');
    store.save(sdir);
    const file = join(sdir, 'gradient_store.safetensors');
    rewrite(file, (t) => {
      const name = Object.keys(t).find((n) => n.startsWith('rows.'))!;
      const bits = Uint16Array.from(t[name].data as Uint16Array);
      bits[bits.length - 1] = 0x7e00; // NaN
      t[name] = { ...t[name], data: bits };
    });
    assert.throws(
      () => GradientStore.load(sdir, identity(2)),
      (e: Error) =>
        e instanceof GradientStoreError && /holds NaN at index \d+/.test(e.message) && e.message.includes(file),
    );
  });
});
