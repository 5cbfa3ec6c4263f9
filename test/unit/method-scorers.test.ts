// Adding a method = a registry entry (src/protocol/methods.ts) + a scorer file under
// src/server/attribution/methods/. This checks the two agree: every registry id has a scorer of
// the right kind, and no scorer is left without an entry.
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { METHOD_REGISTRY } from '../../src/protocol/methods';
import { SCORERS } from '../../src/server/attribution/methods';

test('every registry method has a scorer, and every scorer a registry entry', () => {
  assert.deepEqual(Object.keys(SCORERS).sort(), METHOD_REGISTRY.map((m) => m.id).sort());
});

test("a scorer's kind matches the registry's gradientBased", () => {
  for (const m of METHOD_REGISTRY)
    assert.equal(SCORERS[m.id].kind, m.gradientBased ? 'gradient' : 'pool', `${m.id}: kind`);
});

test('a normalizing scorer cannot use the gradient store (the store has no candidate norms)', () => {
  for (const m of METHOD_REGISTRY) {
    const s = SCORERS[m.id];
    if (s.kind === 'gradient' && s.normalize) assert.equal(m.usesGradientStore, false, m.id);
  }
});
