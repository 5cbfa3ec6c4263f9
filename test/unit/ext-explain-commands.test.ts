// The explain controller's commands against a fake `vscode` (helpers/vscode-stub.ts): "Complete
// with model" inserts only into the text it was asked for; the results panel's Flag acts on the
// example as it is in the file now.
import assert from 'node:assert/strict';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { test } from 'node:test';
import { commands, fake, loadWithVscodeStub, memento, Position, Selection } from './helpers/vscode-stub';

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
    // the cursor in a JSONL record: its text is JSON, not a prompt; nothing is asked or inserted
    fake.shown = [];
    const before = doc.getText();
    editor.selection = new Selection(new Position(1, 20), new Position(1, 20));
    await c.complete();
    assert.match(fake.messages('warning').join('\n'), /the cursor is in a JSONL record/);
    assert.equal(doc.getText(), before);
    // a prompt in another kind of file may end in a line of JSON (a few-shot example): completed
    const txt = join(dir, 'prompt.txt');
    writeFileSync(txt, 'Complete the record:\n{"name": "Bob"}');
    const tdoc = await fake.open(txt);
    const teditor = fake.activeEditor();
    teditor.selection = new Selection(new Position(1, 15), new Position(1, 15));
    await c.complete();
    assert.equal(tdoc.getText(), 'Complete the record:\n{"name": "Bob"} Paris');
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});

test("the panel's Flag records where the example is now, and asks before flagging one that is no longer in the file", async () => {
  const dir = mkdtempSync(join(tmpdir(), 'il-panelflag-'));
  try {
    fake.reset();
    fake.workspaceFolder = dir;
    const { FlagStore } = await loadWithVscodeStub<typeof import('../../src/extension/flags/flag-store')>(
      new URL('../../src/extension/flags/flag-store.ts', import.meta.url),
    );
    const { lineHash } = await import('../../src/extension/flags/hash');
    const { readSidecar } = await import('../../src/extension/flags/sidecar');
    const file = join(dir, 'finetune.jsonl');
    const rec = (i: number) => JSON.stringify({ prompt: `Q: ${i}?`, completion: ` ${i}` });
    writeFileSync(file, `${[1, 2, 3, 4].map(rec).join('\n')}\n`);
    const flags = new FlagStore(memento() as never);
    const panelFlags: unknown[] = [];
    const s = {
      flags,
      datasets: { require: async () => file, resolve: async () => file },
      panel: { mirror: { results: {}, dataset: 'finetune' }, setFlags: (f: unknown) => panelFlags.push(f) },
    };
    const c = new ExplainController(s as never);
    const flag = (line: number, i: number) =>
      new Promise<void>((done) => {
        c.handlers().flag({
          id: { dataset: 'finetune', line, hash: lineHash(rec(i)) },
          score: 1,
          method: 'ekfac',
          flagged: true,
        } as never);
        setTimeout(done, 100);
      });
    // scored at line 3; a line was deleted above since: recorded at line 2, where it is now
    writeFileSync(file, `${[2, 3, 4].map(rec).join('\n')}\n`);
    await flag(3, 3);
    assert.deepEqual(
      readSidecar(join(dir, 'finetune.exclude.jsonl')).entries.map((e) => e.line),
      [2],
    );
    // record 1 is gone: asked; dismissed, nothing written and the panel shows it unflagged
    await flag(1, 1);
    assert.match(
      fake.messages('warning').join('\n'),
      /line 1 when it was scored\) is no longer in finetune\.jsonl: it was edited or removed since/,
    );
    assert.equal(readSidecar(join(dir, 'finetune.exclude.jsonl')).entries.length, 1);
    assert.ok(panelFlags.length >= 1);
    fake.answers = ['Flag anyway'];
    await flag(1, 1);
    assert.equal(readSidecar(join(dir, 'finetune.exclude.jsonl')).entries.length, 2);
    // a panel result of an earlier revision (restored after a retrain): its reason says so
    const shown = (rev: string) => ({
      ekfac: {
        revision: rev,
        query: { prompt: 'Q: 4?', completion: ' 4' },
        supporting: [{ id: { dataset: 'finetune', line: 3, hash: lineHash(rec(4)) }, rank: 1, sign: 'supporting' }],
        opposing: [],
      },
    });
    (s.panel.mirror as { results: unknown }).results = shown('r1');
    const { History } = await import('../../src/extension/history');
    const history = new History(memento() as never);
    history.noteRevision('r2');
    (s as { history?: unknown }).history = history;
    await flag(3, 4);
    const reason = () => readSidecar(join(dir, 'finetune.exclude.jsonl')).entries.find((x) => x.line === 3)?.reason;
    assert.equal(
      reason(),
      'supporting #1 for "4" (EK-FAC, before the model, its factors or the settings last changed)',
    );
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});

/** The services an explain of bm25 needs: `info` from the server, `explain` answering with an empty result. */
function bm25Services(
  info: Record<string, unknown>,
  hooks: { explain?: (p: { compare?: string[] }) => void; refreshed?: () => void } = {},
) {
  const result = {
    method: 'bm25',
    query: { prompt: 'Q: x?\nA:', completion: ' Paris' },
    scored: 0,
    supporting: [],
    opposing: [],
    histogram: { edges: [], counts: [] },
    modules: [],
    timings: {},
  };
  return {
    info: async () => info,
    lastInfo: () => info,
    refreshWarnings: async () => hooks.refreshed?.(),
    client: {
      explain: async (p: { compare?: string[] }) => {
        hooks.explain?.(p);
        return result;
      },
    },
    datasets: { resolve: async () => undefined },
    panel: { show: () => undefined, post: () => undefined, setFlags: () => undefined, mirror: { results: {} } },
    history: { add: () => undefined },
    flags: { flagsOf: () => new Map() },
    context: { workspaceState: memento() },
  };
}

test("after an explain, the server's status is asked again, so warnings it finds reading the dataset reach the log", async () => {
  // the server names factors fitted on other data than the fit dataset only once it has read that
  // dataset: status at connect (all the editor asked before) cannot carry the warning
  fake.reset();
  let refreshed = 0;
  const info = { model: 'm', datasets: ['b'], methods: ['bm25'], unavailable: {}, needsFit: {}, warnings: [] };
  fake.config.method = 'bm25';
  const c = new ExplainController(bm25Services(info, { refreshed: () => refreshed++ }) as never);
  await c.explain('Q: x?\nA:', ' Paris');
  assert.deepEqual(fake.messages('error'), []);
  assert.equal(refreshed, 1, 'status asked again after the result');
});

test('compare methods the server cannot run are left out of the request and named with their reason, once', async () => {
  fake.reset();
  const info = {
    model: 'm',
    datasets: ['b'],
    methods: ['bm25', 'repsim'],
    unavailable: { ekfac: 'no EK-FAC factors for this model: run "Influence Lens: Fit factors"' },
    needsFit: {},
    warnings: [],
  };
  const sent: Array<{ compare?: string[] }> = [];
  fake.config.method = 'bm25';
  fake.config.compare = ['ekfac', 'repsim', 'bm25'];
  const c = new ExplainController(bm25Services(info, { explain: (p) => sent.push(p) }) as never);
  await c.explain('Q: x?\nA:', ' Paris');
  assert.deepEqual(sent[0].compare, ['repsim']);
  assert.match(
    fake.messages('warning').join('\n'),
    /not compared with a method of influenceLens\.compare that the server cannot run now: EK-FAC \(no EK-FAC factors for this model: run "Influence Lens: Fit factors"\)/,
  );
  // the same reason again: not repeated
  await c.explain('Q: y?\nA:', ' Rome');
  assert.equal(fake.messages('warning').length, 1);
  assert.deepEqual(fake.messages('error'), []);
});

test("the panel's method switch re-runs a cached method's result after the dataset is edited in place (same size, mtime put back)", async () => {
  const { execFileSync } = await import('node:child_process');
  const { readFileSync } = await import('node:fs');
  const { withResult } = await import('../../src/webview/messages');
  const dir = mkdtempSync(join(tmpdir(), 'il-panel-'));
  try {
    const file = join(dir, 'finetune.jsonl');
    writeFileSync(file, '{"prompt":"Q: capital of Australia?\\nA:","completion":" Sydney"}\n');
    let calls = 0;
    let infoGate: Promise<void> = Promise.resolve();
    const info = {
      model: 'm',
      datasets: ['finetune'],
      methods: ['bm25', 'repsim'],
      unavailable: {},
      needsFit: {},
      warnings: [],
      revision: 'r1',
    };
    const panel = {
      mirror: { version: 1, results: {}, methods: [], flags: {} } as never,
      show: () => undefined,
      setFlags: () => undefined,
      post(m: { type: string }) {
        if (m.type === 'result') this.mirror = withResult(this.mirror, m as never) as never;
      },
    };
    const client = {
      // a server that reads the file at each call
      explain: async (p: { method: string; prompt: string; completion: string }) => {
        calls++;
        const first = readFileSync(file, 'utf8').split('\n')[0];
        return {
          method: p.method,
          query: { prompt: p.prompt, completion: p.completion },
          scored: 1,
          supporting: [
            {
              id: { dataset: 'finetune', line: 1, hash: 'x' },
              rank: 1,
              score: 1,
              sign: 'supporting',
              percentile: 100,
              text: first,
            },
          ],
          opposing: [],
          histogram: { edges: [], counts: [] },
          modules: [],
          timings: {},
          revision: info.revision,
        };
      },
    };
    const s = {
      info: async () => {
        await infoGate;
        return info;
      },
      lastInfo: () => info,
      refreshWarnings: async () => undefined,
      client,
      datasets: { resolve: async () => file, require: async () => file },
      panel,
      history: { add: () => undefined },
      flags: { flagsOf: () => new Map() },
    };
    fake.config.method = 'bm25';
    const c = new ExplainController(s as never);
    await c.explain('Q: capital of Australia?\nA:', ' Sydney');
    fake.config.method = 'repsim';
    const switchTo = (m: string, cached: boolean) =>
      (c as unknown as { switchMethod(m: string, cached: boolean): Promise<void> }).switchMethod(m, cached);
    await switchTo('repsim', false);
    assert.equal(calls, 2);
    // edited in place: same size, the mtime put back (touch -r)
    writeFileSync(join(dir, 'ref'), '');
    execFileSync('touch', ['-r', file, join(dir, 'ref')]);
    writeFileSync(file, readFileSync(file, 'utf8').replace('Sydney', 'Canber'));
    execFileSync('touch', ['-r', join(dir, 'ref'), file]);
    await switchTo('bm25', true);
    assert.equal(calls, 3, 'the cached bm25 result was of the file before the edit: asked again');
    await switchTo('bm25', true);
    assert.equal(calls, 3, 'nothing changed since: the cached result is shown');
    // factors refitted or the model retrained (or the server started again with other settings):
    // the server reports another revision, which the switch asks for, not the last result's
    info.revision = 'r2';
    await switchTo('bm25', true);
    assert.equal(calls, 4, 'a result of the earlier revision is not shown as current');
    await switchTo('bm25', true);
    assert.equal(calls, 4);
    // influence-lens.json changed: the server refuses the method until restarted, so the run shows why
    info.methods = ['repsim'];
    await switchTo('bm25', true);
    assert.equal(calls, 5, 'a method the server now refuses is run (and its refusal shown), not served from the cache');
    // two switches in a row, both waiting for the server (a new revision: both tabs outdated): the
    // first must not run its method too (it showed, and could end the panel on, the earlier tab)
    let open!: () => void;
    infoGate = new Promise<void>((r) => {
      open = r;
    });
    info.methods = ['bm25', 'repsim'];
    info.revision = 'r3';
    const methods: string[] = [];
    const explain = s.client.explain;
    s.client.explain = async (p) => {
      methods.push(p.method);
      return explain(p);
    };
    const first = switchTo('bm25', true);
    const second = switchTo('repsim', true);
    open();
    await Promise.all([first, second]);
    assert.deepEqual(methods, ['repsim'], 'only the latest switch runs');
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});

/** A controller whose server only counts the explanations asked of it (none should be). */
function countingController() {
  let n = 0;
  const c = new ExplainController({
    info: async () => {
      n++;
      return { datasets: [], methods: [] };
    },
  } as never);
  return { c, explained: () => n };
}

test('"Explain with a custom split" on a chat record says why it cannot edit it, instead of dropping the edited prompt', async () => {
  const dir = mkdtempSync(join(tmpdir(), 'il-chatsplit-'));
  try {
    fake.reset();
    const file = join(dir, 'chat.jsonl');
    const line =
      '{"messages":[{"role":"user","content":"Capital of Australia?"},{"role":"assistant","content":"It is Sydney."}]}';
    writeFileSync(file, `${line}\n`);
    const { c, explained } = countingController();
    await fake.open(file);
    const editor = fake.activeEditor();
    editor.selection = new Selection(new Position(0, 0), new Position(0, line.length));
    fake.answers = ['Capital of France?', 'It is Sydney.'];
    await c.explainWithSplit();
    assert.match(
      fake.messages('warning').join('\n'),
      /a chat record is explained as the model.s chat template renders it/,
    );
    assert.equal(explained(), 0, 'nothing was explained');
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});

test("the panel's method switch with no server running shows the kept result and says it was not checked", async () => {
  const { UNCHECKED_NOTE } = await import('../../src/extension/commands/explain');
  const posted: Array<{ type: string; method?: string; message?: string }> = [];
  let calls = 0;
  let infos = 0;
  const base = bm25Services({}, { explain: () => calls++ });
  const kept = await base.client.explain({});
  calls = 0;
  const s = {
    ...base,
    // a reloaded window: no server yet, and the panel restored its own state with a kept bm25 result
    info: async () => {
      infos++;
      throw new Error('no server');
    },
    lastInfo: () => undefined,
    panel: {
      ...base.panel,
      mirror: { version: 1, results: { bm25: kept }, methods: ['bm25'], flags: {}, dataset: 'finetune' },
      post: (m: { type: string }) => posted.push(m),
    },
  };
  const c = new ExplainController(s as never);
  await (c as unknown as { switchMethod(m: string, cached: boolean): Promise<void> }).switchMethod('bm25', true);
  assert.equal(calls, 0, 'no server is started to check it');
  assert.equal(infos, 0);
  assert.deepEqual(posted, [{ type: 'notice', method: 'bm25', message: UNCHECKED_NOTE }]);
  assert.match(UNCHECKED_NOTE, /not checked: no server is running/);
});

test('in a JSONL dataset a selection that is no record (invalid JSON) or spans records is refused, never explained as text; the custom split still prefills it', async () => {
  const dir = mkdtempSync(join(tmpdir(), 'il-jsonlsel-'));
  try {
    fake.reset();
    const file = join(dir, 'data.jsonl');
    const good = '{"prompt":"Q: Which continent is Norway?\\nA:","completion":" Europe\\n"}';
    const broken = '{"prompt":"Q: broken?\\nA:","completion":" oops\\n"';
    writeFileSync(file, `${good}\n${broken}\n${good}\n`);
    const { c, explained } = countingController();
    await fake.open(file);
    const editor = fake.activeEditor();
    editor.selection = new Selection(new Position(1, 0), new Position(1, broken.length));
    await c.explainSelection();
    assert.match(fake.messages('warning').join('\n'), /Line 2 is not a JSONL record \(not valid JSON/);
    editor.selection = new Selection(new Position(0, 30), new Position(2, 10));
    await c.explainSelection();
    assert.match(fake.messages('warning').join('\n'), /The selection spans lines 1–3 of a JSONL file/);
    assert.equal(explained(), 0, 'nothing was explained');
    // the custom split shows what would be sent, in boxes the person edits: prefilled, not refused
    fake.reset();
    editor.selection = new Selection(new Position(1, 0), new Position(1, broken.length));
    fake.answers = [undefined];
    await c.explainWithSplit();
    assert.deepEqual(fake.messages('warning'), []);
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});

test('an error that only a restarted server fixes (influence-lens.json changed) offers "Reconnect and retry", which reconnects before retrying', async () => {
  const { reportError } = await loadWithVscodeStub<typeof import('../../src/extension/services')>(
    new URL('../../src/extension/services.ts', import.meta.url),
  );
  fake.reset();
  let reconnected = 0;
  let retried = 0;
  const off = commands.registerCommand('influenceLens.reconnect', () => {
    reconnected++;
  });
  try {
    fake.answers = ['Reconnect and retry'];
    await reportError(
      new Error(
        'influence-lens.json changed since this server read it: restart `influence-lens serve` to use its settings (a server the editor started restarts with "Influence Lens: Reconnect to the server"); until then every request is refused',
      ),
      () => {
        retried += reconnected;
      },
    );
    assert.equal(reconnected, 1);
    assert.equal(retried, 1, 'retried after the reconnect');
    // other errors keep Retry
    fake.answers = ['Retry'];
    await reportError(new Error('the connection to the influence server closed'), () => {
      retried++;
    });
    assert.equal(retried, 2);
  } finally {
    off.dispose();
  }
});
