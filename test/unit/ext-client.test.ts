// The extension's server connection against the real thing: `LocalServer` starts
// `influence-lens serve` (the CLI from source) with its own token, `ServerClient` fits factors,
// explains with partial results, cancels, and turns failures into messages a person can act on.
import assert from 'node:assert/strict';
import { spawn, spawnSync } from 'node:child_process';
import { writeFileSync } from 'node:fs';
import { join, resolve } from 'node:path';
import { after, describe, test } from 'node:test';
import { CancellationTokenSource } from 'vscode-jsonrpc';
import { CancelledError, ClientError } from '../../src/extension/client/influence-client';
import { LocalServer } from '../../src/extension/client/local-server';
import { type Connector, ServerClient } from '../../src/extension/client/server-client';
import type { ExplainPartial } from '../../src/protocol/types';
import { writeTinyCorpus } from './helpers/corpus';
import { useTempHome } from './helpers/env';

const home = useTempHome();
const ROOT = resolve(import.meta.dirname, '../..');

// The CLI from source (dist/ may be older than the code under test).
const cli = join(home, 'cli.mjs');
writeFileSync(
  cli,
  `import { register } from ${JSON.stringify(import.meta.resolve('tsx/esm/api'))};\nregister();\n` +
    `await import(${JSON.stringify(new URL(`file://${join(ROOT, 'src/server/cli.ts')}`).href)});\n`,
);

const data = join(home, 'train.jsonl');
const rows = writeTinyCorpus(data, 18);
const config = join(home, 'influence-lens.json');
writeFileSync(
  config,
  JSON.stringify({
    models: { finetuned: { model: join(ROOT, 'test/fixtures/models/llama'), factors: './factors' } },
    datasets: { train: './train.jsonl' },
    modules: 'mlp',
  }),
);

const never = { isCancellationRequested: false, onCancellationRequested: () => ({ dispose() {} }) };
const q = { prompt: 'Q: capital of country 3?\nA:', completion: ' City3', dataset: 'train', topK: 3 };

describe('extension ↔ a local server it starts', () => {
  const log: string[] = [];
  const stopped: string[] = [];
  const local = new LocalServer({
    command: cli,
    node: process.execPath,
    config,
    cwd: home,
    log: (l) => log.push(l),
    onStopped: (why) => stopped.push(why),
  });
  const client = new ServerClient(local);
  after(() => client.dispose());

  test('info: what the server serves; EK-FAC waits for a fit', async () => {
    const info = await client.info();
    assert.deepEqual(info.datasets, ['train']);
    assert.equal(info.datasetPaths?.train, data);
    assert.equal(info.device, 'cpu');
    assert.ok(!info.methods.includes('ekfac'));
    assert.deepEqual(info.needsFit.ekfac, ['finetuned']);
    assert.ok(info.methods.includes('bm25'));
    assert.match(client.label, /^local server \(pid \d+\)$/);
    assert.ok(log.some((l) => l.startsWith('starting the server:') && !l.includes('INFLUENCE_LENS_TOKEN')));
  });

  test('fit with progress makes EK-FAC available', async () => {
    const pcts: number[] = [];
    const r = await client.fit('finetuned', never, (p) => {
      if (p.percentage !== undefined) pcts.push(p.percentage);
    });
    assert.ok(r.info.methods.includes('ekfac'));
    assert.deepEqual(r.info.needsFit, {});
    assert.ok(pcts.length > 0 && pcts.every((x) => x >= 0 && x <= 100));
    assert.ok((await client.info()).methods.includes('ekfac'), 'status reports the fitted stage');
  });

  test('explain streams partial top-k, then the result', async () => {
    const partials: ExplainPartial[] = [];
    const r = await client.explain({ ...q, method: 'ekfac', compare: ['bm25'] }, (p) => partials.push(p), never);
    assert.equal(r.method, 'ekfac');
    assert.equal(r.scored, rows.length);
    assert.equal(r.supporting.length, 3);
    assert.ok(r.supporting[0].otherRanks?.bm25 !== undefined);
    assert.ok(partials.length >= 1);
  });

  test('cancel: the request ends with CancelledError and the server keeps serving', async () => {
    const c = new CancellationTokenSource();
    const p = client.explain({ ...q, method: 'ekfac' }, () => {}, c.token);
    c.cancel();
    await assert.rejects(p, CancelledError);
    const r = await client.explain({ ...q, method: 'bm25' }, () => {}, never);
    assert.equal(r.method, 'bm25');
  });

  test('bad params come back as a ClientError with the server message', async () => {
    await assert.rejects(
      client.explain({ ...q, dataset: 'nope', method: 'bm25' }, () => {}, never),
      (e: Error) => e instanceof ClientError && /unknown dataset "nope"/.test(e.message),
    );
  });

  test('a server that exited is started again on the next call', async () => {
    const pid = Number(/pid (\d+)/.exec(client.label)?.[1]);
    process.kill(pid, 'SIGKILL');
    await waitUntil(() => !alive(pid));
    // said at once (the status bar stops naming its model), not at the next request
    await waitUntil(() => stopped.length > 0);
    assert.deepEqual(stopped, ['the local server stopped (SIGKILL)']);
    // the dropped connection may be noticed by this call or before it
    const info = await client.info().catch(() => client.info());
    assert.ok(info.methods.includes('ekfac'), 'the factors on disk are found again');
    assert.notEqual(Number(/pid (\d+)/.exec(client.label)?.[1]), pid);
  });
});

describe('extension: failures to start or reach a server say what to do', () => {
  test('a missing CLI names the setting to fix', async () => {
    const c = new ServerClient(new LocalServer({ command: join(home, 'no-such-cli') }));
    await assert.rejects(
      c.info(),
      /the influence-lens CLI .*no-such-cli does not exist: set influenceLens\.server\.command/,
    );
    c.dispose();
    // a .js path run with node (MODULE_NOT_FOUND and node's dump before), and a folder (spawn EACCES before)
    for (const [command, why] of [
      [join(home, 'gone', 'influence-lens.js'), 'does not exist'],
      [home, 'is a folder'],
    ] as const) {
      const d = new ServerClient(new LocalServer({ command, node: process.execPath }));
      await assert.rejects(
        d.info(),
        (e: Error) =>
          e.message.includes(`the influence-lens CLI ${command} ${why}: set influenceLens.server.command`) &&
          !/MODULE_NOT_FOUND|EACCES/.test(e.message),
      );
      d.dispose();
    }
    // a command on PATH that is not there still says so
    const p = new ServerClient(new LocalServer({ command: 'no-such-influence-lens-cli' }));
    await assert.rejects(p.info(), /was not found\. Set influenceLens\.server\.command/);
    p.dispose();
  });

  test('a server that fails at start-up: its own error is in the message', async () => {
    const bad = join(home, 'bad.json');
    writeFileSync(bad, '{"models": {}}');
    const c = new ServerClient(new LocalServer({ command: cli, node: process.execPath, config: bad }));
    await assert.rejects(c.info(), (e: Error) => {
      // the server's own error first, the long command line after it
      assert.match(e.message, /^the local server stopped before it was ready: .*bad\.json.* \(exit code 1; /);
      return true;
    });
    c.dispose();
  });

  test('a wrong token: refused, and the connector is told to forget it', async () => {
    const local = new LocalServer({ command: cli, node: process.execPath, config });
    const good = await local.endpoint();
    let forgotten = 0;
    const wrong: Connector = {
      label: 'test',
      endpoint: async () => ({ url: good.url, token: 'x'.repeat(40) }),
      rejected: () => {
        forgotten += 1;
      },
      dispose() {},
    };
    const c = new ServerClient(wrong);
    await assert.rejects(c.info(), /refused the connection \(401/);
    assert.equal(forgotten, 1);
    local.dispose();
  });

  test('serve --watch-parent: the server stops when the process that started it is gone', async () => {
    const gone = spawnSync(process.execPath, ['-e', 'process.stdout.write(String(process.pid))'], {
      encoding: 'utf8',
    });
    const child = spawn(
      process.execPath,
      [cli, 'serve', '--config', config, '--port', '0', '--no-discovery', '--watch-parent', gone.stdout],
      {
        stdio: 'ignore',
      },
    );
    const code = await new Promise<number | null>((res) => child.on('exit', (c) => res(c)));
    assert.equal(code, 0);
  });
});

function alive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch {
    return false;
  }
}

async function waitUntil(f: () => boolean, ms = 10000) {
  const end = Date.now() + ms;
  while (!f()) {
    if (Date.now() > end) throw new Error('timed out');
    await new Promise((r) => setTimeout(r, 50));
  }
}

test('toClientInfo offers a fit only where fitting helps: not for a stage, or multistage, when a factors folder is unusable', async () => {
  const { toClientInfo } = await import('../../src/extension/client/server-client');
  const base = {
    model: 'ft',
    datasets: ['d'],
    datasetPaths: { d: 'd.jsonl' },
    device: 'cpu',
    methods: ['gdp', 'bm25'],
    unavailable: { ekfac: 'x', multistage: 'y' },
    modules: [],
    warnings: [],
    revision: 'r',
  } as const;
  const stages = (ft: object, pt: object) => [
    { name: 'finetuned', model: 'ft', factors: false, ...ft },
    { name: 'pretrained', model: 'pt', factors: false, ...pt },
  ];
  // both merely unfitted: both offered
  let c = toClientInfo({ ...base, stages: stages({}, {}) } as never);
  assert.deepEqual(c.needsFit, { ekfac: ['finetuned'], multistage: ['finetuned', 'pretrained'] });
  // the fine-tuned stage's folder is another model's: nothing offered (fit would refuse it)
  c = toClientInfo({ ...base, stages: stages({ factorsUnusable: 'another model' }, {}) } as never);
  assert.deepEqual(c.needsFit, {});
  // the pre-trained stage's is: ekfac may still be fitted, multistage not
  c = toClientInfo({ ...base, stages: stages({}, { factorsUnusable: 'another model' }) } as never);
  assert.deepEqual(c.needsFit, { ekfac: ['finetuned'] });
});
