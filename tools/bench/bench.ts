// npm run bench -- <suite> (node --import tsx tools/bench/bench.ts <suite>): commands that print numbers and write a report.
// Speed goals live here, never in tests.
//
// bench engine: forward + backward with per-module outputs on a GPT-2-small-shaped random
// model (124M parameters), against ONNX Runtime's own fp32 GEMM rate measured in the same run.
import { existsSync, mkdirSync, writeFileSync } from 'node:fs';
import { cpus, hostname } from 'node:os';
import { join } from 'node:path';
import { pathToFileURL } from 'node:url';
import { CliError, HelpRequested, int, parse } from '../../src/server/cli/util';
import { defaultCacheDir, Model, makeBatch } from '../../src/server/model/engine';
import { type TensorToWrite, writeSafetensors } from '../../src/server/model/safetensors';
import { Rng } from '../../src/server/util/random';
import { benchAll } from './bench-all';
import { benchBlas } from './bench-blas';
import { benchCorpus } from './bench-corpus';
import { benchEkfac } from './bench-ekfac';
import { benchEval } from './bench-eval';
import { benchProfile } from './bench-profile';
import { benchServer } from './bench-server';
import { benchShape } from './bench-shapes';
import { benchStore } from './bench-store';
import { gemmRate } from './gemm-bound';

export async function runBench(argv: string[]): Promise<void> {
  const [suite, ...rest] = argv;
  if (suite === undefined || suite.startsWith('--')) return benchAll(argv);
  if (suite === 'engine') return benchEngine(rest);
  if (suite === 'ekfac' && rest.some((a) => ['--shape', '--model'].includes(a.split('=')[0]))) return benchShape(rest);
  if (suite === 'ekfac') return benchEkfac(rest);
  if (suite === 'server') return benchServer(rest);
  if (suite === 'eval') return benchEval(rest);
  if (suite === 'store') return benchStore(rest);
  if (suite === 'corpus') return benchCorpus(rest);
  if (suite === 'profile') return benchProfile(rest);
  if (suite === 'blas') return benchBlas(rest);
  throw new CliError(
    `usage: npm run bench -- [--quick] (all suites, one report) | npm run bench -- engine|ekfac|server|eval|store [--quick] | npm run bench -- corpus [--examples N] | npm run bench -- profile [--labels empirical|sampled] [--phase cov,eigen,lambda,lambda-rows,qgrad,score,score-back] [--ort-profile <prefix>] | npm run bench -- blas [--layers N] (unknown suite "${suite}")`,
  );
}

interface Gpt2Shape {
  nLayer: number;
  d: number;
  nHead: number;
  vocab: number;
  positions: number;
}

/** Write a random-weight GPT-2 checkpoint (cached; deterministic from the seed). */
export function randomGpt2(dir: string, s: Gpt2Shape, seed = 1): string {
  if (existsSync(join(dir, 'model.safetensors'))) return dir;
  mkdirSync(dir, { recursive: true });
  const rng = new Rng(seed);
  const tensors: Record<string, TensorToWrite> = {};
  const add = (name: string, shape: number[], std: number, mean = 0) => {
    const n = shape.reduce((a, b) => a * b, 1);
    const data = new Float32Array(n);
    // uniform with the given std: cheap and good enough for timing
    const a = std * Math.sqrt(3);
    for (let i = 0; i < n; i++) data[i] = mean + (2 * rng.next() - 1) * a;
    tensors[name] = { dtype: 'F32', shape, data };
  };
  add('transformer.wte.weight', [s.vocab, s.d], 0.02);
  add('transformer.wpe.weight', [s.positions, s.d], 0.01);
  for (let i = 0; i < s.nLayer; i++) {
    const p = `transformer.h.${i}`;
    add(`${p}.ln_1.weight`, [s.d], 0.01, 1);
    add(`${p}.ln_1.bias`, [s.d], 0.01);
    add(`${p}.attn.c_attn.weight`, [s.d, 3 * s.d], 0.02);
    add(`${p}.attn.c_attn.bias`, [3 * s.d], 0.01);
    add(`${p}.attn.c_proj.weight`, [s.d, s.d], 0.02);
    add(`${p}.attn.c_proj.bias`, [s.d], 0.01);
    add(`${p}.ln_2.weight`, [s.d], 0.01, 1);
    add(`${p}.ln_2.bias`, [s.d], 0.01);
    add(`${p}.mlp.c_fc.weight`, [s.d, 4 * s.d], 0.02);
    add(`${p}.mlp.c_fc.bias`, [4 * s.d], 0.01);
    add(`${p}.mlp.c_proj.weight`, [4 * s.d, s.d], 0.02);
    add(`${p}.mlp.c_proj.bias`, [s.d], 0.01);
  }
  add('transformer.ln_f.weight', [s.d], 0.01, 1);
  add('transformer.ln_f.bias', [s.d], 0.01);
  writeSafetensors(join(dir, 'model.safetensors'), tensors, { format: 'pt' });
  const config = {
    model_type: 'gpt2',
    architectures: ['GPT2LMHeadModel'],
    n_layer: s.nLayer,
    n_embd: s.d,
    n_head: s.nHead,
    vocab_size: s.vocab,
    n_positions: s.positions,
    activation_function: 'gelu_new',
    layer_norm_epsilon: 1e-5,
  };
  writeFileSync(join(dir, 'config.json'), JSON.stringify(config, null, 2));
  return dir;
}

async function benchEngine(argv: string[]): Promise<void> {
  const { values: v } = parse(argv, {
    quick: { type: 'boolean' },
    threads: { type: 'string' },
    batch: { type: 'string' },
    seq: { type: 'string' },
    out: { type: 'string' },
  });
  const quick = !!v.quick;
  const threads = v.threads ? int(v.threads, '--threads', 0) : undefined;
  const shape: Gpt2Shape = quick
    ? { nLayer: 2, d: 256, nHead: 4, vocab: 8192, positions: 512 }
    : { nLayer: 12, d: 768, nHead: 12, vocab: 50257, positions: 1024 };
  const B = int(v.batch, '--batch', quick ? 2 : 4);
  const T = int(v.seq, '--seq', quick ? 256 : 512);
  const reps = quick ? 2 : 3;
  const log = (s: string) => process.stderr.write(`${s}\n`);

  const dir = join(defaultCacheDir(), 'bench', `gpt2-random-${shape.nLayer}x${shape.d}-v${shape.vocab}`);
  log(`model: random GPT-2 ${shape.nLayer}×${shape.d}, vocab ${shape.vocab} (${dir})`);
  randomGpt2(dir, shape);
  const model = Model.open(dir, { threads });
  const params = model.parameters().reduce((s, p) => s + p.shape.reduce((a, b) => a * b, 1), 0);

  // FLOPs of one forward + backward-to-module-outputs pass (matrix products only).
  const N = B * T;
  const d = shape.d;
  const linear = shape.nLayer * (3 * d * d + d * d + 8 * d * d); // Σ d_in·d_out over tracked modules
  const attn = shape.nLayer * 2 * B * T * T * d; // QKᵀ and PV multiply-adds
  const head = d * shape.vocab;
  // forward: 2·(N·linear + N·head + attn); backward to the inputs: the same again, plus
  // the first layer's c_attn input gradient is not needed (small, ignored).
  const flops = 2 * (2 * N * (linear + head) + 2 * attn);

  const rss0 = process.memoryUsage().rss;
  let t0 = performance.now();
  const graph = await model.compile({ perToken: true, tokenLoss: true, modules: 'all' });
  const compileMs = performance.now() - t0;
  const rng = new Rng(5);
  const batch = makeBatch(
    Array.from({ length: B }, () => ({ ids: Array.from({ length: T }, () => rng.int(shape.vocab)) })),
    0,
  );
  t0 = performance.now();
  await graph.run(batch);
  const firstMs = performance.now() - t0;
  const times: number[] = [];
  for (let i = 0; i < reps; i++) {
    t0 = performance.now();
    const out = await graph.run(batch);
    times.push(performance.now() - t0);
    void out;
  }
  // the process's high-water mark (ru_maxrss, KiB): RSS sampled between runs misses the peak inside one
  const peakRss = process.resourceUsage().maxRSS * 1024;
  times.sort((a, b) => a - b);
  const med = times[Math.floor(times.length / 2)];
  const achieved = flops / (med / 1000) / 1e9;
  log('measuring ORT GEMM rate...');
  const gemm = Math.max(await gemmRate(N, d, 4 * d, threads, reps), await gemmRate(N, 4 * d, d, threads, reps));
  const report = {
    suite: 'engine',
    date: new Date().toISOString(),
    machine: { host: hostname(), cpus: cpus().length, cpu: cpus()[0]?.model, threads: threads ?? 'all' },
    model: { ...shape, params },
    batch: { B, T, tokens: N },
    compileMs: Math.round(compileMs),
    firstRunMs: Math.round(firstMs),
    medianRunMs: Math.round(med),
    tokensPerSecond: Math.round(N / (med / 1000)),
    gflopCounted: flops / 1e9,
    achievedGflops: achieved,
    ortGemmGflops: gemm,
    fractionOfGemm: achieved / gemm,
    peakRssMiB: Math.round(peakRss / 2 ** 20),
    rssBeforeMiB: Math.round(rss0 / 2 ** 20),
  };
  const out = v.out ?? join('bench', 'out', `engine-${report.date.slice(0, 10)}-${hostname()}.json`);
  mkdirSync(join(out, '..'), { recursive: true });
  writeFileSync(out, `${JSON.stringify(report, null, 2)}\n`);
  process.stdout.write(
    [
      `engine bench (${quick ? 'quick' : 'GPT-2 small'}; ${(params / 1e6).toFixed(1)}M params; batch ${B}×${T} = ${N} tokens; threads ${threads ?? 'all'})`,
      `  forward+backward with per-module a/g: ${med.toFixed(0)} ms median → ${report.tokensPerSecond} tokens/s`,
      `  counted matmul work ${report.gflopCounted.toFixed(1)} GFLOP → ${achieved.toFixed(1)} GFLOP/s`,
      `  ORT fp32 GEMM on this machine: ${gemm.toFixed(1)} GFLOP/s → engine at ${(100 * report.fractionOfGemm).toFixed(0)}% of GEMM`,
      `  peak RSS ${report.peakRssMiB} MiB; compile ${report.compileMs} ms; first run ${report.firstRunMs} ms`,
      `  report: ${out}`,
    ].join('\n') + '\n',
  );
}

// run as a script: `node --import tsx tools/bench/bench.ts [suite] [--quick]`
if (process.argv[1] && import.meta.url === pathToFileURL(process.argv[1]).href)
  runBench(process.argv.slice(2)).catch((e: Error) => {
    // `--help` on a suite: its options, exit 0 (not a stack trace)
    if (e instanceof HelpRequested) return void process.stdout.write(`options:\n${e.options}\n`);
    process.stderr.write(`bench: ${e instanceof CliError ? e.message : e.stack}\n`);
    process.exitCode = 1;
  });
