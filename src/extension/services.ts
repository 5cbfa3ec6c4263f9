// The pieces every command shares, created once in `activate`.
import * as vscode from 'vscode';
import { FALLBACK_ORDER, METHOD_LABELS } from '../protocol/methods';
import type { Method } from '../protocol/types';
import { CancelledError, ClientError, type ClientInfo, type InfluenceClient, type StageName } from './client';
import { SECTION, SettingsError, settings } from './config';
import type { DatasetResolver } from './datasets';
import type { CompletionHeatmap } from './decorations/completion-heatmap';
import type { FlagStore } from './flags/flag-store';
import type { History } from './history';
import type { StatusBar } from './status/status-bar';
import type { ResultsPanel } from './views/results-panel';

export interface Services {
  context: vscode.ExtensionContext;
  /** the current connection (replaced when the server settings change or on Reconnect) */
  readonly client: InfluenceClient;
  panel: ResultsPanel;
  flags: FlagStore;
  history: History;
  datasets: DatasetResolver;
  heatmap: CompletionHeatmap;
  status: StatusBar;
  /** what the server can do (cached; `force` asks again) */
  info(force?: boolean): Promise<ClientInfo>;
  lastInfo(): ClientInfo | undefined;
  /**
   * Asks the server's status again after a request that read a dataset and logs the warnings it
   * did not have before (e.g. factors fitted on other data than the fit dataset, known only once
   * that dataset is loaded); never fails.
   */
  refreshWarnings(): Promise<void>;
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
const RECONNECT_AND_RETRY = 'Reconnect and retry';

export async function reportError(e: unknown, retry?: () => unknown): Promise<void> {
  if (e instanceof CancelledError) return;
  const message = e instanceof Error ? e.message : String(e);
  const settingsAction = e instanceof SettingsError ? ['Open Settings'] : [];
  // a server that refuses every request until it restarts (its influence-lens.json changed):
  // retrying alone gets the same refusal forever, so the button restarts it first
  const reconnect = /"Influence Lens: Reconnect to the server"/.test(message) ? RECONNECT_AND_RETRY : undefined;
  const actions = [...settingsAction, ...(reconnect ? [reconnect] : retry ? ['Retry'] : [])];
  const pick = await vscode.window.showErrorMessage(`Influence Lens: ${message}`, ...actions);
  if (pick === RECONNECT_AND_RETRY) {
    await vscode.commands.executeCommand('influenceLens.reconnect');
    retry?.();
  }
  if (pick === 'Retry') retry?.();
  if (pick === 'Open Settings') void vscode.commands.executeCommand('workbench.action.openSettings', SECTION);
}

/**
 * Makes `method` runnable: when it only needs factors fitted, asks whether to fit them now
 * (once per model; then cached on disk) or use another method. Returns the method to run, or
 * undefined when the person dismissed the question.
 */
export async function runnable(s: Services, method: Method, info: ClientInfo): Promise<Method | undefined> {
  if (info.methods.includes(method)) return method;
  const instead = FALLBACK_ORDER.find((m) => info.methods.includes(m));
  const stages = info.needsFit[method];
  if (stages?.length) {
    const which = stages
      .map((x) => (x === 'finetuned' ? 'the fine-tuned model' : 'the pre-trained model'))
      .join(' and ');
    const fit = 'Fit factors now';
    const other = instead ? `Use ${METHOD_LABELS[instead]}` : undefined;
    const pick = await vscode.window.showInformationMessage(
      `Influence Lens: ${METHOD_LABELS[method]} needs EK-FAC factors for ${which}, which are not fitted yet. ` +
        'Fitting reads the training data once and caches the factors on disk (about 10 s for the embedded model on 2 CPU cores; minutes or more for larger models and data).',
      ...[fit, other].filter((x): x is string => !!x),
    );
    if (pick === fit) {
      await fitStages(s, stages);
      return (await s.info(true)).methods.includes(method) ? method : undefined;
    }
    return pick === other ? instead : undefined;
  }
  if (!instead)
    throw new ClientError(`the server can run no method now (${info.unavailable[method] ?? 'unavailable'})`);
  void vscode.window.showInformationMessage(
    `Influence Lens: ${METHOD_LABELS[method]} cannot run now (${info.unavailable[method] ?? 'unavailable'}); using ${METHOD_LABELS[instead]}.`,
  );
  return instead;
}

/** Fits each stage's factors with a cancellable progress notification. */
export async function fitStages(s: Services, stages: StageName[]): Promise<void> {
  for (const stage of stages) {
    await vscode.window.withProgress(
      {
        location: vscode.ProgressLocation.Notification,
        title: `Influence Lens: fitting EK-FAC factors of the ${stage === 'finetuned' ? 'fine-tuned' : 'pre-trained'} model`,
        cancellable: true,
      },
      async (progress, token) => {
        let shown = 0;
        await s.client.fit(stage, token, (p) => {
          const pct = p.percentage ?? shown;
          progress.report({ message: p.message, increment: Math.max(0, pct - shown) });
          shown = Math.max(shown, pct);
        });
      },
    );
  }
}
