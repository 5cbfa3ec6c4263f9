// The results panel's page (media/webview.js and webview.css, as built) in Debian's chromium at
// the widths a side panel has, showing a real result of the CLI (`explain --json`): nothing may
// be cut off at the right (the example cards, their Flag buttons), and the prompt box shows the
// prompt's end, next to the completion. No editor needed: the page gets the message the
// extension posts. Screenshots go to test/e2e/screenshots/panel-<width>.png.
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { existsSync, mkdirSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { createRequire } from 'node:module';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import { test } from 'node:test';
import { pathToFileURL } from 'node:url';

const ROOT = resolve(import.meta.dirname, '../..');
const TOOLS = process.env.E2E_TOOLS ?? join(ROOT, '.cache/e2e-tools');
const SHOTS = join(import.meta.dirname, 'screenshots');
const CHROMIUM = process.env.E2E_CHROMIUM ?? '/usr/bin/chromium';

const have = existsSync(join(TOOLS, 'node_modules/playwright-core')) && existsSync(CHROMIUM);
const missing = `e2e tools missing: run bash test/e2e/install.sh (looked in ${TOOLS} and ${CHROMIUM})`;
if (!have && process.env.E2E_REQUIRED) throw new Error(missing);

interface Page {
  setViewportSize(s: { width: number; height: number }): Promise<void>;
  goto(u: string): Promise<unknown>;
  evaluate<T>(f: string): Promise<T>;
  waitForSelector(s: string, o?: object): Promise<unknown>;
  screenshot(o: { path: string; fullPage?: boolean }): Promise<Buffer>;
}

test('results panel: nothing cut off at the right in a narrow panel; the prompt box shows its end', {
  skip: have ? false : missing,
  timeout: 180000,
}, async () => {
  const T = mkdtempSync(join(tmpdir(), 'il-panel-layout-'));
  try {
    // a prompt longer than the box, so that where it is scrolled to shows
    const prompt = `${'Some background about countries and their capitals. '.repeat(12)}\nQ: What is the capital of Australia?\nA:`;
    const cli = spawnSync(
      process.execPath,
      [
        join(ROOT, 'bin/influence-lens.js'),
        'explain',
        '--model',
        join(ROOT, 'assets/default/finetuned'),
        '--data',
        join(ROOT, 'assets/default/data/finetune.jsonl'),
        '--prompt',
        prompt,
        '--completion',
        ' Sydney',
        '--method',
        'gdp',
        // other methods' ranks: the agreement badges
        '--compare',
        'cosine,repsim',
        '--top-k',
        '6',
        '--json',
      ],
      { encoding: 'utf8', env: { ...process.env, HOME: T, INFLUENCE_LENS_CACHE: join(T, 'cache') } },
    );
    assert.equal(cli.status, 0, cli.stderr);
    const result = JSON.parse(cli.stdout);
    const media = (f: string) => pathToFileURL(join(ROOT, 'media', f)).href;
    const page = join(T, 'panel.html');
    // the panel's page without its CSP (a file: page), with the webview API the script asks for
    writeFileSync(
      page,
      `<!DOCTYPE html><html><head><meta charset="UTF-8"><link rel="stylesheet" href="${media('webview.css')}"></head>
<body><main id="app"></main>
<script>window.acquireVsCodeApi = () => ({ postMessage() {}, getState() { return undefined; }, setState() {} });</script>
<script src="${media('webview.js')}"></script></body></html>`,
    );
    const req = createRequire(join(TOOLS, 'package.json'));
    const { chromium } = req('playwright-core') as {
      chromium: {
        launch(o: object): Promise<{ newPage(): Promise<Page>; close(): Promise<void> }>;
      };
    };
    const browser = await chromium.launch({
      executablePath: CHROMIUM,
      headless: true,
      args: ['--no-sandbox', '--disable-gpu'],
    });
    try {
      const p = await browser.newPage();
      mkdirSync(SHOTS, { recursive: true });
      for (const width of [280, 420, 1000]) {
        await p.setViewportSize({ width, height: 900 });
        await p.goto(pathToFileURL(page).href);
        await p.evaluate(
          `window.postMessage(${JSON.stringify({ type: 'result', result, methods: ['gdp', 'bm25'], dataset: 'finetune', context: 'c' })}, '*')`,
        );
        await p.waitForSelector('.lists li');
        await p.screenshot({ path: join(SHOTS, `panel-${width}.png`), fullPage: true });
        // every card and button inside the page's width (a horizontal scroll hides the Flag buttons)
        const over = await p.evaluate<string[]>(`(() => {
          const w = document.documentElement.clientWidth;
          return [...document.querySelectorAll('.lists li, .lists button')]
            .filter((e) => e.getBoundingClientRect().right > w + 0.5)
            .map((e) => e.tagName + ' ' + (e.textContent || '').trim().slice(0, 30) + ' right ' + Math.round(e.getBoundingClientRect().right));
        })()`);
        assert.deepEqual(over, [], `at ${width} px, cut off at the right (page ${width} px wide)`);
        const wide = await p.evaluate<number>('document.documentElement.scrollWidth');
        const widest = await p.evaluate<string[]>(`(() => {
          const w = document.documentElement.clientWidth;
          return [...document.querySelectorAll('body *')]
            .filter((e) => e.getBoundingClientRect().right > w + 0.5)
            .slice(0, 5)
            .map((e) => e.tagName + '.' + e.className + ' right ' + Math.round(e.getBoundingClientRect().right));
        })()`);
        assert.ok(wide <= width, `at ${width} px the page scrolls sideways (${wide} px wide: ${widest.join('; ')})`);
        // the prompt box shows its end: the last characters ("A:", next to the completion) lie
        // inside the box's visible part, not below it
        const end = await p.evaluate<{ overflow: boolean; visible: boolean }>(`(() => {
          const b = document.querySelector('header.query .prompt');
          const walker = document.createTreeWalker(b, NodeFilter.SHOW_TEXT);
          let last = null;
          while (walker.nextNode()) last = walker.currentNode;
          const r = document.createRange();
          r.setStart(last, last.length - 2);
          r.setEnd(last, last.length);
          const at = r.getBoundingClientRect();
          const box = b.getBoundingClientRect();
          return { overflow: b.scrollHeight > b.clientHeight, visible: at.top >= box.top - 0.5 && at.bottom <= box.bottom + 0.5 };
        })()`);
        assert.ok(end.overflow, 'the prompt is longer than its box');
        assert.ok(end.visible, `at ${width} px the prompt box hides the prompt's end`);
      }
      // agreement badges agree with the row's own list: a supporting row where the other method
      // ranks it in its top K, an opposing row where a signed method ranks it among its K most
      // opposing (bottom K), never where that method calls it supporting; a similarity method
      // (RepSim) has no opposing side. Ranks set by hand on the real result: the most opposing
      // under cosine, the top under cosine, the bottom under RepSim.
      const n = result.scored as number;
      const doctored = structuredClone(result);
      const [o1, o2, o3] = doctored.opposing;
      // cosine scores only 3 examples below 0: its rank n − 5 is near the bottom but supporting
      doctored.otherOpposing = { cosine: 3 };
      o3.otherRanks = { cosine: n - 5 };
      const [s1] = doctored.supporting;
      doctored.warnings = ["the finetuned model's EK-FAC factors were fitted on other data than its fit dataset"];
      o1.otherRanks = { cosine: n, repsim: n };
      o2.otherRanks = { cosine: 1, repsim: 1 };
      s1.otherRanks = { cosine: n, repsim: 1 };
      await p.evaluate(
        `window.postMessage(${JSON.stringify({ type: 'result', result: doctored, methods: ['gdp'], dataset: 'finetune', context: 'd' })}, '*')`,
      );
      await p.waitForSelector('.lists li .badge');
      const agreeing = await p.evaluate<Record<string, string[]>>(`(() => {
        const out = {};
        for (const li of document.querySelectorAll('.lists li.example')) {
          const line = /line (\\d+)/.exec(li.getAttribute('aria-label'))[1];
          out[line] = [...li.querySelectorAll('.badge.agree')].map((b) => b.textContent);
        }
        return out;
      })()`);
      // a result's warnings are shown with it
      const shownWarning = await p.evaluate<string>(
        `document.querySelector('header.query .result-warning')?.textContent ?? ''`,
      );
      assert.match(shownWarning, /fitted on other data than its fit dataset/);
      // a chat query says how it was rendered
      await p.evaluate(
        `window.postMessage(${JSON.stringify({ type: 'result', result: { ...doctored, query: { ...doctored.query, rendering: 'chat_template' } }, methods: ['gdp'], dataset: 'finetune', context: 'e' })}, '*')`,
      );
      await p.waitForSelector('.lists li .badge');
      assert.match(
        await p.evaluate<string>(`document.querySelector('header.query .meta').textContent`),
        /a chat, rendered with the model's chat template \(its last assistant turn explained\)/,
      );
      // a kept result shown with no server to check it says so on its tab, until a result replaces it
      await p.evaluate(
        `window.postMessage(${JSON.stringify({ type: 'notice', method: 'gdp', message: 'Kept from an earlier explanation and not checked' })}, '*')`,
      );
      await p.waitForSelector('.status.notice');
      assert.match(await p.evaluate<string>(`document.querySelector('.status').textContent`), /not checked/);
      await p.evaluate(
        `window.postMessage(${JSON.stringify({ type: 'result', result: doctored, methods: ['gdp'], dataset: 'finetune', context: 'e' })}, '*')`,
      );
      await p.waitForSelector('.status:not(.notice)');
      assert.equal(await p.evaluate<string>(`document.querySelector('.status').textContent`), '');
      assert.deepEqual(
        agreeing[o1.id.line],
        ['Gradient cosine #' + n],
        'most opposing under cosine: agrees; RepSim has no opposing side',
      );
      assert.deepEqual(agreeing[o2.id.line], [], 'an opposing row that cosine ranks #1 (supporting) does not agree');
      assert.deepEqual(agreeing[o3.id.line], [], 'nor one that cosine scores above 0 though near its bottom');
      assert.deepEqual(
        agreeing[s1.id.line],
        ['RepSim #1'],
        'a supporting row agrees where ranked in the top, not the bottom',
      );
    } finally {
      await browser.close();
    }
  } finally {
    rmSync(T, { recursive: true, force: true });
  }
});
