// Agreement with kronfluence 1.0.1 (test/oracle/make_kronfluence.py, fp64 PyTorch model):
//  1. kronfluence's own factor files load and, with our scoring, give kronfluence's scores;
//  2. factors we fit ourselves (empirical labels, same data) equal kronfluence's factors;
//  3. scores from our own factors equal kronfluence's scores (pairwise, per module, self,
//     heuristic damping).
// Our engine runs in fp64 here, as the oracle did, so agreement is tight (not just rank-level):
// the only differences are fp64 rounding in two independent backward passes (~1e-8 relative).
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { before, describe, test } from 'node:test';
import { loadFactors, preconditionerFor } from '../../src/server/attribution/ekfac/factors-io';
import type { Damping, Preconditioner } from '../../src/server/attribution/ekfac/precondition';
import { type FittedFactors, fitFactors, type TokenizedExample } from '../../src/server/attribution/fit';
import {
  queryGradients,
  queryMatrices,
  scoreCandidates,
  selfInfluenceScores,
} from '../../src/server/attribution/influence';
import { Model } from '../../src/server/model/engine';
import { readSafetensorsHeader, readTensorF64 } from '../../src/server/model/safetensors';
import { spearman } from '../../src/server/util/stats';
import { useTempHome } from './helpers/env';

useTempHome();

interface OracleData {
  train: number[][];
  queries: Array<{ ids: number[]; prompt_length: number }>;
}

function relErr(a: ArrayLike<number>, b: ArrayLike<number>): number {
  let num = 0;
  let den = 0;
  for (let i = 0; i < a.length; i++) {
    num = Math.max(num, Math.abs(a[i] - b[i]));
    den = Math.max(den, Math.abs(b[i]));
  }
  return num / den;
}

for (const name of ['llama', 'qwen2']) {
  describe(`kronfluence agreement (${name})`, () => {
    const dir = join('test/fixtures/kronfluence', name);
    const data: OracleData = JSON.parse(readFileSync(join(dir, 'data.json'), 'utf8'));
    const golden = readSafetensorsHeader(join(dir, 'scores.safetensors'));
    const gold = (key: string) => readTensorF64(golden, key);
    const train: TokenizedExample[] = data.train.map((ids) => ({
      ids,
      weights: ids.map((_, t) => (t < ids.length - 1 ? 1 : 0)),
    }));
    const queries: TokenizedExample[] = data.queries.map((q) => ({
      ids: q.ids,
      weights: q.ids.map((_, t) => (t + 1 >= q.prompt_length && t < q.ids.length - 1 ? 1 : 0)),
    }));
    let model: Model;
    let ours: FittedFactors;

    before(async () => {
      model = Model.open(join('test/fixtures/models', name), { precision: 'fp64' });
      ours = await fitFactors(model, train, { modules: 'all', labels: 'empirical', seed: 0, batchSize: 8 });
    });

    /** kronfluence's score matrix [query][train] computed with our scoring from the given preconditioners. */
    async function pairwise(pre: Map<string, Preconditioner>) {
      const out: number[][] = [];
      const perModule = new Map<string, number[][]>();
      for (const q of queries) {
        const { tokens } = await queryGradients(model, q, { modules: 'all' });
        const M = queryMatrices(tokens, [pre]);
        const s = await scoreCandidates(model, M, train, { modules: 'all', batchSize: 8 });
        out.push(s.scores.map((r) => r[0]));
        for (const [m, rows] of s.perModule) {
          if (!perModule.has(m)) perModule.set(m, []);
          perModule.get(m)!.push(rows.map((r) => r[0]));
        }
      }
      return { all: out, perModule };
    }

    const preFrom = (factorsDirOrOurs: 'kronfluence' | 'ours', damping: Damping) => {
      const pre = new Map<string, Preconditioner>();
      if (factorsDirOrOurs === 'kronfluence') {
        const f = loadFactors(join(dir, 'factors_ekfac'));
        for (const mf of Object.values(f.modules)) pre.set(mf.name, preconditionerFor(mf, damping));
      } else {
        for (const [m, basis] of ours.bases) {
          const lam = ours.lambdas.get(m)!;
          pre.set(
            m,
            preconditionerFor({ name: m, dA: basis.dA, dOut: basis.dOut, eigen: basis, lambda: lam }, damping),
          );
        }
      }
      return pre;
    };

    test('our fitted factors equal kronfluence factors', () => {
      const k = loadFactors(join(dir, 'factors_ekfac'));
      assert.deepEqual(Object.keys(k.modules).sort(), [...ours.covariances.keys()].sort());
      for (const [m, cov] of ours.covariances) {
        const km = k.modules[m];
        assert.equal(cov.activationCount, km.covariance!.activationCount, `${m} token count`);
        assert.equal(cov.gradientCount, km.covariance!.gradientCount);
        assert.ok(relErr(cov.activationSum, km.covariance!.activationSum) < 1e-7, `${m} A`);
        assert.ok(relErr(cov.gradientSum, km.covariance!.gradientSum) < 1e-6, `${m} S`);
        const b = ours.bases.get(m)!;
        assert.ok(relErr(b.eigA, km.eigen!.eigA) < 1e-6, `${m} eigenvalues of A`);
        assert.ok(relErr(b.eigS, km.eigen!.eigS) < 1e-6, `${m} eigenvalues of S`);
        const lam = ours.lambdas.get(m)!;
        assert.equal(lam.count, km.lambda!.count);
        // Λ is invariant to eigenvector signs but not to rotations inside a repeated eigenvalue;
        // random data has none, so Λ must agree entrywise.
        assert.ok(relErr(lam.sum, km.lambda!.sum) < 1e-6, `${m} lambda: ${relErr(lam.sum, km.lambda!.sum)}`);
      }
    });

    for (const source of ['kronfluence', 'ours'] as const) {
      test(`pairwise scores from ${source} factors match kronfluence (damping 1e-3)`, async () => {
        const { all, perModule } = await pairwise(preFrom(source, { absolute: 1e-3 }));
        const want = gold('all');
        const got = all.flat();
        assert.ok(relErr(got, want) < 1e-6, `relative error ${relErr(got, want)}`);
        for (let q = 0; q < queries.length; q++) {
          const rho = spearman(all[q], Array.from(want.subarray(q * train.length, (q + 1) * train.length)));
          assert.ok(rho >= 0.99, `query ${q}: Spearman ${rho}`);
        }
        for (const [m, rows] of perModule) {
          const w = gold(`module.${m}`);
          assert.ok(relErr(rows.flat(), w) < 1e-5, `${m}: ${relErr(rows.flat(), w)}`);
        }
      });
    }

    test('the fp32 engine (what users run) ranks like kronfluence: Spearman ≥ 0.99 per query', async () => {
      const m32 = Model.open(join('test/fixtures/models', name));
      const pre = preFrom('kronfluence', { absolute: 1e-3 });
      const want = gold('all');
      for (const [q, query] of queries.entries()) {
        const { tokens } = await queryGradients(m32, query, { modules: 'all' });
        const s = await scoreCandidates(m32, queryMatrices(tokens, [pre]), train, { modules: 'all', batchSize: 8 });
        const row = Array.from(want.subarray(q * train.length, (q + 1) * train.length));
        const got = s.scores.map((r) => r[0]);
        const rho = spearman(got, row);
        assert.ok(rho >= 0.99, `query ${q}: Spearman ${rho}`);
        assert.ok(relErr(got, row) < 1e-3, `query ${q}: relative error ${relErr(got, row)}`);
      }
    });

    test('heuristic damping (0.1 · mean Λ per module) matches kronfluence damping_factor=None', async () => {
      const { all } = await pairwise(preFrom('ours', { relative: 0.1 }));
      const want = gold('all_heuristic_damping');
      assert.ok(relErr(all.flat(), want) < 1e-6, `relative error ${relErr(all.flat(), want)}`);
    });

    test('self-influence matches kronfluence self scores', async () => {
      const s = await selfInfluenceScores(model, preFrom('kronfluence', { absolute: 1e-3 }), train, {
        modules: 'all',
        batchSize: 8,
      });
      const want = gold('self');
      assert.ok(relErr(s, want) < 1e-6, `relative error ${relErr(s, want)}`);
    });
  });
}
