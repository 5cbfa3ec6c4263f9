// bench store: how faithfully the gradient store pre-ranks, on the embedded default. For each
// projection and k it reports, against exact EK-FAC over the whole fine-tuning set:
//   - bytes per example and the time to build the store (pilot pass included);
//   - Spearman of the store's scores with the exact ones (median and worst query), and the
//     same for the store's coordinates kept in fp32 (what fp16 storage costs);
//   - how often the exact top 10 of both signs lies inside the store's top/bottom `rerank`
//     (what explain rescores exactly), and inside its top/bottom 2·rerank; the largest store
//     rank one of them had;
//   - with a random projection (which has standard errors), how many examples explain
//     rescores (the fixed rerank plus every example whose 2-σ interval reaches the top or
//     bottom 10) and whether the exact top 10 lies inside;
//   - the time of one store query over the 313 examples.
// Then, for the default configuration, the store's rows tiled to `--scale` examples are
// written, loaded (checksum included) and queried: the query time at that size, measured on
// synthetic rows of the real shape (the time does not depend on the values).
import { mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync, writeSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { Corpus, plausible, scoreCorpus } from '../../src/server/attribution/explain';
import { runFitJob } from '../../src/server/attribution/fit-job';
import { queryGradients, queryMatrices } from '../../src/server/attribution/influence';
import { openStage } from '../../src/server/attribution/stage';
import { CliError, parse } from '../../src/server/cli/util';
import { loadDataset } from '../../src/server/data/dataset';
import { contextLength, tokenizeQuery } from '../../src/server/data/tokenize';
import { embeddedDefault } from '../../src/server/defaults';
import {
  GradientStore,
  projectExamples,
  type StoreIdentity,
  type StoreModule,
  storedSize,
} from '../../src/server/index/gradient-store';
import { preconditionerFingerprint, type StoreProjection } from '../../src/server/index/store-projection';
import type { Floats } from '../../src/server/linalg/matrix';
import { Model } from '../../src/server/model/engine';
import {
  DATA_SHA256,
  readSafetensorsHeader,
  readTensorBytes,
  type TensorLayout,
  writeSafetensorsStreamed,
} from '../../src/server/model/safetensors';
import { DEFAULTS } from '../../src/server/settings';
import { spearman } from '../../src/server/util/stats';

export async function benchStore(argv: string[]): Promise<void> {
  const { values: v } = parse(argv, {
    quick: { type: 'boolean' },
    variants: { type: 'string' },
    rerank: { type: 'string' },
    'fact-queries': { type: 'string' },
    scale: { type: 'string' },
    report: { type: 'string' },
  });
  const say = (s = '') => process.stdout.write(`${s}\n`);
  const rerank = Number(v.rerank ?? DEFAULTS.store.rerank);
  const nFact = Number(v['fact-queries'] ?? (v.quick ? 0 : 30));
  const scale = Number(v.scale ?? (v.quick ? 0 : 100_000));
  const eigenKs = [...new Set([16, 24, 32, 40, 48, 64, DEFAULTS.store.k])].sort((a, b) => a - b);
  const variants = (v.variants ?? ['random:16', ...eigenKs.map((k) => `eigen:${k}`)].join(',')).split(',').map((s) => {
    const [p, k] = s.split(':');
    if ((p !== 'random' && p !== 'eigen') || !(Number(k) >= 1))
      throw new CliError(`--variants: expected projection:k items such as eigen:16, got "${s}"`);
    return { projection: p as StoreProjection, k: Number(k) };
  });
  if (!(rerank >= 1) || !(scale >= 0)) throw new CliError('--rerank must be >= 1 and --scale >= 0');
  const d = embeddedDefault();
  await runFitJob({
    modelDir: d.finetuned,
    dataPath: d.finetuneData,
    out: d.finetunedFactors,
    modules: 'all',
    labels: 'sampled',
    seed: 0,
    replaceStale: true, // the embedded default's cache
  });
  const model = Model.open(d.finetuned);
  const st = openStage(d.finetuned, d.finetunedFactors, { model });
  const setup = { model: st, modules: st.modules };
  const corpus = new Corpus('finetune', loadDataset(d.finetuneData), model);
  const all = JSON.parse(readFileSync(d.queries, 'utf8')) as Array<{
    prompt: string;
    completion: string;
    kind: string;
  }>;
  const queries = [
    ...all.filter((q) => q.kind !== 'fact_tracing'),
    ...all.filter((q) => q.kind === 'fact_tracing').slice(0, nFact),
  ];
  say(`gradient store vs exact EK-FAC: ${queries.length} queries × ${corpus.size} fine-tuning examples`);
  let t = Date.now();
  const exact: Float64Array[] = [];
  for (const q of queries) exact.push(await scoreCorpus(setup, corpus, { ...q, method: 'ekfac' }));
  say(`exact EK-FAC scoring: ${((Date.now() - t) / queries.length).toFixed(0)} ms per query`);
  const Ms: Map<string, Floats>[] = [];
  for (const q of queries) {
    const tq = tokenizeQuery(model.tokenizer, q.prompt, q.completion, contextLength(model.config));
    const { tokens } = await queryGradients(model, { ids: tq.ids, weights: tq.weights }, { modules: st.modules });
    const M = queryMatrices(tokens, [st.preconditioners!]);
    Ms.push(new Map([...M].map(([m, rows]) => [m, rows[0]])));
  }
  const med = (x: number[]) => [...x].sort((a, b) => a - b)[Math.floor(x.length / 2)];
  const identityOf = (projection: StoreProjection, k: number): StoreIdentity => ({
    modelFingerprint: 'bench',
    dataFingerprint: 'finetune',
    k,
    seed: 0,
    modules: 'all',
    ...(projection === 'eigen'
      ? { projection, factorsFingerprint: preconditionerFingerprint(st.preconditioners!), pilot: DEFAULTS.storePilot }
      : {}),
  });
  say();
  say(
    `| projection | k | bytes/example | build s | Spearman median / min | fp32 rows: Spearman median / min | exact top-10 in store top-${rerank} | in top-${2 * rerank} | worst store rank of an exact top-10 | rescored set: contains / median / max size | store query ms |`,
  );
  say('|---|---|---|---|---|---|---|---|---|---|---|');
  let defaultStore: GradientStore | undefined;
  // biome-ignore lint/suspicious/noExplicitAny: the report is plain JSON
  const results: Array<Record<string, any>> = [];
  for (const { projection, k } of variants) {
    t = Date.now();
    const store = await GradientStore.build(model, corpus.tokens, identityOf(projection, k), {
      preconditioners: st.preconditioners,
    });
    const buildS = (Date.now() - t) / 1000;
    if (projection === 'eigen' && k === DEFAULTS.store.k) defaultStore = store;
    const f32 = await fp32Rows(model, corpus, store);
    const rho: number[] = [];
    const rho32: number[] = [];
    const worst: number[] = [];
    const sizes: number[] = [];
    let inFixed = 0;
    let inDouble = 0;
    let inRescored = 0;
    let queryMs = 0;
    for (const [i, M] of Ms.entries()) {
      t = performance.now();
      const est = await store.estimate(M);
      queryMs += performance.now() - t;
      const e = exact[i];
      const n = e.length;
      rho.push(spearman(est.scores, e));
      rho32.push(spearman(f32Scores(store.modules, f32, M, n), e));
      const byExact = [...e.keys()].sort((a, b) => e[b] - e[a]);
      const shown = [...byExact.slice(0, 10).filter((j) => e[j] > 0), ...byExact.slice(-10).filter((j) => e[j] < 0)];
      const byStore = [...est.scores.keys()].sort((a, b) => est.scores[b] - est.scores[a]);
      const pos = new Map(byStore.map((j, r) => [j, r]));
      // distance from the nearer end of the store's ranking, in the direction of the example's sign
      const reach = shown.map((j) => (e[j] > 0 ? pos.get(j)! + 1 : n - pos.get(j)!));
      worst.push(Math.max(...reach));
      if (reach.every((r) => r <= rerank)) inFixed++;
      if (reach.every((r) => r <= 2 * rerank)) inDouble++;
      if (est.sd) {
        const rescored = new Set([
          ...byStore.slice(0, rerank),
          ...byStore.slice(-rerank),
          ...plausible(
            Array.from(est.scores, (s) => Float64Array.of(s)),
            est.sd,
            10,
            2,
          ),
        ]);
        sizes.push(rescored.size);
        if (shown.every((j) => rescored.has(j))) inRescored++;
      }
    }
    const nq = queries.length;
    say(
      `| ${projection} | ${k} | ${store.bytes / store.size} | ${buildS.toFixed(1)} | ${med(rho).toFixed(3)} / ${Math.min(...rho).toFixed(3)} | ` +
        `${med(rho32).toFixed(3)} / ${Math.min(...rho32).toFixed(3)} | ${inFixed}/${nq} | ${inDouble}/${nq} | ${med(worst)} median, ${Math.max(...worst)} max | ` +
        `${sizes.length ? `${inRescored}/${nq} / ${med(sizes)} / ${Math.max(...sizes)}` : '—'} | ${(queryMs / nq).toFixed(1)} |`,
    );
    results.push({
      projection,
      k,
      default: projection === 'eigen' && k === DEFAULTS.store.k,
      bytes_per_example: store.bytes / store.size,
      build_seconds: buildS,
      spearman_median: med(rho),
      spearman_min: Math.min(...rho),
      queries: nq,
      exact_top10_in_rerank: inFixed,
      rerank,
      query_ms: queryMs / nq,
      examples: store.size,
    });
  }
  const scaled =
    scale > 0 && defaultStore
      ? await atScale(defaultStore, identityOf('eigen', DEFAULTS.store.k), scale, Ms, say)
      : null;
  if (v.report) {
    mkdirSync(dirname(v.report), { recursive: true });
    writeFileSync(v.report, `${JSON.stringify({ suite: 'store', results, at_scale: scaled }, null, 2)}\n`);
  }
}

/** The store's kept coordinates in fp32 (as the graph gives them), module → [N, size]. */
async function fp32Rows(model: Model, corpus: Corpus, store: GradientStore): Promise<Map<string, Float32Array>> {
  const n = corpus.size;
  const rows = new Map(store.modules.map((m) => [m.name, new Float32Array(n * storedSize(m))]));
  await projectExamples(model, corpus.tokens, store.identity.modules, store.modules, {
    each: (m, k, grid) => {
      const size = storedSize(m);
      const dst = rows.get(m.name)!;
      for (let j = 0; j < size; j++) dst[k * size + j] = m.keep ? grid[m.keep[j]] : grid[j];
    },
  });
  return rows;
}

function f32Scores(modules: StoreModule[], rows: Map<string, Float32Array>, M: Map<string, Floats>, n: number) {
  const out = new Float64Array(n);
  for (const m of modules) {
    const size = storedSize(m);
    const q = queryCoordinates(m, M.get(m.name)!);
    const r = rows.get(m.name)!;
    for (let k = 0; k < n; k++) {
      let s = 0;
      for (let j = 0; j < size; j++) s += r[k * size + j] * q[j];
      out[k] += s;
    }
  }
  return out;
}

/** PSᵀ M PA at the kept entries. */
function queryCoordinates(m: StoreModule, M: Floats): Float64Array {
  const { dA, dOut, kA, kS, PA, PS } = m;
  const grid = new Float64Array(kS * kA);
  const MP = new Float64Array(dOut * kA);
  for (let i = 0; i < dOut; i++)
    for (let j = 0; j < dA; j++) for (let c = 0; c < kA; c++) MP[i * kA + c] += M[i * dA + j] * PA[j * kA + c];
  for (let i = 0; i < dOut; i++)
    for (let r = 0; r < kS; r++) for (let c = 0; c < kA; c++) grid[r * kA + c] += PS[i * kS + r] * MP[i * kA + c];
  return m.keep ? Float64Array.from(m.keep, (j) => grid[j]) : grid;
}

/** The store's rows tiled to `n` examples, saved, loaded and queried. */
async function atScale(
  store: GradientStore,
  identity: StoreIdentity,
  n: number,
  Ms: Map<string, Floats>[],
  say: (s?: string) => void,
): Promise<{ examples: number; gib: number; load_seconds: number; query_ms: number[] }> {
  const dir = mkdtempSync(join(tmpdir(), 'il-bench-store-'));
  try {
    store.save(dir);
    const file = join(dir, 'gradient_store.safetensors');
    const h = readSafetensorsHeader(file);
    // written streamed (as the server builds a store): the tiled rows are never held whole
    const layout: Record<string, TensorLayout> = {};
    for (const [name, info] of h.tensors)
      layout[name] = {
        dtype: info.dtype,
        shape: name.startsWith('rows.') ? [n, info.shape[1]] : name.startsWith('scale.') ? [n] : info.shape,
      };
    const meta: Record<string, string> = { ...h.metadata, size: String(n) };
    delete meta[DATA_SHA256];
    let t = Date.now();
    const small = new Map([...h.tensors.keys()].map((name) => [name, readTensorBytes(h, name)]));
    await writeSafetensorsStreamed(
      file,
      layout,
      meta,
      async (fd, offsetOf) => {
        for (const [name, bytes] of small) {
          const at = offsetOf(name);
          const tiles = name.startsWith('rows.') || name.startsWith('scale.') ? Math.ceil(n / store.size) : 1;
          const per = bytes.byteLength / (tiles > 1 ? store.size : 1);
          for (let i = 0; i < tiles; i++) {
            const len = tiles > 1 ? Math.min(store.size, n - i * store.size) * per : bytes.byteLength;
            for (let done = 0; done < len; )
              done += writeSync(fd, bytes, done, len - done, at + i * bytes.byteLength + done);
          }
        }
      },
      { checksum: true },
    );
    small.clear();
    const writeS = (Date.now() - t) / 1000;
    t = Date.now();
    const big = GradientStore.load(dir, identity);
    if (!big) throw new Error('the tiled store did not load');
    const loadS = (Date.now() - t) / 1000;
    const ms: number[] = [];
    for (const M of Ms.slice(0, 5)) {
      t = performance.now();
      await big.estimate(M);
      ms.push(performance.now() - t);
    }
    say();
    say(
      `at ${n} examples (eigen, k = ${identity.k}; the real rows tiled): ${(big.bytes / 2 ** 30).toFixed(2)} GiB of rows, ` +
        `written in ${writeS.toFixed(1)} s, loaded with its checksum in ${loadS.toFixed(1)} s; ` +
        `query ${ms.map((x) => x.toFixed(0)).join(', ')} ms (${ms.length} queries)`,
    );
    return { examples: n, gib: big.bytes / 2 ** 30, load_seconds: loadS, query_ms: ms };
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
}
