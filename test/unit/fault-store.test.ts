// The server's gradient store under faults, with real `influence-lens serve` processes sharing
// one HOME (so one cache folder): two servers building the same store at once, and a server
// killed (kill -9) in the middle of building it, then a fresh one. A partial store must never be
// used: the fresh server rebuilds it, and every store file that ends up in the cache is the one
// an uninterrupted build writes, byte for byte.
import assert from 'node:assert/strict';
import { type ChildProcess, spawn } from 'node:child_process';
import { existsSync, mkdirSync, readdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { describe, test } from 'node:test';
import { Explain, Index } from '../../src/protocol/requests';
import type { ExplainResult } from '../../src/protocol/types';
import { RpcClient } from '../../src/transport/client';
import { writeTinyCorpus } from './helpers/corpus';
import { useTempHome } from './helpers/env';

const root = useTempHome();
const home = join(root, 'shared-home');
mkdirSync(home);
const TOKEN = 'a-token-of-at-least-16-characters';
const data = join(root, 'train.jsonl');
// enough examples that a build lasts long enough to be killed in the middle
const N = 1500;
writeTinyCorpus(data, N);
const config = join(root, 'influence-lens.json');
writeFileSync(
  config,
  JSON.stringify({
    models: { model: join(process.cwd(), 'test/fixtures/models/llama') },
    datasets: { train: data },
    modules: 'mlp',
    store: { k: 4, minExamples: 10, rerank: 4 },
  }),
);
const storesDir = join(home, '.cache', 'influence-lens', 'stores');
const STORE_FILE = 'gradient_store.safetensors';

interface Server {
  child: ChildProcess;
  url: string;
  err: () => string;
  exited: Promise<number | null>;
}

async function startServer(): Promise<Server> {
  const env: NodeJS.ProcessEnv = { ...process.env, HOME: home, INFLUENCE_LENS_TOKEN: TOKEN };
  delete env.INFLUENCE_LENS_CACHE; // the cache is under HOME, shared by the servers
  const child = spawn(
    process.execPath,
    ['--import', 'tsx', 'src/server/cli.ts', 'serve', '--config', config, '--port', '0', '--no-discovery'],
    { env },
  );
  let out = '';
  let err = '';
  child.stdout!.on('data', (d) => {
    out += d;
  });
  child.stderr!.on('data', (d) => {
    err += d;
  });
  const exited = new Promise<number | null>((res) => child.on('exit', (code) => res(code)));
  for (let waited = 0; !/influence-lens server on (ws:\S+)/.test(out); waited += 50) {
    const code = await Promise.race([exited, new Promise((r) => setTimeout(r, 50, 'waiting'))]);
    assert.equal(code, 'waiting', `serve exited (${code}) before listening:\n${err}`);
    assert.ok(waited < 60_000, `serve did not start in 60 s:\n${err}`);
  }
  return { child, url: /influence-lens server on (ws:\S+)/.exec(out)![1], err: () => err, exited };
}

async function stop(s: Server) {
  s.child.kill('SIGTERM');
  await s.exited;
}

/** The one store folder of the dataset (its name holds the fingerprints) and what is in it. */
function storeFolder(): { dir: string; names: string[] } {
  const dirs = existsSync(storesDir) ? readdirSync(storesDir) : [];
  assert.ok(dirs.length <= 1, `one store folder: ${dirs.join(', ')}`);
  const dir = join(storesDir, dirs[0] ?? 'none');
  return { dir, names: existsSync(dir) ? readdirSync(dir).sort() : [] };
}

const QUERY = { dataset: 'train', prompt: 'Q: capital of country 3?\nA:', completion: ' City3', topK: 5 };
const ranking = (r: ExplainResult) => [...r.supporting, ...r.opposing].map((e) => [e.id.line, e.score]);

describe('gradient store: servers sharing a cache, killed mid-build', () => {
  let reference: Buffer;
  let referenceRanking: unknown;

  test('two servers build the same store at once: both answer, one whole store is left', async () => {
    const servers = await Promise.all([startServer(), startServer()]);
    try {
      const clients = await Promise.all(servers.map((s) => RpcClient.connect({ url: s.url, token: TOKEN })));
      try {
        const built = await Promise.all(clients.map((c) => c.request(Index, { dataset: 'train' })));
        for (const b of built) assert.equal(b.examples, N);
        const { dir, names } = storeFolder();
        assert.deepEqual(names, [STORE_FILE], 'no temporaries left');
        reference = readFileSync(join(dir, STORE_FILE));
        // both answer from the store with the same scores (each checks the file it reads is the one it verified)
        const rs = await Promise.all(clients.map((c) => c.request(Explain, { ...QUERY, method: 'gdp' })));
        referenceRanking = ranking(rs[0]);
        assert.deepEqual(ranking(rs[1]), referenceRanking);
        assert.equal(rs[0].scored, N);
      } finally {
        await Promise.all(clients.map((c) => c.close()));
      }
    } finally {
      await Promise.all(servers.map(stop));
    }
  });

  test('a server killed (-9) in the middle of the build leaves no store; a fresh server rebuilds the same one', async () => {
    assert.ok(reference, 'the first test built the reference store');
    const { dir } = storeFolder();
    rmSync(dir, { recursive: true });
    const s = await startServer();
    const client = await RpcClient.connect({ url: s.url, token: TOKEN });
    const building = client.request(Index, { dataset: 'train' }).catch(() => 'lost');
    // kill it once its store file has been started (anything in the store folder)
    let killedMidway = false;
    for (let waited = 0; waited < 30_000; waited += 5) {
      if (storeFolder().names.length) {
        s.child.kill('SIGKILL');
        killedMidway = true;
        break;
      }
      await new Promise((r) => setTimeout(r, 5));
    }
    s.child.kill('SIGKILL');
    await s.exited;
    assert.equal(await building, 'lost');
    await client.close().catch(() => {});
    assert.ok(killedMidway, 'the kill landed once the store was being written');
    const after = storeFolder();
    assert.ok(!after.names.includes(STORE_FILE), `no store file after the kill: ${after.names.join(', ')}`);
    assert.ok(
      after.names.some((n) => n.includes('.tmp-')),
      'the killed build left its temporary',
    );

    const fresh = await startServer();
    try {
      const c = await RpcClient.connect({ url: fresh.url, token: TOKEN });
      try {
        assert.equal((await c.request(Index, { dataset: 'train' })).examples, N);
        assert.deepEqual(storeFolder().names, [STORE_FILE], 'the temporary was cleaned');
        assert.ok(readFileSync(join(after.dir, STORE_FILE)).equals(reference), 'the rebuilt store is the reference');
        assert.deepEqual(ranking(await c.request(Explain, { ...QUERY, method: 'gdp' })), referenceRanking);
      } finally {
        await c.close();
      }
    } finally {
      await stop(fresh);
    }
  });

  test('two explains at once on one server with no store yet: both answer from one build', async () => {
    rmSync(storesDir, { recursive: true, force: true });
    const s = await startServer();
    try {
      const c = await RpcClient.connect({ url: s.url, token: TOKEN });
      try {
        // each used to build the store; the second build replaced the file the first was reading
        // ("changed on disk since its checksum was verified"): one of the two failed
        const rs = await Promise.all([0, 1].map(() => c.request(Explain, { ...QUERY, method: 'gdp' })));
        for (const r of rs) assert.deepEqual(ranking(r), referenceRanking);
        assert.deepEqual(storeFolder().names, [STORE_FILE]);
        assert.ok(readFileSync(join(storeFolder().dir, STORE_FILE)).equals(reference));
        assert.doesNotMatch(s.err(), /changed on disk|\n\s+at /);
      } finally {
        await c.close();
      }
    } finally {
      await stop(s);
    }
  });
});
