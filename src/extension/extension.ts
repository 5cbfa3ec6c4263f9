// Influence Lens in VS Code: activated by its commands, its view, its panel (restored after a
// reload) or a JSONL file (hovers); never on start-up ("*").
import { join } from 'node:path';
import * as vscode from 'vscode';
import { type ClientInfo, createClient, setServerToken, watchWorkspaceConfig } from './client';
import { ExplainController } from './commands/explain';
import { registerFlagCommands } from './commands/flags';
import { scanDataset } from './commands/scan';
import { SECTION, settings } from './config';
import { DatasetResolver } from './datasets';
import { CompletionHeatmap } from './decorations/completion-heatmap';
import { FlagStore } from './flags/flag-store';
import { History } from './history';
import { JsonlHoverProvider } from './hovers/jsonl-hover';
import { log } from './log';
import { reportError, type Services } from './services';
import { StatusBar } from './status/status-bar';
import { FlaggedTree, type FlagNode } from './views/flagged-tree';
import { ResultsPanel, registerSerializer } from './views/results-panel';

export function activate(context: vscode.ExtensionContext) {
  const status = new StatusBar();
  // the window's own server went away: what it served is not there any more (the next request starts it again)
  const onStopped = (why: string) => {
    info = undefined;
    status.stopped(`${why}; the next explanation starts it again`);
  };
  let client = createClient(context, onStopped);
  log.info(`activated; server: ${client.label}`);
  const flags = new FlagStore(context.workspaceState);
  let info: ClientInfo | undefined;
  let pending: Promise<ClientInfo> | undefined;
  // each server warning is logged once per connection (status is asked again after explains)
  let logged = new Set<string>();
  const logWarnings = (i: ClientInfo) => {
    for (const w of i.warnings)
      if (!logged.has(w)) {
        logged.add(w);
        log.warn(`server: ${w}`);
      }
  };
  /** a new connection (and a new local server), e.g. after the server settings changed */
  /** A new client for the settings as they are now; its server starts on first use. */
  const replaceClient = () => {
    client.dispose();
    client = createClient(context, onStopped);
    info = undefined;
    logged = new Set();
    log.info(`server: ${client.label}`);
  };
  const reconnect = () => {
    replaceClient();
    return s.info(true);
  };
  const s: Services = {
    context,
    get client() {
      return client;
    },
    flags,
    status,
    history: new History(context.workspaceState),
    datasets: new DatasetResolver(() => info),
    heatmap: new CompletionHeatmap(settings().colors),
    panel: undefined as unknown as ResultsPanel,
    lastInfo: () => info,
    async refreshWarnings() {
      const asked = client;
      // a connection not opened yet is not opened for this
      if (!info) return;
      try {
        const i = await asked.info();
        if (asked === client) {
          s.history.noteRevision(i.revision);
          logWarnings(i);
        }
      } catch {
        // the next request reports a server that went away
      }
    },
    info(force = false) {
      if (info && !force) return Promise.resolve(info);
      if (pending && !force) return pending;
      status.connecting(client.label);
      const asked = client;
      const p = client.info().then(
        (i) => {
          if (pending === p) pending = undefined;
          if (asked !== client) return s.info(force);
          info = i;
          s.history.noteRevision(i.revision);
          status.connected(client.label, i);
          logWarnings(i);
          return i;
        },
        (e: Error) => {
          if (pending === p) pending = undefined;
          if (asked === client) status.failed(e.message);
          log.error(`server: ${e.message}`);
          throw e;
        },
      );
      pending = p;
      return p;
    },
  };
  const controller = new ExplainController(s);
  const storage = context.storageUri ?? context.globalStorageUri;
  s.panel = new ResultsPanel(
    context.extensionUri,
    controller.handlers(),
    storage.scheme === 'file' ? join(storage.fsPath, 'panel-state.json') : undefined,
  );
  const tree = new FlaggedTree(flags);
  const view = vscode.window.createTreeView<FlagNode>('influenceLens.flagged', {
    treeDataProvider: tree,
    canSelectMany: true,
    showCollapseAll: true,
  });
  const updateBadge = () => {
    const n = flags.all().reduce((a, g) => a + g.entries.length, 0);
    view.badge = n ? { value: n, tooltip: `${n} flagged example(s)` } : undefined;
  };
  flags.onDidChange(() => {
    updateBadge();
    void controller.pushFlags();
  });
  void flags.init();

  const cmd = (id: string, f: (...a: never[]) => unknown) => vscode.commands.registerCommand(id, f);
  context.subscriptions.push(
    log,
    status,
    flags,
    tree,
    s.heatmap,
    s.panel,
    view,
    { dispose: () => controller.dispose() },
    { dispose: () => client.dispose() },
    cmd('influenceLens.setServerToken', async () => {
      if (await setServerToken(context)) await reconnect().catch((e) => reportError(e));
    }),
    registerSerializer(s.panel),
    cmd('influenceLens.explain', () => controller.explainSelection()),
    cmd('influenceLens.explainWithSplit', () => controller.explainWithSplit()),
    cmd('influenceLens.complete', () => controller.complete()),
    cmd('influenceLens.scanDataset', () => scanDataset(s)),
    cmd('influenceLens.showResults', () => s.panel.show(false)),
    cmd('influenceLens.refreshFlags', () => {
      tree.refresh();
      return flags.init();
    }),
    cmd('influenceLens.reconnect', async () => {
      try {
        const i = await reconnect();
        void vscode.window.showInformationMessage(
          `Influence Lens: ${client.label} · model ${i.model} · ${i.device} · datasets ${i.datasets.join(', ') || 'none'}`,
        );
      } catch (e) {
        void vscode.window.showErrorMessage(`Influence Lens: ${(e as Error).message}`);
      }
    }),
    ...registerFlagCommands(s),
    vscode.languages.registerHoverProvider(
      [
        { scheme: 'file', language: 'jsonl' },
        { scheme: 'file', pattern: '**/*.jsonl' },
      ],
      new JsonlHoverProvider(flags, s.history),
    ),
    // an influence-lens.json written (or removed) after activation: a new client for it, started
    // again at once only if the old one's server had been asked (a window where no one explained
    // yet loads no model for it, and a half-written file fails no start)
    watchWorkspaceConfig(() => {
      const started = info !== undefined;
      replaceClient();
      if (started) void s.info(true).catch(() => undefined);
    }),
    vscode.workspace.onDidChangeConfiguration((e) => {
      if (!e.affectsConfiguration(SECTION)) return;
      if (e.affectsConfiguration(`${SECTION}.server`)) void reconnect().catch(() => undefined);
      const colors = settings().colors;
      s.heatmap.setColors(colors);
      s.panel.post({ type: 'colors', colors });
    }),
  );
  // a configured server is asked at once, so the status bar says what it serves; a local one
  // (which loads the models) starts on first use or a click on the status bar
  if (settings().serverUrl) s.info().catch(() => undefined);
}

export function deactivate() {}
