// Independent of PyTorch: the engine's explicit backward pass against central finite
// differences of its own forward pass, in float64, on coordinates of every parameter
// tensor (so every block type: embeddings, norms, attention, MLP, unembedding). Then
// the per-module outputs are tied to those checked gradients: Σ_b G_b = ∂L/∂W (+ bias column).
import assert from 'node:assert/strict';
import { existsSync } from 'node:fs';
import { test } from 'node:test';
import { Model } from '../../src/server/model/engine';
import { Rng } from '../../src/server/util/random';
import { useTempHome } from './helpers/env';
import { loadGolden, relErr } from './helpers/golden';

const ARCHS = ['gpt2', 'gpt_neox', 'gpt_neox_seq', 'llama', 'qwen2', 'mistral', 'qwen3', 'gemma3', 'phi3'];
const FIX = 'test/fixtures';
useTempHome();

for (const arch of ARCHS) {
  test(`finite differences: ${arch}`, async () => {
    assert.ok(existsSync(`${FIX}/models/${arch}`), 'fixture missing: run test/oracle/make_fixtures.py');
    const model = Model.open(`${FIX}/models/${arch}`, { weights: 'inputs', precision: 'fp64', threads: 1 });
    const { batch } = loadGolden(arch);
    const params = new Map<string, Float64Array>();
    for (const p of model.parameters()) params.set(p.name, Float64Array.from(model.checkpoint.readF32(p.name)));
    const graph = await model.compile({ tokenLoss: true, paramGrads: true });
    const lossOnly = await model.compile({ tokenLoss: true });
    const total = async () => {
      const out = await lossOnly.run(batch, { params });
      return (out.loss.data as Float64Array).reduce((a, b) => a + b, 0);
    };
    const out = await graph.run(batch, { params });
    const rng = new Rng(42);
    const eps = 1e-5;
    let checked = 0;
    for (const [name, w] of params) {
      const grad = out[`grad.${name}`].data as Float64Array;
      // two coordinates per tensor, plus the largest-gradient one (a coordinate that matters)
      let big = 0;
      for (let i = 1; i < grad.length; i++) if (Math.abs(grad[i]) > Math.abs(grad[big])) big = i;
      for (const i of [rng.int(w.length), rng.int(w.length), big]) {
        const orig = w[i];
        w[i] = orig + eps;
        const fp = await total();
        w[i] = orig - eps;
        const fm = await total();
        w[i] = orig;
        const numeric = (fp - fm) / (2 * eps);
        const err = Math.abs(numeric - grad[i]) / Math.max(1e-3, Math.abs(numeric));
        const tol = 1e-5;
        assert.ok(err < tol, `${arch} ${name}[${i}]: backward ${grad[i]} vs finite difference ${numeric}`);
        checked++;
      }
    }
    assert.ok(checked >= 3 * params.size);

    // Per-example module gradients summed over the batch equal the weight (and bias) gradients.
    const perModule = await model.compile({ exampleGrads: true, paramGrads: true, modules: 'all' });
    const r = await perModule.run(batch, { params });
    for (const m of perModule.modules) {
      const G = r[`G.${m.name}`].data as Float64Array;
      const dIn = m.dIn + (m.hasBias ? 1 : 0);
      const sum = new Float64Array(m.dOut * dIn);
      for (let b = 0; b < batch.B; b++) for (let k = 0; k < sum.length; k++) sum[k] += G[b * sum.length + k];
      const gw = r[`grad.${m.weightName}`].data as Float64Array;
      const expectW = new Float64Array(m.dOut * m.dIn);
      const expectB = new Float64Array(m.dOut);
      for (let o = 0; o < m.dOut; o++) {
        for (let i = 0; i < m.dIn; i++) expectW[o * m.dIn + i] = sum[o * dIn + i];
        if (m.hasBias) expectB[o] = sum[o * dIn + m.dIn];
      }
      // Conv1D stores W as [dIn, dOut]: compare transposed
      const actualW =
        m.layout === 'out_in'
          ? gw
          : Float64Array.from({ length: gw.length }, (_, k) => gw[(k % m.dIn) * m.dOut + Math.floor(k / m.dIn)]);
      assert.ok(relErr(expectW, actualW) < 1e-10, `${arch} ${m.name}: Σ G ≠ ∂L/∂W`);
      if (m.hasBias)
        assert.ok(relErr(expectB, r[`grad.${m.biasName}`].data as Float64Array) < 1e-10, `${arch} ${m.name}: bias`);
    }
  });
}
