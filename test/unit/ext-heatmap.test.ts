// The editor's completion heatmap (decorations/completion-heatmap.ts) shades the explained
// completion; its values are of that text, so an edit that touches it clears the shading, while
// an edit before it (a line inserted above) only moves it, as the editor moves the decorations.
import assert from 'node:assert/strict';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { test } from 'node:test';
import { fake, loadWithVscodeStub, window } from './helpers/vscode-stub';

const { CompletionHeatmap } = await loadWithVscodeStub<
  typeof import('../../src/extension/decorations/completion-heatmap')
>(new URL('../../src/extension/decorations/completion-heatmap.ts', import.meta.url));

test('an edit of the shaded completion clears the heatmap, also after lines were inserted above it', async () => {
  fake.reset();
  const dir = mkdtempSync(join(tmpdir(), 'il-heat-'));
  try {
    const file = join(dir, 'question.txt');
    const text = 'Q: What is the capital of Australia?\nA: Sydney\n';
    writeFileSync(file, text);
    const doc = await fake.open(file);
    // what each decoration type holds now
    const shaded = new Map<unknown, unknown[]>();
    const editor = { document: doc, setDecorations: (t: unknown, list: unknown[]) => shaded.set(t, list) };
    window.visibleTextEditors = [editor];
    const at = text.indexOf(' Sydney');
    const chars = [...' Sydney'].map((_, i) => at + i);
    const split = {
      prompt: text.slice(0, at),
      completion: ' Sydney',
      how: 'text',
      description: 'selection',
      completionStarts: chars,
      completionEnds: chars.map((c) => c + 1),
      promptTruncated: false,
    };
    const result = {
      method: 'ekfac',
      query: { prompt: split.prompt, completion: ' Sydney', completionTokens: { offsets: [[0, 7]], values: [0.5] } },
      supporting: [{ completionTokenScores: [3] }],
      opposing: [],
    };
    const heat = new CompletionHeatmap({ supporting: '#00f', opposing: '#f00' });
    const count = () => [...shaded.values()].reduce((n, l) => n + l.length, 0);
    heat.apply(editor as never, split as never, result as never);
    assert.equal(count(), 1, 'the completion token is shaded');

    doc.edit((t) => `Q: a line inserted above\n${t}`);
    assert.equal(count(), 1, 'an edit before the completion keeps the shading (the editor moves it)');
    doc.edit((t) => t.replace('What is', 'Which is'));
    assert.equal(count(), 1, 'an edit of the prompt, before it, keeps it');
    doc.edit((t) => t.replace('Sydney', 'Perth'));
    assert.equal(count(), 0, 'the edited completion is no longer shaded');

    // an edit after the shaded text, in the same line or below, leaves it
    heat.apply(editor as never, split as never, result as never);
    doc.edit((t) => `${t}more text below\n`);
    assert.equal(count(), 1);
    heat.dispose();
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});
