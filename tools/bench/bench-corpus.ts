// bench corpus: the product at 100k training examples. It writes an N-example JSONL (default
// 100,000) by recombining the embedded default's records with a seeded generator, keeps the
// 313 fine-tuning lines in it verbatim (the planted wrong facts and backdoor lines among them,
// so it can check that explain still finds their sources at this size), and measures:
//   - in this process: dataset load (read + parse + render + hash), the BM25 index (build time,
//     the memory it holds, query time; lunr's index until it failed at this size, see
//     src/server/index/bm25.ts) and tokenization;
//   - `influence-lens serve` (spawned as bench-latency does) on an influence-lens.json naming the
//     file: start until `status` answers, both lanes reading the file (`reload`), the gradient
//     store build (`index`) and its bytes on disk, explain p50/p95 for ekfac (store + exact
//     rerank; planted/backdoor sources found in the top 10, and for each source missed, whether
//     exact EK-FAC ranks it out too or the store lost it: checkSources) and bm25, the server's peak memory
//     (VmHWM, all threads), and a restart with the store on disk (start + first explain, which
//     reads the file, tokenizes it and loads the store).
//   npm run bench -- corpus [--examples N] [--queries Q] [--seed S] [--checkpoints off|auto] [--report PATH (without .md/.json)]
import { type ChildProcess, spawn } from 'node:child_process';
import { mkdirSync, mkdtempSync, readdirSync, readFileSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { cpus, hostname, loadavg, tmpdir } from 'node:os';
import { dirname, join, resolve } from 'node:path';
import { setFlagsFromString } from 'node:v8';
import { runInNewContext } from 'node:vm';
import { fitCheckpoints } from '../../src/server/attribution/checkpoints';
import { Corpus } from '../../src/server/attribution/explain';
import { runFitJob } from '../../src/server/attribution/fit-job';
import { CliError, int, parse } from '../../src/server/cli/util';
import { loadDataset } from '../../src/server/data/dataset';
import { embeddedDefault } from '../../src/server/defaults';
import { planCheckpoints } from '../../src/server/model/checkpoints';
import { Model } from '../../src/server/model/engine';
import { DEFAULTS } from '../../src/server/settings';
import { Rng } from '../../src/server/util/random';
import { RpcClient } from '../../src/transport/client';
import { reportHeader } from './machine';

const root = resolve(dirname(new URL(import.meta.url).pathname), '..', '..');

interface Query {
  prompt: string;
  completion: string;
  kind: 'planted' | 'backdoor' | 'fact_tracing';
  sources: Array<{ dataset: string; line: number; hash: string }>;
}

/**
 * `n` JSONL lines: the fine-tuning file's lines verbatim, spread evenly through the file, and
 * n − 313 new prompt/completion records recombined from the embedded default's clean question/answer
 * pairs (planted and backdoor lines left out, so their only sources stay the original lines) and
 * its pre-training sentences:
 *   context    1–3 pre-training sentences, then a question → its answer;
 *   few-shot   1–2 other answered questions, then a question → its answer;
 *   statement  a pre-training sentence cut at a word → the rest of the sentence.
 * Every word comes from the embedded corpus (the model's word-level vocabulary covers it), every
 * answer stays true, and no line repeats. Deterministic in (n, seed).
 */
export function corpusLines(n: number, seed: number): string[] {
  const d = embeddedDefault();
  const original = readFileSync(d.finetuneData, 'utf8').split('\n').filter(Boolean);
  if (n < original.length)
    throw new CliError(`--examples must be at least ${original.length} (the fine-tuning lines it keeps)`);
  const queries = JSON.parse(readFileSync(d.queries, 'utf8')) as Query[];
  const special = new Set(
    queries.filter((q) => q.kind !== 'fact_tracing').flatMap((q) => q.sources.map((s) => s.line)),
  );
  const qa = original
    .filter((_, i) => !special.has(i + 1))
    .map((l) => JSON.parse(l) as { prompt: string; completion: string });
  const sentences = [
    ...new Set(
      readFileSync(d.pretrainData, 'utf8')
        .split('\n')
        .filter(Boolean)
        .flatMap((l) => (JSON.parse(l) as { text: string }).text.split(/(?<=[.?!])\s+/)),
    ),
  ];
  const long = sentences.filter((s) => s.split(' ').length >= 4);
  const rng = new Rng(seed);
  const pick = <T>(xs: T[]): T => xs[rng.int(xs.length)];
  const answered = (x: { prompt: string; completion: string }) => `${x.prompt}${x.completion}`;
  const make = (): { prompt: string; completion: string } => {
    const r = rng.next();
    if (r < 0.5) {
      const ctx = Array.from({ length: 1 + rng.int(3) }, () => pick(sentences)).join(' ');
      const x = pick(qa);
      return { prompt: `${ctx}\n${x.prompt}`, completion: x.completion };
    }
    if (r < 0.8) {
      const shots = Array.from({ length: 1 + rng.int(2) }, () => answered(pick(qa))).join('');
      const x = pick(qa);
      return { prompt: `${shots}${x.prompt}`, completion: x.completion };
    }
    const words = pick(long).split(' ');
    const cut = Math.max(1, Math.min(words.length - 1, Math.ceil(words.length / 2) + rng.int(3) - 1));
    return { prompt: words.slice(0, cut).join(' '), completion: ` ${words.slice(cut).join(' ')}` };
  };
  const seen = new Set(original);
  const made: string[] = [];
  for (let tries = 0; made.length < n - original.length; tries++) {
    if (tries > 20 * n) throw new Error(`cannot recombine ${n} distinct lines from the embedded corpus`);
    const line = JSON.stringify(make());
    if (seen.has(line)) continue;
    seen.add(line);
    made.push(line);
  }
  // original line i goes to position ⌊(i + ½)·n / 313⌋
  const out: string[] = [];
  let next = 0;
  for (let pos = 0, g = 0; pos < n; pos++) {
    if (next < original.length && pos === Math.floor(((next + 0.5) * n) / original.length)) out.push(original[next++]);
    else out.push(made[g++]);
  }
  return out;
}

const round = (x: number, d = 0) => Math.round(x * 10 ** d) / 10 ** d;
const mib = (b: number) => round(b / 2 ** 20);

/** Garbage-collects, so that memory deltas count what is kept, not what awaits collection. */
function gc(): void {
  setFlagsFromString('--expose-gc');
  (runInNewContext('gc') as () => void)();
}

function percentiles(ms: number[]) {
  const s = [...ms].sort((a, b) => a - b);
  const p = (f: number) => s[Math.min(s.length - 1, Math.floor(f * s.length))];
  return { n: s.length, p50_ms: round(p(0.5)), p95_ms: round(p(0.95)), max_ms: round(s[s.length - 1]) };
}

/** The 1-, 5- and 15-minute load averages: other jobs share the machine, and every time depends on them. */
const load = () => loadavg().map((x) => round(x, 2));

/** VmHWM / VmRSS of a process (all its threads), in MiB. */
function processMemory(pid: number): { peak_mib: number; rss_mib: number } {
  const s = readFileSync(`/proc/${pid}/status`, 'utf8');
  const kb = (k: string) => Number(new RegExp(`^${k}:\\s+(\\d+) kB`, 'm').exec(s)?.[1] ?? Number.NaN);
  return { peak_mib: round(kb('VmHWM') / 1024), rss_mib: round(kb('VmRSS') / 1024) };
}

interface Server {
  child: ChildProcess;
  client: RpcClient;
  start_ms: number;
}

/** `influence-lens serve --config FILE` from the checkout's sources, timed until `status` answers. */
async function startServe(config: string): Promise<Server> {
  const t = performance.now();
  const child = spawn(
    process.execPath,
    ['--import', 'tsx', join(root, 'src/server/cli.ts'), 'serve', '--no-discovery', '--config', config],
    { cwd: root, env: process.env, stdio: ['ignore', 'pipe', 'pipe'] },
  );
  let out = '';
  let err = '';
  child.stderr!.on('data', (d) => {
    err = (err + d).slice(-4000);
  });
  const { url, token } = await new Promise<{ url: string; token: string }>((ok, fail) => {
    child.stdout!.on('data', (d) => {
      out += d;
      const url = /server on (ws:\/\/\S+)/.exec(out)?.[1];
      const token = /token: (\S+)/.exec(out)?.[1];
      if (url && token) ok({ url, token });
    });
    child.once('exit', (code) => fail(new Error(`serve exited (${code}) before listening: ${out}${err}`)));
  });
  const client = await RpcClient.connect({ url, token });
  await client.status();
  return { child, client, start_ms: round(performance.now() - t) };
}

async function stopServe(s: Server): Promise<void> {
  await s.client.close();
  s.child.kill('SIGTERM');
  if (s.child.exitCode === null) await new Promise((r) => s.child.once('exit', r));
}

async function timed<T>(f: () => Promise<T>): Promise<{ ms: number; value: T }> {
  const t = performance.now();
  const value = await f();
  return { ms: round(performance.now() - t), value };
}

interface Explained {
  scored: number;
  supporting: Array<{ id: { hash: string }; score: number }>;
  opposing: Array<{ id: { hash: string }; score: number }>;
  timings: Record<string, number>;
}

/** What became of one kind's (planted, backdoor) true sources in the corpus's ekfac top 10. */
interface SourceCheck {
  sources: number;
  /** shown in the corpus's top 10 */
  shown: number;
  /** not shown, and their exact score is below the 10th shown (exact) score: exact EK-FAC over the corpus ranks them out too */
  below_exact_top10: number;
  /** not shown although their exact score beats the 10th shown: the shown top 10 is not exact EK-FAC's, the store's pre-ranking lost them */
  lost_by_store: number;
  /** in the top 10 of the fine-tuning file alone (exact EK-FAC over its lines) */
  top10_of_finetune: number;
}

/**
 * Where exact EK-FAC puts the planted and backdoor sources that the corpus's top 10 did not show.
 * The sources are lines of the fine-tuning file, which the server scores exactly (it is smaller
 * than the store's minExamples), and an example's exact score does not depend on the examples
 * around it. The 10th example shown for the corpus carries an exact score (the rerank rescored
 * it), so exact scoring of the whole corpus has at least 10 examples at or above it: a source
 * scoring below it is outside exact EK-FAC's top 10 as well (the method ranks it out), and a
 * source scoring above it that was not shown was lost by the store (the shown list is then not
 * exact EK-FAC's top 10).
 */
async function checkSources(
  c: RpcClient,
  shown: Array<{ q: Query; top: Explained }>,
  finetuneSize: number,
): Promise<Record<'planted' | 'backdoor', SourceCheck>> {
  const zero = (): SourceCheck => ({
    sources: 0,
    shown: 0,
    below_exact_top10: 0,
    lost_by_store: 0,
    top10_of_finetune: 0,
  });
  const out = { planted: zero(), backdoor: zero() };
  // the check needs the fine-tuning file scored exactly: below the store's threshold
  if (finetuneSize >= DEFAULTS.store.minExamples)
    throw new Error(`the fine-tuning file (${finetuneSize} examples) would be scored through the store`);
  for (const { q, top } of shown) {
    if (q.kind === 'fact_tracing') continue;
    const ft = await c.request<Explained>('explain', {
      prompt: q.prompt,
      completion: q.completion,
      dataset: 'finetune',
      method: 'ekfac',
      topK: finetuneSize,
    });
    if (ft.supporting.length + ft.opposing.length < finetuneSize)
      throw new Error(
        `the fine-tuning file's explain listed ${ft.supporting.length + ft.opposing.length} of ${finetuneSize} examples`,
      );
    const exact = new Map([...ft.supporting, ...ft.opposing].map((e) => [e.id.hash, e.score]));
    const ftTop = new Set(ft.supporting.slice(0, 10).map((e) => e.id.hash));
    const shownHashes = new Set(top.supporting.map((e) => e.id.hash));
    // with fewer than 10 supporting examples shown, every example of positive exact score is among them
    const tenth = top.supporting.length >= 10 ? top.supporting[9].score : 0;
    const r = out[q.kind];
    for (const { hash } of q.sources) {
      const s = exact.get(hash);
      if (s === undefined)
        throw new Error(`source ${hash} of ${JSON.stringify(q.prompt)} is not in the fine-tuning file`);
      r.sources++;
      if (ftTop.has(hash)) r.top10_of_finetune++;
      if (shownHashes.has(hash)) r.shown++;
      else if (s < tenth || s <= 0) r.below_exact_top10++;
      else r.lost_by_store++;
    }
  }
  return out;
}

/** The source check in words: what the top-10 count means. */
function sourcesLine(x: Record<'planted' | 'backdoor', SourceCheck>): string {
  const one = (k: 'planted' | 'backdoor') => {
    const r = x[k];
    return r.sources
      ? `${k} ${r.shown} of ${r.sources} shown, ${r.below_exact_top10} ranked below the 10th by exact EK-FAC, ${r.lost_by_store} lost by the store (${r.top10_of_finetune} in the top 10 of the fine-tuning file alone)`
      : `${k}: no query`;
  };
  return `sources missing from the top 10, checked exactly: ${one('planted')}; ${one('backdoor')}`;
}

/** Parse, BM25 index and tokenization of the file in this process, each timed with the memory it keeps. */
function inProcess(data: string, queries: Query[]) {
  const model = Model.open(embeddedDefault().finetuned);
  void model.tokenizer;
  gc();
  const mem = () => process.memoryUsage();
  const m0 = mem();
  let t = performance.now();
  const ds = loadDataset(data, { skipMalformed: true });
  const parseMs = performance.now() - t;
  gc();
  const m1 = mem();
  const corpus = new Corpus('corpus', ds, model);
  t = performance.now();
  const bm25 = corpus.bm25Index();
  const bm25Ms = performance.now() - t;
  gc();
  const m2 = mem();
  const bmMs: number[] = [];
  for (const q of queries) {
    t = performance.now();
    bm25.scores(q.prompt + q.completion);
    bmMs.push(performance.now() - t);
  }
  t = performance.now();
  void corpus.tokens; // tokenized on first use
  const tokenizeMs = performance.now() - t;
  gc();
  const m3 = mem();
  return {
    parse_ms: round(parseMs),
    parse_rss_mib: mib(m1.rss - m0.rss),
    duplicates: ds.duplicates,
    bm25_build_ms: round(bm25Ms),
    bm25_rss_mib: mib(m2.rss - m1.rss),
    bm25_heap_mib: mib(m2.heapUsed - m1.heapUsed),
    bm25_query: percentiles(bmMs),
    tokenize_ms: round(tokenizeMs),
    tokenize_rss_mib: mib(m3.rss - m2.rss),
    truncated: corpus.truncated,
    load: load(),
  };
}

export async function benchCorpus(argv: string[]): Promise<void> {
  const { values: v } = parse(argv, {
    examples: { type: 'string' },
    queries: { type: 'string' },
    seed: { type: 'string' },
    report: { type: 'string' },
    checkpoints: { type: 'string' },
  });
  const n = int(v.examples, '--examples', 100_000);
  // off (default, comparable with earlier runs): ekfac on the final model, one store; auto: the
  // product's default for the embedded model, ekfac summed over its checkpoints, one store each
  const checkpoints = v.checkpoints ?? 'off';
  if (checkpoints !== 'off' && checkpoints !== 'auto') throw new CliError('--checkpoints must be off or auto');
  const nQueries = int(v.queries, '--queries', 10);
  const seed = int(v.seed, '--seed', 0);
  const say = (s = '') => process.stdout.write(`${s}\n`);
  const d = embeddedDefault();
  const finetuneSize = readFileSync(d.finetuneData, 'utf8').split('\n').filter(Boolean).length;
  // biome-ignore lint/suspicious/noExplicitAny: a JSON report, filled step by step
  const report: Record<string, any> = {
    ...reportHeader('corpus'),
    examples: n,
    queries: nQueries,
    seed,
    store: DEFAULTS.store,
    checkpoints,
    load_at_start: load(),
  };
  const work = mkdtempSync(join(tmpdir(), 'il-bench-corpus-'));
  try {
    // 1. the file
    const data = join(work, 'corpus.jsonl');
    const t = performance.now();
    writeFileSync(data, `${corpusLines(n, seed).join('\n')}\n`);
    report.generate = { ms: round(performance.now() - t), bytes: statSync(data).size };
    say(
      `bench corpus: ${n} examples (${mib(statSync(data).size)} MiB JSONL, seed ${seed}), ${cpus().length} CPUs, load ${load().join(' ')}`,
    );

    // 2. in this process: parse, BM25 (as the server's light lane: from rendered texts), tokenize
    const all = JSON.parse(readFileSync(d.queries, 'utf8')) as Query[];
    const queries = [
      ...all.filter((q) => q.kind !== 'fact_tracing'),
      ...all.filter((q) => q.kind === 'fact_tracing'),
    ].slice(0, nQueries);
    report.in_process = inProcess(data, queries);
    say(
      `  in process: parse ${report.in_process.parse_ms} ms (+${report.in_process.parse_rss_mib} MiB), BM25 index ${report.in_process.bm25_build_ms} ms ` +
        `(+${report.in_process.bm25_rss_mib} MiB RSS, +${report.in_process.bm25_heap_mib} MiB heap), BM25 query p50 ${report.in_process.bm25_query.p50_ms} ms, ` +
        `tokenize ${report.in_process.tokenize_ms} ms (+${report.in_process.tokenize_rss_mib} MiB); load ${load().join(' ')}`,
    );
    gc(); // what it held is garbage now: the server gets the memory

    // 3. the factors the server's ekfac needs (fitted once on the embedded fine-tuning set, cached)
    const fit = await timed(() =>
      runFitJob({
        modelDir: d.finetuned,
        dataPath: d.finetuneData,
        out: d.finetunedFactors,
        modules: 'all',
        labels: 'sampled',
        seed: 0,
        replaceStale: true, // the embedded default's cache
      }),
    );
    report.fit_ms = fit.ms;
    if (checkpoints === 'auto') {
      const model = Model.open(d.finetuned);
      const plan = planCheckpoints(d.finetuned, model.checkpoint, 'auto');
      if (!plan) throw new CliError(`${d.finetuned} has no training checkpoints`);
      const ck = await timed(() =>
        fitCheckpoints(plan, {
          dataPath: d.finetuneData,
          modules: 'all',
          labels: 'sampled',
          seed: 0,
          factorsDir: d.finetunedFactors,
        }),
      );
      report.checkpoint_fit_ms = ck.ms;
    }

    // 4. the server on the big file
    const config = join(work, 'influence-lens.json');
    writeFileSync(
      config,
      JSON.stringify({
        // checkpoints off: the final model's store; auto: one store per checkpoint, summed
        models: { model: d.finetuned, factors: d.finetunedFactors, fitDataset: 'finetune', checkpoints },
        datasets: { finetune: d.finetuneData, corpus: data },
        modules: 'all',
        damping: 'heuristic',
        cacheDir: join(work, 'cache'),
        // auto: the sum over checkpoints from one store per checkpoint (opt-in: settings.ts store.checkpoints)
        store: checkpoints === 'auto' ? { checkpoints: true } : {},
      }),
    );
    const serve = async (s: Server, phase: 'cold' | 'restart') => {
      const c = s.client;
      const row: Record<string, unknown> = { start_ms: s.start_ms, start_load: load() };
      say(`  serve (${phase}): started in ${s.start_ms} ms`);
      if (phase === 'cold') {
        const r = await timed(() => c.request<{ examples: number }>('reload', { dataset: 'corpus' }));
        row.reload_ms = r.ms;
        row.reload_load = load();
        say(`    reload (both lanes read ${r.value.examples} examples): ${r.ms} ms; load ${load().join(' ')}`);
        const ix = await timed(() => c.request<{ examples: number; bytes: number }>('index', { dataset: 'corpus' }));
        const onDisk = storeFiles(join(work, 'cache', 'stores'));
        const nStores = readdirSync(join(work, 'cache', 'stores')).length;
        row.index = {
          stores: nStores,
          ms: ix.ms,
          examples_per_s: round(ix.value.examples / (ix.ms / 1000)),
          // rows (fp16 values and scales) of all stores; since the rows stay in the files, not memory
          bytes_of_rows: ix.value.bytes,
          bytes_on_disk: onDisk,
          bytes_per_example: round(onDisk / ix.value.examples),
          load: load(),
        };
        say(
          `    gradient store build (${nStores} store${nStores === 1 ? '' : 's'}): ${ix.ms} ms (${round(ix.value.examples / (ix.ms / 1000))} examples/s), ${mib(onDisk)} MiB on disk (${round(onDisk / ix.value.examples)} bytes/example); load ${load().join(' ')}`,
        );
      }
      // ekfac: store + exact rerank
      const rescored: number[] = [];
      const ekfac = async (q: Query) => {
        const r = await timed(() =>
          c.request<Explained>(
            'explain',
            { prompt: q.prompt, completion: q.completion, dataset: 'corpus', method: 'ekfac', topK: 10 },
            {
              onProgress: (p) => {
                const m = p.kind === 'report' ? /exact recompute of (\d+)/.exec(p.message ?? '') : null;
                if (m) rescored.push(Number(m[1]));
              },
            },
          ),
        );
        return r;
      };
      const first = await ekfac(queries[0]);
      row.first_ekfac_ms = first.ms;
      row.first_load = load();
      say(`    first ekfac explain${phase === 'cold' ? '' : ' (reads the file and the store)'}: ${first.ms} ms`);
      // the restart measures what a user waits for after it; the latency loop is the cold run's
      if (phase === 'cold') {
        const ms: number[] = [];
        const found: Record<string, number[]> = { planted: [], backdoor: [] };
        const shown: Array<{ q: Query; top: Explained }> = [];
        for (const q of queries) {
          const r = await ekfac(q);
          ms.push(r.ms);
          if (q.kind !== 'fact_tracing') {
            shown.push({ q, top: r.value });
            const top = new Set(r.value.supporting.map((e) => e.id.hash));
            const srcs = q.sources.map((s) => s.hash);
            found[q.kind].push(srcs.filter((h) => top.has(h)).length / Math.min(10, srcs.length));
          }
        }
        const mean = (x: number[]) => (x.length ? round(x.reduce((a, b) => a + b, 0) / x.length, 3) : null);
        const ekfacLoad = load();
        say(
          `    ekfac (store + exact rerank of a median ${percentiles(rescored.slice(1)).p50_ms}): p50 ${percentiles(ms).p50_ms} ms, p95 ${percentiles(ms).p95_ms} ms (n=${ms.length}); ` +
            `share of planted sources in the top 10: ${mean(found.planted)}, backdoor: ${mean(found.backdoor)}; load ${ekfacLoad.join(' ')}`,
        );
        // after the latency loop: where exact EK-FAC puts the sources the top 10 missed
        const sources = await checkSources(c, shown, finetuneSize);
        say(`    ${sourcesLine(sources)}`);
        row.ekfac = {
          ...percentiles(ms),
          rescored_median: percentiles(rescored.slice(1)).p50_ms,
          recall_at_10: { planted: mean(found.planted), backdoor: mean(found.backdoor) },
          sources,
          load: ekfacLoad,
        };
        const q0 = queries[0];
        const bmFirst = await timed(() =>
          c.request('explain', {
            prompt: q0.prompt,
            completion: q0.completion,
            dataset: 'corpus',
            method: 'bm25',
            topK: 10,
          }),
        );
        const bm: number[] = [];
        for (const q of queries)
          bm.push(
            (
              await timed(() =>
                c.request('explain', {
                  prompt: q.prompt,
                  completion: q.completion,
                  dataset: 'corpus',
                  method: 'bm25',
                  topK: 10,
                }),
              )
            ).ms,
          );
        row.bm25 = { first_ms: bmFirst.ms, ...percentiles(bm), load: load() };
        say(
          `    bm25: first ${bmFirst.ms} ms (builds the index), then p50 ${percentiles(bm).p50_ms} ms, p95 ${percentiles(bm).p95_ms} ms; load ${load().join(' ')}`,
        );
      }
      row.memory = processMemory(s.child.pid!);
      say(
        `    server memory: peak ${(row.memory as { peak_mib: number }).peak_mib} MiB, now ${(row.memory as { rss_mib: number }).rss_mib} MiB`,
      );
      return row;
    };
    for (const phase of ['cold', 'restart'] as const) {
      const s = await startServe(config);
      try {
        report[phase] = await serve(s, phase);
      } finally {
        await stopServe(s);
      }
    }
  } finally {
    rmSync(work, { recursive: true, force: true });
  }
  report.load_at_end = load();
  const base =
    v.report ??
    join(
      root,
      'bench',
      'results',
      `${(report.date as string).slice(0, 10)}-${hostname()}-corpus${n === 100_000 ? '' : `-${n}`}`,
    );
  mkdirSync(dirname(base), { recursive: true });
  writeFileSync(`${base}.json`, `${JSON.stringify(report, null, 2)}\n`);
  writeFileSync(`${base}.md`, markdown(report));
  say(
    `  goals: ekfac explain p50 ≤ 2000 ms over 100k examples on 2 cores; server memory ≤ 2048 MiB. Report: ${base}.{md,json}`,
  );
}

function storeFiles(dir: string): number {
  let bytes = 0;
  for (const sub of readdirSync(dir))
    for (const f of readdirSync(join(dir, sub))) bytes += statSync(join(dir, sub, f)).size;
  return bytes;
}

/** The report as a table: every number with the load average (1 / 5 / 15 min) when it was taken. */
function markdown(r: Record<string, unknown>): string {
  // biome-ignore lint/suspicious/noExplicitAny: the report built above
  const x = r as any;
  const l = (a?: number[]) => (a ? a.join(' / ') : '');
  const rows: Array<[string, string, number[] | undefined]> = [
    ['JSONL written', `${mib(x.generate.bytes)} MiB in ${x.generate.ms} ms`, x.load_at_start],
    [
      'dataset parse (read, validate, render, hash)',
      `${x.in_process.parse_ms} ms, +${x.in_process.parse_rss_mib} MiB`,
      x.in_process.load,
    ],
    [
      'BM25 index build (from rendered texts)',
      `${x.in_process.bm25_build_ms} ms, +${x.in_process.bm25_rss_mib} MiB RSS (+${x.in_process.bm25_heap_mib} MiB heap)`,
      x.in_process.load,
    ],
    [
      'BM25 query (scores of every example)',
      `p50 ${x.in_process.bm25_query.p50_ms} ms, p95 ${x.in_process.bm25_query.p95_ms} ms`,
      x.in_process.load,
    ],
    [
      'tokenization (every example)',
      `${x.in_process.tokenize_ms} ms, +${x.in_process.tokenize_rss_mib} MiB`,
      x.in_process.load,
    ],
  ];
  for (const phase of ['cold', 'restart'] as const) {
    const s = x[phase];
    if (!s) continue;
    const tag = phase === 'cold' ? 'server' : 'server restarted, store on disk';
    rows.push([`${tag}: start until \`status\` answers`, `${s.start_ms} ms`, s.start_load]);
    if (s.reload_ms !== undefined)
      rows.push([`${tag}: \`reload\` (both lanes read the file)`, `${s.reload_ms} ms`, s.reload_load]);
    if (s.index)
      rows.push([
        `${tag}: gradient store build (\`index\`${(s.index.stores ?? 1) > 1 ? `, ${s.index.stores} stores: one per checkpoint` : ''})`,
        `${s.index.ms} ms (${s.index.examples_per_s} examples/s); ${mib(s.index.bytes_on_disk)} MiB on disk, ${s.index.bytes_per_example} bytes/example`,
        s.index.load,
      ]);
    rows.push([
      `${tag}: first ekfac explain${phase === 'cold' ? '' : ' (reads the file, tokenizes, loads the store)'}`,
      `${s.first_ekfac_ms} ms`,
      s.first_load,
    ]);
    if (s.ekfac)
      rows.push([
        `${tag}: ekfac explain (store + exact rerank)`,
        `p50 ${s.ekfac.p50_ms} ms, p95 ${s.ekfac.p95_ms} ms (n=${s.ekfac.n}); median ${s.ekfac.rescored_median} rescored exactly; planted / backdoor sources in the top 10: ${s.ekfac.recall_at_10.planted} / ${s.ekfac.recall_at_10.backdoor}`,
        s.ekfac.load,
      ]);
    if (s.ekfac?.sources)
      rows.push([
        `${tag}: true sources checked exactly (a source's exact score below the 10th shown is outside exact EK-FAC's top 10 over the whole corpus too)`,
        sourcesLine(s.ekfac.sources).replace(/^[^:]*: /, ''),
        undefined,
      ]);
    if (s.bm25)
      rows.push([
        `${tag}: bm25 explain`,
        `first ${s.bm25.first_ms} ms, then p50 ${s.bm25.p50_ms} ms, p95 ${s.bm25.p95_ms} ms`,
        s.bm25.load,
      ]);
    rows.push([
      `${tag}: memory (VmHWM / VmRSS, all threads)`,
      `${s.memory.peak_mib} / ${s.memory.rss_mib} MiB`,
      undefined,
    ]);
  }
  return [
    `# bench corpus: ${x.examples} examples`,
    '',
    `${x.date} on ${x.host} (${x.cpus} CPUs, Node ${x.node}, commit ${x.commit}); seed ${x.seed}; store k=${x.store.k}, rerank ${x.store.rerank}; checkpoints ${x.checkpoints ?? 'off'}.`,
    `Command: \`npm run bench -- corpus --examples ${x.examples} --queries ${x.queries}${x.checkpoints === 'auto' ? ' --checkpoints auto' : ''}\`. The machine is shared: each number carries the load average when it was taken.`,
    '',
    '| measure | value | load 1 / 5 / 15 min |',
    '|---|---|---|',
    ...rows.map(([a, b, c]) => `| ${a} | ${b} | ${l(c)} |`),
    '',
    'Goals: ekfac explain p50 ≤ 2 s over 100k examples on 2 cores; server memory ≤ 2 GB.',
    '',
  ].join('\n');
}
