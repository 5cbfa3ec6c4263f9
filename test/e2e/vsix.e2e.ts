// The platform VSIX alone: the linux-x64 VSIX (scripts/package-vsix.ts --target) installed into a
// clean code-server profile, no checkout, no node_modules on PATH, no influence-lens.json and no
// settings; the workspace holds only a JSONL file (the embedded default's fine-tuning data).
// "Explain this completion" on its planted wrong record must reach a results panel through the
// server the VSIX carries (fit offered, fitted, results). Screenshots: test/e2e/screenshots/vsix-*.
//
//   bash test/e2e/install.sh && node --import tsx test/e2e/vsix.e2e.ts   (E2E_KEEP=1 keeps the temp folder)
import assert from 'node:assert/strict';
import { type ChildProcess, spawn, spawnSync } from 'node:child_process';
import { copyFileSync, existsSync, mkdirSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { createRequire } from 'node:module';
import { createServer } from 'node:net';
import { tmpdir } from 'node:os';
import { dirname, join, resolve } from 'node:path';
import { after, before, test } from 'node:test';
import { defaultVsce, packageVsix } from '../../scripts/package-vsix';

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
if (!have && process.env.E2E_REQUIRED && process.platform === 'linux' && process.arch === 'x64')
  throw new Error(missing);
// the VSIX under test is linux-x64's: it runs here only on that platform
const skip =
  process.platform !== 'linux' || process.arch !== 'x64'
    ? 'the linux-x64 VSIX needs linux-x64'
    : have
      ? false
      : missing;

let T = '';
let installedAt = 0;
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
  await page.screenshot({ path: join(SHOTS, `vsix-${name}.png`) });
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
  const vsix = packageVsix(join(T, 'ext.vsix'), defaultVsce(), 'linux-x64');
  mark('built and packaged');
  // the workspace: one JSONL file, nothing else
  ws = join(T, 'workspace');
  mkdirSync(ws);
  copyFileSync(join(ROOT, 'assets/default/data/finetune.jsonl'), join(ws, 'finetune.jsonl'));
  const home = join(T, 'home');
  const ud = join(T, 'user-data');
  const ext = join(T, 'extensions');
  mkdirSync(join(ud, 'User'), { recursive: true });
  writeFileSync(
    join(ud, 'User/settings.json'),
    JSON.stringify({
      'workbench.startupEditor': 'none',
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
  // no checkout, no node_modules: a PATH of system folders and code-server's own node
  const env = {
    PATH: `${dirname(process.execPath)}:/usr/local/bin:/usr/bin:/bin`,
    LANG: 'C.UTF-8',
    HOME: home,
    INFLUENCE_LENS_CACHE: join(home, '.cache/influence-lens'),
    XDG_CONFIG_HOME: join(home, '.config'),
    XDG_DATA_HOME: join(home, '.local/share'),
  };
  const cs = join(TOOLS, 'node_modules/.bin/code-server');
  const installStart = Date.now();
  const common = ['--user-data-dir', ud, '--extensions-dir', ext, '--config', join(T, 'cs.yaml')];
  const inst = spawnSync(cs, [...common, '--install-extension', vsix], { env, encoding: 'utf8' });
  assert.equal(inst.status, 0, `${inst.stdout}\n${inst.stderr}`);
  mark('extension installed');
  installedAt = installStart;
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

test('VSIX alone: explain the planted wrong record of a lone JSONL file', { skip, timeout: 600000 }, async () => {
  await step('explain', async () => {
    // from the Explorer (Quick Open's file search may still be indexing in a fresh profile)
    await page.locator('.explorer-folders-view .monaco-list-row', { hasText: 'finetune.jsonl' }).first().click();
    await page.locator('.tabs-container .tab.active', { hasText: 'finetune.jsonl' }).waitFor({ timeout: 20000 });
    await page.locator('.editor-instance .monaco-editor .view-lines').click();
    // the whole record on line 237: split into prompt and completion by its fields
    await page.keyboard.press('Control+G');
    await page.keyboard.type(String(PLANTED.line));
    await page.keyboard.press('Enter');
    await page.keyboard.press('Home');
    await page.keyboard.press('Shift+End');
    await palette('Influence Lens: Explain this completion');
    // the embedded default has two datasets: the fine-tuning one is this file
    const pick = page.locator('.quick-input-list .monaco-list-row', { hasText: /^finetune/ }).first();
    await pick.waitFor({ timeout: 120000 });
    await shot('00-which-data');
    await pick.click();
    const ask = page.locator('.notification-toast', { hasText: 'needs EK-FAC factors' });
    await ask.waitFor({ timeout: 180000 });
    mark('server started from the VSIX, fit offered');
    await shot('00-fit-offered');
    await ask.locator('.monaco-button', { hasText: 'Fit factors now' }).click();
    const first = results().locator('section.supporting li.example').first();
    await first.waitFor({ timeout: 300000 });
    mark('results shown');
    const sinceInstall = (Date.now() - installedAt) / 1000;
    console.log(`vsix e2e: ${sinceInstall.toFixed(0)} s from install to the first results panel`);
    const planted = results().locator('section.supporting li.example', { hasText: `finetune:${PLANTED.line}` });
    await planted.waitFor({ timeout: 5000 });
    assert.equal(await results().locator('section.supporting li.example').count(), 10);
    await page.waitForTimeout(500);
    await shot('01-results');
    await page.locator('iframe.webview.ready').screenshot({ path: join(SHOTS, 'vsix-01a-panel.png') });
    // the server the VSIX carries, not a checkout's: its command line is in the output channel
    await palette('Output: Show Output Channels...');
    const row = page.locator('.quick-input-list .monaco-list-row', { hasText: 'Influence Lens' }).first();
    await row.waitFor({ timeout: 10000 });
    await row.click();
    await page
      .locator('.output-view, .monaco-editor', { hasText: 'server/cli.mjs serve' })
      .first()
      .waitFor({ timeout: 10000 });
    await shot('02-output');
  })();
});
