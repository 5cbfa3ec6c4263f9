// The one-line caption that says which computation produced a result's scores: the CLI prints
// it and the results panel shows it under the query (src/common/display.ts).
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { describeAttribution } from '../../src/common/display';

test('over checkpoints: names every checkpoint with its weight and how the weights were chosen', () => {
  assert.equal(
    describeAttribution({
      method: 'ekfac',
      over: 'checkpoints',
      checkpoints: [
        { name: 'checkpoint-80', step: 80, weight: 0.6 },
        { name: 'checkpoint-160', step: 160, weight: 0.4 },
      ],
      weighting: 'learning-rate',
    }),
    'Σ over 2 training checkpoint(s) (checkpoint-80 ×0.600, checkpoint-160 ×0.400; learning-rate weights)',
  );
});

test('equal weights carry the reason; the final model alone is said plainly', () => {
  assert.equal(
    describeAttribution({
      method: 'gdp',
      over: 'checkpoints',
      checkpoints: [{ name: 'checkpoint-3', step: 3, weight: 1 }],
      weighting: 'uniform',
      note: 'learning rate unknown for checkpoint-3',
    }),
    'Σ over 1 training checkpoint(s) (checkpoint-3 ×1.000; equal weights); learning rate unknown for checkpoint-3',
  );
  assert.equal(describeAttribution({ method: 'bm25', over: 'final-model' }), 'final model');
});

test('the malformed lines a result was scored without are each named, the first with its reason', () => {
  const s = describeAttribution({
    method: 'bm25',
    over: 'final-model',
    skipped: {
      count: 3,
      lines: [
        { line: 7, message: "not valid JSON (Expected ',' or '}' after property value in JSON at position 48)" },
        { line: 8, message: 'expected a JSON object, got an array' },
        { line: 14, message: 'invalid UTF-8' },
      ],
    },
  });
  assert.equal(
    s,
    "final model; 3 malformed line(s) of the dataset not scored (lines 7, 8, 14; line 7: not valid JSON (Expected ',' or '}' after property value in JSON at position 48))",
  );
  assert.match(
    describeAttribution({
      method: 'bm25',
      over: 'final-model',
      skipped: { count: 9, lines: [{ line: 2, message: 'x' }] },
    }),
    /\(lines 2, …; line 2: x\)$/,
  );
});
