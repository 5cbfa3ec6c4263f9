// tools/bench/gemm-bound.ts: the scoring bound counts each candidate's matrix products once, with
// the first layer's input gradients left out, and times every product at a measured (positive) rate.
import assert from 'node:assert/strict';
import { test } from 'node:test';
import type { ModuleInfo } from '../../src/server/model/engine';
import { scoringBound } from '../../tools/bench/gemm-bound';

const mod = (name: string, dIn: number, dOut: number, hasBias: boolean): ModuleInfo => ({
  name,
  kind: 'mlp',
  dIn,
  dOut,
  hasBias,
  weightName: `${name}.weight`,
});

test('scoringBound: the products of one candidate, counted by hand', async () => {
  const modules = [mod('model.layers.0.mlp.up', 16, 32, true), mod('model.layers.1.mlp.up', 16, 32, false)];
  const T = 8;
  const Q = 3;
  const b = await scoringBound(modules, { vocab: 50, hidden: 16 }, T, 2, Q, 1, 1);
  const forward = 2 * 2 * T * 16 * 32;
  const inputGradient = 2 * T * 32 * 16; // layer 1 only
  const perExample = 2 * T * 32 * 17 + 2 * T * 32 * 16;
  const scores = 2 * Q * 32 * 17 + 2 * Q * 32 * 16;
  const head = 2 * 2 * T * 16 * 50;
  const expected = (forward + inputGradient + perExample + scores + head) / 1e9;
  assert.ok(Math.abs(b.gflop_per_candidate - expected) < 1e-15, `${b.gflop_per_candidate} vs ${expected}`);
  assert.equal(b.products.filter((p) => p.what === 'input gradient').length, 1);
  for (const p of b.products) assert.ok(p.gflops_rate > 0 && Number.isFinite(p.gflops_rate), p.what);
  const seconds = b.products.reduce((s, p) => s + p.gflop / p.gflops_rate, 0);
  assert.ok(Math.abs(b.seconds_per_candidate - seconds) < 1e-12);
});
