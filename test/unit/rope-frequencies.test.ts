// RoPE's inverse frequencies against transformers' own (test/oracle/make_rope.py): computed as
// float32 tensors, operation by operation. Rounded once from float64 instead, a third of them
// were one unit in the last place off, an angle error that grows with the position.
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { test } from 'node:test';
import { inverseFrequencies } from '../../src/server/model/architectures/common';

const golden = JSON.parse(readFileSync('test/fixtures/golden/rope-inverse-frequencies.json', 'utf8')) as {
  cases: Array<{ type: string; dim: number; theta: number; params: Record<string, unknown>; inv: number[] }>;
};

test('inverse frequencies equal transformers float32 ones (default, linear, llama3)', () => {
  let differing = 0;
  let total = 0;
  for (const c of golden.cases) {
    const ours = inverseFrequencies(c.dim, { type: c.type, theta: c.theta, params: c.params });
    assert.equal(ours.length, c.inv.length);
    for (const [i, want] of c.inv.entries()) {
      total++;
      const got = ours[i];
      if (got === want) continue;
      differing++;
      // PyTorch's vectorised powf is within an ulp, not correctly rounded: one ulp at most
      const ulp = 2 ** (Math.floor(Math.log2(Math.abs(want))) - 23);
      assert.ok(Math.abs(got - want) <= ulp, `${c.type} dim ${c.dim} θ ${c.theta} [${i}]: ${got} vs ${want}`);
    }
  }
  // rounded once from float64, 108 of the 328 differed
  assert.ok(differing <= 2, `${differing} of ${total} differ from transformers`);
});
