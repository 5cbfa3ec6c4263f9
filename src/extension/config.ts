// The extension's settings (`influenceLens.*` in package.json's contributes.configuration).
import * as vscode from 'vscode';
import { cssColor, DEFAULT_OPPOSING, DEFAULT_SUPPORTING } from '../common/display';
import { METHODS, type Method } from '../protocol/types';

export const SECTION = 'influenceLens';

export interface Settings {
  serverUrl: string;
  /** the influence-lens CLI that starts the local server; empty: found automatically */
  serverCommand: string;
  /** the local server's influence-lens.json; empty: the workspace's, else the embedded default */
  serverConfig: string;
  dataset: string;
  datasets: Record<string, string>;
  topK: number;
  method: Method;
  compare: Method[];
  candidates: 'all' | 'retrieved';
  maxPromptChars: number;
  colors: { supporting: string; opposing: string };
  hovers: boolean;
  editorHeatmap: boolean;
}

export function settings(scope?: vscode.ConfigurationScope): Settings {
  const c = vscode.workspace.getConfiguration(SECTION, scope);
  const method = c.get<string>('method', 'ekfac');
  const topK = c.get<number>('topK', 10);
  return {
    serverUrl: c.get<string>('server.url', '').trim(),
    serverCommand: c.get<string>('server.command', '').trim(),
    serverConfig: c.get<string>('server.config', '').trim(),
    dataset: c.get<string>('dataset', '').trim(),
    datasets: c.get<Record<string, string>>('datasets', {}) ?? {},
    topK: Number.isInteger(topK) && topK >= 1 ? Math.min(topK, 1000) : 10,
    method: (METHODS as readonly string[]).includes(method) ? (method as Method) : 'ekfac',
    compare: (c.get<string[]>('compare', []) ?? []).filter((m): m is Method =>
      (METHODS as readonly string[]).includes(m),
    ),
    candidates: c.get<string>('candidates', 'all') === 'retrieved' ? 'retrieved' : 'all',
    maxPromptChars: Math.max(1, c.get<number>('maxPromptChars', 4000)),
    colors: {
      supporting: cssColor(c.get<string>('colors.supporting', ''), DEFAULT_SUPPORTING),
      opposing: cssColor(c.get<string>('colors.opposing', ''), DEFAULT_OPPOSING),
    },
    hovers: c.get<boolean>('hovers.enabled', true),
    editorHeatmap: c.get<boolean>('heatmap.editor', true),
  };
}
