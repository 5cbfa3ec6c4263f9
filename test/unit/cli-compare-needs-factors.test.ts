// `explain --compare ekfac` (or multistage) without --factors: the refusal names the flag and the
// method that needs the factors, not the --method that ran fine without them ("--method gdp needs
// --factors" sent the user to change a method that needs none).
import assert from 'node:assert/strict';
import { writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { test } from 'node:test';
import { cliIn } from './helpers/cli';
import { useTempHome } from './helpers/env';

const home = useTempHome();
const cli = cliIn(home);
const MODEL = 'test/fixtures/models/llama';

test('--compare ekfac without --factors names --compare ekfac, not the default --method gdp', () => {
  const data = join(home, 'train.jsonl');
  writeFileSync(data, `${JSON.stringify({ prompt: 'Q: capital of France?\nA:', completion: ' Paris' })}\n`);
  const base = ['explain', '--model', MODEL, '--data', data, '--prompt', 'Q: x\nA:', '--completion', ' y'];
  let r = cli(...base, '--compare', 'bm25,ekfac');
  assert.equal(r.code, 1);
  assert.match(r.err, /--compare ekfac needs --factors <dir>/);
  assert.doesNotMatch(r.err, /--method gdp needs/);
  r = cli(...base, '--method', 'cosine', '--compare', 'ekfac');
  assert.match(r.err, /--compare ekfac needs --factors <dir>/);
  // the method itself still named when it is the one that needs them
  r = cli(...base, '--method', 'ekfac');
  assert.match(r.err, /--method ekfac needs --factors <dir>/);
});
