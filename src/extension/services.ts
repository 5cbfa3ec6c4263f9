// The pieces every command shares, created once in `activate`.
import * as vscode from 'vscode';
import { CancelledError, ClientError, type ClientInfo, type InfluenceClient } from './client';
import { settings } from './config';
import type { DatasetResolver } from './datasets';
import type { CompletionHeatmap } from './decorations/completion-heatmap';
import type { FlagStore } from './flags/flag-store';
import type { History } from './history';
import type { StatusBar } from './status/status-bar';
import type { ResultsPanel } from './views/results-panel';

export interface Services {
  context: vscode.ExtensionContext;
  client: InfluenceClient;
  panel: ResultsPanel;
  flags: FlagStore;
  history: History;
  datasets: DatasetResolver;
  heatmap: CompletionHeatmap;
  status: StatusBar;
  /** what the server can do (cached; `force` asks again) */
  info(force?: boolean): Promise<ClientInfo>;
  lastInfo(): ClientInfo | undefined;
}

const DATASET_KEY = 'influenceLens.lastDataset';

/** The dataset to explain against: the setting, the only one, or the user's pick (remembered). */
export async function chooseDataset(s: Services, info: ClientInfo): Promise<string | undefined> {
  const configured = settings().dataset;
  if (configured) {
    if (!info.datasets.includes(configured))
      throw new ClientError(
        `The setting influenceLens.dataset names "${configured}", which the server does not serve (it serves: ${info.datasets.join(', ') || 'none'}).`,
      );
    return configured;
  }
  if (info.datasets.length === 0)
    throw new ClientError('The server serves no dataset: add one to its influence-lens.json.');
  if (info.datasets.length === 1) return info.datasets[0];
  const last = s.context.workspaceState.get<string>(DATASET_KEY);
  const items = info.datasets.map((d) => ({ label: d, description: d === last ? 'last used' : undefined }));
  items.sort((a, b) => (a.label === last ? -1 : b.label === last ? 1 : 0));
  const pick = await vscode.window.showQuickPick(items, {
    title: 'Influence Lens: which training data?',
    placeHolder: 'The dataset whose examples are scored (set influenceLens.dataset to skip this question)',
  });
  if (pick) await s.context.workspaceState.update(DATASET_KEY, pick.label);
  return pick?.label;
}

/** Shows an error a person can act on; cancellation is silent. */
export async function reportError(e: unknown, retry?: () => unknown): Promise<void> {
  if (e instanceof CancelledError) return;
  const message = e instanceof Error ? e.message : String(e);
  const actions = retry ? ['Retry'] : [];
  const pick = await vscode.window.showErrorMessage(`Influence Lens: ${message}`, ...actions);
  if (pick === 'Retry') retry?.();
}
