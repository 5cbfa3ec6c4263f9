// Factors carry the version of the fit that wrote them (FIT_VERSION). An earlier version's fit
// computes other factors for the same model, data and settings (sampled labels were drawn per
// batch before version 2: the same seed gave other labels), and its arguments file says nothing
// else that differs: such factors are refused where a person named the folder, fitted again where
// the folder is a cache, and never used as if current. Another tool's factors (kronfluence's) have
// no version of ours and stay usable.
import assert from 'node:assert/strict';
import { cpSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { test } from 'node:test';
import { FIT_VERSION, loadFactors, saveFactors } from '../../src/server/attribution/ekfac/factors-io';
import { runFitJob } from '../../src/server/attribution/fit-job';
import { openStage } from '../../src/server/attribution/stage';
import { writeJsonl } from './helpers/corpus';
import { useTempHome } from './helpers/env';

const home = useTempHome();
const LLAMA = 'test/fixtures/models/llama';

/** `dir`'s factors as a version before FIT_VERSION was stored wrote them (no fitVersion anywhere). */
function asEarlierVersion(dir: string, out: string): void {
  const f = loadFactors(dir);
  const { fitVersion: _, ...args } = f.args;
  saveFactors(out, { ...f, args });
}

test('factors of an earlier fit version are refused by name, refitted as a cache, and kronfluence factors still open', async () => {
  const data = writeJsonl(join(home, 'v.jsonl'), [
    { text: 'Paris is the capital of France.' },
    { text: 'Rome is the capital of Italy.' },
    { text: 'Madrid is the capital of Spain.' },
  ]);
  const fit = (out: string, replaceStale?: boolean) =>
    runFitJob({ modelDir: LLAMA, dataPath: data, out, modules: 'mlp', labels: 'sampled', seed: 0, replaceStale });
  const now = join(home, 'now');
  await fit(now);
  assert.equal(loadFactors(now).args.fitVersion, FIT_VERSION);
  assert.ok(openStage(LLAMA, now), "this version's factors open");

  const earlier = join(home, 'earlier');
  asEarlierVersion(now, earlier);
  assert.equal(loadFactors(earlier).args.fitVersion, 1, 'no version stored: version 1');
  assert.throws(
    () => openStage(LLAMA, earlier),
    /the factors in .*earlier were fitted by an earlier version of influence-lens, whose factors differ from this version's for the same model, data and settings \(fit version 1, this version fits version 2: since then sampled labels are drawn per example\): fit them again/,
  );
  // a folder the person named is not refitted behind their back: the fit says why it stops
  await assert.rejects(
    fit(earlier),
    /already holds factors fitted on an earlier version of this program's fit \(fit version 1, this version fits version 2/,
  );
  // a folder the program owns as a cache (the server's, the demo's) is fitted again
  const log: string[] = [];
  const r = await runFitJob({
    modelDir: LLAMA,
    dataPath: data,
    out: earlier,
    modules: 'mlp',
    labels: 'sampled',
    seed: 0,
    replaceStale: true,
    log: (l) => log.push(l),
  });
  assert.equal(r.status, 'done');
  assert.ok(
    log.some((l) => /are for an earlier version of this program's fit .*: fitting them again/.test(l)),
    log.join('\n'),
  );
  assert.equal(loadFactors(earlier).args.fitVersion, FIT_VERSION);
  assert.ok(openStage(LLAMA, earlier));

  // a later version's factors (a downgrade) are refused too
  const later = join(home, 'later');
  const f = loadFactors(now);
  saveFactors(later, { ...f, args: { ...f.args, fitVersion: FIT_VERSION + 1 } });
  assert.throws(() => openStage(LLAMA, later), /fitted by a later version of influence-lens/);
  // a fit version that is not one is refused as unreadable
  const file = join(now, 'influence_lens_arguments.json');
  writeFileSync(file, readFileSync(file, 'utf8').replace(`"fitVersion": ${FIT_VERSION}`, '"fitVersion": "2"'));
  assert.throws(() => loadFactors(now), /holds "fitVersion": "2", which is not a fit version/);

  // kronfluence's own factors: no version of ours, used as they are
  const kron = join(home, 'kron');
  cpSync('test/fixtures/kronfluence/llama/factors_ekfac', kron, { recursive: true });
  assert.equal(loadFactors(kron).args.fitVersion, null);
  assert.ok(openStage(LLAMA, kron).warnings.length > 0, 'opened, with its warning that it cannot be checked');
  rmSync(kron, { recursive: true });
});

test('config.json rewritten with the same content (CRLF line endings, another key order, 2.0 for 2) keeps its factors', async () => {
  const { cpSync: cp } = await import('node:fs');
  const model = join(home, 'crlf-model');
  cp(LLAMA, model, { recursive: true });
  const data = writeJsonl(join(home, 'crlf.jsonl'), [{ text: 'Paris is the capital of France.' }]);
  const out = join(home, 'crlf-factors');
  await runFitJob({ modelDir: model, dataPath: data, out, modules: 'mlp', labels: 'empirical', seed: 0 });
  const file = join(model, 'config.json');
  const cfg = JSON.parse(readFileSync(file, 'utf8'));
  const reordered = Object.fromEntries(Object.entries(cfg).reverse());
  const text = JSON.stringify(reordered, null, 4)
    .replace(`"num_hidden_layers": ${cfg.num_hidden_layers}`, `"num_hidden_layers": ${cfg.num_hidden_layers}.0`)
    .replaceAll('\n', '\r\n');
  assert.match(text, /\.0/);
  writeFileSync(file, text);
  assert.ok(openStage(model, out), 'the same model: its factors open');
  // a change of content is another model
  writeFileSync(file, JSON.stringify({ ...cfg, rms_norm_eps: (cfg.rms_norm_eps ?? 1e-6) * 2 }));
  assert.throws(() => openStage(model, out), /were fitted on another model/);
});

test('an unfinished fit of an earlier version is not offered to be finished: this version cannot', async () => {
  const { mkdirSync: mk } = await import('node:fs');
  const data = writeJsonl(join(home, 'unfinished.jsonl'), [{ text: 'Paris is the capital of France.' }]);
  const out = join(home, 'unfinished');
  const fit = () => runFitJob({ modelDir: LLAMA, dataPath: data, out, modules: 'mlp', labels: 'empirical', seed: 0 });
  await fit();
  // what a fit killed midway by an earlier version left: its job description, without fitVersion
  const args = JSON.parse(readFileSync(join(out, 'influence_lens_arguments.json'), 'utf8'));
  rmSync(out, { recursive: true });
  mk(join(out, 'partials'), { recursive: true });
  const job = {
    modelFingerprint: args.modelFingerprint,
    dataFingerprint: args.dataFingerprint,
    modules: 'mlp',
    labels: 'empirical',
    seed: 0,
    maxExamples: null,
    partitions: 1,
  };
  writeFileSync(join(out, 'partials', 'job.json'), JSON.stringify(job, null, 2));
  await assert.rejects(
    fit(),
    /holds an unfinished fit of another version of influence-lens \(fit version 1, this version fits 2\), which this version cannot finish: delete .*partials to start over/,
  );
});
