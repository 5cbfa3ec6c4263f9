// Where a dataset id's file is, when the server's own path is not on this machine (a container,
// a remote, another checkout): the workspace file named <id>.jsonl, only when there is one. With a
// backup beside the real file, the first hit of the search used to be taken: a flag from the
// results panel then went beside the backup, and exporting the file the server scored kept it.
import assert from 'node:assert/strict';
import { mkdirSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterEach, beforeEach, test } from 'node:test';
import { fake, loadWithVscodeStub } from './helpers/vscode-stub';

type DatasetsModule = typeof import('../../src/extension/datasets');
const { DatasetResolver } = await loadWithVscodeStub<DatasetsModule>(
  new URL('../../src/extension/datasets.ts', import.meta.url),
);

let dir: string;
beforeEach(() => {
  fake.reset();
  dir = mkdtempSync(join(tmpdir(), 'il-datasets-'));
  fake.workspaceFolder = dir;
  mkdirSync(join(dir, 'data'));
  writeFileSync(join(dir, 'data/train.jsonl'), '{"text": "scored"}\n');
});
afterEach(() => rmSync(dir, { recursive: true, force: true }));

const info = () => ({ datasetPaths: { train: '/srv/data/train.jsonl' } }) as never;

test("one workspace file of the dataset's name is found when the server's path is not on this machine", async () => {
  // the cleaned copy and the flags file beside it are not candidates
  writeFileSync(join(dir, 'data/train.cleaned.jsonl'), '{"text": "scored"}\n');
  writeFileSync(join(dir, 'data/train.exclude.jsonl'), '');
  assert.equal(await new DatasetResolver(info).require('train'), join(dir, 'data/train.jsonl'));
});

test('two workspace files of that name: none is picked; the error lists both and the setting that decides', async () => {
  mkdirSync(join(dir, 'backup'));
  writeFileSync(join(dir, 'backup/train.jsonl'), '{"text": "last month"}\n');
  const r = new DatasetResolver(info);
  await assert.rejects(
    r.require('train'),
    /2 files in the workspace could hold dataset "train" \(backup\/train\.jsonl, data\/train\.jsonl\), and the server's \/srv\/data\/train\.jsonl is not on this machine: name the one the server reads in the setting influenceLens\.datasets/,
  );
  // the setting decides
  fake.config['datasets'] = { train: 'data/train.jsonl' };
  assert.equal(await r.require('train'), join(dir, 'data/train.jsonl'));
});
