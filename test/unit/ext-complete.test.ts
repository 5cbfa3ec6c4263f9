// "Complete with model" against a fake `vscode` (helpers/vscode-stub.ts): the completion is
// inserted only into the text it was asked for.
import assert from 'node:assert/strict';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { test } from 'node:test';
import { fake, loadWithVscodeStub, Position, Selection } from './helpers/vscode-stub';

const { ExplainController } = await loadWithVscodeStub<typeof import('../../src/extension/commands/explain')>(
  new URL('../../src/extension/commands/explain.ts', import.meta.url),
);

test('a completion is not inserted when the document changed while the model was completing', async () => {
  const dir = mkdtempSync(join(tmpdir(), 'il-complete-'));
  try {
    fake.reset();
    const file = join(dir, 'qa.jsonl');
    const lines = [
      '{"prompt":"Q: one?\\nA:","completion":" 1"}',
      '{"prompt":"Q: two?\\nA:","completion":" 2"}',
      'Q: What is the capital of France?\nA:',
    ];
    writeFileSync(file, lines.join('\n'));
    let edit = (): void => undefined;
    const client = {
      generate: async () => {
        edit(); // the person types while the server works
        return { completion: ' Paris' };
      },
    };
    const c = new ExplainController({ client } as never);
    const doc = await fake.open(file);
    const end = new Position(3, 2);
    const editor = fake.activeEditor();
    editor.selection = new Selection(end, end);
    edit = () => doc.edit((t) => `${lines[0]}\n${t}`); // a line inserted above
    await c.complete();
    assert.match(
      fake.messages('warning').join('\n'),
      /qa\.jsonl changed while the model was completing, so nothing was inserted/,
    );
    assert.equal(doc.getText(), [lines[0], ...lines].join('\n'), 'no line was corrupted');
    // unchanged: inserted at the cursor
    fake.shown = [];
    edit = () => undefined;
    editor.selection = new Selection(new Position(4, 2), new Position(4, 2));
    await c.complete();
    assert.equal(doc.getText(), `${[lines[0], ...lines].join('\n')} Paris`);
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});
