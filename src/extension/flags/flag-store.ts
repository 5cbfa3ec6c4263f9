// The flags of every dataset the editor knows about, read from their sidecars
// (`<dataset>.exclude.jsonl`, see sidecar.ts) and kept fresh by a file watcher, so an edit by
// hand, a `git checkout` or another window shows up in the tree, the hovers and the panel.
// Every change is made on the file under its lock (sidecar.ts), never from this in-memory copy,
// and the copy is re-read whenever the file's size or time changed (a watcher event can lag), so
// one window never writes back a stale view over another window's flags.

import { existsSync, lstatSync, renameSync, rmSync, symlinkSync } from 'node:fs';
import { basename } from 'node:path';
import * as vscode from 'vscode';
import { resolveLinks } from '../../common/atomic-write';
import { fileStamp } from '../../common/file-stamp';
import { dirtyDocument } from '../datasets';
import {
  addFlags,
  datasetPathForSidecar,
  type FlagEntry,
  isFolder,
  isSidecarPath,
  readSidecar,
  removeFlags,
  setReason,
  sidecarPathFor,
  sidecarSharedWith,
  withLock,
} from './sidecar';

export interface FlagGroup {
  dataset: string;
  sidecar: string;
  entries: FlagEntry[];
  /** sidecar lines that are not entries (kept, reported in the tree's tooltip) */
  problems: number;
  /** the file's size and modification time when read ('' when absent) */
  stamp: string;
}

const KNOWN_KEY = 'influenceLens.knownSidecars';

export class FlagStore implements vscode.Disposable {
  private readonly groups = new Map<string, FlagGroup>();
  private readonly emitter = new vscode.EventEmitter<void>();
  readonly onDidChange = this.emitter.event;
  private readonly disposables: vscode.Disposable[] = [this.emitter];

  constructor(private readonly memento: vscode.Memento) {
    const w = vscode.workspace.createFileSystemWatcher('**/*.exclude.jsonl');
    const reload = (u: vscode.Uri) => this.load(u.fsPath);
    this.disposables.push(
      w,
      w.onDidChange(reload),
      w.onDidCreate(reload),
      w.onDidDelete(reload),
      vscode.workspace.onDidRenameFiles((e) => void this.followRenames(e.files)),
    );
  }

  /**
   * A dataset renamed or moved in VS Code takes its flags file along (`a.exclude.jsonl` →
   * `b.exclude.jsonl`): flags are found by the dataset's name, so they would otherwise stop
   * applying to it without a word. Never over an existing flags file (then it says so). A rename
   * outside VS Code (git mv) is not seen: the tree then shows the flags under the old name.
   */
  async followRenames(files: ReadonlyArray<{ oldUri: vscode.Uri; newUri: vscode.Uri }>): Promise<void> {
    for (const { oldUri, newUri } of files) {
      if (oldUri.scheme !== 'file' || isSidecarPath(oldUri.fsPath) || isSidecarPath(newUri.fsPath)) continue;
      // a folder renamed is one event for the folder itself: "train/" is no dataset, and the flags
      // of a "train.jsonl" beside it are not its to take
      if (isFolder(newUri.fsPath)) continue;
      const from = sidecarPathFor(oldUri.fsPath);
      const to = sidecarPathFor(newUri.fsPath);
      if (from === to || !existsSync(from)) continue;
      try {
        if (existsSync(to))
          throw new Error(
            `${basename(to)} exists, so the flags of ${basename(oldUri.fsPath)} stay in ${basename(from)}: merge them by hand`,
          );
        // under the old file's lock: another window may be writing it right now
        await withLock(from, () => {
          if (existsSync(to)) throw new Error(`${basename(to)} appeared; the flags stay in ${basename(from)}`);
          if (lstatSync(from).isSymbolicLink()) {
            // a link to shared flags: a new link beside the dataset to the same file (a relative
            // link moved elsewhere would point at nothing), then the old link goes
            symlinkSync(resolveLinks(from), to);
            rmSync(from);
          } else renameSync(from, to);
        });
        this.groups.delete(from);
        this.remember(to);
        this.load(to);
        void vscode.window.showInformationMessage(
          `Influence Lens: moved the flags of ${basename(oldUri.fsPath)} to ${basename(to)}, next to ${basename(newUri.fsPath)}.`,
        );
      } catch (e) {
        void vscode.window.showWarningMessage(`Influence Lens: ${(e as Error).message}`);
      }
    }
  }

  /** Reads the workspace's sidecars and those this extension wrote before (datasets outside the workspace). */
  async init(): Promise<void> {
    const known = this.memento.get<string[]>(KNOWN_KEY, []);
    const found = vscode.workspace.workspaceFolders?.length
      ? (await vscode.workspace.findFiles('**/*.exclude.jsonl', '**/node_modules/**', 200)).map((u) => u.fsPath)
      : [];
    for (const p of new Set([...known.filter((k) => existsSync(k)), ...found])) this.load(p, false);
    this.emitter.fire();
  }

  /** Every dataset with flags, each re-read when its file changed (a watcher event can lag, or never come). */
  all(): FlagGroup[] {
    for (const g of [...this.groups.values()]) if (g.stamp !== stampOf(g.sidecar)) this.load(g.sidecar, false);
    return [...this.groups.values()]
      .filter((g) => g.entries.length || g.problems)
      .sort((a, b) => a.dataset.localeCompare(b.dataset));
  }

  /** The flags of one dataset file, by hash. */
  flagsOf(datasetPath: string): Map<string, FlagEntry> {
    const sidecar = sidecarPathFor(datasetPath);
    const have = this.groups.get(sidecar);
    if (!have) this.load(sidecar, false);
    else if (have.stamp !== stampOf(sidecar)) this.load(sidecar); // changed by another window
    return new Map((this.groups.get(sidecar)?.entries ?? []).map((e) => [e.hash, e]));
  }

  /**
   * Throws while an editor holds unsaved changes to the dataset's flags file: flags are read and
   * written on disk, so acting now would ignore what the person sees (and a later save of that
   * editor would overwrite what was written). `what` names the action for the message.
   */
  assertSaved(datasetPath: string, what: string): void {
    const sidecar = sidecarPathFor(datasetPath);
    if (dirtyDocument(sidecar))
      throw new Error(
        `${vscode.workspace.asRelativePath(sidecar)} has unsaved changes: save or revert them, then ${what} again (flags are read from the file on disk)`,
      );
  }

  async flag(datasetPath: string, entries: FlagEntry[]): Promise<number> {
    this.assertSaved(datasetPath, 'flag');
    const sidecar = sidecarPathFor(datasetPath);
    const other = sidecarSharedWith(datasetPath);
    if (other)
      throw new Error(
        `${basename(datasetPath)} and ${basename(other)} would keep their flags in the same file (${basename(sidecar)}): rename one of them before flagging`,
      );
    const n = await addFlags(sidecar, entries);
    this.remember(sidecar);
    this.load(sidecar);
    return n;
  }

  async unflag(datasetPath: string, hashes: string[]): Promise<number> {
    this.assertSaved(datasetPath, 'unflag');
    const sidecar = sidecarPathFor(datasetPath);
    const n = await removeFlags(sidecar, hashes);
    this.load(sidecar);
    return n;
  }

  async setReason(datasetPath: string, hash: string, reason: string): Promise<boolean> {
    this.assertSaved(datasetPath, 'edit the reason');
    const sidecar = sidecarPathFor(datasetPath);
    const ok = await setReason(sidecar, hash, reason);
    this.load(sidecar);
    return ok;
  }

  private load(sidecar: string, fire = true) {
    try {
      const stamp = stampOf(sidecar);
      const s = readSidecar(sidecar);
      this.groups.set(sidecar, {
        dataset: datasetPathForSidecar(sidecar),
        sidecar,
        entries: s.entries,
        problems: s.problems.length,
        stamp,
      });
    } catch (e) {
      void vscode.window.showWarningMessage(`Influence Lens: cannot read ${sidecar}: ${(e as Error).message}`);
    }
    if (fire) this.emitter.fire();
  }

  private remember(sidecar: string) {
    const known = this.memento.get<string[]>(KNOWN_KEY, []);
    if (!known.includes(sidecar)) void this.memento.update(KNOWN_KEY, [...known, sidecar].slice(-100));
  }

  dispose(): void {
    for (const d of this.disposables) d.dispose();
  }
}

function stampOf(path: string): string {
  // ctime too (fileStamp): a flags file rewritten in place with its size and mtime kept (cp -p, rsync -t)
  return fileStamp(path) ?? '';
}
