// bench ekfac: EK-FAC factor fitting time and exact pairwise-scoring throughput on a fixed
// random Llama and fixed random data, next to kronfluence doing the same work on the same
// machine in the same run (test/oracle/bench_kronfluence.py, when its Python venv exists).
// Both sides use empirical labels, SUM losses, the same modules and damping 1e-3, so their
// scores must agree (Spearman per query) — a speed number without agreement means nothing.
import { spawnSync } from 'node:child_process';
import { existsSync, mkdirSync, readFileSync, writeFileSync } from 'node:fs';
import { cpus, hostname } from 'node:os';
import { dirname, join } from 'node:path';
import { preconditionerFor } from '../../src/server/attribution/ekfac/factors-io';
import { type FittedFactors, fitFactors, type TokenizedExample } from '../../src/server/attribution/fit';
import { queryBatchGradients, queryMatrices, scoreCandidates } from '../../src/server/attribution/influence';
import { int, parse } from '../../src/server/cli/util';
import { packageRoot } from '../../src/server/defaults';
import { defaultCacheDir, Model } from '../../src/server/model/engine';
import { initLlama, saveCheckpoint } from '../../src/server/train/trainer';
import { Rng } from '../../src/server/util/random';
import { spearman } from '../../src/server/util/stats';

const SHAPES = {
  full: { d: 128, layers: 4, heads: 4, ffn: 512, train: 256, length: 64, queries: 8 },
  quick: { d: 64, layers: 2, heads: 4, ffn: 256, train: 64, length: 32, queries: 4 },
};
// its tokenizer (vocab 320) is only used for the pad id
const VOCAB_FROM = () => join(packageRoot(), 'test/fixtures/models/llama');

export async function benchEkfac(argv: string[]): Promise<void> {
  const { values: v } = parse(argv, {
    quick: { type: 'boolean' },
    threads: { type: 'string' },
    python: { type: 'string' },
    'no-kronfluence': { type: 'boolean' },
    report: { type: 'string' },
  });
  const size = v.quick ? 'quick' : 'full';
  const s = SHAPES[size];
  const threads = int(v.threads, '--threads', cpus().length);
  const root = join(defaultCacheDir(), 'bench', `ekfac-${size}`);
  const modelDir = join(root, 'model');
  mkdirSync(root, { recursive: true });
  if (!existsSync(join(modelDir, 'model.safetensors'))) {
    const { config, params, shapes } = initLlama(
      { vocab: 320, d: s.d, layers: s.layers, heads: s.heads, kvHeads: s.heads, ffn: s.ffn, maxPositions: 128 },
      7,
      { bos: 0, eos: 0, pad: 0 },
    );
    // a few times the init scale, so the random model's gradients are not all tiny
    for (const [name, p] of params) if (!name.includes('norm')) for (let i = 0; i < p.length; i++) p[i] *= 4;
    saveCheckpoint(modelDir, config, params, shapes, VOCAB_FROM());
  }
  const rng = new Rng(11);
  const seq = (n: number) => Array.from({ length: n }, () => 1 + rng.int(319));
  const train = Array.from({ length: s.train }, () => seq(s.length / 2 + rng.int(s.length / 2 + 1)));
  const queries = Array.from({ length: s.queries }, () => ({ ids: seq(12), prompt_length: 8 }));
  const dataFile = join(root, 'data.json');
  writeFileSync(dataFile, JSON.stringify({ train, queries }));
  const trainEx: TokenizedExample[] = train.map((ids) => ({
    ids,
    weights: ids.map((_, t) => (t < ids.length - 1 ? 1 : 0)),
  }));
  const queryEx: TokenizedExample[] = queries.map((q) => ({
    ids: q.ids,
    weights: q.ids.map((_, t) => (t + 1 >= q.prompt_length && t < q.ids.length - 1 ? 1 : 0)),
  }));
  const tokens = train.reduce((a, x) => a + x.length, 0);
  const say = (line: string) => process.stdout.write(`${line}\n`);
  say(
    `bench ekfac (${size}): random Llama d=${s.d} × ${s.layers} layers, ffn ${s.ffn}; ${s.train} train sequences (${tokens} tokens), ${s.queries} queries; all linear modules; ${threads} threads`,
  );

  // ours
  const model = Model.open(modelDir, { threads });
  const opts = { modules: 'all' as const, labels: 'empirical' as const, seed: 0, batchSize: 8 };
  await fitFactors(model, trainEx.slice(0, 8), opts); // compile the graphs outside the timing
  // this machine is shared: time every step `repeats` times and keep the (lower) median, as the
  // kronfluence side does
  const repeats = v.quick ? 1 : 3;
  const median = (xs: number[]) => [...xs].sort((a, b) => a - b)[(xs.length - 1) >> 1];
  const fitTimes: number[] = [];
  let factors!: FittedFactors;
  for (let r = 0; r < repeats; r++) {
    const t = performance.now();
    factors = await fitFactors(model, trainEx, opts);
    fitTimes.push((performance.now() - t) / 1000);
  }
  const fitSeconds = median(fitTimes);
  const pre = new Map(
    [...factors.bases].map(([m, b]) => {
      const lam = factors.lambdas.get(m)!;
      return [m, preconditionerFor({ name: m, dA: b.dA, dOut: b.dOut, eigen: b, lambda: lam }, { absolute: 1e-3 })];
    }),
  );
  const scoreAll = async () => {
    // all queries as rows of one query matrix: one pass over the candidates scores every pair
    const G = await queryBatchGradients(model, queryEx, { modules: 'all' });
    return scoreCandidates(model, queryMatrices(G, [pre]), trainEx, { modules: 'all', batchSize: 8 });
  };
  await scoreAll(); // warm-up (graph compile)
  const scoreTimes: number[] = [];
  let scored!: Awaited<ReturnType<typeof scoreAll>>;
  for (let r = 0; r < repeats; r++) {
    const t = performance.now();
    scored = await scoreAll();
    scoreTimes.push((performance.now() - t) / 1000);
  }
  const scoreSeconds = median(scoreTimes);
  const ours = {
    fit_seconds: fitSeconds,
    fit_seconds_runs: fitTimes,
    score_seconds_runs: scoreTimes,
    fit_tokens_per_second: tokens / fitSeconds,
    score_seconds: scoreSeconds,
    candidates_per_second: s.train / scoreSeconds,
  };
  say(
    `  influence-lens: fit ${fitSeconds.toFixed(2)} s (${Math.round(ours.fit_tokens_per_second)} tokens/s); score ${s.queries}×${s.train} in ${scoreSeconds.toFixed(2)} s → ${Math.round(ours.candidates_per_second)} candidates/s`,
  );

  // kronfluence, same model and data, same machine, same run
  let kron: Record<string, unknown> | null = null;
  let agreement: number[] | null = null;
  const python = v.python ?? join(packageRoot(), 'test/oracle/.venv/bin/python');
  const script = join(packageRoot(), 'test/oracle/bench_kronfluence.py');
  if (v['no-kronfluence']) say('  kronfluence: skipped (--no-kronfluence)');
  else if (!existsSync(python) || !existsSync(script))
    say(
      `  kronfluence: not run (no ${existsSync(python) ? script : python}; see test/oracle/README.md to create the venv)`,
    );
  else {
    const out = join(root, 'kronfluence');
    const r = spawnSync(
      python,
      [
        script,
        '--model',
        modelDir,
        '--data',
        dataFile,
        '--out',
        out,
        '--threads',
        String(threads),
        '--labels',
        'empirical',
        '--modules',
        'all',
        '--damping',
        '1e-3',
        '--batch-size',
        '8',
        '--repeats',
        String(repeats),
      ],
      { encoding: 'utf8', stdio: ['ignore', 'pipe', 'pipe'] },
    );
    if (r.status !== 0)
      say(
        `  kronfluence: failed (exit ${r.status}): ${(r.stderr || r.stdout).trim().split('\n').slice(-3).join(' | ')}`,
      );
    else {
      kron = JSON.parse(readFileSync(join(out, 'kronfluence_bench.json'), 'utf8'));
      const theirs = JSON.parse(readFileSync(join(out, 'kronfluence_scores.json'), 'utf8')) as number[][];
      agreement = theirs.map((row, q) =>
        spearman(
          row,
          scored.scores.map((c) => c[q]),
        ),
      );
      const k = kron as { fit_seconds: number; score_seconds: number; candidates_per_second: number };
      say(
        `  kronfluence:    fit ${k.fit_seconds.toFixed(2)} s; score in ${k.score_seconds.toFixed(2)} s → ${Math.round(k.candidates_per_second)} candidates/s`,
      );
      say(
        `  ratios: fitting time ours/kronfluence = ${(fitSeconds / k.fit_seconds).toFixed(2)} (goal ≤ 0.5); scoring throughput ours/kronfluence = ${(ours.candidates_per_second / k.candidates_per_second).toFixed(2)} (goal ≥ 2)`,
      );
      say(`  agreement: Spearman per query ${agreement.map((x) => x.toFixed(4)).join(', ')} (goal ≥ 0.99)`);
    }
  }
  // this process's peak resident memory: the model, the fit and the scoring (run alone by `bench`)
  const peakRssMb = process.resourceUsage().maxRSS / 1024;
  say(
    `  peak memory (RSS): influence-lens ${Math.round(peakRssMb)} MB${kron && typeof kron.peak_rss_mb === 'number' ? `, kronfluence ${Math.round(kron.peak_rss_mb)} MB (its Python process, torch included)` : ''}`,
  );
  const report = {
    suite: 'ekfac',
    peak_rss_mb: peakRssMb,
    size,
    date: new Date().toISOString(),
    host: hostname(),
    cpus: cpus().length,
    threads,
    node: process.version,
    shape: s,
    tokens,
    ours,
    kronfluence: kron,
    spearman_per_query: agreement,
  };
  const file = v.report ?? join('bench/out', `ekfac-${size}-${report.date.slice(0, 10)}-${hostname()}.json`);
  mkdirSync(dirname(file), { recursive: true });
  writeFileSync(file, `${JSON.stringify(report, null, 2)}\n`);
  say(`  report: ${file}`);
}
