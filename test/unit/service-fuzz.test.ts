// The real server and the real InfluenceService on the embedded default, attacked the way users
// and bugs do: broken data files, broken factors and model files get specific error codes naming
// the file (never InternalError), and a bounded fuzz loop of random and malformed params for every
// method, run concurrently with cancellations while two other processes flag examples, leaves the
// server up, answering, and every flag on disk.
import assert from 'node:assert/strict';
import { type ChildProcess, spawn, spawnSync } from 'node:child_process';
import { cpSync, mkdirSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { after, before, describe, test } from 'node:test';
import { toClientInfo } from '../../src/extension/client/server-client';
import { readSidecar, sidecarPathFor } from '../../src/extension/flags/sidecar';
import { RpcErrorCode } from '../../src/protocol/rpc';
import { METHODS } from '../../src/protocol/types';
import { defaultServiceConfig, embeddedDefault } from '../../src/server/defaults';
import { serviceHandlers } from '../../src/server/service/handlers';
import { InfluenceService, type ServiceConfig } from '../../src/server/service/influence-service';
import { Rng } from '../../src/server/util/random';
import { RpcClient } from '../../src/transport/client';
import type { RpcError } from '../../src/transport/errors';
import { type RunningServer, startServer } from '../../src/transport/server';
import { useTempHome } from './helpers/env';

const home = useTempHome();
const d = embeddedDefault();
const deepRecord = (depth: number) => `{"text": "deep", "meta": ${'['.repeat(depth)}${']'.repeat(depth)}}`;

// the embedded default's data, copied so flags (sidecars) are written in the temp folder
const finetune = join(home, 'finetune.jsonl');
cpSync(d.finetuneData, finetune);
const exampleCount = readFileSync(finetune, 'utf8')
  .split('\n')
  .filter((l) => l.trim()).length;
const deep = join(home, 'deep.jsonl');
writeFileSync(deep, `${readFileSync(finetune, 'utf8').trimEnd()}\n${deepRecord(3000)}\n${deepRecord(100_000)}\n`);
const empty = join(home, 'empty.jsonl');
writeFileSync(empty, '\n\n');
const bad = join(home, 'bad.jsonl');
writeFileSync(bad, 'not json\n{"no_text": 1}\n');
const gone = join(home, 'gone.jsonl');
// final factors that cannot be read (a truncated write by some other tool, a bad copy)
const brokenFactors = join(home, 'factors-broken');
mkdirSync(brokenFactors);
writeFileSync(join(brokenFactors, 'influence_lens_arguments.json'), '{"modelFingerprint": ');

const base = defaultServiceConfig();
const config: ServiceConfig = {
  ...base,
  finetuned: { ...base.finetuned, factors: brokenFactors, fitDataset: 'finetune' },
  datasets: { finetune, pretrain: d.pretrainData, deep, empty, bad, gone },
  cacheDir: join(home, 'cache'),
};

let server: RunningServer;
let client: RpcClient;
before(async () => {
  const service = new InfluenceService(config);
  service.open();
  server = await startServer({
    handlers: serviceHandlers(service),
    info: () => service.info(),
    discoveryFile: false,
    limits: { maxConcurrent: 2, maxQueued: 64 },
  });
  client = await RpcClient.connect({ url: server.url, token: server.token });
});
after(async () => {
  await client.close();
  await server.close();
});

/** the request's error (fails the test when it succeeds) */
async function errorOf(p: Promise<unknown>): Promise<RpcError> {
  try {
    await p;
  } catch (e) {
    return e as RpcError;
  }
  assert.fail('expected the request to fail');
}

const q = { prompt: 'Q: What is the capital of France?\nA:', completion: ' Paris', topK: 3 };

describe('errors a user can act on, over the real server', () => {
  test('a dataset file that is empty, has no usable line or is missing: InvalidData naming it', async () => {
    for (const [id, path, why] of [
      ['empty', empty, /no training examples/],
      ['bad', bad, /no training examples \(2 malformed/],
      ['gone', gone, /does not exist: restore it, or fix its path/],
    ] as const) {
      for (const call of [
        () => client.request('explain', { ...q, dataset: id, method: 'bm25' }),
        () => client.request('getExample', { dataset: id, line: 1 }),
        () => client.request('reload', { dataset: id }),
      ]) {
        const e = await errorOf(call());
        assert.equal(e.code, RpcErrorCode.InvalidData, e.message);
        assert.ok(e.message.includes(path), e.message);
        assert.match(e.message, why);
        assert.doesNotMatch(e.message, /\n\s+at /, 'no stack');
      }
    }
  });

  test("a query that cannot be explained is the request's fault: InvalidParams, not InvalidData", async () => {
    for (const [params, why] of [
      [{ ...q, completion: '' }, /completion/],
      [{ ...q, prompt: 'word '.repeat(600) }, /prompt \+ completion is \d+ tokens; the model takes \d+/],
      // far beyond the context: refused from a prefix, not tokenized whole
      [
        { ...q, prompt: 'word '.repeat(3900) },
        /prompt \+ completion is more than \d+ tokens \(its first \d+ of 19\d\d\d characters alone\); the model takes \d+/,
      ],
      [{ ...q, messages: [{ role: 'user', content: 'hi' }] }, /assistant/],
      [{ ...q, prompt: 'a \ud800 b' }, /the prompt holds an unpaired surrogate \(\\ud800 at character 2\)/],
    ] as const) {
      const e = await errorOf(client.request('explain', { ...params, dataset: 'finetune', method: 'gdp' }));
      assert.equal(e.code, RpcErrorCode.InvalidParams, e.message);
      assert.match(e.message, why);
    }
  });

  test('broken factors: ekfac and scan say why, fit says to delete the folder (BrokenFactors)', async () => {
    assert.match(client.server!.unavailable.ekfac ?? '', /cannot be used \(.*factors-broken/);
    // fitting does not help (fit refuses that folder): the editor says why instead of offering "Fit factors now"
    assert.match(client.server!.stages[0].factorsUnusable ?? '', /cannot be used \(.*factors-broken.*at a new folder/);
    assert.equal(toClientInfo(client.server!).needsFit.ekfac, undefined);
    let e = await errorOf(client.request('explain', { ...q, dataset: 'finetune', method: 'ekfac' }));
    assert.equal(e.code, RpcErrorCode.NotReady);
    assert.match(e.message, /cannot be used/);
    e = await errorOf(client.request('scanDataset', { dataset: 'finetune' }));
    assert.equal(e.code, RpcErrorCode.NotReady);
    e = await errorOf(client.request('fit', {}));
    assert.equal(e.code, RpcErrorCode.BrokenFactors, e.message);
    assert.ok(
      e.message.includes(brokenFactors) &&
        /point the fine-tuned model's "factors" in influence-lens\.json at a new folder and run "fit"/.test(e.message),
    );
  });

  test('a dataset with lines nested 3000 and 100 000 deep is served without them', async () => {
    const r = await client.request<{ examples: number; skipped: number }>('reload', { dataset: 'deep' });
    assert.deepEqual(r, { dataset: 'deep', examples: exampleCount, skipped: 2 });
    const x = await client.request<{ scored: number }>('explain', { ...q, dataset: 'deep', method: 'bm25' });
    assert.equal(x.scored, exampleCount);
    const e = await errorOf(client.request('getExample', { dataset: 'deep', line: exampleCount + 1 }));
    assert.equal(e.code, RpcErrorCode.InvalidParams);
  });

  test('serve refuses a truncated tokenizer.json, config.json or model.safetensors with one line naming it', () => {
    for (const file of ['tokenizer.json', 'config.json', 'model.safetensors']) {
      const dir = join(home, `broken-${file}`);
      cpSync('test/fixtures/models/llama', join(dir, 'm'), { recursive: true });
      const bytes = readFileSync(join(dir, 'm', file));
      writeFileSync(join(dir, 'm', file), bytes.subarray(0, bytes.length >> 1));
      cpSync(finetune, join(dir, 'train.jsonl'));
      writeFileSync(
        join(dir, 'influence-lens.json'),
        JSON.stringify({ models: { model: 'm' }, datasets: { train: 'train.jsonl' }, modules: 'mlp' }),
      );
      const r = spawnSync(
        process.execPath,
        [
          '--import',
          'tsx',
          'src/server/cli.ts',
          'serve',
          '--config',
          join(dir, 'influence-lens.json'),
          '--no-discovery',
        ],
        { encoding: 'utf8', env: { ...process.env, HOME: home }, timeout: 60_000 },
      );
      assert.equal(r.status, 1, `${file}: ${r.stdout}${r.stderr}`);
      assert.equal(r.stdout, '', 'it never announced a server');
      const lines = r.stderr.trim().split('\n');
      assert.equal(lines.length, 1, r.stderr);
      assert.ok(lines[0].includes(join(dir, 'm', file)), lines[0]);
    }
  });
});

describe('fuzz: random and malformed params for every method, concurrent, with cancellation', () => {
  const WRITER = join(import.meta.dirname, 'helpers', 'flag-writer.ts');
  const sidecar = sidecarPathFor(finetune);
  const writers: ChildProcess[] = [];

  test('no InternalError, the server stays up, no flag lost', async () => {
    // two "editor windows" flag examples of the served dataset meanwhile
    const exits = ['a', 'b'].map((prefix) => {
      const c = spawn(process.execPath, ['--import', 'tsx', WRITER, sidecar, 'add', prefix, '200'], {
        stdio: 'ignore',
      });
      writers.push(c);
      return new Promise<number | null>((resolve) => c.on('exit', resolve));
    });

    const rng = new Rng(13);
    const pick = <T>(xs: readonly T[]): T => xs[Math.floor(rng.next() * xs.length)];
    const ids = ['finetune', 'pretrain', 'deep', 'empty', 'bad', 'gone', 'nope', '', '../finetune', 'x'.repeat(300)];
    const junk = (): unknown =>
      pick([null, true, -1, 0, 1.5, 2 ** 53, 1e308, '', 'x', 'é🌍', [], [1, 'a'], {}, { a: { b: [null] } }]);
    const valid: Record<string, () => Record<string, unknown>> = {
      explain: () => ({ ...q, dataset: pick(ids.slice(0, 3)), method: pick(['bm25', 'bm25', 'gdp', 'ekfac']) }),
      getExample: () => ({ dataset: pick(ids.slice(0, 3)), line: 1 + Math.floor(rng.next() * 400) }),
      scanDataset: () => ({ dataset: pick(ids), topK: 5 }),
      generate: () => ({ prompt: 'Q: What is the capital of France?\nA:', maxTokens: 1 + Math.floor(rng.next() * 4) }),
      reload: () => ({ dataset: pick(ids) }),
      index: () => ({ dataset: pick(['empty', 'bad', 'gone', 'nope']) }),
      fit: () => ({ stage: pick(['finetuned', 'pretrained', 'middle']) }),
    };
    /** a valid request with one field broken: dropped, retyped, or an extra field */
    const mutate = (p: Record<string, unknown>): unknown => {
      const keys = Object.keys(p);
      const k = pick(keys);
      switch (Math.floor(rng.next() * 6)) {
        case 0:
          return p;
        case 1: {
          const { [k]: _, ...rest } = p;
          return rest;
        }
        case 2:
          return { ...p, [k]: junk() };
        case 3:
          return { ...p, [pick(['extra', '__proto__', 'constructor', 'path'])]: junk() };
        case 4:
          return junk();
        default:
          return { ...p, method: pick([...METHODS, 'magic', 1]), topK: pick([0, 1, 1001, -3, 2.5, '3']) };
      }
    };
    // fit on the pretrained stage really fits: keep the fuzz bounded and cheap
    const safe = (method: string, p: unknown) =>
      !(method === 'fit' && p !== null && typeof p === 'object' && (p as { stage?: unknown }).stage === 'pretrained');

    const codes = new Map<number | string, number>();
    let ok = 0;
    for (let round = 0; round < 25; round++) {
      const batch = Array.from({ length: 8 }, async () => {
        const method = pick([...Object.keys(valid), 'status', 'nope']);
        const params = method in valid ? mutate(valid[method]()) : junk();
        if (!safe(method, params)) return;
        const ac = new AbortController();
        if (rng.next() < 0.3) setTimeout(() => ac.abort(), Math.floor(rng.next() * 30));
        try {
          await client.request(method, params as object, { signal: ac.signal });
          ok++;
        } catch (e) {
          const code = (e as RpcError).code ?? (e as Error).message;
          codes.set(code, (codes.get(code) ?? 0) + 1);
          assert.notEqual(
            code,
            RpcErrorCode.InternalError,
            `${method} ${JSON.stringify(params)}: ${(e as Error).message}`,
          );
          assert.equal(typeof code, 'number', `${method}: not an RPC error: ${(e as Error).stack}`);
        }
      });
      await Promise.all(batch);
    }
    console.log(`fuzz: ${ok} succeeded; errors by code: ${JSON.stringify([...codes])}`);
    assert.ok(ok > 0 && codes.get(RpcErrorCode.InvalidParams)! > 0, JSON.stringify([ok, [...codes]]));

    // still up and idle: status answers, nothing is left running, a real explain works
    const s = await client.status();
    assert.equal(s.heavy.running, 0);
    const r = await client.request<{ scored: number }>('explain', { ...q, dataset: 'finetune', method: 'bm25' });
    assert.equal(r.scored, exampleCount);

    assert.deepEqual(await Promise.all(exits), [0, 0]);
    const flags = readSidecar(sidecar);
    assert.equal(flags.entries.length, 400);
    assert.equal(new Set(flags.entries.map((e) => e.hash)).size, 400);
    // the sidecar is never taken for data
    assert.deepEqual(await client.request('reload', { dataset: 'finetune' }), {
      dataset: 'finetune',
      examples: exampleCount,
      skipped: 0,
    });
  });
  after(() => {
    for (const w of writers) if (w.exitCode === null) w.kill();
  });
});
