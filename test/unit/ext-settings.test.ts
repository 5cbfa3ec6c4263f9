// The extension's settings as settings.json holds them (hand-edited: the editor only underlines a
// bad value). Values that change results are never replaced silently: explain refuses with the
// setting's name. Display settings (colors, hovers.enabled, heatmap.editor) are said at once,
// once, and their default shown.
import assert from 'node:assert/strict';
import { beforeEach, test } from 'node:test';
import { fake, loadWithVscodeStub } from './helpers/vscode-stub';

type ConfigModule = typeof import('../../src/extension/config');
const { settings } = await loadWithVscodeStub<ConfigModule>(new URL('../../src/extension/config.ts', import.meta.url));

beforeEach(() => fake.reset());

test('hovers.enabled "false" (a string) is said at once and taken as the default, once per value', () => {
  fake.config['hovers.enabled'] = 'false';
  fake.config['heatmap.editor'] = 0;
  const s = settings();
  assert.equal(s.hovers, true);
  assert.equal(s.editorHeatmap, true);
  assert.deepEqual(s.problems, [], 'a display switch does not stop explain');
  settings();
  assert.deepEqual(fake.messages('warning'), [
    'Influence Lens: influenceLens.hovers.enabled is "false", not true or false; it is taken as true (the default).',
    'Influence Lens: influenceLens.heatmap.editor is 0, not true or false; it is taken as true (the default).',
  ]);
});

test('a value that changes results is listed, for explain to refuse', () => {
  fake.config.topK = 0;
  fake.config.method = 'ekfak';
  const s = settings();
  assert.equal(s.problems.length, 2);
  assert.ok(s.problems.some((p) => /^influenceLens\.topK is 0; it accepts/.test(p)));
  assert.ok(s.problems.some((p) => /^influenceLens\.method is "ekfak"; it accepts one of/.test(p)));
});
