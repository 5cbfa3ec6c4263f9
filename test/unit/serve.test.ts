// The real server end to end: the influence methods over a real WebSocket on loopback with a
// real client — explain with progress and partial results, concurrency, cancellation that
// frees the work, bad params, and a restart that reuses the on-disk caches.
import assert from 'node:assert/strict';
import { statSync } from 'node:fs';
import { join } from 'node:path';
import { after, before, describe, test } from 'node:test';
import { LIMITS } from '../../src/protocol/limits';
import { Explain, ExplainMany, GetExample } from '../../src/protocol/requests';
import type { ExplainPartial, ExplainResult } from '../../src/protocol/types';
import { serviceHandlers } from '../../src/server/service/handlers';
import { InfluenceService, type ServiceConfig } from '../../src/server/service/influence-service';
import { RpcClient } from '../../src/transport/client';
import { type RunningServer, startServer } from '../../src/transport/server';
import { writeTinyCorpus } from './helpers/corpus';
import { useTempHome } from './helpers/env';

const home = useTempHome();

describe('influence server over WebSocket', () => {
  const data = join(home, 'train.jsonl');
  const rows = writeTinyCorpus(data, 24);
  const config: ServiceConfig = {
    finetuned: { model: 'test/fixtures/models/llama', factors: join(home, 'factors') },
    datasets: { train: data },
    modules: 'mlp',
    cacheDir: join(home, 'cache'),
    store: { k: 8, minExamples: 10, rerank: 6 },
  };
  let server: RunningServer;
  let client: RpcClient;
  let service: InfluenceService;

  const start = async () => {
    service = new InfluenceService(config);
    service.open();
    server = await startServer({
      handlers: serviceHandlers(service),
      info: () => service.info(),
      discoveryFile: false,
      limits: { maxConcurrent: 2, maxQueued: 16 },
    });
    client = await RpcClient.connect({ url: server.url, token: server.token });
  };
  const stop = async () => {
    await client.close();
    await server.close();
  };
  before(start);
  after(stop);

  const q = { prompt: 'Q: capital of country 3?\nA:', completion: ' City3', dataset: 'train', topK: 3 };

  test('fit over RPC (with progress) makes ekfac available', async () => {
    assert.ok(!client.server!.methods.includes('ekfac'));
    const progress: string[] = [];
    const r = await client.request<{ status: string; info: { methods: string[] } }>(
      'fit',
      {},
      { onProgress: (p) => progress.push(p.kind) },
    );
    assert.equal(r.status, 'done');
    assert.ok(r.info.methods.includes('ekfac'));
    assert.equal(progress[0], 'begin');
    assert.equal(progress.at(-1), 'end');
  });

  test('explain with several queries returns one result per query, equal to single explains', async () => {
    const { prompt, completion, ...rest } = q;
    const queries = [
      { prompt, completion },
      { prompt: `${prompt} `, completion },
    ];
    const many = await client.request(ExplainMany, { ...rest, method: 'ekfac', queries });
    assert.equal(many.results.length, 2);
    for (const [i, one] of queries.entries()) {
      const r = await client.request(Explain, { ...rest, ...one, method: 'ekfac' });
      assert.deepEqual(
        many.results[i].supporting.map((e) => [e.id.line, e.score]),
        r.supporting.map((e) => [e.id.line, e.score]),
      );
    }
    // queries replace prompt/completion: a request with both is refused, naming the field
    await assert.rejects(client.request('explainMany', { ...q, method: 'ekfac', queries }), /prompt/);
  });

  test('explain streams partial results, then the full result (via the gradient store)', async () => {
    const partials: ExplainPartial[] = [];
    const r = await client.request<ExplainResult>(
      'explain',
      { ...q, method: 'gdp' },
      { onPartial: (p) => partials.push(p as ExplainPartial) },
    );
    assert.equal(r.scored, rows.length);
    assert.ok(r.supporting.length > 0 && r.supporting[0].tokenScores);
    const e = await client.request<ExplainResult>('explain', { ...q, method: 'ekfac', compare: ['bm25'] });
    assert.equal(e.method, 'ekfac');
    assert.ok(e.supporting[0].otherRanks?.bm25);
    assert.ok(partials.length >= 1 || r.timings.total_ms < 250, 'partials while scoring');
  });

  test('8 concurrent explains all succeed under the concurrency limit', async () => {
    const methods = ['ekfac', 'gdp', 'cosine', 'repsim', 'bm25', 'ekfac', 'gdp', 'bm25'];
    const results = await Promise.all(
      methods.map((method) => client.request<ExplainResult>('explain', { ...q, method })),
    );
    assert.deepEqual(
      results.map((r) => r.method),
      methods,
    );
  });

  test('bad params and unknown datasets get clear errors; the server keeps serving', async () => {
    await assert.rejects(client.request('explain', { ...q, method: 'nope' }), /method/);
    await assert.rejects(client.request('explain', { ...q, topK: 0 }), /topK/);
    await assert.rejects(client.request('explain', { ...q, method: 'gdp', dataset: '/etc/passwd' }), /unknown dataset/);
    await assert.rejects(client.request('explain', { ...q, method: 'gdp', path: '/etc/passwd' }), /path/);
    await assert.rejects(client.request('getExample', { dataset: 'train', line: 999 }), /no example at line 999/);
    // ids that name Object.prototype's members are unknown ids like any other
    for (const dataset of ['__proto__', 'constructor', 'toString', 'hasOwnProperty'])
      await assert.rejects(
        client.request(Explain, { ...q, method: 'bm25', dataset }),
        new RegExp(`unknown dataset "${dataset}"; configured: train`),
      );
    const ex = await client.request(GetExample, { dataset: 'train', line: 2 });
    assert.match(ex.text, /Country 1/);
  });

  test('topK up to the limit the setting and the schema allow is served (was refused above 200)', async () => {
    const r = await client.request(Explain, { ...q, method: 'bm25', topK: 300 });
    assert.equal(r.supporting.length + r.opposing.length, rows.length);
    await assert.rejects(
      client.request(Explain, { ...q, method: 'bm25', topK: LIMITS.topK.max + 1 }),
      new RegExp(`topK.*${LIMITS.topK.max}`),
    );
  });

  test('cancelling an explain frees the slot for the next request', async () => {
    const ac = new AbortController();
    const pending = client.request('explain', { ...q, method: 'ekfac' }, { signal: ac.signal });
    setTimeout(() => ac.abort(), 5);
    await assert.rejects(pending, /cancel/i);
    const r = await client.request<ExplainResult>('explain', { ...q, method: 'bm25' });
    assert.equal(r.method, 'bm25');
    // the cancel is answered at once; the worker lets go of the slot when its current batch ends
    let running = -1;
    for (let waited = 0; waited < 20_000; waited += 50) {
      running = (await client.status()).heavy.running;
      if (running === 0) break;
      await new Promise((res) => setTimeout(res, 50));
    }
    assert.equal(running, 0, 'the heavy slot is free again');
  });

  test('generate completes a prompt', async () => {
    const g = await client.request<{ completion: string; logprobs: number[] }>('generate', {
      prompt: 'Q: capital of country 3?\nA:',
      maxTokens: 4,
    });
    assert.equal(typeof g.completion, 'string');
    assert.ok(g.logprobs.every((x) => x <= 0));
    assert.equal((g as { notes?: string[] }).notes, undefined);
    // a seed at temperature 0 (the default) changes nothing: said, as the CLI says it
    const seeded = await client.request<{ completion: string; notes?: string[] }>('generate', {
      prompt: 'Q: capital of country 3?\nA:',
      maxTokens: 4,
      seed: 7,
    });
    assert.equal(seeded.completion, g.completion);
    assert.deepEqual(seeded.notes, ['seed 7 changes nothing: temperature 0 decodes greedily']);
  });

  test('a restarted server reuses the factors and the gradient store on disk', async () => {
    const storeFiles = () =>
      statSync(join(config.cacheDir, 'stores')).isDirectory() ? statSync(join(config.cacheDir, 'stores')).mtimeMs : 0;
    const before = storeFiles();
    await stop();
    await start();
    assert.ok(client.server!.methods.includes('ekfac'), 'factors loaded at start');
    const r = await client.request<ExplainResult>('explain', { ...q, method: 'ekfac' });
    assert.equal(r.scored, rows.length);
    assert.equal(storeFiles(), before, 'no new store was built');
  });
});
