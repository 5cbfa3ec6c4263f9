// Influence Lens in VS Code: activated by its commands, its view, its panel (restored after a
// reload) or a JSONL file (hovers); never on start-up ("*").
import { join } from 'node:path';
import * as vscode from 'vscode';
import { type ClientInfo, createClient } from './client';
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
import type { Services } from './services';
import { StatusBar } from './status/status-bar';
import { FlaggedTree, type FlagNode } from './views/flagged-tree';
import { ResultsPanel, registerSerializer } from './views/results-panel';

export function activate(context: vscode.ExtensionContext) {
  const client = createClient();
  log.info(`activated; client: ${client.label}`);
  const status = new StatusBar();
  const flags = new FlagStore(context.workspaceState);
  let info: ClientInfo | undefined;
  let pending: Promise<ClientInfo> | undefined;
  const s: Services = {
    context,
    client,
    flags,
    status,
    history: new History(context.workspaceState),
    datasets: new DatasetResolver(() => info),
    heatmap: new CompletionHeatmap(settings().colors),
    panel: undefined as unknown as ResultsPanel,
    lastInfo: () => info,
    info(force = false) {
      if (info && !force) return Promise.resolve(info);
      if (pending && !force) return pending;
      status.connecting();
      pending = client.info().then(
        (i) => {
          info = i;
          pending = undefined;
          status.connected(client.label, i);
          return i;
        },
        (e: Error) => {
          pending = undefined;
          status.failed(e.message);
          throw e;
        },
      );
      return pending;
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
    s.heatmap,
    s.panel,
    view,
    { dispose: () => controller.dispose() },
    { dispose: () => client.dispose() },
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
        const i = await s.info(true);
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
    vscode.workspace.onDidChangeConfiguration((e) => {
      if (!e.affectsConfiguration(SECTION)) return;
      const colors = settings().colors;
      s.heatmap.setColors(colors);
      s.panel.post({ type: 'colors', colors });
    }),
  );
  // ask the server in the background so the status bar says what it serves
  s.info().catch(() => undefined);
}

export function deactivate() {}
