// The local server's setup is the workspace folder's influence-lens.json when there is one: a file
// written (or removed) after that server started makes the extension start it again, instead of
// leaving the embedded default's explanations standing in for the configured model's.
import assert from 'node:assert/strict';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterEach, beforeEach, test } from 'node:test';
import { fake, loadWithVscodeStub, Uri } from './helpers/vscode-stub';

type ClientModule = typeof import('../../src/extension/client/index');
const { watchWorkspaceConfig } = await loadWithVscodeStub<ClientModule>(
  new URL('../../src/extension/client/index.ts', import.meta.url),
);

let dir: string;
beforeEach(() => {
  fake.reset();
  dir = mkdtempSync(join(tmpdir(), 'il-srvcfg-'));
  fake.workspaceFolder = dir;
});
afterEach(() => rmSync(dir, { recursive: true, force: true }));

test('influence-lens.json created or deleted in the workspace folder restarts the local server; elsewhere, or with server.url / server.config set, nothing', () => {
  let restarts = 0;
  const d = watchWorkspaceConfig(() => restarts++);
  const w = fake.watchers.find((x) => x.glob.endsWith('influence-lens.json'));
  assert.ok(w, 'no watcher on influence-lens.json');
  w.create.fire(Uri.file(join(dir, 'influence-lens.json')));
  assert.equal(restarts, 1);
  w.delete.fire(Uri.file(join(dir, 'influence-lens.json')));
  assert.equal(restarts, 2);
  // another folder's file is not the local server's setup
  w.create.fire(Uri.file(join(dir, 'sub', 'influence-lens.json')));
  assert.equal(restarts, 2);
  // a setting chooses the server: the workspace's file does not
  fake.config['server.config'] = 'other.json';
  w.create.fire(Uri.file(join(dir, 'influence-lens.json')));
  fake.config['server.config'] = '';
  fake.config['server.url'] = 'ws://127.0.0.1:7070';
  w.create.fire(Uri.file(join(dir, 'influence-lens.json')));
  assert.equal(restarts, 2);
  d.dispose();
});
