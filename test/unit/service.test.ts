// The server's methods, called directly (the JSON-RPC layer only adds transport and security).
import assert from 'node:assert/strict';
import { appendFileSync, chmodSync, readFileSync, renameSync, statSync, utimesSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { describe, test } from 'node:test';
import { describeAttribution } from '../../src/common/display';
import { InfluenceService, ServiceError } from '../../src/server/service/influence-service';
import { writeCapitals } from './helpers/corpus';
import { useTempHome } from './helpers/env';

const home = useTempHome();

describe('InfluenceService', () => {
  const data = join(home, 'train.jsonl');
  writeCapitals(data);
  const service = new InfluenceService({
    finetuned: { model: 'test/fixtures/models/llama', factors: join(home, 'factors') },
    datasets: { train: data },
    modules: 'mlp',
    cacheDir: join(home, 'cache'),
    store: { k: 4, minExamples: 0, rerank: 2 },
  });
  service.open();
  const q = { prompt: 'Q: capital of France?\nA:', completion: ' Paris', dataset: 'train', topK: 2 };

  test('before fitting, ekfac is unavailable with the reason; baselines work', async () => {
    const info = service.info();
    assert.ok(!info.methods.includes('ekfac'));
    assert.match(info.unavailable.ekfac ?? '', /run "fit"/);
    await assert.rejects(service.explain({ ...q, method: 'ekfac' }), /ekfac is unavailable/);
    const r = await service.explain({ ...q, method: 'bm25' });
    assert.equal(r.supporting[0].id.line, 2);
  });

  test('fit makes ekfac available; explain with the gradient store reranks exactly', async () => {
    const steps: string[] = [];
    await service.fit('finetuned', { progress: (m) => steps.push(m) });
    assert.ok(steps.includes('covariance') && steps.includes('lambda'));
    assert.ok(service.info().methods.includes('ekfac'));
    const viaStore = await service.explain({ ...q, method: 'ekfac' });
    const exact = await service.explain({ ...q, method: 'ekfac', candidates: 'retrieved' });
    assert.ok(viaStore.scored === 4);
    for (const e of viaStore.supporting) {
      const x = [...exact.supporting, ...exact.opposing].find((y) => y.id.hash === e.id.hash);
      if (x) assert.ok(Math.abs(x.score - e.score) <= 1e-5 * Math.abs(x.score));
    }
  });

  test('"modules" decides what every method scores: factors over other modules are refused, never put in its place', async () => {
    const all = new InfluenceService({
      finetuned: { model: 'test/fixtures/models/llama', factors: join(home, 'factors') },
      datasets: { train: data },
      modules: 'all',
      cacheDir: join(home, 'cache'),
    });
    all.open();
    const info = all.info();
    assert.ok(!info.methods.includes('ekfac'));
    assert.match(
      info.unavailable.ekfac ?? '',
      /fitted over the MLP modules, but "modules" in the server's config asks for all/,
    );
    const r = await all.explain({ ...q, method: 'gdp' });
    assert.deepEqual(r.modules, info.modules);
    assert.equal(r.modules.length, 14);
    // without a "modules" setting the factors' modules are scored (a CLI fit's default works as is)
    const unset = new InfluenceService({
      finetuned: { model: 'test/fixtures/models/llama', factors: join(home, 'factors') },
      datasets: { train: data },
      cacheDir: join(home, 'cache'),
    });
    unset.open();
    assert.ok(unset.info().methods.includes('ekfac'));
    assert.equal(unset.info().modules.length, 6);
    assert.equal((await unset.explain({ ...q, method: 'ekfac' })).modules.length, 6);
    // the mlp service (its factors fitted above) scores the 6 MLP modules with every method
    const m = await service.explain({ ...q, method: 'gdp' });
    assert.deepEqual(m.modules, service.info().modules);
    assert.equal(m.modules.length, 6);
  });

  test('bad requests get actionable errors', async () => {
    await assert.rejects(service.explain({ ...q, dataset: '../../etc/passwd', method: 'gdp' }), /unknown dataset/);
    await assert.rejects(service.explain({ ...q, method: 'magic' as 'gdp' }), /unknown method/);
    await assert.rejects(service.explain({ ...q, topK: 0, method: 'gdp' }), /topK must be an integer/);
    await assert.rejects(service.explain({ ...q, completion: 'x'.repeat(30000), method: 'gdp' }), /longer than/);
    await assert.rejects(service.explain({ ...q, method: 'multistage' }), /no pre-trained model/);
    assert.throws(() => service.getExample('train', 99), /no example at line 99/);
  });

  test('a dataset edited on disk is reloaded; one edited mid-request is reported', async () => {
    appendFileSync(data, `${JSON.stringify({ text: 'Rome is the capital of Italy.' })}\n`);
    const r = await service.explain({ ...q, method: 'gdp' });
    assert.equal(r.scored, 5);
    let edited = false;
    await assert.rejects(
      service.explain(
        { ...q, method: 'gdp', topK: 1 },
        {
          progress: () => {
            if (!edited) appendFileSync(data, `${JSON.stringify({ text: 'Madrid is in Spain.' })}\n`);
            edited = true;
          },
        },
      ),
      (e: Error) => e instanceof ServiceError && e.code === 'data_changed',
    );
    assert.equal((await service.explain({ ...q, method: 'gdp' })).scored, 6);
    // replaced by a file of the same size and mtime (an editor's save-as-rename, touch -r; mv)
    utimesSync(data, 1_700_000_000, 1_700_000_000); // a whole second: utimes keeps it exactly
    const before = service.getExample('train', 6);
    const old = statSync(data);
    const next = `${data}.next`;
    writeFileSync(next, readFileSync(data, 'utf8').replace('Madrid is in Spain.', 'Madrid is in Spaim.'));
    utimesSync(next, 1_700_000_000, 1_700_000_000);
    renameSync(next, data);
    assert.equal(statSync(data).size, old.size);
    assert.equal(statSync(data).mtimeMs, old.mtimeMs);
    const after = service.getExample('train', 6);
    assert.match(before.text, /Spain/);
    assert.match(after.text, /Spaim/, 'the new file is read');
    assert.notEqual(after.id.hash, before.id.hash);
    // rewritten in place (same inode), same size, mtime put back: only ctime tells, and the bytes decide
    const inode = statSync(data).ino;
    writeFileSync(data, readFileSync(data, 'utf8').replace('Madrid is in Spaim.', 'Madrid is in Spaiq.'));
    utimesSync(data, 1_700_000_000, 1_700_000_000);
    assert.equal(statSync(data).ino, inode);
    assert.match(service.getExample('train', 6).text, /Spaiq/);
    // a metadata-only change (chmod: ctime moves, bytes do not) keeps the loaded dataset
    const loaded = service.dataset('train');
    chmodSync(data, 0o600);
    assert.equal(service.dataset('train'), loaded, 'not reloaded for a chmod');
    assert.equal((await service.explain({ ...q, method: 'gdp' })).scored, 6);
  });

  test('getExample and scanDataset', async () => {
    const ex = service.getExample('train', 2);
    assert.equal(ex.kind, 'prompt_completion');
    assert.equal(ex.tokens.ids.length, ex.tokens.offsets.length);
    const scan = await service.scanDataset('train', 3);
    assert.equal(scan.examples.length, 3);
    assert.ok(scan.examples[0].selfInfluence >= scan.examples[2].selfInfluence);
  });

  test('cancellation stops the work', async () => {
    const ac = new AbortController();
    ac.abort();
    await assert.rejects(service.explain({ ...q, method: 'gdp' }, { signal: ac.signal }), /cancelled/);
  });
});

test('a dataset with malformed lines is scored without them, and every result says which', async () => {
  const data = join(home, 'some-bad.jsonl');
  writeFileSync(
    data,
    `${JSON.stringify({ text: 'Paris is in France.' })}\n{"text": broken\n${JSON.stringify({ txet: 'x' })}\n${JSON.stringify({ text: 'Rome is in Italy.' })}\n`,
  );
  const s = new InfluenceService({
    finetuned: { model: 'test/fixtures/models/llama' },
    datasets: { d: data },
    cacheDir: join(home, 'cache-bad'),
  });
  s.open();
  const r = await s.explain({
    prompt: 'Q: where is Paris?\nA:',
    completion: ' France',
    dataset: 'd',
    topK: 2,
    method: 'bm25',
  });
  assert.equal(r.scored, 2);
  assert.equal(r.attribution?.skipped?.count, 2);
  assert.deepEqual(
    r.attribution?.skipped?.lines.map((x) => x.line),
    [2, 3],
  );
  assert.match(
    describeAttribution(r.attribution!),
    /2 malformed line\(s\) of the dataset not scored \(lines 2, 3; line 2: /,
  );
});
