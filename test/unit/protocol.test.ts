// The protocol is declared once: every request has a params schema and a server handler, and
// the limits in src/protocol/limits.ts are the ones the editor's settings and the
// configuration file's schema advertise.
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { test } from 'node:test';
import { LIMITS } from '../../src/protocol/limits';
import {
  FALLBACK_ORDER,
  METHOD_LABELS,
  METHOD_REGISTRY,
  METHODS,
  methodInfo,
  SIGNED_METHODS,
} from '../../src/protocol/methods';
import { PARAMS_SCHEMA } from '../../src/protocol/params-schema';
import { SERVICE_REQUESTS } from '../../src/protocol/requests';
import { serviceHandlers } from '../../src/server/service/handlers';
import type { InfluenceService } from '../../src/server/service/influence-service';

const pkg = JSON.parse(readFileSync('package.json', 'utf8'));
const configSchema = JSON.parse(readFileSync('influence-lens.schema.json', 'utf8'));
const setting = (name: string) => pkg.contributes.configuration.properties[`influenceLens.${name}`];

test('every declared request has a params schema and a handler, and nothing else does', () => {
  const declared = SERVICE_REQUESTS.map((r) => r.method).sort();
  assert.deepEqual(Object.keys(PARAMS_SCHEMA).sort(), declared);
  const table = serviceHandlers({} as InfluenceService);
  assert.deepEqual(Object.keys(table).sort(), declared);
  for (const [name, spec] of Object.entries(table))
    assert.equal(
      typeof spec === 'function' ? undefined : spec.params,
      PARAMS_SCHEMA[name as keyof typeof PARAMS_SCHEMA],
    );
});

test('topK: the setting, the RPC schema and the configuration schema agree with LIMITS', () => {
  assert.equal(setting('topK').maximum, LIMITS.topK.max);
  assert.equal(setting('topK').minimum, LIMITS.topK.min);
  assert.equal(PARAMS_SCHEMA.explain.properties.topK.maximum, LIMITS.topK.max);
  assert.equal(PARAMS_SCHEMA.explain.properties.topK.minimum, LIMITS.topK.min);
  const maxTopK = configSchema.properties.limits.properties.maxTopK;
  assert.equal(maxTopK.maximum, LIMITS.topK.max);
  assert.equal(maxTopK.default, LIMITS.topK.max);
  assert.equal(configSchema.properties.limits.properties.maxTextChars.default, LIMITS.explainTextMaxChars);
});

test("package.json's method settings list exactly the registry's methods, with its descriptions", () => {
  assert.deepEqual(setting('method').enum, [...METHODS]);
  assert.deepEqual(
    setting('method').enumDescriptions,
    METHOD_REGISTRY.map((m) => m.description),
  );
  assert.deepEqual(setting('compare').items.enum, [...METHODS]);
  for (const m of setting('compare').default) assert.ok(METHODS.includes(m), m);
  assert.ok(METHODS.includes(setting('method').default));
});

test('the registry derives every list: labels, signs, fallbacks, the RPC enum', () => {
  assert.deepEqual(Object.keys(METHOD_LABELS), [...METHODS]);
  assert.deepEqual([...PARAMS_SCHEMA.explain.properties.method.enum], [...METHODS]);
  assert.equal(PARAMS_SCHEMA.explain.properties.compare.maxItems, METHODS.length);
  // a fallback needs nothing fitted, or it could not stand in for a method that needs factors
  for (const m of FALLBACK_ORDER) assert.equal(methodInfo(m)?.needsFactors, false, m);
  for (const m of SIGNED_METHODS) assert.equal(methodInfo(m)?.signed, true);
  assert.equal(new Set(METHODS).size, METHODS.length, 'ids are unique');
});
