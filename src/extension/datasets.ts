// Where a dataset id's JSONL file is, so the editor can open an example at file:line and keep its
// flags next to it. The server addresses datasets by id only; the file comes from, in order:
// the `influenceLens.datasets` setting ({"id": "path"}, relative to the workspace folder), the
// paths the server reports, a workspace file named `<id>.jsonl`, or the id itself as a path.
import { existsSync, readFileSync, statSync } from 'node:fs';
import { isAbsolute, join } from 'node:path';
import * as vscode from 'vscode';
import { byteLines, lineText } from '../common/byte-lines';
import type { ClientInfo } from './client';
import { SettingsError, settings } from './config';
import { lineHash, lineHashAt } from './flags/hash';
import { isSidecarPath } from './flags/sidecar';

export class DatasetResolver {
  private found = new Map<string, string>();

  constructor(private readonly info: () => ClientInfo | undefined) {}

  /**
   * The dataset's file path, or undefined with nothing found. A path the setting names must
   * exist: flags written next to a missing file would belong to no dataset.
   */
  async resolve(id: string): Promise<string | undefined> {
    const configured = settings().datasets[id];
    if (configured) {
      const p = absolute(configured);
      if (!existsSync(p))
        throw new SettingsError([
          `influenceLens.datasets maps "${id}" to ${JSON.stringify(configured)}, and there is no such file (${p}); correct the path, or remove the entry to use the server's`,
        ]);
      return p;
    }
    const reported = this.info()?.datasetPaths?.[id];
    if (reported && existsSync(reported)) return reported;
    const cached = this.found.get(id);
    if (cached && existsSync(cached)) return cached;
    if (vscode.workspace.workspaceFolders?.length) {
      const glob = `**/${id.replace(/[[\]{}*?]/g, '')}.jsonl`;
      const hits = (await vscode.workspace.findFiles(glob, '**/node_modules/**', 10)).filter(
        (u) => !isSidecarPath(u.fsPath) && !u.fsPath.endsWith('.cleaned.jsonl'),
      );
      // several files of that name (a backup, another checkout): a flag written beside the wrong
      // one would never reach the data the server scored, so none is picked
      if (hits.length > 1) {
        const rel = hits.map((u) => vscode.workspace.asRelativePath(u, false)).sort();
        throw new Error(
          `${hits.length} files in the workspace could hold dataset "${id}" (${rel.join(', ')})${reported ? `, and the server's ${reported} is not on this machine` : ''}: name the one the server reads in the setting influenceLens.datasets, e.g. {"${id}": "${rel[0]}"}`,
        );
      }
      if (hits.length) {
        this.found.set(id, hits[0].fsPath);
        return hits[0].fsPath;
      }
    }
    const asPath = absolute(id);
    if (asPath.endsWith('.jsonl') && existsSync(asPath)) return asPath;
    return undefined;
  }

  /** Like `resolve`, but says what to do when nothing is found. */
  async require(id: string): Promise<string> {
    const p = await this.resolve(id);
    if (!p)
      throw new Error(
        `Cannot find the file of dataset "${id}". Name it in the setting influenceLens.datasets, e.g. {"${id}": "data/${id}.jsonl"}.`,
      );
    return p;
  }
}

function absolute(p: string): string {
  if (isAbsolute(p)) return p;
  const root = vscode.workspace.workspaceFolders?.[0]?.uri.fsPath;
  return root ? join(root, p) : p;
}

/**
 * Opens a dataset at an example (the editor's text, unsaved edits included): its line when the
 * line still holds the example (same hash), otherwise wherever the hash is now; says so when it
 * moved. When it is gone, nothing is selected: a selection on whatever now holds that line number
 * would invite flagging the wrong record. Returns whether the example was found.
 */
export async function revealExample(path: string, line: number, hash: string): Promise<boolean> {
  const doc = await openDataset(path);
  if (!doc) return revealInLargeFile(path, line, hash);
  let target = line - 1;
  if (target >= doc.lineCount || lineHashAt(doc, Math.max(0, target)) !== hash) {
    let moved = -1;
    for (let i = 0; i < doc.lineCount; i++) {
      if (lineHashAt(doc, i) === hash) {
        moved = i;
        break;
      }
    }
    if (moved < 0) {
      void vscode.window.showWarningMessage(
        `Influence Lens: the example ${hash} (line ${line} when it was scored) is no longer in ${vscode.workspace.asRelativePath(path)}${doc.isDirty ? ' (unsaved edits)' : ''}: it was edited or removed. Explain again to score the file as it is now.`,
      );
      return false;
    }
    void vscode.window.showInformationMessage(`The example moved from line ${line} to line ${moved + 1}.`);
    target = moved;
  }
  const range = doc.lineAt(target).range;
  await vscode.window.showTextDocument(doc, {
    selection: new vscode.Selection(range.start, range.end),
    preview: true,
    viewColumn: vscode.ViewColumn.One,
  });
  return true;
}

/**
 * VS Code does not give extensions the text of a file above 50 MB (its text model's sync limit,
 * counted in characters): openTextDocument fails with "Files above 50MB cannot be synchronized
 * with extensions". Training sets are often that big.
 */
const SYNC_LIMIT = 50 * 1024 * 1024;

/** The dataset's document, or undefined when the file is too large for extensions to read. */
export async function openDataset(path: string): Promise<vscode.TextDocument | undefined> {
  try {
    return await vscode.workspace.openTextDocument(vscode.Uri.file(path));
  } catch (e) {
    if (tooLargeForExtensions(path)) return undefined;
    throw e;
  }
}

function tooLargeForExtensions(path: string): boolean {
  try {
    return statSync(path).size > SYNC_LIMIT;
  } catch {
    return false;
  }
}

/**
 * The 1-based line that holds the example now: `line` when it still does, else its first copy;
 * undefined when it is in no line. Read from the editor when the file is open there (unsaved
 * edits included), else from the file's bytes (any size).
 */
export function currentLine(path: string, line: number, hash: string): number | undefined {
  const uri = vscode.Uri.file(path).toString();
  const doc = vscode.workspace.textDocuments.find((d) => d.uri.toString() === uri);
  if (doc) {
    if (line <= doc.lineCount && lineHashAt(doc, line - 1) === hash) return line;
    for (let i = 0; i < doc.lineCount; i++) if (lineHashAt(doc, i) === hash) return i + 1;
    return undefined;
  }
  const buf = readFileSync(path);
  let found: number | undefined;
  for (const l of byteLines(buf)) {
    const text = lineText(buf, l);
    if (text === undefined || lineHash(text) !== hash) continue;
    if (found === undefined || l.line === line) found = l.line;
    if (l.line >= line) break;
  }
  return found;
}

/** revealExample for a file above the limit: the example is found in the file on disk. */
async function revealInLargeFile(path: string, line: number, hash: string): Promise<boolean> {
  const found = currentLine(path, line, hash);
  const rel = vscode.workspace.asRelativePath(path);
  if (found === undefined) {
    void vscode.window.showWarningMessage(
      `Influence Lens: the example ${hash} (line ${line} when it was scored) is no longer in ${rel} (the file on disk): it was edited or removed. Explain again to score the file as it is now.`,
    );
    return false;
  }
  if (found !== line)
    void vscode.window.showInformationMessage(`The example moved from line ${line} to line ${found}.`);
  const at = new vscode.Position(found - 1, 0);
  await vscode.commands.executeCommand('vscode.open', vscode.Uri.file(path), {
    selection: new vscode.Range(at, at),
    preview: true,
    viewColumn: vscode.ViewColumn.One,
  });
  return true;
}

/** The open editor document of a file, when it has unsaved changes. */
export function dirtyDocument(path: string): vscode.TextDocument | undefined {
  const uri = vscode.Uri.file(path).toString();
  return vscode.workspace.textDocuments.find((d) => d.isDirty && d.uri.toString() === uri);
}

/**
 * Before work that reads a dataset from disk (the server's scoring, an export): when the editor
 * holds unsaved changes to it, asks whether to save them first. Returns false when the person
 * chose neither (nothing is done then); `what` says what reads the file.
 */
export async function offerSave(path: string, what: string): Promise<boolean> {
  const doc = dirtyDocument(path);
  if (!doc) return true;
  const save = 'Save and continue';
  const saved = 'Use the saved file';
  const pick = await vscode.window.showWarningMessage(
    `${vscode.workspace.asRelativePath(path)} has unsaved changes.`,
    { modal: true, detail: `${what} reads the file on disk, without the unsaved changes.` },
    save,
    saved,
  );
  if (pick === save) {
    if (!(await doc.save())) throw new Error(`could not save ${path}`);
    return true;
  }
  return pick === saved;
}
