// The engine's errors name the thing that is wrong, never a CLI flag (the editor user has no
// flags); the CLI adds the flag (cli/util.ts withFlagHint). Checked on the errors a person meets
// most: a bad damping value and a method run without the factors it needs.
import assert from 'node:assert/strict';
import { test } from 'node:test';
import type { QueryGradients } from '../../src/server/attribution/influence';
import { SCORERS } from '../../src/server/attribution/methods';
import { type ExplainSetup, SettingError } from '../../src/server/attribution/setup';
import { parseDamping } from '../../src/server/attribution/stage';
import { int, withFlagHint } from '../../src/server/cli/util';
import type { Model } from '../../src/server/model/engine';

function thrown(f: () => unknown): Error {
  try {
    f();
  } catch (e) {
    return e as Error;
  }
  assert.fail('did not throw');
}

const noFlag = (e: Error) => assert.doesNotMatch(e.message, /--[a-z]/, `names a flag: ${e.message}`);

test('a bad damping says "damping must be …"; the CLI adds --damping', () => {
  const e = thrown(() => parseDamping('lots'));
  assert.match(e.message, /^damping must be a non-negative number .*\(got "lots"\)$/);
  noFlag(e);
  assert.ok(e instanceof SettingError && e.setting === 'damping');
  // the hint goes inside the message's closing brackets, not in a second pair
  assert.match(withFlagHint(e), /\(got "lots"; set it with --damping\)$/);
});

test('damping is read as a decimal number, as the config schema reads it: hex, binary and stray signs are refused', () => {
  assert.deepEqual(parseDamping('1e-3'), { absolute: 1e-3 });
  assert.deepEqual(parseDamping(' 0.5 '), { absolute: 0.5 });
  assert.deepEqual(parseDamping('.25x'), { relative: 0.25 });
  assert.deepEqual(parseDamping('0x'), { relative: 0 });
  assert.deepEqual(parseDamping('heuristic'), { relative: 0.1 });
  // Number() read these as 16, 1, 16 and -0 (a negative zero damping)
  for (const v of ['0x10', '0b1', '0x10x', '-0', '+-1', '1e-3X', '', '1e400', 'Infinity', 'NaN'])
    assert.match(thrown(() => parseDamping(v)).message, /^damping must be/, v);
});

test('CLI integers are digits: "1e1", "1.0" and "0x10" are refused, not read as 10, 1 and 16', () => {
  assert.equal(int('10', '--top-k', 3), 10);
  assert.equal(int(' 7 ', '--top-k', 3), 7);
  assert.equal(int(undefined, '--top-k', 3), 3);
  for (const v of ['1e1', '1.0', '0x10', '', ' ', '1_000', '10abc'])
    assert.match(thrown(() => int(v, '--top-k', 3)).message, /^--top-k must be an integer/, v);
});

test('methods without the factors they need say which model lacks them; the CLI adds the flags', () => {
  const model = {} as Model;
  const qg = { G: new Map() } as QueryGradients;
  const gradient = (id: 'ekfac' | 'multistage') => {
    const s = SCORERS[id];
    assert.equal(s.kind, 'gradient');
    return s;
  };
  const cases: Array<[() => unknown, RegExp, string, RegExp]> = [
    [
      () => gradient('ekfac').query({ model: { model }, modules: 'mlp' } as ExplainSetup, qg),
      /^ekfac needs EK-FAC factors for the fine-tuned model$/,
      'factors',
      /--factors <dir>/,
    ],
    [
      () => gradient('multistage').query({ model: { model }, modules: 'mlp' } as ExplainSetup, qg),
      /^multistage needs the pre-trained model and its EK-FAC factors$/,
      'pretrained',
      /--pretrained-model <dir> and --pretrained-factors <dir>/,
    ],
    [
      () => gradient('multistage').query({ model: { model }, pretrained: { model }, modules: 'mlp' }, qg),
      /^multistage needs EK-FAC factors fitted on the pre-trained model$/,
      'pretrained',
      /--pretrained-factors/,
    ],
  ];
  for (const [f, message, setting, hint] of cases) {
    const e = thrown(f);
    assert.match(e.message, message);
    noFlag(e);
    assert.ok(e instanceof SettingError && e.setting === setting, `${e.message}: setting`);
    assert.match(withFlagHint(e), hint);
  }
});

test('errors about no setting pass through the CLI unchanged', () => {
  assert.equal(withFlagHint(new Error('x')), 'x');
  assert.equal(withFlagHint(new SettingError('y')), 'y');
});
