// The results panel's signed heatmap colors and number formats, and the token/chart layout.
import assert from 'node:assert/strict';
import { test } from 'node:test';
import {
  BUCKETS,
  bucketBackground,
  bucketClass,
  bucketOf,
  cssColor,
  formatPercentile,
  formatScore,
  formatValue,
  mixPercent,
  signGlyph,
  symmetricScale,
  tokenTitle,
} from '../../src/common/display';
import { axisPosition, histogramBins, layerBars, segments, shortModule, sumPerToken } from '../../src/common/heatmap';

test('colors: buckets are signed, symmetric, monotone and clamped', () => {
  assert.equal(bucketOf(10, 10), BUCKETS);
  assert.equal(bucketOf(-10, 10), -BUCKETS);
  assert.equal(bucketOf(100, 10), BUCKETS); // clamped
  assert.equal(bucketOf(0, 10), 0);
  assert.equal(bucketOf(0.01, 10), 0); // negligible
  assert.equal(bucketOf(0.5, 10), 1);
  for (let v = -10; v <= 10; v += 0.25) assert.equal(bucketOf(v, 10) + bucketOf(-v, 10), 0);
  let prev = -Infinity;
  for (let v = -10; v <= 10; v += 0.1) {
    const b = bucketOf(v, 10);
    assert.ok(b >= prev, `monotone at ${v}`);
    prev = b;
  }
});

test('colors: no scale, NaN and Infinity give no color', () => {
  assert.equal(bucketOf(5, 0), 0);
  assert.equal(bucketOf(Number.NaN, 1), 0);
  assert.equal(bucketOf(Number.POSITIVE_INFINITY, 1), 0);
  assert.equal(bucketOf(1, Number.NaN), 0);
  assert.equal(symmetricScale([1, -3, Number.NaN, Number.NEGATIVE_INFINITY, 2]), 3);
  assert.equal(symmetricScale([]), 0);
});

test('colors: backgrounds mix the theme colors, stronger for bigger steps', () => {
  assert.equal(bucketBackground(0), 'transparent');
  assert.match(bucketBackground(3), /^color-mix\(in srgb, var\(--il-supporting\) \d+%, transparent\)$/);
  assert.match(bucketBackground(-1), /var\(--il-opposing\)/);
  const custom = bucketBackground(-2, BUCKETS, { supporting: '#00f', opposing: 'var(--vscode-charts-red)' });
  assert.match(custom, /var\(--vscode-charts-red\)/);
  for (let b = 1; b < BUCKETS; b++) assert.ok(mixPercent(b + 1) > mixPercent(b));
  assert.equal(mixPercent(-3), mixPercent(3));
  assert.ok(mixPercent(BUCKETS) <= 70, 'text stays readable on the strongest step');
});

test('colors: the sign is never color alone', () => {
  assert.equal(signGlyph(2), '+');
  assert.equal(signGlyph(-2), '\u2212');
  assert.equal(signGlyph(0), '');
  assert.equal(bucketClass(3), 'il-p3');
  assert.equal(bucketClass(-5), 'il-n5');
  assert.equal(bucketClass(0), 'il-z');
  assert.equal(tokenTitle(' Sydney', 1830.4), '" Sydney"  +1.83e+3 (supporting)');
  assert.match(tokenTitle('\n', -0.5), /^"\\n" {2}−0\.500 \(opposing\)$/);
  assert.match(tokenTitle('a', 2, false), /similarity \(no sign\)/);
});

test('colors: scores and percentiles in words', () => {
  assert.equal(formatScore(2073.96), '+2.07e+3');
  assert.equal(formatScore(12.34), '+12.3');
  assert.equal(formatScore(12345), '+1.23e+4');
  assert.equal(formatScore(-0.0421), '\u22120.0421');
  assert.equal(formatScore(0.00001234), '+1.23e-5');
  assert.equal(formatScore(0), '0');
  assert.equal(formatScore(Number.NaN), 'NaN');
  assert.equal(formatPercentile(100), 'highest');
  assert.equal(formatPercentile(99.97), 'highest');
  assert.equal(formatPercentile(99.9), 'top 0.1%');
  assert.equal(formatPercentile(99.68), 'top 0.3%');
  assert.equal(formatPercentile(95), 'top 5%');
  assert.equal(formatPercentile(0), 'lowest');
  assert.equal(formatPercentile(0.3), 'bottom 0.3%');
  assert.equal(formatValue(5.4), '5.40');
  assert.equal(formatValue(-0.5), '\u22120.500');
  assert.equal(formatPercentile(3), 'bottom 3%');
  // one way to write 1% (it read "bottom 1.0%" beside "bottom 1%")
  assert.equal(formatPercentile(0.96), 'bottom 1%');
  assert.equal(formatPercentile(99.04), 'top 1%');
  assert.equal(formatPercentile(0.94), 'bottom 0.9%');
  assert.equal(formatPercentile(52), '52nd percentile');
  assert.equal(formatPercentile(11), '11th percentile');
  assert.equal(formatPercentile(21), '21st percentile');
});

test('colors: settings become safe CSS or the theme default', () => {
  const fb = 'var(--vscode-charts-blue)';
  assert.equal(cssColor('', fb), fb);
  assert.equal(cssColor(undefined, fb), fb);
  assert.equal(cssColor('#2f81f7', fb), '#2f81f7');
  assert.equal(cssColor('rgb(10, 20, 30)', fb), 'rgb(10, 20, 30)');
  assert.equal(cssColor('Teal', fb), 'teal');
  assert.equal(cssColor('RebeccaPurple', fb), 'rebeccapurple');
  // a theme color id; one the theme does not define shows the default (var()'s fallback)
  assert.equal(cssColor('charts.green', fb), `var(--vscode-charts-green, ${fb})`);
  assert.equal(cssColor('editorError.foreground', fb), `var(--vscode-editorError-foreground, ${fb})`);
  // a misspelled color name would paint nothing: the default instead (and the extension says so)
  for (const bad of [
    'blu',
    'gren',
    'transparentish',
    'red; background: url(x)',
    'url(javascript:1)',
    '#12345g',
    '#12345',
    'expression(alert(1))',
    'a b',
  ])
    assert.equal(cssColor(bad, fb), fb, bad);
});

test('heatmap: segments cover the text exactly, with values on tokens', () => {
  const text = 'Q: hi\nA: Sydney\n';
  const scores = {
    offsets: [
      [0, 1],
      [1, 2],
      [3, 5],
      [5, 6],
      [9, 15],
      [15, 16],
    ] as Array<[number, number]>,
    values: [0, 1, 2, -3, 40, 0.5],
  };
  const segs = segments(text, scores);
  assert.equal(segs.map((s) => s.text).join(''), text);
  assert.deepEqual(
    segs.filter((s) => s.value !== undefined).map((s) => [s.text, s.value]),
    [
      ['Q', 0],
      [':', 1],
      ['hi', 2],
      ['\n', -3],
      ['Sydney', 40],
      ['\n', 0.5],
    ],
  );
  // gaps (the spaces) are plain segments
  assert.ok(segs.some((s) => s.text === ' ' && s.value === undefined));
});

test('heatmap: unsorted, overlapping, empty and out-of-range offsets are tolerated', () => {
  const segs = segments('abcdef', {
    offsets: [
      [4, 6],
      [0, 3],
      [2, 4],
      [3, 3],
      [10, 12],
    ],
    values: [1, 2, 3, 4, 5],
  });
  assert.equal(segs.map((s) => s.text).join(''), 'abcdef');
  assert.deepEqual(
    segs.map((s) => [s.text, s.token]),
    [
      ['abc', 1],
      ['d', 2],
      ['ef', 0],
    ],
  );
  assert.deepEqual(segments('abc', undefined), [{ text: 'abc' }]);
  assert.deepEqual(segments('', undefined), []);
  // surrogate pairs stay whole when the offsets say so
  const e = segments('a🌍b', { offsets: [[1, 3]], values: [1] });
  assert.deepEqual(
    e.map((s) => s.text),
    ['a', '🌍', 'b'],
  );
});

test('heatmap: per-token sums, layer bars and histogram bins', () => {
  assert.deepEqual(sumPerToken([[1, 2], undefined, [3, Number.NaN, 9]], 2), [4, 2]);
  assert.equal(shortModule('model.layers.1.mlp.up_proj'), 'L1 mlp.up_proj');
  assert.equal(shortModule('transformer.h.0.attn.c_attn'), 'L0 attn.c_attn');
  assert.equal(shortModule('lm_head'), 'lm_head');
  const bars = layerBars(['a.layers.0.x', 'a.layers.1.x', 'missing'], { 'a.layers.0.x': -2, 'a.layers.1.x': 4 });
  assert.deepEqual(
    bars.map((b) => [b.label, b.value, b.percent]),
    [
      ['L0 x', -2, 50],
      ['L1 x', 4, 100],
    ],
  );
  assert.deepEqual(layerBars(['x'], undefined), []);
  const bins = histogramBins({ edges: [-1, 0, 1, 2], counts: [300, 0, 1] });
  assert.equal(bins.length, 3);
  assert.equal(bins[0].height, 1);
  assert.equal(bins[1].height, 0);
  assert.ok(bins[2].height > 0.1, 'one example stays visible next to 300');
  assert.deepEqual(histogramBins({ edges: [0, 1], counts: [1, 2] }), []);
  assert.equal(axisPosition({ edges: [-1, 1] }, 0), 0.5);
  assert.equal(axisPosition({ edges: [-1, 1] }, 5), 1);
  assert.equal(axisPosition({ edges: [1, 1] }, 1), 0.5);
});

test('recordText: every record shape on one line, a conversational prompt/completion as its turns (not raw JSON)', async () => {
  const { recordText } = await import('../../src/common/display');
  assert.equal(recordText({ prompt: 'Q: x?\nA:', completion: ' y' }), 'Q: x?\nA: y');
  assert.equal(recordText({ text: 'plain' }), 'plain');
  assert.equal(
    recordText({
      messages: [
        { role: 'user', content: 'Hi?' },
        { role: 'assistant', content: 'Hello' },
      ],
    }),
    'user: Hi? assistant: Hello',
  );
  assert.equal(
    recordText({ prompt: [{ role: 'user', content: 'Hi?' }], completion: [{ role: 'assistant', content: 'Hello' }] }),
    'user: Hi? assistant: Hello',
  );
  assert.equal(recordText([1, 2]), undefined);
});
