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
