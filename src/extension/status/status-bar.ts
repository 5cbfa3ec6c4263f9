// The status bar item: the server's state, model and device; a click asks the server again.
import { basename } from 'node:path';
import * as vscode from 'vscode';
import type { ClientInfo } from '../client';

export class StatusBar implements vscode.Disposable {
  private readonly item = vscode.window.createStatusBarItem(
    'influenceLens.status',
    vscode.StatusBarAlignment.Right,
    100,
  );

  constructor() {
    this.item.name = 'Influence Lens';
    this.item.command = 'influenceLens.reconnect';
    this.item.text = '$(telescope) Influence Lens';
    this.item.tooltip = 'Influence Lens: the server starts on the first explanation. Click to start it now.';
    this.item.show();
  }

  connecting(label: string): void {
    this.item.text = '$(loading~spin) Influence Lens';
    this.item.backgroundColor = undefined;
    this.item.tooltip = `Influence Lens: connecting to the ${label}…`;
  }

  connected(label: string, info: ClientInfo): void {
    this.item.text = `$(telescope) ${basename(info.model)} · ${info.device}`;
    this.item.backgroundColor = undefined;
    const md = new vscode.MarkdownString();
    md.appendMarkdown(`**Influence Lens** · ${label}\n\n`);
    md.appendMarkdown(`model: \`${info.model}\` · device: ${info.device}\n\n`);
    md.appendMarkdown(`datasets: ${info.datasets.map((d) => `\`${d}\``).join(', ') || 'none'}\n\n`);
    md.appendMarkdown(`methods: ${info.methods.join(', ') || 'none'}\n\n`);
    const un = Object.entries(info.unavailable).filter(([, why]) => why);
    if (un.length) md.appendMarkdown(un.map(([m, why]) => `- ${m}: ${why}`).join('\n'));
    md.appendMarkdown('\n\nClick to ask the server again.');
    this.item.tooltip = md;
  }

  failed(message: string): void {
    this.item.text = '$(debug-disconnect) Influence Lens';
    this.item.backgroundColor = new vscode.ThemeColor('statusBarItem.warningBackground');
    this.item.tooltip = `Influence Lens: ${message}\n\nClick to try again.`;
  }

  /** The server is gone but will be started again on use (not a failure to connect). */
  stopped(message: string): void {
    this.item.text = '$(circle-slash) Influence Lens';
    this.item.backgroundColor = new vscode.ThemeColor('statusBarItem.warningBackground');
    this.item.tooltip = `Influence Lens: ${message}.\n\nClick to start it now.`;
  }

  dispose(): void {
    this.item.dispose();
  }
}
