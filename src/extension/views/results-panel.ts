// Hosts the results webview. The extension keeps the authoritative copy of what the panel
// shows (`mirror`), so a panel that was hidden (its page is discarded: no
// retainContextWhenHidden) or restored after a reload (WebviewPanelSerializer) is repainted
// whole when its page says 'ready'; the page also paints its own `getState()` at once.
import { mkdirSync, readFileSync } from 'node:fs';
import { dirname } from 'node:path';
import * as vscode from 'vscode';
import type { ExampleId, ExplainPartial, Method } from '../../protocol/types';
import { type FlagState, type FromWebview, type PanelState, type ToWebview, withResult } from '../../webview/messages';
import { writeFileAtomic } from '../flags/sidecar';
import { log } from '../log';
import { panelHtml } from './panel-html';

export interface PanelHandlers {
  open(id: ExampleId): void;
  flag(m: { id: ExampleId; score: number; method: Method; flagged: boolean }): void;
  /** the person chose a method; `cached`: the panel holds a result of it (the controller checks it still applies) */
  method(m: Method, cached: boolean): void;
  /** the page (re)loaded: the controller sends flags and colors */
  ready(): void;
}

export class ResultsPanel implements vscode.Disposable {
  static readonly viewType = 'influenceLens.results';
  private panel?: vscode.WebviewPanel;
  private ready = false;
  private busy?: { method: Method; message: string };
  private error?: { method: Method; message: string };
  private partial?: ExplainPartial;
  mirror: PanelState = { version: 1, results: {}, methods: [], flags: {} };

  constructor(
    private readonly extensionUri: vscode.Uri,
    private readonly handlers: PanelHandlers,
    /** a file (in the extension's storage) that keeps the last results too: a window reload can
     * restore the panel before the editor saved its page state */
    private readonly statePath?: string,
  ) {}

  get visible(): boolean {
    return !!this.panel?.visible;
  }

  /** Opens the panel beside the editor (or reveals it). */
  show(preserveFocus = true): void {
    if (this.panel) {
      this.panel.reveal(undefined, preserveFocus);
      return;
    }
    const panel = vscode.window.createWebviewPanel(
      ResultsPanel.viewType,
      'Influence Lens',
      { viewColumn: vscode.ViewColumn.Beside, preserveFocus },
      this.options(),
    );
    this.adopt(panel);
  }

  /** Takes over a panel (new, or restored by the serializer with the page's last state). */
  adopt(panel: vscode.WebviewPanel, state?: PanelState): void {
    log.info(
      `panel: ${state ? `restoring (page state: ${Object.keys(state.results ?? {}).join(',') || 'no results'})` : 'new'}`,
    );
    this.panel?.dispose();
    this.panel = panel;
    this.ready = false;
    const saved = this.loadSaved();
    // the saved file is written on every result; the page state the editor kept may be older
    if (saved?.version === 1 && Object.keys(saved.results).length) this.mirror = saved;
    else if (state?.version === 1 && Object.keys(state.results).length) this.mirror = state;
    log.info(
      `panel: saved state ${this.statePath ?? '(no storage)'}: ${Object.keys(saved?.results ?? {}).join(',') || 'none'}`,
    );
    panel.webview.options = this.options();
    panel.iconPath = vscode.Uri.joinPath(this.extensionUri, 'media', 'icon.svg');
    const media = vscode.Uri.joinPath(this.extensionUri, 'media');
    panel.webview.html = panelHtml({
      cspSource: panel.webview.cspSource,
      scriptUri: panel.webview.asWebviewUri(vscode.Uri.joinPath(media, 'webview.js')).toString(),
      styleUri: panel.webview.asWebviewUri(vscode.Uri.joinPath(media, 'webview.css')).toString(),
    });
    panel.webview.onDidReceiveMessage((m: FromWebview) => this.receive(m));
    panel.onDidChangeViewState(() => {
      // a hidden page is discarded; it says 'ready' again when shown
      if (!panel.visible) this.ready = false;
    });
    panel.onDidDispose(() => {
      if (this.panel === panel) {
        this.panel = undefined;
        this.ready = false;
      }
    });
  }

  private options(): vscode.WebviewOptions & vscode.WebviewPanelOptions {
    return {
      enableScripts: true,
      enableFindWidget: true,
      localResourceRoots: [vscode.Uri.joinPath(this.extensionUri, 'media')],
    };
  }

  private receive(m: FromWebview) {
    switch (m.type) {
      case 'ready':
        log.info(
          `panel: page ready (page state: ${Object.keys(m.state?.results ?? {}).join(',') || 'none'}; extension: ${Object.keys(this.mirror.results).join(',') || 'none'})`,
        );
        this.ready = true;
        if (Object.keys(this.mirror.results).length) this.send({ type: 'state', state: this.mirror });
        else if (m.state?.version === 1 && Object.keys(m.state.results).length) {
          // the page restored more than the extension knows (an empty mirror would wipe it)
          this.mirror = { ...m.state, focus: undefined };
          this.save();
        }
        if (this.busy) this.send({ type: 'busy', ...this.busy });
        if (this.partial) this.send({ type: 'partial', partial: this.partial });
        if (this.error) this.send({ type: 'error', ...this.error });
        this.handlers.ready();
        break;
      case 'open':
        this.handlers.open(m.id);
        break;
      case 'flag':
        this.handlers.flag(m);
        break;
      case 'method':
        this.mirror.method = m.method;
        this.save();
        this.handlers.method(m.method, !!this.mirror.results[m.method]);
        break;
    }
  }

  /** Updates the mirror and sends the message when the page is listening. */
  post(m: ToWebview): void {
    switch (m.type) {
      case 'result': {
        this.mirror = withResult(this.mirror, m);
        this.mirror.focus = undefined;
        this.busy = this.error = this.partial = undefined;
        break;
      }
      case 'busy':
        this.busy = { method: m.method, message: m.message };
        this.error = this.partial = undefined;
        this.mirror.method = m.method;
        break;
      case 'partial':
        this.partial = m.partial;
        break;
      case 'error':
        this.error = { method: m.method, message: m.message };
        this.busy = this.partial = undefined;
        break;
      case 'flags':
        this.mirror.flags = m.flags;
        break;
      case 'colors':
        this.mirror.colors = m.colors;
        break;
      case 'state':
        this.mirror = m.state;
        break;
    }
    this.send(m);
    if (m.type === 'result' || m.type === 'state') this.save();
  }

  private save() {
    if (!this.statePath) return;
    try {
      mkdirSync(dirname(this.statePath), { recursive: true });
      writeFileAtomic(this.statePath, JSON.stringify({ ...this.mirror, focus: undefined }));
    } catch {
      // the page's own state still restores it in most cases
    }
  }

  private loadSaved(): PanelState | undefined {
    if (!this.statePath) return undefined;
    try {
      return JSON.parse(readFileSync(this.statePath, 'utf8')) as PanelState;
    } catch {
      return undefined;
    }
  }

  setFlags(flags: Record<string, FlagState>): void {
    this.post({ type: 'flags', flags });
  }

  private send(m: ToWebview) {
    if (this.panel && this.ready) void this.panel.webview.postMessage(m);
  }

  dispose(): void {
    this.panel?.dispose();
  }
}

export function registerSerializer(panel: ResultsPanel): vscode.Disposable {
  return vscode.window.registerWebviewPanelSerializer(ResultsPanel.viewType, {
    async deserializeWebviewPanel(p: vscode.WebviewPanel, state: unknown) {
      panel.adopt(p, state as PanelState | undefined);
    },
  });
}
