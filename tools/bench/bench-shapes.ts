// bench ekfac --shape <name>: EK-FAC at a real model's shape (random weights, the real config,
// a real tokenizer, real English text), next to kronfluence doing the same work in the same run.
// The toy shape of plain `bench ekfac` hid where time and memory go at real widths.
//   fit: covariance pass, eigendecomposition and Λ pass timed separately (tokens/s of the passes)
//   scoring: every query's preconditioned gradient once, then one pass over the candidates with
//   all queries' rows (the path `explain --queries` uses): candidates/s
//   agreement: Spearman per query between our scores and kronfluence's, and the largest
//   difference relative to the query's largest |score|.
// --model <dir> runs the same on a checkpoint of one's own (test/oracle/train_shape.py trains a
// shape's checkpoint on the bench's text: the comparison on weights that are not a random init).
// The checkpoint is written once by test/oracle/make_shape.py (the oracle venv, which the
// kronfluence side needs anyway) and cached.
import { spawn, spawnSync } from 'node:child_process';
import { createHash } from 'node:crypto';
import { existsSync, mkdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { cpus, hostname } from 'node:os';
import { basename, dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import type { Eigenbasis } from '../../src/server/attribution/ekfac/eigenbasis';
import { preconditionerFor } from '../../src/server/attribution/ekfac/factors-io';
import type { LambdaAccumulator } from '../../src/server/attribution/ekfac/lambda';
import type { Preconditioner } from '../../src/server/attribution/ekfac/precondition';
import { fitCovariances, fitEigenbases, fitLambdas, type TokenizedExample } from '../../src/server/attribution/fit';
import {
  eigenbasisCheaper,
  queryBatchGradients,
  queryMatrices,
  scoreCandidates,
  tokenCount,
} from '../../src/server/attribution/influence';
import { CliError, int, parse } from '../../src/server/cli/util';
import { packageRoot } from '../../src/server/defaults';
import { defaultCacheDir, Model } from '../../src/server/model/engine';
import { spearman } from '../../src/server/util/stats';
import { scoringBound } from './gemm-bound';
import { reportHeader } from './machine';

export const BENCH_SHAPES = [
  'pythia-70m',
  'pythia-160m',
  'smollm-135m',
  'qwen2.5-0.5b',
  'qwen3-0.6b',
  'gemma-3-270m',
  'gpt2',
] as const;

/**
 * Real English text: paragraphs of this project's own documentation, frozen into
 * shape-text.txt on 2026-12-03 so that runs on different commits score the same data (the text
 * was cut from the live Markdown before, and changed whenever the docs did). Extended on
 * 2026-12-06 with the paragraphs of docs/MEASUREMENTS.md and docs/ARCHITECTURE.md of that day,
 * appended after the old text (whose tokens are unchanged), so that 256 sequences × 128 tokens fit.
 */
function englishText(): string {
  return readFileSync(join(dirname(fileURLToPath(import.meta.url)), 'shape-text.txt'), 'utf8');
}

export async function benchShape(argv: string[]): Promise<void> {
  const { values: v } = parse(argv, {
    shape: { type: 'string' },
    model: { type: 'string' },
    examples: { type: 'string' },
    queries: { type: 'string' },
    length: { type: 'string' },
    threads: { type: 'string' },
    python: { type: 'string' },
    'no-kronfluence': { type: 'boolean' },
    'no-warmup': { type: 'boolean' },
    'eigendecomposition-dtype': { type: 'string' },
    flow: { type: 'boolean' },
    report: { type: 'string' },
    compare: { type: 'string' },
  });
  // --model: the same comparison on a checkpoint of the user's (a trained one, say), cached data
  // and factors under a folder named by the checkpoint's path
  const custom = v.model ? resolve(v.model) : null;
  if (custom && v.shape) throw new CliError('give --shape or --model, not both');
  if (custom && !existsSync(join(custom, 'config.json')))
    throw new CliError(`--model ${v.model}: no config.json there (a Hugging Face checkpoint folder is expected)`);
  // both tools decompose in this precision (kronfluence's eigendecomposition_dtype; float64 is both defaults)
  const eigendecompositionDtype = v['eigendecomposition-dtype'] ?? 'float64';
  if (eigendecompositionDtype !== 'float64' && eigendecompositionDtype !== 'float32')
    throw new CliError(`--eigendecomposition-dtype must be float64 or float32 (got "${eigendecompositionDtype}")`);
  const shape = custom ? `model-${basename(custom)}` : (v.shape as (typeof BENCH_SHAPES)[number]);
  if (!custom && !BENCH_SHAPES.includes(shape as (typeof BENCH_SHAPES)[number]))
    throw new CliError(`--shape must be one of ${BENCH_SHAPES.join(', ')}, or give --model <checkpoint-dir>`);
  const nTrain = int(v.examples, '--examples', 16);
  const nQueries = int(v.queries, '--queries', 8);
  const length = int(v.length, '--length', 128);
  const threads = int(v.threads, '--threads', cpus().length);
  const python = v.python ?? join(packageRoot(), 'test/oracle/.venv/bin/python');
  const root = custom
    ? join(defaultCacheDir(), 'bench', `${shape}-${createHash('sha256').update(custom).digest('hex').slice(0, 12)}`)
    : join(defaultCacheDir(), 'bench', `shape-${shape}`);
  const modelDir = custom ?? join(root, 'model');
  mkdirSync(root, { recursive: true });
  const say = (line: string) => process.stdout.write(`${line}\n`);
  if (!existsSync(join(modelDir, 'config.json'))) {
    if (!existsSync(python))
      throw new CliError(
        `no ${python}: the ${shape} checkpoint is written by test/oracle/make_shape.py (see test/oracle/README.md for the venv)`,
      );
    const r = spawnSync(python, [join(packageRoot(), 'test/oracle/make_shape.py'), shape, modelDir], {
      encoding: 'utf8',
    });
    if (r.status !== 0) throw new CliError(`make_shape.py ${shape} failed: ${(r.stderr || r.stdout).trim()}`);
  }
  const model = Model.open(modelDir, { threads });

  // sequences of `length` tokens cut from the text, in order; queries come after the training text
  const ids = model.tokenizer.encode(englishText(), { addSpecialTokens: false }).ids;
  const need = (nTrain + nQueries) * length;
  if (ids.length < need)
    throw new CliError(
      `the text has ${ids.length} tokens, fewer than --examples × --length + queries (${need}); lower them`,
    );
  const train = Array.from({ length: nTrain }, (_, i) => ids.slice(i * length, (i + 1) * length));
  const qLen = Math.min(length, 32);
  const queries = Array.from({ length: nQueries }, (_, i) => ({
    ids: ids.slice((nTrain + i) * length, (nTrain + i) * length + qLen),
    prompt_length: qLen / 2,
  }));
  const dataFile = join(root, `data-${nTrain}x${length}.json`);
  writeFileSync(dataFile, JSON.stringify({ train, queries }));
  const trainEx: TokenizedExample[] = train.map((x) => ({
    ids: x,
    weights: x.map((_, t) => (t < x.length - 1 ? 1 : 0)),
  }));
  const queryEx: TokenizedExample[] = queries.map((q) => ({
    ids: q.ids,
    weights: q.ids.map((_, t) => (t + 1 >= q.prompt_length && t < q.ids.length - 1 ? 1 : 0)),
  }));
  const tokens = nTrain * length;
  // once, at the start: the report's header, whose CPU model the first line also prints
  const header = reportHeader('ekfac-shape');
  say(
    `bench ekfac --shape ${shape}: ${model.describe()}; ${nTrain} sequences × ${length} tokens of English text, ${nQueries} queries; all linear modules; ${threads} threads on ${header.cpu ?? 'an unknown CPU'}${eigendecompositionDtype === 'float32' ? '; both tools eigendecompose in float32' : ''}`,
  );

  // kronfluence first, while this process holds only the model: at Qwen2.5-0.5B our factors and
  // preconditioners are many GB, and both tools at once would not fit in 24 GB
  let kron: Record<string, unknown> | null = null;
  let theirs: number[][] | null = null;
  const script = join(packageRoot(), 'test/oracle/bench_kronfluence.py');
  if (v['no-kronfluence']) say('  kronfluence: skipped (--no-kronfluence)');
  else if (!existsSync(python)) say(`  kronfluence: not run (no ${python}; see test/oracle/README.md)`);
  else {
    const out = join(root, 'kronfluence');
    const r = spawnSync(
      python,
      [
        script,
        ...['--model', modelDir, '--data', dataFile, '--out', out, '--threads', String(threads)],
        ...['--labels', 'empirical', '--modules', 'all', '--damping', '1e-3', '--batch-size', '8', '--repeats', '1'],
        ...(v['no-warmup'] ? ['--no-warmup'] : []),
        ...['--eigendecomposition-dtype', eigendecompositionDtype],
      ],
      { encoding: 'utf8', stdio: ['ignore', 'pipe', 'pipe'] },
    );
    if (r.status !== 0)
      say(
        `  kronfluence: failed (exit ${r.status}): ${(r.stderr || r.stdout).trim().split('\n').slice(-3).join(' | ')}`,
      );
    else {
      kron = JSON.parse(readFileSync(join(out, 'kronfluence_bench.json'), 'utf8'));
      theirs = JSON.parse(readFileSync(join(out, 'kronfluence_scores.json'), 'utf8')) as number[][];
    }
  }

  // ours: one run each (a real shape takes minutes; the machine's load is the noise to mention)
  const opts = { modules: 'all' as const, labels: 'empirical' as const, seed: 0, batchSize: 8 };
  const sec = (t: number) => (performance.now() - t) / 1000;
  // the same decision explain makes: rows left in the eigenbasis when rotating the candidates costs less
  const eigenFor = (pre: Map<string, Preconditioner>, modules: Iterable<string>) =>
    eigenbasisCheaper(pre, modules, nQueries, tokenCount(trainEx));
  // the scoring bound's products (gemm-bound.ts), timed now and again after scoring, the faster
  // kept: this shared host's speed drifts over minutes. Before the fit, so their few hundred MB
  // of inputs do not add to our peak memory
  const boundArgs = [
    model.modules('all'),
    { vocab: model.config.vocab_size as number, hidden: model.config.hidden_size as number },
    length,
    Math.min(opts.batchSize, nTrain),
    nQueries,
    threads,
  ] as const;
  const boundBefore = await scoringBound(...boundArgs);
  const warmupSeconds = v['no-warmup'] ? null : await warmUp(model, trainEx.slice(0, 8), queryEx, opts, eigenFor);
  if (warmupSeconds !== null)
    say(
      `  influence-lens: warm-up ${warmupSeconds.toFixed(1)} s (each graph compiled and run once, as kronfluence's warm-up)`,
    );
  let t = performance.now();
  // as the fit job does: fitEigenbases drops each covariance once decomposed (at 135M they are
  // 2.4 GB), and the per-token rows kept for the Λ pass when they fit are consumed by it
  const { covariances, rows } = await fitCovariances(model, trainEx, opts, { rows: true });
  const rowsMb = rows ? rows.bytes / 2 ** 20 : null;
  const covarianceSeconds = sec(t);
  t = performance.now();
  const bases = await fitEigenbases(covariances, { precision: model.precision, eigendecompositionDtype });
  const eigenSeconds = sec(t);
  t = performance.now();
  const lambdas = await fitLambdas(model, trainEx, bases, opts, rows);
  const lambdaSeconds = sec(t);
  const fitSeconds = covarianceSeconds + eigenSeconds + lambdaSeconds;
  const pre = preconditioners(bases, lambdas);
  t = performance.now();
  let G: Awaited<ReturnType<typeof queryBatchGradients>> | null = await queryBatchGradients(model, queryEx, {
    modules: 'all',
  });
  const queryGradSeconds = sec(t);
  t = performance.now();
  // as explain chooses: the query rows left in the eigenbasis when rotating the candidates costs less
  const eigen = eigenFor(pre, G.keys());
  const M = queryMatrices(G, [pre], { eigenbasis: eigen });
  G = null; // the raw query gradients are not needed once preconditioned
  const preconditionSeconds = sec(t);
  t = performance.now();
  const scored = await scoreRows(model, M, trainEx, pre, eigen);
  const candidateSeconds = sec(t);
  const scoreSeconds = queryGradSeconds + preconditionSeconds + candidateSeconds;
  // read before the bound's second measurement allocates its inputs
  const peakRssMb = process.resourceUsage().maxRSS / 1024;
  // how fast this machine's matrix products alone would let any engine score the candidates
  const bound = await scoringBound(...boundArgs, 5, boundBefore);
  const fixedSeconds = queryGradSeconds + preconditionSeconds;
  const scoringCeiling = nTrain / (fixedSeconds + nTrain * bound.seconds_per_candidate);
  const ours = {
    fit_seconds: fitSeconds,
    covariance_seconds: covarianceSeconds,
    eigendecomposition_seconds: eigenSeconds,
    lambda_seconds: lambdaSeconds,
    /** MiB of the covariance pass's per-token rows the Λ pass reused (null: Λ ran its own pass over the data) */
    lambda_rows_mb: rowsMb,
    fit_tokens_per_second: tokens / fitSeconds,
    warmup_seconds: warmupSeconds,
    query_gradient_seconds: queryGradSeconds,
    precondition_seconds: preconditionSeconds,
    scored_in_eigenbasis: eigen,
    /**
     * scored in the eigenbasis: the GFLOP per candidate of rotating its tokens, ã Q_A and g Q_S per
     * module (2·T·(d_A² + d_out²)), which the bound (the products every exact score needs) leaves out
     */
    eigenbasis_rotation_gflop_per_candidate: eigen
      ? (2 * length * model.modules('all').reduce((s, m) => s + (m.dIn + (m.hasBias ? 1 : 0)) ** 2 + m.dOut ** 2, 0)) /
        1e9
      : 0,
    score_seconds: scoreSeconds,
    candidates_per_second: nTrain / scoreSeconds,
    candidate_pass_seconds: candidateSeconds,
    /**
     * the candidates' matrix products at ORT's best measured rate for each shape (a lower bound on
     * any engine's time on this machine), and the candidates/s our own fixed costs plus that allow
     */
    scoring_bound: { ...bound, candidates_per_second_ceiling: scoringCeiling },
    peak_rss_mb: peakRssMb,
    /** candidates × queries, for --compare of a later run */
    scores: scored.scores.map((r) => Array.from(r)),
  };
  say(
    `  influence-lens: fit ${fitSeconds.toFixed(1)} s (${ours.fit_tokens_per_second.toFixed(1)} tokens/s; covariance ${covarianceSeconds.toFixed(1)} s, eigendecomposition ${eigenSeconds.toFixed(1)} s, Λ ${lambdaSeconds.toFixed(1)} s${rowsMb === null ? '' : ` from ${Math.round(rowsMb)} MiB of kept rows`})`,
  );
  say(
    `                  score ${nQueries}×${nTrain} in ${scoreSeconds.toFixed(1)} s (query gradients ${queryGradSeconds.toFixed(1)} s, preconditioning ${preconditionSeconds.toFixed(1)} s${eigen ? ', scored in the eigenbasis' : ''}) → ${ours.candidates_per_second.toFixed(2)} candidates/s; peak RSS ${Math.round(ours.peak_rss_mb)} MB`,
  );
  say(
    `                  the candidates' matrix products: ${bound.gflop_per_candidate.toFixed(1)} GFLOP each, ≥ ${(1000 * bound.seconds_per_candidate).toFixed(0)} ms at ORT's measured GEMM rates here (ours ${((1000 * candidateSeconds) / nTrain).toFixed(0)} ms, ${((100 * bound.seconds_per_candidate * nTrain) / candidateSeconds).toFixed(0)}% of that bound); ceiling with our fixed costs ${scoringCeiling.toFixed(2)} candidates/s`,
  );
  if (eigen)
    say(
      `                  (scored in the eigenbasis: each candidate's tokens are also rotated, ${ours.eigenbasis_rotation_gflop_per_candidate.toFixed(1)} GFLOP more per candidate than the bound counts, for ${preconditionSeconds.toFixed(1)} s of preconditioning instead of rotating every query row back)`,
    );

  let agreement: number[] | null = null;
  // Spearman alone would pass scores off by a common factor or with a shifted scale: the largest
  // difference per query, relative to that query's largest |score|, says the values agree too
  let relError: number[] | null = null;
  if (kron && theirs) {
    ({ spearman: agreement, relError } = agreementWith(theirs, scored.scores));
    const k = kron as {
      fit_seconds: number;
      fit_phases: Record<string, number>;
      score_seconds: number;
      candidates_per_second: number;
      peak_rss_mb: number;
    };
    say(
      `  kronfluence:    fit ${k.fit_seconds.toFixed(1)} s (covariance ${k.fit_phases.covariance_seconds?.toFixed(1)} s, eigendecomposition ${k.fit_phases.eigendecomposition_seconds?.toFixed(1)} s, Λ ${k.fit_phases.lambda_seconds?.toFixed(1)} s); score ${k.score_seconds.toFixed(1)} s → ${k.candidates_per_second.toFixed(2)} candidates/s; peak RSS ${Math.round(k.peak_rss_mb)} MB`,
    );
    say(
      `  ratios ours/kronfluence: fit time ${(fitSeconds / k.fit_seconds).toFixed(2)} (goal ≤ 0.5), scoring throughput ${(ours.candidates_per_second / k.candidates_per_second).toFixed(2)} (goal ≥ 2), peak RSS ${(ours.peak_rss_mb / k.peak_rss_mb).toFixed(2)} (goal ≤ 1)`,
    );
    say(
      `  scoring ratio's ceiling on this machine's GEMMs: ${(scoringCeiling / k.candidates_per_second).toFixed(2)} (the products above at their measured rates, our query gradients and preconditioning, nothing else)`,
    );
    say(`  agreement: Spearman per query ${agreement.map((x) => x.toFixed(4)).join(', ')}`);
    say(
      `             largest difference / largest |score| per query ${relError.map((x) => x.toExponential(1)).join(', ')}`,
    );
  }
  // --compare <report>: our scores against those of an earlier run of ours (the float64 fit, say)
  let compared: { report: string; spearman: number[]; relative_error: number[] } | null = null;
  if (v.compare) {
    const earlier = JSON.parse(readFileSync(v.compare, 'utf8')) as { ours?: { scores?: number[][] } };
    const rows = earlier.ours?.scores;
    if (!rows || rows.length !== scored.scores.length || rows[0]?.length !== nQueries)
      throw new CliError(
        `--compare ${v.compare}: no scores of ${nQueries} queries × ${nTrain} candidates in that report`,
      );
    // theirs is queries × candidates
    const a = agreementWith(
      Array.from({ length: nQueries }, (_, q) => rows.map((r) => r[q])),
      scored.scores,
    );
    compared = { report: v.compare, spearman: a.spearman, relative_error: a.relError };
    say(`  against ${v.compare}: Spearman per query ${a.spearman.map((x) => x.toFixed(4)).join(', ')}`);
    say(
      `             largest difference / largest |score| per query ${a.relError.map((x) => x.toExponential(1)).join(', ')}`,
    );
  }
  // the user's flow through the CLI: `fit`, then one `explain` over the same examples as JSONL text
  let flow: Record<string, unknown> | null = null;
  if (v.flow) {
    const jsonl = join(root, `flow-${nTrain}x${length}.jsonl`);
    writeFileSync(jsonl, `${train.map((x) => JSON.stringify({ text: model.tokenizer.decode(x) })).join('\n')}\n`);
    const factors = join(root, `flow-factors-${nTrain}x${length}`);
    rmSync(factors, { recursive: true, force: true });
    const cli = join(packageRoot(), 'bin/influence-lens.js');
    const fitRun = await timedChild(process.execPath, [
      cli,
      ...['fit', '--model', modelDir, '--data', jsonl, '--out', factors, '--modules', 'all'],
      ...['--eigendecomposition-dtype', eigendecompositionDtype],
    ]);
    const q = model.tokenizer.decode(queries[0].ids.slice(0, queries[0].prompt_length));
    const c = model.tokenizer.decode(queries[0].ids.slice(queries[0].prompt_length));
    const explainRun = await timedChild(process.execPath, [
      cli,
      ...['explain', '--model', modelDir, '--factors', factors, '--data', jsonl, '--prompt', q, '--completion', c],
      '--json',
    ]);
    flow = {
      fit_seconds: fitRun.seconds,
      fit_peak_rss_mb: fitRun.peakMb,
      explain_seconds: explainRun.seconds,
      explain_peak_rss_mb: explainRun.peakMb,
      completion_tokens: queries[0].ids.length - queries[0].prompt_length,
    };
    say(
      `  CLI flow (influence-lens fit, then explain, over ${nTrain} examples): fit ${fitRun.seconds.toFixed(1)} s, peak RSS ${fitRun.peakMb ?? 'n/a'} MB; explain ${explainRun.seconds.toFixed(1)} s, peak RSS ${explainRun.peakMb ?? 'n/a'} MB`,
    );
  }
  const report = {
    ...header,
    shape,
    threads,
    train: nTrain,
    length,
    queries: nQueries,
    tokens,
    eigendecomposition_dtype: eigendecompositionDtype,
    ours,
    kronfluence: kron,
    spearman_per_query: agreement,
    relative_error_per_query: relError,
    compared,
    model: custom ?? undefined,
    cli_flow: flow,
  };
  const file = v.report ?? join('bench/out', `ekfac-${shape}-${report.date.slice(0, 10)}-${hostname()}.json`);
  mkdirSync(dirname(file), { recursive: true });
  writeFileSync(file, `${JSON.stringify(report, null, 2)}\n`);
  say(`  report: ${file}`);
}

/**
 * Runs a command to completion; wall seconds and its peak RSS (VmHWM, read from /proc every
 * 100 ms while it runs: Linux only, else null). A failed command stops the bench with its output.
 */
async function timedChild(cmd: string, args: string[]): Promise<{ seconds: number; peakMb: number | null }> {
  const t = performance.now();
  const child = spawn(cmd, args, { stdio: ['ignore', 'pipe', 'pipe'] });
  let out = '';
  child.stdout.on('data', (d) => {
    out = (out + d).slice(-4000);
  });
  child.stderr.on('data', (d) => {
    out = (out + d).slice(-4000);
  });
  let peak: number | null = null;
  const status = `/proc/${child.pid}/status`;
  const poll = setInterval(() => {
    try {
      const kb = Number(/VmHWM:\s+(\d+)/.exec(readFileSync(status, 'utf8'))?.[1]);
      if (Number.isFinite(kb)) peak = Math.max(peak ?? 0, Math.round(kb / 1024));
    } catch {
      // exited, or no /proc
    }
  }, 100);
  const code: number | null = await new Promise((res) => child.on('close', res));
  clearInterval(poll);
  if (code !== 0)
    throw new CliError(
      `${args.slice(1, 2).join(' ')} failed (exit ${code}): ${out.trim().split('\n').slice(-3).join(' | ')}`,
    );
  return { seconds: (performance.now() - t) / 1000, peakMb: peak };
}

/**
 * Our warm-up, as kronfluence's (test/oracle/bench_kronfluence.py runs its fit and scoring once on
 * the first 8 examples, untimed): every graph of the pipeline compiled and run once on `sub`, so
 * that neither side's timing holds one-time costs (ONNX Runtime's session creation took 4.2 s for
 * the SmolLM-135M score graph, and a process's first run of a shape 2-3 s more than later ones).
 * The Λ and score runs take identity bases: a run costs the same whatever their values, and an
 * eigendecomposition is no graph to warm. Returns its seconds.
 */
async function warmUp(
  model: Model,
  sub: TokenizedExample[],
  queries: TokenizedExample[],
  opts: { modules: 'all'; labels: 'empirical'; seed: number; batchSize: number },
  eigenFor: (pre: Map<string, Preconditioner>, modules: Iterable<string>) => boolean,
): Promise<number> {
  const t = performance.now();
  const { modules } = await fitCovariances(model, sub, opts);
  const identity = (n: number) => {
    const q = model.precision === 'fp64' ? new Float64Array(n * n) : new Float32Array(n * n);
    for (let i = 0; i < n; i++) q[i * n + i] = 1;
    return q;
  };
  const bases = new Map(
    modules.map((m) => {
      const dA = m.dIn + (m.hasBias ? 1 : 0);
      const basis = {
        module: m.name,
        dA,
        dOut: m.dOut,
        qA: identity(dA),
        eigA: new Float64Array(dA),
        qS: identity(m.dOut),
        eigS: new Float64Array(m.dOut),
      };
      return [m.name, basis];
    }),
  );
  const pre = preconditioners(bases, await fitLambdas(model, sub, bases, opts));
  const G = await queryBatchGradients(model, queries, { modules: 'all' });
  const eigen = eigenFor(pre, G.keys());
  await scoreRows(model, queryMatrices(G, [pre], { eigenbasis: eigen }), sub, pre, eigen);
  return (performance.now() - t) / 1000;
}

/**
 * The bench's preconditioners (absolute damping 1e-3, as kronfluence's side); the fp64 Λ sums are
 * cleared once the preconditioners hold 1/(Λ+λ) (2.9 GB at Qwen2.5-0.5B).
 */
function preconditioners(
  bases: Map<string, Eigenbasis>,
  lambdas: Map<string, LambdaAccumulator>,
): Map<string, Preconditioner> {
  const pre = new Map(
    [...bases].map(([m, b]) => [
      m,
      preconditionerFor({ name: m, dA: b.dA, dOut: b.dOut, eigen: b, lambda: lambdas.get(m)! }, { absolute: 1e-3 }),
    ]),
  );
  lambdas.clear();
  return pre;
}

/** One pass over the candidates with every query's rows (explain --queries), in the eigenbasis when `eigen`. */
function scoreRows(
  model: Model,
  M: ReturnType<typeof queryMatrices>,
  candidates: TokenizedExample[],
  pre: Map<string, Preconditioner>,
  eigen: boolean,
) {
  return scoreCandidates(model, M, candidates, { modules: 'all', batchSize: 8, ...(eigen ? { eigenbasis: pre } : {}) });
}

/**
 * Per query, Spearman and the largest difference relative to the query's largest |score| (Spearman
 * alone would pass scores off by a common factor). `reference` is queries × candidates, `scores`
 * candidates × queries.
 */
function agreementWith(reference: number[][], scores: ArrayLike<number>[]): { spearman: number[]; relError: number[] } {
  return {
    spearman: reference.map((row, q) =>
      spearman(
        row,
        scores.map((c) => c[q]),
      ),
    ),
    relError: reference.map((row, q) => {
      const scale = Math.max(...row.map(Math.abs));
      const diff = Math.max(...row.map((x, c) => Math.abs(x - scores[c][q])));
      return scale > 0 ? diff / scale : diff;
    }),
  };
}
