import assert from 'node:assert/strict';
import { test } from 'node:test';
import { lds, rankingOf, recallAtK, reciprocalRank } from '../../src/server/eval/metrics';
import { pearson, spearman } from '../../src/server/util/stats';

test('ranking metrics', () => {
  const ranking = rankingOf([0.1, 0.9, 0.5, 0.9, -1]);
  assert.deepEqual(ranking, [1, 3, 2, 0, 4]);
  assert.equal(recallAtK(ranking, new Set([3, 4]), 2), 0.5);
  assert.equal(reciprocalRank(ranking, new Set([2, 4])), 1 / 3);
  assert.equal(reciprocalRank(ranking, new Set([7])), 0);
});

test('Spearman and Pearson, with ties', () => {
  assert.equal(spearman([1, 2, 3], [10, 20, 30]), 1);
  assert.equal(spearman([1, 2, 3], [3, 2, 1]), -1);
  assert.ok(Math.abs(spearman([1, 1, 2], [1, 2, 3]) - 0.8660254037844387) < 1e-12);
  assert.ok(Math.abs(pearson([1, 2, 3, 4], [2, 4, 6, 9]) - 11.5 / Math.sqrt(5 * 26.75)) < 1e-12);
});

test('LDS is 1 when the summed scores order the subsets exactly as the losses', () => {
  const scores = [3, 1, -2, 0.5];
  const subsets = [
    [0, 1],
    [2, 3],
    [0, 3],
    [1, 2],
  ];
  const losses = subsets.map((s) => 10 - s.reduce((a, i) => a + scores[i], 0)); // supporting lowers the loss
  assert.equal(lds(scores, subsets, losses), 1);
  assert.equal(
    lds(
      scores.map((x) => -x),
      subsets,
      losses,
    ),
    -1,
  );
});
