// The real server on the embedded default with the service in worker threads (as `serve` runs
// it): `status` answers while a fit runs, and cancelling a fit or a scan stops the work itself —
// the heavy slot is free again and `status` lists nothing, no final factors are written, and a
// later fit resumes from the partials and succeeds.
import assert from 'node:assert/strict';
import { existsSync, mkdirSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { after, before, describe, test } from 'node:test';
import { RpcErrorCode } from '../../src/protocol/rpc';
import type { ExplainResult } from '../../src/protocol/types';
import { OUR_ARGUMENTS_FILE } from '../../src/server/attribution/ekfac/factors-io';
import { defaultServiceConfig } from '../../src/server/defaults';
import { readConfigFile } from '../../src/server/service/config';
import { serviceHandlers } from '../../src/server/service/handlers';
import { WorkerService } from '../../src/server/service/worker-service';
import { RpcClient } from '../../src/transport/client';
import type { RpcError } from '../../src/transport/errors';
import { type RunningServer, startServer } from '../../src/transport/server';
import { useTempHome } from './helpers/env';

const home = useTempHome();

describe('server with the service in worker threads (embedded default)', () => {
  const config = defaultServiceConfig();
  let service: WorkerService;
  let server: RunningServer;
  let client: RpcClient;

  before(async () => {
    service = await WorkerService.start(config);
    // one heavy slot: a request that still held it after a cancel would make the next one queue
    server = await startServer({
      handlers: serviceHandlers(service),
      info: () => service.info(),
      discoveryFile: false,
      limits: { maxConcurrent: 1, maxQueued: 4 },
    });
    client = await RpcClient.connect({ url: server.url, token: server.token });
  });
  after(async () => {
    await client.close();
    await server.close();
    await service.close();
  });

  /** Starts `method`, cancels it once its work has reported progress `reports` times. */
  async function cancelMidWork(method: string, params: object, reports = 1) {
    const ac = new AbortController();
    let seen = 0;
    let reachedWork!: () => void;
    const working = new Promise<void>((r) => {
      reachedWork = r;
    });
    const pending = client.request(method, params, {
      signal: ac.signal,
      onProgress: (p) => {
        if (p.kind === 'report' && p.done !== undefined && ++seen >= reports) reachedWork();
      },
    });
    let settled = false;
    pending.then(
      () => (settled = true),
      () => (settled = true),
    );
    await working;
    // the server answers while the work runs (the event loop is free)
    const during = await client.status();
    assert.equal(settled, false, `${method} still running when status answered`);
    assert.deepEqual(
      during.requests.map((r) => [r.method, r.state]),
      [[method, 'running']],
    );
    ac.abort();
    await assert.rejects(pending, /cancel/i);
    // the work stops at the next batch: status lists nothing and the slot is free
    const t = Date.now();
    let s = await client.status();
    while ((s.requests.length || s.heavy.running) && Date.now() - t < 5000) {
      await new Promise((r) => setTimeout(r, 20));
      s = await client.status();
    }
    assert.deepEqual(s.requests, [], `nothing running after the cancel (${Date.now() - t} ms)`);
    assert.equal(s.heavy.running, 0);
    return Date.now() - t;
  }

  test('cancelling a fit stops it: slot free, no final factors, a later fit resumes and succeeds', async () => {
    const factors = config.finetuned.factors!;
    await cancelMidWork('fit', { stage: 'finetuned' }, 2);
    assert.ok(!existsSync(join(factors, OUR_ARGUMENTS_FILE)), 'no final factors written');
    // the next heavy request gets the slot at once (no queueing behind the cancelled fit)
    const g = client.request<{ completion: string }>('generate', {
      prompt: 'Q: capital of country 3?\nA:',
      maxTokens: 2,
    });
    const s = await client.status();
    assert.deepEqual(
      s.requests.map((r) => [r.method, r.state]),
      [['generate', 'running']],
    );
    await g;
    assert.ok(!client.server!.methods.includes('ekfac'));
    const r = await client.request<{ status: string; info: { methods: string[] } }>('fit', { stage: 'finetuned' });
    assert.equal(r.status, 'done');
    assert.ok(r.info.methods.includes('ekfac'));
    assert.ok(existsSync(join(factors, OUR_ARGUMENTS_FILE)));
    assert.ok(!existsSync(join(factors, 'partials')), 'partials removed after the final write');
    assert.ok((await client.status()).service?.methods.includes('ekfac'), 'status reports the new factors');
  });

  test('cancelling a scan stops it and frees the slot; the next scan succeeds', async () => {
    await cancelMidWork('scanDataset', { dataset: 'finetune', topK: 3 });
    const r = await client.request<{ examples: unknown[]; scored: number }>('scanDataset', {
      dataset: 'finetune',
      topK: 3,
    });
    assert.equal(r.examples.length, 3);
    assert.ok(r.scored > 100);
  });

  test('bm25 explains and getExample do not take a heavy slot; results match the heavy lane', async () => {
    const q = { prompt: 'Q: What is the capital of France?\nA:', completion: ' Paris', dataset: 'finetune', topK: 3 };
    const heavy = client.request<ExplainResult>('explain', { ...q, method: 'ekfac' });
    let heavyDone = false;
    heavy.then(() => (heavyDone = true));
    // the only heavy slot is taken: a bm25 explain that needed it would wait for the ekfac one
    const light = await client.request<ExplainResult>('explain', { ...q, method: 'bm25' });
    assert.equal(heavyDone, false, 'bm25 answered while the gradient explain still held the heavy slot');
    const ex = await client.request<{ id: { line: number } }>('getExample', {
      dataset: 'finetune',
      line: light.supporting[0].id.line,
    });
    assert.equal(ex.id.line, light.supporting[0].id.line);
    const both = await client.request<ExplainResult>('explain', { ...q, method: 'ekfac', compare: ['bm25'] });
    assert.equal((await heavy).scored, both.scored);
    assert.equal(light.scored, both.scored);
    // one revision for both lanes (the light one watches the factors it does not load): the panel
    // keeps an ekfac result beside a bm25 one only when they agree
    assert.ok(light.revision && light.revision.length === 16);
    assert.equal(light.revision, both.revision);
    assert.equal((await client.status()).service?.revision, both.revision);
  });

  test("the workers' errors keep their codes and messages", async () => {
    await assert.rejects(client.request('getExample', { dataset: 'finetune', line: 99999 }), (e: RpcError) => {
      assert.equal(e.code, RpcErrorCode.InvalidParams);
      assert.match(e.message, /no example at line 99999/);
      return true;
    });
    const q = { prompt: 'Q: x?\nA:', completion: ' y', topK: 3 };
    for (const method of ['bm25', 'gdp'])
      await assert.rejects(client.request('explain', { ...q, method, dataset: 'nope' }), (e: RpcError) => {
        assert.equal(e.code, RpcErrorCode.InvalidParams);
        assert.match(e.message, /unknown dataset "nope"/);
        return true;
      });
  });

  test('reload counts against the heavy limit and answers with the dataset size', async () => {
    const r = await client.request<{ examples: number }>('reload', { dataset: 'finetune' });
    assert.ok(r.examples > 100);
  });
});

describe('a cancelled request in status', () => {
  test('stays listed (and holds its slot) until its handler returns, not only until the reply', async () => {
    let finish!: () => void;
    const handlerDone = new Promise<void>((r) => {
      finish = r;
    });
    const server = await startServer({
      // a handler that only stops when told to (like work between two checks of its signal)
      handlers: { slow: { heavy: true, handler: () => handlerDone } },
      discoveryFile: false,
      limits: { maxConcurrent: 1, maxQueued: 4 },
    });
    const client = await RpcClient.connect({ url: server.url, token: server.token });
    try {
      const ac = new AbortController();
      const pending = client.request('slow', {}, { signal: ac.signal });
      while ((await client.status()).heavy.running === 0) await new Promise((r) => setTimeout(r, 5));
      ac.abort();
      await assert.rejects(pending, /cancel/i);
      const s = await client.status();
      assert.deepEqual(
        s.requests.map((r) => r.method),
        ['slow'],
      );
      assert.equal(s.heavy.running, 1);
      finish();
      await new Promise((r) => setTimeout(r, 50));
      const after = await client.status();
      assert.deepEqual(after.requests, []);
      assert.equal(after.heavy.running, 0);
    } finally {
      await client.close();
      await server.close();
    }
  });
});

test('influence-lens.json edited under the worker threads: status says at once that every method waits for a restart, and requests are refused', async () => {
  const dir = join(home, 'config-status');
  mkdirSync(dir, { recursive: true });
  const file = join(dir, 'influence-lens.json');
  const base = defaultServiceConfig();
  const settings = { models: { model: base.finetuned.model }, datasets: { finetune: base.datasets.finetune } };
  writeFileSync(file, JSON.stringify(settings));
  const service = await WorkerService.start(readConfigFile(file).service);
  try {
    assert.ok(service.info().methods.includes('bm25'));
    writeFileSync(file, JSON.stringify({ ...settings, damping: 5 }));
    assert.deepEqual(service.info().methods, []);
    assert.match(
      service.info().unavailable.bm25 ?? '',
      /changed since this server read it: restart `influence-lens serve`/,
    );
    await assert.rejects(
      service.explain({
        prompt: 'Q: capital of France?\nA:',
        completion: ' Paris',
        dataset: 'finetune',
        method: 'bm25',
        topK: 2,
      }),
      /changed since this server read it/,
    );
  } finally {
    await service.close();
  }
});

test('status after factors are fitted by another process: the heavy lane reads them again and says EK-FAC can run', async () => {
  const base = defaultServiceConfig();
  // a cache of its own (the tests above fit into the shared one)
  const dir = join(home, 'status-refit');
  const factors = join(dir, 'factors');
  const config = {
    ...base,
    cacheDir: join(dir, 'cache'),
    finetuned: { ...base.finetuned, factors },
    pretrained: undefined,
  };
  const service = await WorkerService.start(config);
  try {
    assert.ok(!service.info().methods.includes('ekfac'), 'no factors yet');
    // another process (a CLI fit, a second server) writes them: here a service of its own
    const { InfluenceService } = await import('../../src/server/service/influence-service');
    const other = new InfluenceService(config);
    other.open();
    const r = await other.fit('finetuned');
    assert.equal(r.status, 'done');
    assert.ok(existsSync(join(factors, OUR_ARGUMENTS_FILE)));
    // the snapshot is the heavy lane's last answer; status asks it again
    assert.ok(!service.info().methods.includes('ekfac'));
    const now = await service.currentInfo();
    assert.ok(now.methods.includes('ekfac'), `methods now: ${now.methods.join(', ')}`);
    assert.ok(service.info().methods.includes('ekfac'), 'the snapshot is updated too');
  } finally {
    await service.close();
  }
});
