// End to end in a real editor: code-server 4.100.3 (VS Code 1.100.3) with the packaged extension,
// driven by playwright-core with Debian's chromium (recipe: test/e2e/install.sh). The workspace holds a copy of the embedded default's
// fine-tuning data, an influence-lens.json that points at it and at the embedded fine-tuned
// model, and a question the model answers wrongly. The extension starts the real server itself
// (influence-lens serve, from this checkout's bin/) — nothing is canned.
//
// Steps: select " Sydney" → "Explain this completion" from the palette → EK-FAC needs factors:
// "Fit factors now" (progress notification) → the panel lists the planted example (line 237)
// among the supporting examples, with heatmaps → flag it → the sidecar has it and the Flagged
// examples view shows it → "Export cleaned dataset" → hover line 237 of the dataset → switch the
// panel to BM25 → reload the window: the panel comes back → a light theme.
// Screenshots go to test/e2e/screenshots/ (git-ignored; CI keeps them as artifacts).
//
//   bash test/e2e/install.sh && npm run test:e2e        (E2E_KEEP=1 keeps the temp folder)
// `npm test` runs it too when the tools are installed; E2E_REQUIRED=1 (CI) fails instead of skipping.
import assert from 'node:assert/strict';
import { type ChildProcess, spawn, spawnSync } from 'node:child_process';
import { copyFileSync, existsSync, mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { createRequire } from 'node:module';
import { createServer } from 'node:net';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import { after, before, test } from 'node:test';
import { packageVsix } from '../../scripts/package-vsix';

const ROOT = resolve(import.meta.dirname, '../..');
const TOOLS = process.env.E2E_TOOLS ?? join(ROOT, '.cache/e2e-tools');
const SHOTS = join(import.meta.dirname, 'screenshots');
const PLANTED = { line: 237, hash: 'fa581d0ee93201d7' };
const CHROMIUM = process.env.E2E_CHROMIUM ?? '/usr/bin/chromium';

// playwright-core's types are not a project dependency: the little used here
interface Locator {
  click(o?: object): Promise<void>;
  first(): Locator;
  nth(i: number): Locator;
  locator(s: string, o?: { hasText?: string | RegExp }): Locator;
  getByText(t: string | RegExp): Locator;
  waitFor(o?: { state?: string; timeout?: number }): Promise<void>;
  count(): Promise<number>;
  textContent(): Promise<string | null>;
  innerText(): Promise<string>;
  getAttribute(n: string): Promise<string | null>;
  scrollIntoViewIfNeeded(): Promise<void>;
  screenshot(o: { path: string }): Promise<Buffer>;
  fill(v: string): Promise<void>;
  press(k: string): Promise<void>;
  hover(): Promise<void>;
}
interface FrameLocator {
  locator(s: string, o?: { hasText?: string | RegExp }): Locator;
  frameLocator(s: string): FrameLocator;
}
interface Page {
  goto(u: string, o?: object): Promise<unknown>;
  reload(o?: object): Promise<unknown>;
  locator(s: string, o?: { hasText?: string | RegExp }): Locator;
  frameLocator(s: string): FrameLocator;
  keyboard: { press(k: string): Promise<void>; type(t: string): Promise<void> };
  screenshot(o: { path: string; fullPage?: boolean }): Promise<Buffer>;
  waitForTimeout(ms: number): Promise<void>;
  on(e: string, f: (x: unknown) => void): void;
}
interface Context {
  pages(): Page[];
  newPage(): Promise<Page>;
  close(): Promise<void>;
}

const have = existsSync(join(TOOLS, 'node_modules/.bin/code-server')) && existsSync(CHROMIUM);
const missing = `e2e tools missing: run bash test/e2e/install.sh (looked in ${TOOLS} and ${CHROMIUM})`;
if (!have && process.env.E2E_REQUIRED) throw new Error(missing);
const skip = have ? false : missing;

let T = '';
let server: ChildProcess | undefined;
let ctx: Context | undefined;
let page: Page;
let port = 0;
let ws = '';
const t0 = Date.now();
const timings: Record<string, number> = {};
const mark = (name: string) => {
  timings[name] = (Date.now() - t0) / 1000;
};

function freePort(): Promise<number> {
  return new Promise((res, rej) => {
    const s = createServer();
    s.once('error', rej);
    s.listen(0, '127.0.0.1', () => {
      const p = (s.address() as { port: number }).port;
      s.close(() => res(p));
    });
  });
}

async function waitFor<T>(what: string, f: () => T | Promise<T>, timeoutMs = 30000): Promise<NonNullable<T>> {
  const end = Date.now() + timeoutMs;
  let last: unknown;
  for (;;) {
    try {
      const v = await f();
      if (v) return v as NonNullable<T>;
    } catch (e) {
      last = e;
    }
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}${last ? `: ${(last as Error).message}` : ''}`);
    await new Promise((r) => setTimeout(r, 200));
  }
}

async function shot(name: string) {
  await page.screenshot({ path: join(SHOTS, `${name}.png`) });
}

/** A step that leaves a screenshot of the editor behind when it fails. */
function step(name: string, f: () => Promise<void>) {
  return async () => {
    try {
      await f();
    } catch (e) {
      await shot(`FAILED-${name}`).catch(() => undefined);
      throw e;
    }
  };
}

async function clearNotifications() {
  await palette('Notifications: Clear All Notifications');
}

/** Runs a command from the palette by its title. */
async function palette(title: string) {
  await page.keyboard.press('F1');
  const input = page.locator('.quick-input-widget input');
  await input.waitFor({ state: 'visible', timeout: 10000 });
  await input.fill(`>${title}`);
  // click the row with this title (Enter would run whichever row the fuzzy match put first)
  const row = page.locator('.quick-input-list .monaco-list-row', { hasText: title }).first();
  await row.waitFor({ timeout: 10000 });
  await row.click();
}

/** Opens a workspace file with Quick Open. */
async function openFile(name: string) {
  await page.keyboard.press('Control+P');
  const input = page.locator('.quick-input-widget input');
  await input.waitFor({ state: 'visible', timeout: 10000 });
  await input.fill(name);
  await page.locator('.quick-input-list .monaco-list-row', { hasText: name }).first().waitFor({ timeout: 10000 });
  await page.keyboard.press('Enter');
  await page.locator('.tabs-container .tab.active', { hasText: name }).waitFor({ timeout: 10000 });
}

let plantedRank = 0;
/** The planted wrong fact's row among the supporting examples. */
function planted(): Locator {
  return results().locator('section.supporting li.example', { hasText: `finetune:${PLANTED.line}` });
}

function results(): FrameLocator {
  return page.frameLocator('iframe.webview.ready').frameLocator('#active-frame');
}

before(async () => {
  if (skip) return;
  T = mkdtempSync(join(tmpdir(), 'il-e2e-'));
  mkdirSync(SHOTS, { recursive: true });
  // build and package the extension
  const b = spawnSync(process.execPath, ['scripts/build.mjs'], { cwd: ROOT, encoding: 'utf8' });
  assert.equal(b.status, 0, b.stderr);
  const vsix = packageVsix(join(T, 'ext.vsix'));
  mark('built and packaged');
  // the workspace: the embedded default's fine-tuning data and the question
  ws = join(T, 'workspace');
  mkdirSync(ws);
  copyFileSync(join(ROOT, 'assets/default/data/finetune.jsonl'), join(ws, 'finetune.jsonl'));
  writeFileSync(join(ws, 'question.txt'), 'Q: What is the capital of Australia?\nA: Sydney\n');
  // the user's own setup: their data in the workspace, a model elsewhere, factors next to the data
  writeFileSync(
    join(ws, 'influence-lens.json'),
    JSON.stringify(
      {
        models: {
          finetuned: {
            model: join(ROOT, 'assets/default/finetuned'),
            factors: './.influence-lens/factors',
            fitDataset: 'finetune',
          },
        },
        datasets: { finetune: './finetune.jsonl' },
        damping: 'heuristic',
      },
      null,
      2,
    ),
  );
  mkdirSync(join(ws, '.vscode'));
  writeFileSync(
    join(ws, '.vscode/settings.json'),
    JSON.stringify({ 'influenceLens.server.command': join(ROOT, 'bin/influence-lens.js') }),
  );
  const home = join(T, 'home');
  const ud = join(T, 'user-data');
  const ext = join(T, 'extensions');
  mkdirSync(join(ud, 'User'), { recursive: true });
  writeFileSync(
    join(ud, 'User/settings.json'),
    JSON.stringify({
      'workbench.startupEditor': 'none',
      // code-server (VS Code for the Web) saves after 1 s by default; the steps about unsaved edits
      // need them to stay unsaved however slowly the machine runs them
      'files.autoSave': 'off',
      'workbench.tips.enabled': false,
      'workbench.colorTheme': 'Default Dark Modern',
      'security.workspace.trust.enabled': false,
      'telemetry.telemetryLevel': 'off',
      'extensions.autoCheckUpdates': false,
      'extensions.autoUpdate': false,
      'update.mode': 'none',
      'editor.fontSize': 14,
      'editor.minimap.enabled': false,
      'chat.commandCenter.enabled': false,
      'workbench.secondarySideBar.defaultVisibility': 'hidden',
    }),
  );
  writeFileSync(join(T, 'cs.yaml'), 'auth: none\n');
  const env = {
    ...process.env,
    HOME: home,
    XDG_CONFIG_HOME: join(home, '.config'),
    XDG_DATA_HOME: join(home, '.local/share'),
  };
  const cs = join(TOOLS, 'node_modules/.bin/code-server');
  const common = ['--user-data-dir', ud, '--extensions-dir', ext, '--config', join(T, 'cs.yaml')];
  const inst = spawnSync(cs, [...common, '--install-extension', vsix], { env, encoding: 'utf8' });
  assert.equal(inst.status, 0, `${inst.stdout}\n${inst.stderr}`);
  mark('extension installed');
  port = await freePort();
  server = spawn(
    cs,
    [
      ...common,
      '--auth',
      'none',
      '--bind-addr',
      `127.0.0.1:${port}`,
      '--disable-telemetry',
      '--disable-update-check',
      '--disable-workspace-trust',
      '--disable-getting-started-override',
      ws,
    ],
    { env, detached: true, stdio: ['ignore', 'pipe', 'pipe'] },
  );
  let log = '';
  server.stdout?.on('data', (d) => {
    log += d;
  });
  server.stderr?.on('data', (d) => {
    log += d;
  });
  await waitFor(
    `code-server on port ${port} (log: ${log.slice(-500)})`,
    async () => (await fetch(`http://127.0.0.1:${port}/healthz`).catch(() => undefined))?.ok,
  );
  mark('code-server ready');
  const req = createRequire(join(TOOLS, 'package.json'));
  const { chromium } = req('playwright-core') as {
    chromium: { launchPersistentContext(dir: string, o: object): Promise<Context> };
  };
  ctx = await chromium.launchPersistentContext(join(T, 'chromium'), {
    executablePath: CHROMIUM,
    headless: true,
    viewport: { width: 1600, height: 1000 },
    args: [
      '--no-sandbox',
      '--disable-gpu',
      '--disable-quic',
      '--no-first-run',
      '--disable-background-networking',
      '--disable-component-update',
      '--disable-sync',
    ],
  });
  page = ctx.pages()[0] ?? (await ctx.newPage());
  await page.goto(`http://127.0.0.1:${port}/?folder=${encodeURIComponent(ws)}`);
  await page.locator('.monaco-workbench').waitFor({ timeout: 60000 });
  mark('workbench shown');
});

after(async () => {
  await ctx?.close().catch(() => undefined);
  if (server?.pid) {
    try {
      process.kill(-server.pid, 'SIGTERM');
    } catch {
      // already gone
    }
  }
  if (T && !process.env.E2E_KEEP) rmSync(T, { recursive: true, force: true });
  if (Object.keys(timings).length) console.log(`e2e timings (s since start): ${JSON.stringify(timings)}`);
});

test('editor: explain a wrong answer, flag its planted source, export, hover', { skip, timeout: 480000 }, async (t) => {
  await t.test(
    'select the completion and explain it from the palette',
    step('select-the-completion-and-explain-it-fro', async () => {
      await openFile('question.txt');
      await page.locator('.editor-instance .monaco-editor .view-lines').click();
      await page.keyboard.press('Control+Home');
      await page.keyboard.press('ArrowDown');
      await page.keyboard.press('Home');
      await page.keyboard.press('ArrowRight');
      await page.keyboard.press('ArrowRight');
      await page.keyboard.press('Shift+End');
      await page.locator('.statusbar', { hasText: '(7 selected)' }).waitFor({ timeout: 10000 });
      await palette('Influence Lens: Explain this completion');
      // the extension starts the server; EK-FAC needs factors, fitted once on request
      const ask = page.locator('.notification-toast', { hasText: 'needs EK-FAC factors' });
      await ask.waitFor({ timeout: 90000 });
      mark('server started, fit offered');
      await shot('00-fit-offered');
      await ask.locator('.monaco-button', { hasText: 'Fit factors now' }).click();
      await page.locator('.notification-toast', { hasText: 'fitting EK-FAC factors' }).waitFor({ timeout: 20000 });
      await page.waitForTimeout(1500);
      await shot('00b-fitting');
      const first = results().locator('section.supporting li.example').first();
      await first.waitFor({ timeout: 180000 });
      mark('results shown');
      // the planted wrong fact is among the supporting examples (rank 1 in the offline engine run)
      await planted().waitFor({ timeout: 5000 });
      plantedRank = Number(/#(\d+)/.exec(await planted().locator('.rank').innerText())?.[1]);
      assert.ok(plantedRank >= 1 && plantedRank <= 10, `planted rank ${plantedRank}`);
      assert.equal(await results().locator('section.supporting li.example').count(), 10);
      assert.equal(await results().locator('section.opposing li.example').count(), 10);
      const legend = await results().locator('section.legend').innerText();
      assert.match(legend, /training on this example made the completion more likely/);
      assert.match(legend, /less likely/);
      // heatmaps on the query and on each example, with values on hover (title), not color alone
      const tok = results().locator('header.query .heat span.tok').first();
      assert.match((await tok.getAttribute('title')) ?? '', /Sydney.*supporting/s);
      assert.ok((await results().locator('li.example .heat span.tok.il-p5').count()) >= 10);
      assert.ok((await results().locator('.bars .bar-row').count()) >= 14, 'per-layer bars');
      assert.ok((await results().locator('svg.hist rect.bin').count()) >= 10, 'histogram');
      // the editor heatmap on the completion (move the cursor off the selection to see it)
      await page.keyboard.press('Control+End');
      await page.waitForTimeout(300);
      await shot('01-results');
      await page.locator('iframe.webview.ready').screenshot({ path: join(SHOTS, '01a-panel.png') });
      // the charts at the bottom of the panel, and one example's layers
      await results().locator('li.example details.layers summary').first().click();
      await results().locator('.charts').scrollIntoViewIfNeeded();
      await page.waitForTimeout(300);
      await shot('01b-charts');
      await page.locator('iframe.webview.ready').screenshot({ path: join(SHOTS, '01c-panel-bottom.png') });
      await results().locator('li.example').first().scrollIntoViewIfNeeded();
    }),
  );

  await t.test(
    'flag the planted example: the sidecar has it, the view lists it',
    step('flag-the-planted-example-the-sidecar-has', async () => {
      const row = planted();
      await row.locator('button.flag').click();
      await waitFor(
        'the flag button to turn on',
        async () => (await row.locator('button.flag').getAttribute('aria-pressed')) === 'true',
        10000,
      );
      const sidecar = join(ws, 'finetune.exclude.jsonl');
      const lines: string[] = await waitFor('the sidecar', () =>
        existsSync(sidecar) ? readFileSync(sidecar, 'utf8').trim().split('\n') : undefined,
      );
      assert.equal(lines.length, 1);
      const e = JSON.parse(lines[0]);
      assert.deepEqual(Object.keys(e), ['hash', 'line', 'reason', 'score', 'query']);
      assert.equal(e.hash, PLANTED.hash);
      assert.equal(e.line, PLANTED.line);
      assert.equal(e.reason, `supporting #${plantedRank} for "Sydney" (EK-FAC)`);
      assert.equal(e.query, 'Q: What is the capital of Australia?\nA: Sydney');
      mark('flagged');
      // the Flagged examples view in the Explorer
      await page.locator('.tabs-container .tab', { hasText: 'question.txt' }).click();
      await palette('Explorer: Focus on Flagged examples View');
      const view = page.locator('.pane', { hasText: 'Flagged examples' });
      await view.locator('.monaco-list-row', { hasText: 'finetune.jsonl' }).waitFor({ timeout: 10000 });
      await view
        .locator('.monaco-list-row', { hasText: `${PLANTED.line}: Q: What is the capital of Australia?` })
        .waitFor({ timeout: 10000 });
      await clearNotifications();
      await page.waitForTimeout(300);
      await shot('02-flagged');
    }),
  );

  await t.test(
    'export the cleaned dataset next to the original',
    step('export-the-cleaned-dataset-next-to-the-o', async () => {
      await palette('Influence Lens: Export cleaned dataset');
      const out = join(ws, 'finetune.cleaned.jsonl');
      const text: string = await waitFor('the cleaned copy', () =>
        existsSync(out) ? readFileSync(out, 'utf8') : undefined,
      );
      const src = readFileSync(join(ws, 'finetune.jsonl'), 'utf8');
      const srcLines = src.split('\n');
      assert.equal(text, srcLines.filter((_, i) => i !== PLANTED.line - 1).join('\n'));
      assert.equal(
        src,
        readFileSync(join(ROOT, 'assets/default/data/finetune.jsonl'), 'utf8'),
        'the source is untouched',
      );
      await page
        .locator('.notifications-toasts', { hasText: '312 examples kept, 1 flagged removed' })
        .waitFor({ timeout: 10000 });
      mark('exported');
      await shot('03-exported');
    }),
  );

  await t.test(
    'hover a dataset line: its flag and its influence on the last query',
    step('hover-a-dataset-line-its-flag-and-its-in', async () => {
      await clearNotifications();
      await openFile('finetune.jsonl');
      await page.locator('.editor-instance .monaco-editor .view-lines').click();
      await page.keyboard.press('Control+G');
      await page.locator('.quick-input-widget input').fill(`:${PLANTED.line}`);
      await page.keyboard.press('Enter');
      await page.waitForTimeout(300);
      await page.keyboard.press('Control+K');
      await page.keyboard.press('Control+I');
      const hover = page.locator('.monaco-hover-content', { hasText: 'Influence Lens' });
      await hover.waitFor({ timeout: 10000 });
      const text = await hover.innerText();
      assert.match(text, /Flagged for removal/);
      assert.ok(text.includes(`supporting #${plantedRank} for “Sydney” (EK-FAC`), text);
      assert.match(text, /Unflag/);
      mark('hover');
      await page.waitForTimeout(600); // the hover fades in
      await shot('04-hover');
    }),
  );

  await t.test(
    'an example deleted in the editor (unsaved): Open says so and selects nothing, so no flag lands on the next record',
    step('deleted-example-open', async () => {
      await page.keyboard.press('Escape');
      await clearNotifications();
      // finetune.jsonl, the cursor put on the planted line again and the editor focused (a tab's
      // click alone left the focus on the tab on a loaded machine, and the key did nothing): delete
      // the line, unsaved
      await page.locator('.tabs-container .tab', { hasText: 'finetune.jsonl' }).click();
      await page.locator('.editor-instance .monaco-editor .view-lines').first().click();
      await page.keyboard.press('Control+G');
      await page.locator('.quick-input-widget input').fill(`:${PLANTED.line}`);
      await page.keyboard.press('Enter');
      await page.waitForTimeout(300);
      await page.keyboard.press('Control+Shift+K');
      // the editor now holds line 238's record on line 237
      const plantedText = page.locator('.editor-instance .view-lines', {
        hasText: 'What is the capital of Australia?',
      });
      await waitFor('the deletion', async () => (await plantedText.count()) === 0, 10000);
      await palette('Influence Lens: Show results');
      await planted().locator('button.link').click();
      await page
        .locator('.notification-toast', { hasText: 'is no longer in finetune.jsonl (unsaved edits)' })
        .waitFor({ timeout: 10000 });
      assert.equal(await page.locator('.notification-toast', { hasText: 'showing line' }).count(), 0);
      await shot('04b-example-gone');
      // put the line back: nothing was saved
      await page.locator('.tabs-container .tab', { hasText: 'finetune.jsonl' }).click();
      await page.locator('.editor-instance .monaco-editor .view-lines').first().click();
      await page.keyboard.press('Control+Z');
      await plantedText.first().waitFor({ timeout: 10000 });
      assert.equal(
        readFileSync(join(ws, 'finetune.jsonl'), 'utf8'),
        readFileSync(join(ROOT, 'assets/default/data/finetune.jsonl'), 'utf8'),
      );
      await clearNotifications();
    }),
  );

  await t.test(
    'switch the panel to BM25: similarity only, no sign',
    step('switch-the-panel-to-bm25-similarity-only', async () => {
      await palette('Influence Lens: Show results');
      await results().locator('button[data-method="bm25"]').click();
      await results().locator('section.list h2', { hasText: 'Most similar' }).waitFor({ timeout: 20000 });
      assert.equal(await results().locator('section.opposing').count(), 0);
      assert.match(await results().locator('section.legend').innerText(), /no sign/);
      await clearNotifications();
      await page.waitForTimeout(300);
      await shot('05-bm25');
      await results().locator('button[data-method="ekfac"]').click();
      await results().locator('section.opposing').waitFor({ timeout: 10000 });
    }),
  );

  await t.test(
    'reload the window: the panel comes back with its results and flags',
    step('reload-the-window-the-panel-comes-back-w', async () => {
      await page.reload();
      await page.locator('.monaco-workbench').waitFor({ timeout: 60000 });
      const first = results().locator('section.supporting li.example').first();
      await first.waitFor({ timeout: 60000 });
      await waitFor(
        'the flag state after reload',
        async () => (await first.locator('button.flag').getAttribute('aria-pressed')) === 'true',
        20000,
      );
      mark('restored after reload');
      await page.waitForTimeout(300);
      await shot('06-reloaded');
    }),
  );

  await t.test(
    'a light theme: the panel follows it',
    step('light-theme', async () => {
      await page.locator('.tabs-container .tab', { hasText: 'question.txt' }).click();
      await palette('Preferences: Color Theme');
      const row = page.locator('.quick-input-list .monaco-list-row', { hasText: 'Light Modern' }).first();
      await row.waitFor({ timeout: 10000 });
      await row.click();
      await page.locator('.monaco-workbench.vs').waitFor({ timeout: 20000 });
      await page.waitForTimeout(800);
      await shot('07-light-theme');
    }),
  );
});
