// bench blas: the system BLAS's float32 matrix products at the query preconditioning's shapes
// (P(G) = Q_S R Q_Aᵀ per module: `rotateBack32`), with the kernels OpenBLAS runs here. The same
// products in ONNX Runtime run on its own kernels (bench ekfac's `scoring_bound`), so this is what
// the OpenBLAS kernel choice (linalg/native.ts `openblasCoreFor`) changes. Run it with and without
// OPENBLAS_CORETYPE to compare (`env -u OPENBLAS_CORETYPE npm run bench -- blas`).
import { type Preconditioner, rotateBack32 } from '../../src/server/attribution/ekfac/precondition';
import { int, parse } from '../../src/server/cli/util';
import { gemm32 } from '../../src/server/linalg/matrix';
import { nativeLapack } from '../../src/server/linalg/native';
import { Rng } from '../../src/server/util/random';

export async function benchBlas(argv: string[]): Promise<void> {
  const { values: v } = parse(argv, { layers: { type: 'string' } });
  const layers = int(v.layers, '--layers', 4);
  const lib = nativeLapack();
  const say = (line: string) => process.stdout.write(`${line}\n`);
  say(
    `bench blas: ${lib ? `${lib.library}, kernels ${lib.core ?? '(not OpenBLAS)'}` : 'no system BLAS (pure JS)'}; OPENBLAS_CORETYPE=${process.env.OPENBLAS_CORETYPE ?? '(unset)'}`,
  );
  const rng = new Rng(1);
  const random = (n: number) => {
    const u = rng.uniforms(n);
    for (let i = 0; i < n; i++) u[i] -= 0.5;
    return u;
  };
  for (const [m, k, n] of [
    [4864, 4864, 896],
    [4864, 896, 896],
  ]) {
    const A = random(m * k);
    const B = random(k * n);
    let best = Number.POSITIVE_INFINITY;
    for (let r = 0; r < 3; r++) {
      const t = performance.now();
      gemm32(A, B, m, k, n);
      best = Math.min(best, (performance.now() - t) / 1000);
    }
    say(
      `  sgemm ${m}×${k} · ${k}×${n}: ${(best * 1000).toFixed(0)} ms, ${((2 * m * k * n) / best / 1e9).toFixed(0)} GFLOP/s`,
    );
  }
  // one layer of Qwen2.5-0.5B's tracked modules (d_out, d_A; q/k/v with their bias column)
  const shapes = [
    [896, 897],
    [128, 897],
    [128, 897],
    [896, 896],
    [4864, 896],
    [4864, 896],
    [896, 4864],
  ];
  const mods = shapes.map(([dOut, dA]) => {
    const p = { module: 'm', dOut, dA, qS: random(dOut * dOut), qA: random(dA * dA), inverse: random(dOut * dA) };
    return { p: p as unknown as Preconditioner, f: { qS: p.qS, qA: p.qA, inverse: p.inverse }, R: random(dOut * dA) };
  });
  let flop = 0;
  const t = performance.now();
  for (let l = 0; l < layers; l++)
    for (const { p, f, R } of mods) {
      rotateBack32(p, R, f);
      flop += 2 * p.dOut * p.dA * (p.dOut + p.dA);
    }
  const s = (performance.now() - t) / 1000;
  say(
    `  rotating one query row back (Q_S R Q_Aᵀ), Qwen2.5-0.5B shapes, ${layers} layers: ${s.toFixed(2)} s (${(flop / s / 1e9).toFixed(0)} GFLOP/s); all 24 layers ≈ ${((s * 24) / layers).toFixed(1)} s a query`,
  );
}
