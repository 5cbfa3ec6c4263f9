// --checkpoints on the command line and the "checkpoints" key of influence-lens.json, on a real
// transformers Trainer output_dir (test/fixtures/trainer_run: the final model with checkpoint-3/
// and checkpoint-6/ inside). "auto" (the default) sums over the checkpoints; "off" must really
// score the final model alone, in the CLI and in the server.
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { cpSync, existsSync, readdirSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { describe, test } from 'node:test';
import { Explain } from '../../src/protocol/requests';
import type { ExplainResult } from '../../src/protocol/types';
import { ConfigFileError, parseConfig } from '../../src/server/service/config';
import { InfluenceService } from '../../src/server/service/influence-service';
import { RpcClient } from '../../src/transport/client';
import { cliIn } from './helpers/cli';
import { useTempHome } from './helpers/env';

const home = useTempHome();
const RUN = 'test/fixtures/trainer_run';
const DATA = join(RUN, 'train.jsonl');
const Q = ['--prompt', 'The capital of France is', '--completion', ' Paris.'];

const cli = cliIn(home);

const explainJson = (...extra: string[]) => {
  const r = cli('explain', '--model', RUN, '--data', DATA, ...Q, '--top-k', '8', '--json', ...extra);
  assert.equal(r.code, 0, r.err);
  return { result: JSON.parse(r.out) as ExplainResult, err: r.err };
};
const scores = (r: ExplainResult) =>
  Object.fromEntries([...r.supporting, ...r.opposing].map((e) => [e.id.line, e.score]));

describe('influence-lens --checkpoints', () => {
  const factors = join(home, 'factors');
  const finalOnly = join(home, 'factors-final-only');

  test('explain: auto (the default) sums over checkpoint-3 and checkpoint-6; off scores the final model alone', () => {
    const auto = explainJson('--method', 'gdp');
    assert.match(
      auto.err,
      /summing over 2 training checkpoint\(s\), weighted by learning rate: checkpoint-3 ×0\.\d+ \(lr [\d.]+e-\d+\), checkpoint-6/,
    );
    assert.equal(auto.result.attribution?.over, 'checkpoints');
    assert.deepEqual(
      auto.result.attribution?.checkpoints?.map((c) => [c.name, c.step]),
      [
        ['checkpoint-3', 3],
        ['checkpoint-6', 6],
      ],
    );
    // a method that does not sum over them is not announced as summing
    const cosine = explainJson('--method', 'cosine');
    assert.doesNotMatch(cosine.err, /summing over/);
    assert.match(cosine.err, /2 training checkpoint\(s\) found; cosine scores the final model alone/);
    // BM25 reads the text alone: no line about models
    assert.doesNotMatch(explainJson('--method', 'bm25').err, /checkpoint/);
    const off = explainJson('--method', 'gdp', '--checkpoints', 'off');
    assert.deepEqual(off.result.attribution, { method: 'gdp', over: 'final-model' });
    assert.doesNotMatch(off.err, /summing over/);
    const a = scores(auto.result);
    const o = scores(off.result);
    assert.ok(
      Object.keys(a).some((k) => Math.abs(a[k] - o[k]) > 1e-6 * Math.abs(o[k])),
      'off gives other scores',
    );
  });

  test('explain: a list of folders is used as given (one checkpoint weighs 1)', () => {
    const { result } = explainJson('--method', 'gdp', '--checkpoints', join(RUN, 'checkpoint-3'));
    assert.deepEqual(
      result.attribution?.checkpoints?.map(({ name, step, weight }) => ({ name, step, weight })),
      [{ name: 'checkpoint-3', step: 3, weight: 1 }],
    );
    assert.ok(result.attribution!.checkpoints![0].learningRate! > 0);
  });

  test('fit fits every checkpoint; explain ekfac then says which checkpoints made the scores', () => {
    const f = cli('fit', '--model', RUN, '--data', DATA, '--out', factors);
    assert.equal(f.code, 0, f.err);
    assert.match(f.out, /checkpoint-3: wrote EK-FAC factors/);
    assert.match(f.out, /checkpoint-6: wrote EK-FAC factors/);
    assert.equal(readdirSync(join(factors, 'checkpoints')).length, 2);
    const again = cli('fit', '--model', RUN, '--data', DATA, '--out', factors);
    assert.match(again.out, /checkpoint-3: .*already holds factors/);
    const text = cli('explain', '--model', RUN, '--data', DATA, ...Q, '--factors', factors);
    assert.equal(text.code, 0, text.err);
    assert.match(text.out, /method: ekfac/);
    assert.match(
      text.out,
      /scores: Σ over 2 training checkpoint\(s\) \(checkpoint-3 ×0\.\d+ \(lr [\d.]+e-\d+\), checkpoint-6 ×0\.\d+ \(lr [\d.]+e-\d+\); learning-rate weights\)/,
    );
    const scan = cli('scan', '--model', RUN, '--data', DATA, '--factors', factors, '--json');
    assert.equal(scan.code, 0, scan.err);
    assert.equal(JSON.parse(scan.out).attribution.over, 'checkpoints');
    const scanText = cli('scan', '--model', RUN, '--data', DATA, '--factors', factors);
    assert.match(scanText.out, /scores: Σ over 2 training checkpoint\(s\)/);
    const scanOff = cli('scan', '--model', RUN, '--data', DATA, '--factors', factors, '--checkpoints', 'off');
    assert.match(scanOff.out, /scores: final model/);
  });

  test('fit --checkpoints off fits the final model only; explain ekfac then refuses in one line until told off', () => {
    const f = cli('fit', '--model', RUN, '--data', DATA, '--out', finalOnly, '--checkpoints', 'off');
    assert.equal(f.code, 0, f.err);
    assert.equal(existsSync(join(finalOnly, 'checkpoints')), false);
    const refused = cli('explain', '--model', RUN, '--data', DATA, ...Q, '--factors', finalOnly);
    assert.notEqual(refused.code, 0);
    assert.match(
      refused.err,
      /checkpoint-3, checkpoint-6 have no EK-FAC factors yet \(or factors fitted under another training convention or over other modules\); fit them with: influence-lens fit .* or pass --checkpoints off/,
    );
    assert.equal(refused.err.trim().split('\n').length, 2, refused.err); // the plan line + the error
    const off = cli('explain', '--model', RUN, '--data', DATA, ...Q, '--factors', finalOnly, '--checkpoints', 'off');
    assert.equal(off.code, 0, off.err);
    assert.match(off.out, /scores: final model/);
  });
});

describe('influence-lens.json "checkpoints"', () => {
  const raw = (extra: Record<string, unknown>) => ({
    models: { model: RUN, ...extra },
    datasets: { train: DATA },
  });
  const service = (extra: Record<string, unknown>) => {
    const s = new InfluenceService(parseConfig(raw(extra), { baseDir: process.cwd() }).service);
    s.open();
    return s;
  };
  const ask = { dataset: 'train', prompt: 'The capital of France is', completion: ' Paris.', topK: 8 };

  test('absent: auto; "off": the final model alone; a list: those folders', async () => {
    const auto = await service({}).explain({ ...ask, method: 'gdp' });
    assert.equal(auto.attribution?.over, 'checkpoints');
    const off = await service({ checkpoints: 'off' }).explain({ ...ask, method: 'gdp' });
    assert.deepEqual(off.attribution, { method: 'gdp', over: 'final-model' });
    const one = await service({ checkpoints: [`${RUN}/checkpoint-6`] }).explain({ ...ask, method: 'gdp' });
    assert.deepEqual(
      one.attribution?.checkpoints?.map(({ name, step, weight }) => ({ name, step, weight })),
      [{ name: 'checkpoint-6', step: 6, weight: 1 }],
    );
  });

  test('the fit request fits every checkpoint; ekfac then sums over them (and waits for them before)', async () => {
    const factors = join(home, 'service-factors');
    const s = service({ factors });
    await s.fit('finetuned');
    assert.equal(readdirSync(join(factors, 'checkpoints')).length, 2);
    assert.ok(s.info().methods.includes('ekfac'));
    const r = await s.explain({ ...ask, method: 'ekfac' });
    assert.equal(r.attribution?.over, 'checkpoints');
    // the same final factors, with a checkpoint list whose factors are not fitted: ekfac waits for "fit"
    cpSync(join(RUN, 'checkpoint-6'), join(home, 'copy-6'), { recursive: true });
    const other = service({ factors, checkpoints: [`${RUN}/checkpoint-3`, `${join(home, 'copy-6')}`] });
    assert.match(String(other.info().unavailable.ekfac), /copy-6 have no EK-FAC factors yet: run "fit"/);
  });

  test('a pre-trained stage cannot name checkpoints (it would be ignored)', () => {
    assert.throws(
      () =>
        parseConfig(
          {
            models: { finetuned: { model: RUN }, pretrained: { model: RUN, checkpoints: 'off' } },
            datasets: { t: DATA },
          },
          { baseDir: '/' },
        ),
      (e: Error) => e instanceof ConfigFileError && /models\.pretrained\.checkpoints/.test(e.message),
    );
  });

  test('a value that is neither auto, off nor a list is refused by the schema', () => {
    assert.throws(() => parseConfig(raw({ checkpoints: 'sometimes' }), { baseDir: '/' }), ConfigFileError);
  });
});

describe('serve --checkpoints', () => {
  const TOKEN = 'a-token-of-at-least-16-characters';
  /** Starts `serve` on the Trainer run, asks one gdp explain over RPC, stops it; returns the result's attribution. */
  async function served(...flags: string[]) {
    const cfg = join(home, 'serve.json');
    writeFileSync(
      cfg,
      JSON.stringify({ models: { model: join(process.cwd(), RUN) }, datasets: { train: join(process.cwd(), DATA) } }),
    );
    const serve = spawn(
      process.execPath,
      ['--import', 'tsx', 'src/server/cli.ts', 'serve', '--config', cfg, '--port', '0', '--no-discovery', ...flags],
      { env: { ...process.env, HOME: home, INFLUENCE_LENS_TOKEN: TOKEN } },
    );
    let out = '';
    let err = '';
    serve.stdout.on('data', (d) => {
      out += d;
    });
    serve.stderr.on('data', (d) => {
      err += d;
    });
    const exited = new Promise<number | null>((res) => serve.on('exit', (code) => res(code)));
    try {
      for (let waited = 0; !/influence-lens server on (ws:\S+)/.test(out); waited += 100) {
        const code = await Promise.race([exited, new Promise((r) => setTimeout(r, 100, 'waiting'))]);
        assert.equal(code, 'waiting', `serve exited (${code}) before listening:\n${err}`);
        assert.ok(waited < 120_000, `serve did not start in 120 s:\n${err}`);
      }
      const url = /influence-lens server on (ws:\S+)/.exec(out)![1];
      const client = await RpcClient.connect({ url, token: TOKEN });
      try {
        const r = await client.request(Explain, {
          dataset: 'train',
          prompt: 'The capital of France is',
          completion: ' Paris.',
          method: 'gdp',
          topK: 3,
        });
        return r.attribution;
      } finally {
        await client.close();
      }
    } finally {
      serve.kill('SIGTERM');
      await exited;
    }
  }

  test('the default sums over the checkpoints; --checkpoints off overrides the config to the final model', async () => {
    assert.equal((await served())?.over, 'checkpoints');
    assert.deepEqual(await served('--checkpoints', 'off'), { method: 'gdp', over: 'final-model' });
  });
});
