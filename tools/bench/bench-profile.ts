// bench profile: where the EK-FAC passes spend their time at a bench shape (default pythia-70m,
// the checkpoint `bench ekfac --shape` caches). Each pass runs once to warm up, then --repeats
// times; its wall time is split into ONNX Runtime's `run` and the JS-side work (covariance
// syrk, Λ sums). With --ort-profile, ONNX Runtime's per-node profile is written
// (INFLUENCE_LENS_ORT_PROFILE) and summed by op type and by node.
//   cov: fitCovariances; eigen: fitEigenbases of a covariance pass's sums (that pass untimed); lambda: fitLambdas with random dense eigenbases (GEMM time does not
//   depend on values, and an eigendecomposition takes longer than the pass); qgrad: the
//   queries' per-token gradients; score: scoreCandidates in the eigenbasis with random rows;
//   score-back: the same rows taken as P(G) (the path for many candidate tokens, rows rotated back);
//   lambda-rows: Λ from the covariance pass's kept rows (empirical labels), that pass untimed.
import { existsSync, readdirSync, readFileSync } from 'node:fs';
import { basename, dirname, join } from 'node:path';
import { CovarianceAccumulator } from '../../src/server/attribution/ekfac/covariance';
import type { Eigenbasis } from '../../src/server/attribution/ekfac/eigenbasis';
import { LambdaAccumulator } from '../../src/server/attribution/ekfac/lambda';
import type { TokenRows } from '../../src/server/attribution/ekfac/lambda-rows';
import type { Preconditioner } from '../../src/server/attribution/ekfac/precondition';
import { fitCovariances, fitEigenbases, fitLambdas, type TokenizedExample } from '../../src/server/attribution/fit';
import { queryBatchGradients, scoreCandidates } from '../../src/server/attribution/influence';
import { CliError, int, parse } from '../../src/server/cli/util';
import { CompiledGraph, defaultCacheDir, Model } from '../../src/server/model/engine';
import { Rng } from '../../src/server/util/random';

const PHASES = ['cov', 'eigen', 'lambda', 'lambda-rows', 'qgrad', 'score', 'score-back'] as const;

export async function benchProfile(argv: string[]): Promise<void> {
  const { values: v } = parse(argv, {
    shape: { type: 'string' },
    phase: { type: 'string' },
    repeats: { type: 'string' },
    threads: { type: 'string' },
    'ort-profile': { type: 'string' },
    labels: { type: 'string' },
  });
  const shape = v.shape ?? 'pythia-70m';
  const phases = v.phase ? v.phase.split(',') : [...PHASES];
  for (const p of phases)
    if (!(PHASES as readonly string[]).includes(p)) throw new CliError(`--phase: one or more of ${PHASES.join(', ')}`);
  const repeats = int(v.repeats, '--repeats', 2);
  const modelDir = join(defaultCacheDir(), 'bench', `shape-${shape}`, 'model');
  if (!existsSync(join(modelDir, 'config.json')))
    throw new CliError(`no ${modelDir}: run \`npm run bench -- ekfac --shape ${shape}\` once to write it`);
  const prefix = v['ort-profile'];
  if (prefix) process.env.INFLUENCE_LENS_ORT_PROFILE = prefix;
  const model = Model.open(modelDir, { threads: int(v.threads, '--threads', 2) });

  // the bench's data: 16 × 128 tokens of its English text, 8 queries of 32 (prompt 16)
  const text = readFileSync(join(import.meta.dirname, 'shape-text.txt'), 'utf8');
  const ids = model.tokenizer.encode(text, { addSpecialTokens: false }).ids;
  const [nTrain, length, nQ, qLen] = [16, 128, 8, 32];
  const train: TokenizedExample[] = Array.from({ length: nTrain }, (_, i) => {
    const x = ids.slice(i * length, (i + 1) * length);
    return { ids: x, weights: x.map((_, t) => (t < x.length - 1 ? 1 : 0)) };
  });
  const queries: TokenizedExample[] = Array.from({ length: nQ }, (_, i) => {
    const q = ids.slice((nTrain + i) * length, (nTrain + i) * length + qLen);
    return { ids: q, weights: q.map((_, t) => (t + 1 >= qLen / 2 && t < q.length - 1 ? 1 : 0)) };
  });
  // --labels sampled: fit's default labels (drawn from the model), for the covariance pass's head
  const labels: 'empirical' | 'sampled' =
    v.labels === undefined || v.labels === 'empirical'
      ? 'empirical'
      : v.labels === 'sampled'
        ? 'sampled'
        : (() => {
            throw new CliError('--labels must be empirical or sampled');
          })();
  const opts = { modules: 'all' as const, labels, seed: 0, batchSize: 8 };

  const times = new Map<string, number>();
  const timed = <T extends object>(proto: T, method: keyof T & string, label: string) => {
    const f = proto[method] as (...args: unknown[]) => unknown;
    const add = (t: number) => times.set(label, (times.get(label) ?? 0) + (performance.now() - t) / 1000);
    (proto as Record<string, unknown>)[method] = function (this: unknown, ...args: unknown[]) {
      const t = performance.now();
      const r = f.apply(this, args);
      if (r instanceof Promise) return r.finally(() => add(t));
      add(t);
      return r;
    };
  };
  timed(CompiledGraph.prototype, 'run', 'ORT run');
  // the sessions that ran, to write their profiles at the end
  const graphs = new Set<CompiledGraph>();
  const run = CompiledGraph.prototype.run;
  CompiledGraph.prototype.run = function (this: CompiledGraph, ...args: Parameters<typeof run>) {
    graphs.add(this);
    return run.apply(this, args);
  };
  timed(CovarianceAccumulator.prototype, 'addActivationRows', 'JS Σ ã ãᵀ');
  timed(CovarianceAccumulator.prototype, 'addGradientRows', 'JS Σ g gᵀ');
  timed(LambdaAccumulator.prototype, 'addSum', 'JS Λ sums');

  const rng = new Rng(3);
  const random = (n: number, scale: number) => {
    const u = rng.uniforms(n);
    for (let i = 0; i < n; i++) u[i] = (u[i] - 0.5) * scale;
    return u;
  };
  const mods = model.modules('all');
  const pre = new Map<string, Preconditioner>();
  const rows = new Map<string, Float32Array[]>();
  for (const m of mods) {
    const dA = m.dIn + (m.hasBias ? 1 : 0);
    const b: Eigenbasis = {
      module: m.name,
      dA,
      dOut: m.dOut,
      qA: random(dA * dA, 2 / Math.sqrt(dA)),
      qS: random(m.dOut * m.dOut, 2 / Math.sqrt(m.dOut)),
      eigA: new Float64Array(dA),
      eigS: new Float64Array(m.dOut),
    };
    const ones = new Float32Array(dA * m.dOut).fill(1);
    pre.set(m.name, { ...b, damping: 1e-3, inverse: ones });
    rows.set(
      m.name,
      Array.from({ length: nQ }, () => random(m.dOut * dA, 1e-3)),
    );
  }
  const bases = new Map<string, Eigenbasis>(pre);
  let kept: TokenRows | undefined;
  let covariances: Map<string, CovarianceAccumulator> | undefined;
  // untimed work a pass needs before each run
  const prepare: Partial<Record<(typeof PHASES)[number], () => Promise<unknown>>> = {
    // the decompositions consume the sums: a covariance pass before each
    eigen: async () => {
      covariances = (await fitCovariances(model, train, opts)).covariances;
    },
    'lambda-rows': async () => {
      kept = (await fitCovariances(model, train, opts, { rows: true })).rows;
      if (!kept) throw new CliError('the rows were not kept (INFLUENCE_LENS_FIT_ROWS_MB?)');
    },
  };
  const passes: Record<(typeof PHASES)[number], () => Promise<unknown>> = {
    cov: () => fitCovariances(model, train, opts),
    eigen: () => fitEigenbases(covariances!),
    lambda: () => fitLambdas(model, train, bases, opts),
    'lambda-rows': () => fitLambdas(model, train, bases, opts, kept),
    qgrad: () => queryBatchGradients(model, queries, { modules: 'all' }),
    score: () => scoreCandidates(model, rows, train, { modules: 'all', batchSize: 8, eigenbasis: pre }),
    'score-back': () => scoreCandidates(model, rows, train, { modules: 'all', batchSize: 8 }),
  };
  const say = (line: string) => process.stdout.write(`${line}\n`);
  say(`bench profile: ${model.describe()}; ${nTrain} × ${length} tokens, ${nQ} queries × ${qLen}; ${repeats} repeats`);
  for (const p of phases as Array<(typeof PHASES)[number]>) {
    await prepare[p]?.();
    await passes[p](); // compile and warm up
    times.clear();
    let c0 = process.cpuUsage();
    let cpu = 0;
    const walls: number[] = [];
    for (let r = 0; r < repeats; r++) {
      if (prepare[p]) {
        cpu += cpuSince(c0);
        await prepare[p]!();
        times.clear();
        c0 = process.cpuUsage();
      }
      const t = performance.now();
      await passes[p]();
      walls.push((performance.now() - t) / 1000);
    }
    cpu += cpuSince(c0);
    const parts = [...times].map(([k, s]) => `${k} ${(s / repeats).toFixed(2)} s`).join(', ');
    say(
      `  ${p}: wall ${walls.map((w) => w.toFixed(2)).join(', ')} s; per pass: CPU ${(cpu / repeats).toFixed(2)} s, ${parts}`,
    );
  }
  if (prefix) {
    for (const g of graphs) g.session.endProfiling();
    const dir = dirname(prefix);
    const base = basename(prefix);
    for (const f of readdirSync(dir).filter((x) => x.startsWith(`${base}_`) && x.endsWith('.json')))
      say(summarize(join(dir, f)));
  }
}

function cpuSince(c0: NodeJS.CpuUsage): number {
  const c = process.cpuUsage(c0);
  return (c.user + c.system) / 1e6;
}

interface TraceEvent {
  cat?: string;
  name: string;
  dur: number;
  args?: { op_name?: string; output_type_shape?: Array<Record<string, number[]>> };
}

/** An ORT profile summed by op type and by node (kernel time only). */
export function summarize(file: string, top = 15): string {
  const events = JSON.parse(readFileSync(file, 'utf8')) as TraceEvent[];
  const byOp = new Map<string, number>();
  const byNode = new Map<string, { op: string; us: number; shape: string }>();
  let runs = 0;
  for (const e of events) {
    if (e.cat === 'Session' && e.name === 'model_run') runs++;
    if (e.cat !== 'Node' || !e.name.endsWith('_kernel_time')) continue;
    const op = e.args?.op_name ?? '?';
    byOp.set(op, (byOp.get(op) ?? 0) + e.dur);
    const node = e.name.slice(0, -'_kernel_time'.length);
    const shape = (e.args?.output_type_shape ?? []).map((o) => JSON.stringify(Object.values(o)[0])).join(' ');
    const n = byNode.get(node) ?? { op, us: 0, shape };
    n.us += e.dur;
    byNode.set(node, n);
  }
  const total = [...byOp.values()].reduce((a, b) => a + b, 0);
  const pct = (us: number) => `${((100 * us) / total).toFixed(1)}%`;
  const lines = [`${file}: ${runs} runs, kernels ${(total / 1e6).toFixed(2)} s`];
  for (const [op, us] of [...byOp].sort((a, b) => b[1] - a[1]).slice(0, top))
    lines.push(`    ${op.padEnd(20)} ${(us / 1e6).toFixed(3)} s ${pct(us)}`);
  lines.push('  top nodes:');
  for (const [node, n] of [...byNode].sort((a, b) => b[1].us - a[1].us).slice(0, top))
    lines.push(
      `    ${node.slice(0, 36).padEnd(36)} ${n.op.padEnd(16)} ${(n.us / 1e6).toFixed(3)} s ${pct(n.us)} → ${n.shape}`,
    );
  return lines.join('\n');
}
