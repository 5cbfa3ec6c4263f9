// The results panel's HTML and CSP, and the test-only fixture client the e2e test drives.
import assert from 'node:assert/strict';
import { join } from 'node:path';
import { test } from 'node:test';
import { FixtureClient } from '../../src/extension/client/fixture-client';
import { contentSecurityPolicy, makeNonce, panelHtml } from '../../src/extension/views/panel-html';

const never = { isCancellationRequested: false, onCancellationRequested: () => ({ dispose() {} }) };

test('panel: strict CSP with a fresh nonce; one script, no inline code or styles', () => {
  const a = makeNonce();
  const b = makeNonce();
  assert.notEqual(a, b);
  assert.match(a, /^[A-Za-z0-9]{20,}$/);
  const csp = contentSecurityPolicy('https://x.vscode-cdn.net', a);
  assert.match(csp, /^default-src 'none'/);
  assert.match(csp, new RegExp(`script-src 'nonce-${a}'`));
  assert.doesNotMatch(csp, /unsafe-inline|unsafe-eval|\*/);
  const html = panelHtml({
    cspSource: 'https://x.vscode-cdn.net',
    scriptUri: 'https://x/webview.js?a=1&b="2"',
    styleUri: 'https://x/webview.css',
    nonce: a,
  });
  assert.equal((html.match(/<script/g) ?? []).length, 1);
  assert.match(html, new RegExp(`<script nonce="${a}" src="https://x/webview.js\\?a=1&amp;b=&quot;2&quot;"></script>`));
  assert.doesNotMatch(html, /style=|<style|onclick|javascript:/);
});

test('fixture client (test only): answers its own query, refuses any other split', async () => {
  const c = new FixtureClient(join(import.meta.dirname, '../fixtures/e2e/explain-results.fixture.json'), 1);
  const info = await c.info();
  assert.deepEqual(info.datasets, ['finetune']);
  assert.ok(info.methods.includes('ekfac'));
  const partials: number[] = [];
  const q = { prompt: 'Q: What is the capital of Australia?\nA:', completion: ' Sydney', dataset: 'finetune', topK: 5 };
  const r = await c.explain({ ...q, method: 'ekfac' }, (p) => partials.push(p.scored), never);
  assert.equal(r.supporting.length, 5);
  assert.equal(r.supporting[0].id.line, 237);
  assert.ok(partials.length >= 2 && partials[0] < partials[1]);
  await assert.rejects(
    c.explain({ ...q, completion: ' Sydney\n', method: 'ekfac' }, () => {}, never),
    /answers only/,
  );
  await assert.rejects(
    c.explain({ ...q, method: 'multistage' }, () => {}, never),
    /no multistage/,
  );
  const cancelled = { isCancellationRequested: true, onCancellationRequested: () => ({ dispose() {} }) };
  await assert.rejects(
    c.explain({ ...q, method: 'ekfac' }, () => {}, cancelled),
    /cancelled/,
  );
  const g = await c.generate({ prompt: q.prompt }, never);
  assert.equal(g.completion, ' Sydney');
});
