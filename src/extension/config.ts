// The extension's settings (`influenceLens.*` in package.json's contributes.configuration). A
// value the schema does not allow (settings.json is hand-edited; the editor only underlines it)
// is never replaced silently: it is listed in `problems`, and explain refuses to run until it is
// corrected, naming the setting and what it accepts. Colors and the display switches
// (hovers.enabled, heatmap.editor) only change the look: a bad one is reported at once, once, and
// the default shown (a hover read "false" as on until the next explain said why).
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
  /** settings whose value is not allowed, one sentence each (what it is, what it accepts) */
  problems: string[];
}

/** Explain refuses to run while a setting that decides what is scored has a value it does not accept. */
export class SettingsError extends Error {
  constructor(readonly problems: string[]) {
    super(
      `fix ${problems.length === 1 ? 'this setting' : 'these settings'} first (File › Preferences › Settings, or settings.json): ${problems.join('; ')}`,
    );
    this.name = 'SettingsError';
  }
}

const warnedLooks = new Set<string>();

/** A display setting's bad value, said once per value when it is first read. */
function warnLook(key: string, value: unknown, accepts: string, shown: string): void {
  const id = `${key}=${JSON.stringify(value)}`;
  if (warnedLooks.has(id)) return;
  warnedLooks.add(id);
  void vscode.window.showWarningMessage(
    `Influence Lens: ${SECTION}.${key} is ${JSON.stringify(value)}, ${accepts}; ${shown}.`,
  );
}

export function settings(scope?: vscode.ConfigurationScope): Settings {
  const c = vscode.workspace.getConfiguration(SECTION, scope);
  const problems: string[] = [];
  const bad = (key: string, value: unknown, accepts: string) =>
    problems.push(`${SECTION}.${key} is ${JSON.stringify(value)}; it accepts ${accepts}`);
  const str = (key: string): string => {
    const v = c.get<unknown>(key, '');
    if (typeof v === 'string') return v.trim();
    bad(key, v, 'a string');
    return '';
  };
  const int = (key: string, fallback: number, min: number, max: number): number => {
    const v = c.get<unknown>(key, fallback);
    if (typeof v === 'number' && Number.isInteger(v) && v >= min && v <= max) return v;
    bad(key, v, `a whole number from ${min}${max === Number.MAX_SAFE_INTEGER ? ' up' : ` to ${max}`}`);
    return fallback;
  };
  const methods = METHODS.join(', ');
  const isMethod = (m: unknown): m is Method => typeof m === 'string' && (METHODS as readonly string[]).includes(m);

  const method = c.get<unknown>('method', 'ekfac');
  if (!isMethod(method)) bad('method', method, `one of ${methods}`);
  const compareRaw = c.get<unknown>('compare', []);
  let compare: Method[] = [];
  if (!Array.isArray(compareRaw)) bad('compare', compareRaw, `a list of methods (${methods})`);
  else {
    const unknown = compareRaw.filter((m) => !isMethod(m));
    if (unknown.length) bad('compare', compareRaw, `a list of methods (${methods}); not ${JSON.stringify(unknown)}`);
    compare = compareRaw.filter(isMethod);
  }
  const candidates = c.get<unknown>('candidates', 'all');
  if (candidates !== 'all' && candidates !== 'retrieved') bad('candidates', candidates, '"all" or "retrieved"');
  const datasetsRaw = c.get<unknown>('datasets', {}) ?? {};
  const datasets: Record<string, string> = {};
  if (typeof datasetsRaw !== 'object' || Array.isArray(datasetsRaw))
    bad('datasets', datasetsRaw, 'an object mapping dataset ids to files, e.g. {"finetune": "data/train.jsonl"}');
  else
    for (const [id, p] of Object.entries(datasetsRaw as Record<string, unknown>)) {
      if (typeof p === 'string' && p.trim()) datasets[id] = p.trim();
      else bad(`datasets["${id}"]`, p, 'a file path');
    }

  const color = (key: string, fallback: string) => {
    const v = c.get<unknown>(key, '');
    const s = typeof v === 'string' ? v : '';
    const css = cssColor(s, fallback);
    if (typeof v !== 'string' || (s.trim() && css === fallback))
      warnLook(
        key,
        v,
        'not a color',
        'the default is shown. It accepts a hex color (#1f77b4), rgb()/hsl(), a CSS color name, or a theme color id (charts.blue)',
      );
    return css;
  };
  const look = (key: string, fallback: boolean): boolean => {
    const v = c.get<unknown>(key, fallback);
    if (typeof v === 'boolean') return v;
    warnLook(key, v, 'not true or false', `it is taken as ${fallback} (the default)`);
    return fallback;
  };

  return {
    serverUrl: str('server.url'),
    serverCommand: str('server.command'),
    serverConfig: str('server.config'),
    dataset: str('dataset'),
    datasets,
    topK: int('topK', 10, 1, 1000),
    method: isMethod(method) ? method : 'ekfac',
    compare,
    candidates: candidates === 'retrieved' ? 'retrieved' : 'all',
    maxPromptChars: int('maxPromptChars', 4000, 1, Number.MAX_SAFE_INTEGER),
    colors: {
      supporting: color('colors.supporting', DEFAULT_SUPPORTING),
      opposing: color('colors.opposing', DEFAULT_OPPOSING),
    },
    hovers: look('hovers.enabled', true),
    editorHeatmap: look('heatmap.editor', true),
    problems,
  };
}
