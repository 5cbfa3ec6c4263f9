// The "Flagged examples" view: one node per dataset with flags, one child per flagged example
// with its text, line, reason and the query that led to the flag. Unflag, edit the reason, open,
// export and apply removal are commands on the nodes (package.json: view/item/context). Where a
// dataset is open with unsaved edits, lines and texts are the editor's (what the person sees and
// what Open selects), and the dataset's node says so; otherwise the file's.

import { existsSync, readFileSync } from 'node:fs';
import { basename } from 'node:path';
import * as vscode from 'vscode';
import { byteLines, lineText } from '../../common/byte-lines';
import { formatScore, recordText } from '../../common/display';
import { fileStamp } from '../../common/file-stamp';
import { dirtyDocument } from '../datasets';
import type { FlagGroup, FlagStore } from '../flags/flag-store';
import { lineHash } from '../flags/hash';
import type { FlagEntry } from '../flags/sidecar';

export type FlagNode =
  | { kind: 'dataset'; group: FlagGroup }
  | { kind: 'flag'; group: FlagGroup; entry: FlagEntry; now?: { line: number; text: string } };

export class FlaggedTree implements vscode.TreeDataProvider<FlagNode> {
  private readonly emitter = new vscode.EventEmitter<FlagNode | undefined>();
  readonly onDidChangeTreeData = this.emitter.event;
  private readonly lines = new Map<string, { stamp: string; byHash: Map<string, { line: number; text: string }> }>();

  private readonly disposables: vscode.Disposable[] = [];
  /** the datasets the tree showed last (file events for other files are ignored cheaply) */
  private shown = new Set<string>();
  private pending: ReturnType<typeof setTimeout> | undefined;

  constructor(private readonly store: FlagStore) {
    store.onDidChange(() => this.emitter.fire(undefined));
    // a flagged example's line and text come from its dataset: redraw when a dataset with flags
    // is edited, saved or closed here (closing unsaved edits goes back to the file) or changed on
    // disk by another program (debounced: typing fires on every key, a save fires twice)
    const changed = (path: string) => {
      if (!this.shown.has(path)) return;
      clearTimeout(this.pending);
      this.pending = setTimeout(() => this.emitter.fire(undefined), 200);
    };
    const w = vscode.workspace.createFileSystemWatcher('**/*');
    this.disposables.push(
      w,
      w.onDidChange((u) => changed(u.fsPath)),
      w.onDidCreate((u) => changed(u.fsPath)),
      w.onDidDelete((u) => changed(u.fsPath)),
      vscode.workspace.onDidSaveTextDocument((d) => changed(d.uri.fsPath)),
      vscode.workspace.onDidChangeTextDocument((e) => changed(e.document.uri.fsPath)),
      vscode.workspace.onDidCloseTextDocument((d) => changed(d.uri.fsPath)),
    );
  }

  dispose(): void {
    clearTimeout(this.pending);
    for (const d of this.disposables) d.dispose();
  }

  refresh(): void {
    this.lines.clear();
    this.emitter.fire(undefined);
  }

  getChildren(node?: FlagNode): FlagNode[] {
    if (!node) {
      const groups = this.store.all();
      this.shown = new Set(groups.map((g) => g.dataset));
      return groups.map((group) => ({ kind: 'dataset', group }));
    }
    if (node.kind !== 'dataset') return [];
    const where = this.index(node.group.dataset);
    return node.group.entries.map((entry) => ({ kind: 'flag', group: node.group, entry, now: where?.get(entry.hash) }));
  }

  getParent(node: FlagNode): FlagNode | undefined {
    return node.kind === 'flag' ? { kind: 'dataset', group: node.group } : undefined;
  }

  getTreeItem(node: FlagNode): vscode.TreeItem {
    if (node.kind === 'dataset') {
      const g = node.group;
      const item = new vscode.TreeItem(basename(g.dataset), vscode.TreeItemCollapsibleState.Expanded);
      item.id = `dataset:${g.sidecar}`;
      // flags are found by the dataset's name: after a rename outside VS Code they belong to no file
      const missing = !existsSync(g.dataset);
      const unsaved = !!dirtyDocument(g.dataset);
      item.description = `${g.entries.length} flagged${missing ? ' · dataset missing (renamed or deleted?)' : unsaved ? ' · as in the unsaved editor' : ''}`;
      item.resourceUri = vscode.Uri.file(g.dataset);
      item.iconPath = missing
        ? new vscode.ThemeIcon('warning', new vscode.ThemeColor('problemsWarningIcon.foreground'))
        : new vscode.ThemeIcon('database');
      item.contextValue = 'influenceLens.dataset';
      item.tooltip = new vscode.MarkdownString(
        `**${vscode.workspace.asRelativePath(g.dataset)}**\n\n${g.entries.length} flagged in \`${basename(g.sidecar)}\`` +
          (missing
            ? `\n\nThere is no ${basename(g.dataset)}: if it was renamed, rename \`${basename(g.sidecar)}\` to match, so its flags apply again.`
            : '') +
          (unsaved
            ? '\n\nLines are those of the editor, which has unsaved edits; exports read the file on disk (you are asked to save first).'
            : '') +
          (g.problems ? `\n\n${g.problems} line(s) of the sidecar are not flags (kept as they are)` : ''),
      );
      return item;
    }
    const { entry, now } = node;
    const preview = now
      ? recordPreview(now.text)
      : dirtyDocument(node.group.dataset)
        ? '(not in the unsaved editor text)'
        : existsSync(node.group.dataset)
          ? '(no longer in the file)'
          : '(dataset missing)';
    const item = new vscode.TreeItem(`${now?.line ?? entry.line}: ${preview}`, vscode.TreeItemCollapsibleState.None);
    item.id = `flag:${node.group.sidecar}:${entry.hash}`;
    item.description = entry.reason;
    item.iconPath = new vscode.ThemeIcon(
      'flag',
      now ? undefined : new vscode.ThemeColor('problemsWarningIcon.foreground'),
    );
    item.contextValue = 'influenceLens.flag';
    const md = new vscode.MarkdownString();
    md.appendMarkdown(`**Flagged** · line ${now?.line ?? entry.line}`);
    if (now && now.line !== entry.line) md.appendMarkdown(` (was ${entry.line} when flagged)`);
    md.appendMarkdown(` · hash \`${entry.hash}\`\n\n`);
    if (entry.reason) md.appendMarkdown(`Reason: ${escapeMarkdown(entry.reason)}\n\n`);
    if (entry.score !== null) md.appendMarkdown(`Score on its query: ${formatScore(entry.score)}\n\n`);
    if (entry.query) md.appendCodeblock(entry.query.slice(-600), 'text');
    item.tooltip = md;
    item.command = {
      command: 'influenceLens.openFlag',
      title: 'Open',
      arguments: [node],
    };
    return item;
  }

  /**
   * hash → current line and text of a dataset: the editor's text while it has unsaved edits
   * (cached by the document's version), else the file's (cached by size, mtime, ctime and inode).
   */
  private index(path: string): Map<string, { line: number; text: string }> | undefined {
    const doc = dirtyDocument(path);
    let stamp: string;
    if (doc) stamp = `editor:${doc.version}`;
    else {
      // ctime and inode too (fileStamp): a file replaced with its size and mtime kept showed its old lines
      const s = fileStamp(path);
      if (s === undefined) return undefined;
      stamp = s;
    }
    const hit = this.lines.get(path);
    if (hit?.stamp === stamp) return hit.byHash;
    const byHash = new Map<string, { line: number; text: string }>();
    // by bytes, as the server splits it: one string of a file past ~512 MiB would throw
    const buf = doc ? Buffer.from(doc.getText(), 'utf8') : readFileSync(path);
    for (const l of byteLines(buf)) {
      const text = lineText(buf, l);
      const h = text === undefined ? undefined : lineHash(text);
      if (h && text !== undefined && !byHash.has(h)) byHash.set(h, { line: l.line, text });
    }
    this.lines.set(path, { stamp, byHash });
    return byHash;
  }
}

/** A record's text on one line (`recordText`: prompt and completion, the text, a chat's turns from the first), cut to fit. */
export function recordPreview(line: string): string {
  try {
    return textPreview(recordText(JSON.parse(line)) ?? line);
  } catch {
    return textPreview(line);
  }
}

/** Text on one line (newlines as ⏎), at most `max` characters. */
export function textPreview(s: string, max = 90): string {
  s = s.replace(/\s*\n\s*/g, ' ⏎ ').trim();
  return s.length > max ? `${s.slice(0, max - 1)}…` : s;
}

function escapeMarkdown(s: string): string {
  return s.replace(/[\\`*_{}[\]()#+\-.!|<>]/g, '\\$&');
}
