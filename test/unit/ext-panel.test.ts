// The results panel's HTML and CSP.
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { contentSecurityPolicy, makeNonce, panelHtml } from '../../src/extension/views/panel-html';

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

test('panel: a new result keeps the other methods only when computed in the same context', async () => {
  const { withResult } = await import('../../src/webview/messages');
  const result = (method: 'ekfac' | 'bm25', prompt = 'p') =>
    ({ method, query: { prompt, completion: 'c' } }) as unknown as import('../../src/protocol/types').ExplainResult;
  const empty = { version: 1 as const, results: {}, methods: [], flags: {} };
  const msg = (method: 'ekfac' | 'bm25', context: string, dataset = 'finetune') => ({
    type: 'result' as const,
    result: result(method),
    methods: ['ekfac', 'bm25'] as Array<'ekfac' | 'bm25'>,
    dataset,
    context,
  });
  const one = withResult(empty, msg('ekfac', 'A'));
  assert.deepEqual(Object.keys(one.results), ['ekfac']);
  // same query, dataset file, model and settings: both methods shown
  assert.deepEqual(Object.keys(withResult(one, msg('bm25', 'A')).results).sort(), ['bm25', 'ekfac']);
  // the dataset file or the model changed (another context): the old method's result is dropped
  assert.deepEqual(Object.keys(withResult(one, msg('bm25', 'B')).results), ['bm25']);
  assert.deepEqual(Object.keys(withResult(one, msg('bm25', 'A', 'other')).results), ['bm25']);
  // a state saved before contexts existed keeps nothing
  assert.deepEqual(Object.keys(withResult({ ...one, context: undefined }, msg('bm25', 'A')).results), ['bm25']);
  assert.equal(withResult(one, msg('bm25', 'B')).context, 'B');
  // a result shows its tab (a run starts on its own tab)...
  assert.equal(withResult({ ...one, method: 'bm25' }, msg('bm25', 'A')).method, 'bm25');
  // ...but one that arrives after the person chose another tab with a kept result stays in the
  // background, in the same context: BM25 was running, EK-FAC's kept result was chosen meanwhile
  const running = { ...withResult(one, msg('bm25', 'A')), method: 'ekfac' as const };
  const done = withResult(running, msg('bm25', 'A'));
  assert.equal(done.method, 'ekfac');
  assert.deepEqual(Object.keys(done.results).sort(), ['bm25', 'ekfac']);
  // in another context the new result is all there is: shown
  assert.equal(withResult(running, msg('bm25', 'B')).method, 'bm25');
});
