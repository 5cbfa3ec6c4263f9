// The GPU check (run by scripts/device-check.sh on a machine with a GPU): at the Pythia-70M
// shape, on the CPU and on every execution provider that works here (cuda, webgpu):
//   engine  forward + backward with every module's a and g: tokens/s
//   fit     covariance + eigendecomposition + Λ over the same sequences: tokens/s
//   explain all queries' preconditioned gradients, one scoring pass over the candidates: candidates/s
// Each device's scores are compared with the CPU's (Spearman per query ≥ 0.999). Exit codes:
// 0 all good, 1 a device disagrees with the CPU, 2 no GPU execution provider works here.
// `cpu` may be named as the device to check: the whole path against itself (what the tests run,
// test/unit/device-check.test.ts, since no CI machine has a GPU).
import { existsSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import { preconditionerFor } from '../src/server/attribution/ekfac/factors-io';
import { fitFactors, type TokenizedExample } from '../src/server/attribution/fit';
import { queryBatchGradients, queryMatrices, scoreCandidates } from '../src/server/attribution/influence';
import { Model, makeBatch } from '../src/server/model/engine';
import type { Device } from '../src/server/model/onnx/session';
import { checkDevice } from '../src/server/service/device';
import { spearman } from '../src/server/util/stats';

const [modelDir, ...wanted] = process.argv.slice(2);
if (!modelDir || !existsSync(join(modelDir, 'config.json'))) {
  process.stderr.write('usage: device-check.ts <model-dir> [cuda] [webgpu] [cpu]\n');
  process.exit(2);
}
const devices = (wanted.length ? wanted : ['cuda', 'webgpu']) as Device[];
const say = (line: string) => process.stdout.write(`${line}\n`);

const available: Device[] = [];
for (const d of devices) {
  try {
    await checkDevice(d);
    available.push(d);
    say(`${d}: available`);
  } catch (e) {
    say(`${d}: NOT available — ${(e as Error).message}`);
  }
}
if (!available.length) {
  say('FAIL: no GPU execution provider works on this machine; nothing to check (see README, "GPU").');
  process.exit(2);
}

// real English text, tokenized by the checkpoint's tokenizer: 16 sequences of 128 tokens, 4 queries
const text = readFileSync(join(import.meta.dirname, '..', 'README.md'), 'utf8').replace(/\s+/g, ' ');
const probe = Model.open(modelDir);
const ids = probe.tokenizer.encode(text, { addSpecialTokens: false }).ids;
const L = 128;
const train: TokenizedExample[] = Array.from({ length: 16 }, (_, i) => {
  const x = ids.slice(i * L, (i + 1) * L);
  return { ids: x, weights: x.map((_, t) => (t < x.length - 1 ? 1 : 0)) };
});
const queries: TokenizedExample[] = Array.from({ length: 4 }, (_, i) => {
  const x = ids.slice((16 + i) * L, (16 + i) * L + 32);
  return { ids: x, weights: x.map((_, t) => (t >= 15 && t < x.length - 1 ? 1 : 0)) };
});
const tokens = train.length * L;

async function run(device: Device) {
  const model = Model.open(modelDir, { device });
  const sec = (t: number) => (performance.now() - t) / 1000;
  const graph = await model.compile({ labels: 'data', perToken: true, modules: 'all' });
  const batch = makeBatch(train.slice(0, 8), 0);
  await graph.run(batch); // warm-up
  let t = performance.now();
  for (let r = 0; r < 3; r++) await graph.run(batch);
  const engine = (3 * 8 * L) / sec(t);
  const opts = { modules: 'all' as const, labels: 'empirical' as const, seed: 0, batchSize: 8 };
  t = performance.now();
  const f = await fitFactors(model, train, opts);
  const fit = tokens / sec(t);
  const pre = new Map(
    [...f.bases].map(([m, b]) => [
      m,
      preconditionerFor({ name: m, dA: b.dA, dOut: b.dOut, eigen: b, lambda: f.lambdas.get(m)! }, { absolute: 1e-3 }),
    ]),
  );
  t = performance.now();
  const G = await queryBatchGradients(model, queries, { modules: 'all' });
  const s = await scoreCandidates(model, queryMatrices(G, [pre]), train, { modules: 'all', batchSize: 8 });
  const explain = train.length / sec(t);
  return { engine, fit, explain, scores: s.scores };
}

const cpu = await run('cpu');
const line = (d: string, r: { engine: number; fit: number; explain: number }, x = '') =>
  say(
    `${d.padEnd(7)} engine ${r.engine.toFixed(0).padStart(7)} tokens/s   fit ${r.fit.toFixed(0).padStart(6)} tokens/s   explain ${r.explain.toFixed(2).padStart(7)} candidates/s${x}`,
  );
line('cpu', cpu);
let ok = true;
for (const d of available) {
  const r = await run(d);
  const rho = queries.map((_, q) =>
    spearman(
      cpu.scores.map((c) => c[q]),
      r.scores.map((c) => c[q]),
    ),
  );
  const agree = rho.every((x) => x >= 0.999);
  ok &&= agree;
  line(
    d,
    r,
    `   ×cpu: ${(r.engine / cpu.engine).toFixed(1)} / ${(r.fit / cpu.fit).toFixed(1)} / ${(r.explain / cpu.explain).toFixed(1)}   Spearman vs cpu ${rho.map((x) => x.toFixed(4)).join(', ')} ${agree ? 'ok' : 'FAIL (< 0.999)'}`,
  );
}
process.exit(ok ? 0 : 1);
