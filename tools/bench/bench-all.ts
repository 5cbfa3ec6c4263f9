// npm run bench [-- --quick]: every claim in one command. Runs the suites one after the
// other, each in its own process (so each peak-memory number is that suite's alone):
//   ekfac  — factor fitting and exact scoring next to kronfluence (same model, data, machine, run)
//   shape  — the same at Pythia-70M's real shape (`bench ekfac --shape pythia-70m`)
//   server — explain latency through the real server
//   eval   — accuracy: planted/backdoor retrieval, fact tracing, Gauss-Newton ground truth, LDS
//   store  — the gradient store against exact EK-FAC: Spearman, containment, bytes, 100k rows
// and writes bench/results/<date>-<machine>[-quick].{json,md} with a headline table.
import { spawnSync } from 'node:child_process';
import { existsSync, mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { cpus, hostname, tmpdir } from 'node:os';
import { join } from 'node:path';
import { parse } from '../../src/server/cli/util';
import { packageRoot } from '../../src/server/defaults';
import { defaultCacheDir } from '../../src/server/model/engine';
import { evalMarkdown, fmt, mdTable, type Row } from './bench-eval';

// report JSON read back from the suites (their shapes are their own files' business)
// biome-ignore lint/suspicious/noExplicitAny: see above
type Json = Record<string, any>;

export async function benchAll(argv: string[]): Promise<void> {
  const { values: v } = parse(argv, { quick: { type: 'boolean' }, 'no-kronfluence': { type: 'boolean' } });
  const quick = v.quick === true;
  const say = (s = '') => process.stdout.write(`${s}\n`);
  const t0 = Date.now();
  const tmp = mkdtempSync(join(tmpdir(), 'il-bench-'));
  const noKron = v['no-kronfluence'] ? ['--no-kronfluence'] : [];
  // [report key, command line]; --quick is passed to the suites that have it
  const suites: Array<[string, string[]]> = [
    ['ekfac', ['ekfac', ...(quick ? ['--quick'] : []), ...noKron]],
    // the real-shape checkpoint is written once by the oracle venv (test/oracle/make_shape.py)
    ...(shapeAvailable('pythia-70m')
      ? [
          [
            'shape',
            ['ekfac', '--shape', 'pythia-70m', ...(quick ? ['--examples', '8', '--queries', '4'] : []), ...noKron],
          ] as [string, string[]],
        ]
      : []),
    ['server', ['server', ...(quick ? ['--quick'] : [])]],
    ['eval', ['eval', ...(quick ? ['--quick'] : [])]],
    ['store', ['store', ...(quick ? ['--quick'] : [])]],
  ];
  const out: Record<string, Json | string> = {};
  if (!suites.some(([name]) => name === 'shape'))
    say(
      '\n== npm run bench -- ekfac --shape pythia-70m: skipped (no cached checkpoint and no test/oracle/.venv to write one; see test/oracle/README.md)',
    );
  try {
    for (const [suite, command] of suites) {
      const file = join(tmp, `${suite}.json`);
      const args = [...command, '--report', file];
      say(`\n== npm run bench -- ${command.join(' ')}`);
      // the same entry point (and loader flags, e.g. tsx's) as this process
      const r = spawnSync(process.execPath, [...process.execArgv, process.argv[1], ...args], { stdio: 'inherit' });
      out[suite] =
        r.status === 0 && existsSync(file)
          ? (JSON.parse(readFileSync(file, 'utf8')) as Json)
          : `failed (exit ${r.status ?? r.signal})`;
    }
  } finally {
    rmSync(tmp, { recursive: true, force: true });
  }
  const date = new Date().toISOString();
  const report = {
    command: `npm run bench${quick ? ' -- --quick' : ''}`,
    date,
    host: hostname(),
    cpus: cpus().length,
    cpu: cpus()[0]?.model ?? '',
    node: process.version,
    seconds: (Date.now() - t0) / 1000,
    headline: headline(out),
    suites: out,
  };
  mkdirSync('bench/results', { recursive: true });
  const base = join('bench/results', `${date.slice(0, 10)}-${hostname()}${quick ? '-quick' : ''}`);
  writeFileSync(`${base}.json`, `${JSON.stringify(report, null, 2)}\n`);
  writeFileSync(`${base}.md`, markdown(report, out));
  say();
  say(mdTable(report.headline, ['measure', 'influence-lens', 'reference', 'ratio']));
  say();
  say(`done in ${report.seconds.toFixed(0)} s; report: ${base}.json, ${base}.md`);
  if (Object.values(out).some((x) => typeof x === 'string')) process.exitCode = 1;
}

/** The Pythia-70M-shape checkpoint is cached, or the oracle venv that writes it is there. */
function shapeAvailable(shape: string): boolean {
  return (
    existsSync(join(defaultCacheDir(), 'bench', `shape-${shape}`, 'model', 'config.json')) ||
    existsSync(join(packageRoot(), 'test/oracle/.venv/bin/python'))
  );
}

/** The numbers a reader wants first, each next to the strongest alternative measured in the same run. */
function headline(s: Record<string, Json | string>): Row[] {
  const rows: Row[] = [];
  const num = (x: unknown) => (typeof x === 'number' && Number.isFinite(x) ? x : undefined);
  const ek = typeof s.ekfac === 'object' ? s.ekfac : undefined;
  if (ek) {
    const k = ek.kronfluence as Json | null;
    const add = (measure: string, ours?: number, theirs?: number, higherBetter = true, unit = '') => {
      if (ours === undefined) return;
      rows.push({
        measure,
        'influence-lens': `${fmt(round(ours))}${unit}`,
        reference: theirs === undefined ? '—' : `${fmt(round(theirs))}${unit} (kronfluence)`,
        ratio: theirs === undefined ? '—' : `${(ours / theirs).toFixed(2)}×${higherBetter ? '' : ' (lower is better)'}`,
      });
    };
    add('EK-FAC fit, tokens/s', num(ek.ours?.fit_tokens_per_second), num(k?.fit_tokens_per_second));
    add('exact pairwise scoring, candidates/s', num(ek.ours?.candidates_per_second), num(k?.candidates_per_second));
    add('peak memory (fit + scoring), MB', num(ek.peak_rss_mb), num(k?.peak_rss_mb), false);
    const sp = ek.spearman_per_query as number[] | null;
    if (sp?.length)
      rows.push({
        measure: 'agreement with kronfluence (Spearman, worst query)',
        'influence-lens': Math.min(...sp),
        reference: '—',
        ratio: '—',
      });
  }
  const sh = typeof s.shape === 'object' ? s.shape : undefined;
  if (sh) {
    const k = sh.kronfluence as Json | null;
    const label = `${sh.shape} shape (${sh.train}×${sh.length} tokens, ${sh.queries} queries)`;
    const add = (measure: string, ours?: number, theirs?: number, higherBetter = true) => {
      if (ours === undefined) return;
      rows.push({
        measure: `${label}: ${measure}`,
        'influence-lens': fmt(round(ours)),
        reference: theirs === undefined ? '—' : `${fmt(round(theirs))} (kronfluence)`,
        ratio: theirs === undefined ? '—' : `${(ours / theirs).toFixed(2)}×${higherBetter ? '' : ' (lower is better)'}`,
      });
    };
    add('EK-FAC fit, tokens/s', num(sh.ours?.fit_tokens_per_second), num(k?.fit_tokens_per_second));
    add('batch scoring, candidates/s', num(sh.ours?.candidates_per_second), num(k?.candidates_per_second));
    add('peak memory, MB', num(sh.ours?.peak_rss_mb), num(k?.peak_rss_mb), false);
    const sp = sh.spearman_per_query as number[] | null;
    if (sp?.length)
      rows.push({
        measure: `${label}: agreement with kronfluence (Spearman, worst query)`,
        'influence-lens': Math.min(...sp),
        reference: '—',
        ratio: '—',
      });
  }
  const sv = typeof s.server === 'object' ? s.server : undefined;
  for (const r of (sv?.results ?? []) as Json[])
    if (r.method === 'ekfac' || r.method === 'multistage')
      rows.push({
        measure: `explain latency p50, ${r.method} over ${r.candidates} examples`,
        'influence-lens': `${Math.round(r.p50_ms)} ms`,
        reference: '—',
        ratio: '—',
      });
  const ev = typeof s.eval === 'object' ? s.eval : undefined;
  if (ev) {
    const best = (rs: Row[], pick: (r: Row) => boolean, key: string) =>
      rs.filter(pick).sort((a, b) => Number(b[key]) - Number(a[key]))[0];
    const baselines = (r: Row) => !String(r.method).includes('EK-FAC') && !String(r.method).includes('store');
    for (const task of ['planted', 'backdoor']) {
      const rs = (ev.retrieval as Row[]).filter((r) => r.task === task);
      // the default computation (EK-FAC summed over checkpoints when the model has them), and final-model EK-FAC
      const dflt = rs.find((r) => String(r.method).startsWith('EK-FAC Σ'));
      const b = best(rs, baselines, 'Recall@10');
      const cell = (r: Row) =>
        `${fmt(r['Recall@10'])} / ${fmt(r.MRR)}${r['in bottom 10%'] === undefined ? '' : ` / ${r['in bottom 10%']}`} (${r.method})`;
      for (const e of [dflt, rs.find((r) => r.method === 'EK-FAC')])
        if (e && b)
          rows.push({
            measure: `${task} sources, Recall@10 / MRR / true sources in the bottom 10%`,
            'influence-lens': cell(e),
            reference: cell(b),
            ratio: '—',
          });
    }
    // the non-lexical task (tools/bench/eval-nonlexical.ts), over the queries its retrain check verifies
    const nl = ((ev.nonlexical as Json | undefined)?.rows ?? []) as Row[];
    const nlv = nl.filter((r) => r.queries === 'verified');
    const nle = nlv.find((r) => r.method === 'EK-FAC');
    const nlb = best(nlv, baselines, 'MRR');
    if (nle && nlb)
      rows.push({
        measure: `non-lexical planted sources (${nle.n} verified queries), Recall@10 / MRR`,
        'influence-lens': `${fmt(nle['Recall@10'])} / ${fmt(nle.MRR)} (EK-FAC)`,
        reference: `${fmt(nlb['Recall@10'])} / ${fmt(nlb.MRR)} (${nlb.method})`,
        ratio: '—',
      });
    const tr = ev.fact_tracing as Row[];
    const ms = best(tr, (r) => r.method === 'multi-stage EK-FAC', 'MRR');
    const ss = best(tr, (r) => r.method === 'single-stage EK-FAC', 'MRR');
    const bt = best(tr, (r) => !String(r.method).includes('EK-FAC'), 'MRR');
    if (ms && ss && bt)
      rows.push({
        measure: 'fact tracing into pre-training, MRR (best damping)',
        'influence-lens': `${fmt(ms.MRR)} multi-stage, ${fmt(ss.MRR)} single-stage`,
        reference: `${fmt(bt.MRR)} (${bt.method})`,
        ratio: '—',
      });
    if (Array.isArray(ev.ground_truth)) {
      const gt = ev.ground_truth as Row[];
      for (const damping of [...new Set(gt.map((r) => r['GGN damping']))]) {
        const e = gt.find((r) => r.method === 'EK-FAC' && r['GGN damping'] === damping);
        const b = best(
          gt.filter((r) => r['GGN damping'] === damping),
          baselines,
          'top-10 overlap',
        );
        if (e && b)
          rows.push({
            measure: `exact Gauss-Newton influence (${damping}): top-10 overlap / Spearman`,
            'influence-lens': `${fmt(e['top-10 overlap'])} / ${fmt(e.Spearman)} (EK-FAC)`,
            reference: `${fmt(b['top-10 overlap'])} / ${fmt(b.Spearman)} (${b.method})`,
            ratio: '—',
          });
      }
    }
    const lds = ev.lds.rows as Row[];
    const e = lds.find((r) => r.method === 'EK-FAC');
    const b = best(lds, baselines, 'LDS');
    if (e && b)
      rows.push({
        measure: `LDS (${ev.lds.subsets} retrained halves)`,
        'influence-lens': `${fmt(e.LDS)} (EK-FAC)`,
        reference: `${fmt(b.LDS)} (${b.method})`,
        ratio: '—',
      });
  }
  const st = typeof s.store === 'object' ? s.store : undefined;
  const def = (st?.results as Json[] | undefined)?.find((r) => r.default);
  if (def) {
    rows.push({
      measure: `gradient store (k = ${def.k}) vs exact EK-FAC: Spearman median / worst; exact top-10 inside the store's top-${def.rerank}`,
      'influence-lens': `${fmt(def.spearman_median)} / ${fmt(def.spearman_min)}; ${def.exact_top10_in_rerank}/${def.queries} queries`,
      reference: '—',
      ratio: '—',
    });
    const sc = st?.at_scale as Json | null;
    rows.push({
      measure: 'gradient store: bytes per example; query time',
      'influence-lens': `${Math.round(def.bytes_per_example)} B; ${fmt(def.query_ms)} ms over ${def.examples}${
        sc
          ? `, ${Math.round([...sc.query_ms].sort((a: number, b: number) => a - b)[Math.floor(sc.query_ms.length / 2)])} ms over ${sc.examples}`
          : ''
      }`,
      reference: '—',
      ratio: '—',
    });
  }
  return rows;
}

function round(x: number): number {
  return Math.abs(x) >= 10 ? Math.round(x) : x;
}

function markdown(
  r: {
    command: string;
    date: string;
    host: string;
    cpus: number;
    cpu: string;
    node: string;
    seconds: number;
    headline: Row[];
  },
  s: Record<string, Json | string>,
): string {
  const parts = [
    `# Influence Lens benchmark

${r.date} on ${r.host} (${r.cpus} × ${r.cpu}, Node ${r.node}, no GPU); ${r.seconds.toFixed(0)} s.
Command: \`${r.command}\`.

## Headline
${mdTable(r.headline, ['measure', 'influence-lens', 'reference', 'ratio'])}
`,
  ];
  const ek = s.ekfac;
  if (typeof ek === 'string') parts.push(`## Speed against kronfluence\n${ek}\n`);
  else {
    const k = ek.kronfluence as Json | null;
    parts.push(`## Speed against kronfluence (\`bench ekfac${ek.size === 'quick' ? ' --quick' : ''}\`)

Random Llama d=${ek.shape.d} × ${ek.shape.layers} layers (ffn ${ek.shape.ffn}), ${ek.shape.train} training sequences (${ek.tokens} tokens), ${ek.shape.queries} queries, all linear modules, empirical labels, damping 1e-3, batch 8, ${ek.threads} threads; medians of the repeated runs.

| | influence-lens | kronfluence ${k?.versions?.kronfluence ?? ''} (torch ${k?.versions?.torch ?? ''}) |
|---|---|---|
| fit (s) | ${fmt(ek.ours.fit_seconds)} | ${k ? fmt(k.fit_seconds) : 'not run'} |
| fit (tokens/s) | ${Math.round(ek.ours.fit_tokens_per_second)} | ${k ? Math.round(k.fit_tokens_per_second) : '—'} |
| exact scoring (candidates/s) | ${Math.round(ek.ours.candidates_per_second)} | ${k ? Math.round(k.candidates_per_second) : '—'} |
| peak memory, whole process (MB) | ${Math.round(ek.peak_rss_mb)} | ${k?.peak_rss_mb ? Math.round(k.peak_rss_mb) : '—'} |
| Spearman with kronfluence per query | ${(ek.spearman_per_query ?? []).map((x: number) => x.toFixed(4)).join(', ') || '—'} | |
`);
  }
  const sv = s.server;
  if (typeof sv === 'string') parts.push(`## Explain latency through the server\n${sv}\n`);
  else
    parts.push(`## Explain latency through the server (\`bench server${sv.queries <= 6 ? ' --quick' : ''}\`)

${sv.queries} queries per row, WebSocket JSON-RPC on loopback, top 10; peak memory of the server process ${Math.round(sv.peak_rss_mb)} MB.

${mdTable(
  (sv.results as Json[]).map((x) => ({
    method: x.method,
    dataset: x.dataset,
    examples: x.candidates,
    'p50 ms': Math.round(x.p50_ms),
    'p95 ms': Math.round(x.p95_ms),
  })),
  ['method', 'dataset', 'examples', 'p50 ms', 'p95 ms'],
)}

Gradient store (k=${sv.store?.k}, ${Math.round(sv.store?.bytes_per_example ?? 0)} bytes/example) against exact EK-FAC over the whole set: Spearman median ${fmt(sv.store?.spearman_median ?? NaN)}, min ${fmt(sv.store?.spearman_min ?? NaN)} (it only pre-ranks; shown examples are rescored exactly).
`);
  const ev = s.eval;
  parts.push(typeof ev === 'string' ? `## Accuracy\n${ev}\n` : evalMarkdown(ev as Parameters<typeof evalMarkdown>[0]));
  return parts.join('\n');
}
