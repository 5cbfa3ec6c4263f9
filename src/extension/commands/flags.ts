// Flag / unflag (from a hover, the editor or the tree), edit a flag's reason, "Export cleaned
// dataset" (a filtered copy next to the original) and "Apply removal to file" (an undoable edit
// of the open document; nothing is saved for the user).
import { existsSync, readFileSync, statSync } from 'node:fs';
import { basename } from 'node:path';
import * as vscode from 'vscode';
import { invalidLineShownAs } from '../../common/byte-lines';
import { parseJsonLine } from '../../common/json-line';
import { METHOD_LABELS } from '../../protocol/methods';
import { offerSave, openDataset, revealExample } from '../datasets';
import { cleanedPathFor, editorRewrites, exportCleaned, filterDataset, removalSpans } from '../flags/export';
import type { FlagGroup } from '../flags/flag-store';
import { lineHashAt, lineTextAt } from '../flags/hash';
import { isSidecarPath, readFlagsForRemoval, sidecarPathFor } from '../flags/sidecar';
import { STALE_NOTE } from '../history';
import { reportError, type Services } from '../services';
import type { FlagNode } from '../views/flagged-tree';

export function registerFlagCommands(s: Services): vscode.Disposable[] {
  const reg = (id: string, f: (...args: never[]) => unknown) =>
    vscode.commands.registerCommand(id, async (...args: never[]) => {
      try {
        await f(...args);
      } catch (e) {
        void reportError(e);
      }
    });
  return [
    reg('influenceLens.flagLine', (uri?: string, line?: number, hash?: string) => flagLine(s, true, uri, line, hash)),
    reg('influenceLens.unflagLine', (uri?: string, line?: number, hash?: string) =>
      flagLine(s, false, uri, line, hash),
    ),
    reg('influenceLens.unflag', (node?: FlagNode, nodes?: FlagNode[]) => unflagNodes(s, node, nodes)),
    reg('influenceLens.unflagAll', (node?: FlagNode) => unflagAll(s, node)),
    reg('influenceLens.editReason', (node?: FlagNode) => editReason(s, node)),
    reg('influenceLens.openFlag', (node?: FlagNode) => openFlag(node)),
    reg('influenceLens.exportCleaned', (node?: FlagNode) => exportCommand(s, node)),
    reg('influenceLens.applyRemoval', (node?: FlagNode) => applyRemoval(s, node)),
  ];
}

/**
 * Flags or unflags the record on a line: the hover's link (its args name the example it showed:
 * file, line and content hash) or the active editor's cursor.
 */
async function flagLine(s: Services, on: boolean, uri?: string, line?: number, shown?: string) {
  let doc: vscode.TextDocument;
  if (uri !== undefined && line !== undefined) doc = await vscode.workspace.openTextDocument(vscode.Uri.parse(uri));
  else {
    const ed = vscode.window.activeTextEditor;
    if (!ed) throw new Error('open a JSONL dataset and put the cursor on an example');
    doc = ed.document;
    line = ed.selection.active.line;
  }
  if (doc.uri.scheme !== 'file' || isSidecarPath(doc.uri.fsPath))
    throw new Error('flags live next to a dataset file on disk: open the dataset (.jsonl)');
  const hash = line < doc.lineCount ? lineHashAt(doc, line) : undefined;
  // a hover stays open while the file changes under it (a git pull, another program): its link
  // must not act on whatever record now sits on that line
  if (shown !== undefined && hash !== shown)
    throw new Error(
      `line ${line + 1} of ${basename(doc.uri.fsPath)} no longer holds the example the hover showed (hash ${shown}): the file changed. Hover the example again.`,
    );
  if (!hash) {
    const p = line < doc.lineCount ? parseJsonLine(lineTextAt(doc, line)) : undefined;
    const why = p?.kind === 'malformed' ? ` (${p.problem})` : p?.kind === 'blank' ? ' (it is blank)' : '';
    throw new Error(
      `line ${line + 1} is not a JSON record${why}; the server skips it too, so there is nothing to flag`,
    );
  }
  // the editor shows a line that is not UTF-8 with U+FFFD for its bad bytes, and hashes that text;
  // the server skips the line (no text at all), so such a flag would match nothing on export
  const text = lineTextAt(doc, line);
  // (read whole: up to 1 GiB; a larger dataset's flag is taken as before, unchecked)
  if (on && text.includes('\uFFFD') && statSync(doc.uri.fsPath).size < 2 ** 30) {
    const bad = invalidLineShownAs(readFileSync(doc.uri.fsPath), text);
    if (bad)
      throw new Error(
        `line ${line + 1} is not valid UTF-8 in the file (line ${bad.line} on disk; the editor shows � for its bad bytes); the server skips it, so there is nothing to flag: fix its encoding (saving the file from this editor writes the � characters in their place)`,
      );
  }
  if (!on) {
    if (await s.flags.unflag(doc.uri.fsPath, [hash])) {
      vscode.window.setStatusBarMessage(`$(close) Unflagged line ${line + 1}`, 3000);
      return;
    }
    await notFlagged(s, doc, line);
    return;
  }
  // the newest ranking by the current model, else the newest one, said to be older
  const hits = s.history.hits(hash, doc.uri.fsPath);
  const hit = hits.find((h) => !h.stale) ?? hits[0];
  const added = await s.flags.flag(doc.uri.fsPath, [
    hit
      ? {
          hash,
          line: line + 1,
          reason: `${hit.sign === 'neutral' ? 'similar' : hit.sign} #${hit.rank} for ${JSON.stringify(hit.completion.trim())} (${METHOD_LABELS[hit.method]}${hit.stale ? `, ${hit.staleNote ?? STALE_NOTE}` : ''})`,
          score: hit.score,
          query: hit.prompt + hit.completion,
        }
      : { hash, line: line + 1, reason: 'flagged by hand', score: null, query: '' },
  ]);
  vscode.window.setStatusBarMessage(
    added
      ? `$(flag) Flagged line ${line + 1} → ${basename(doc.uri.fsPath).replace(/\.jsonl$/, '')}.exclude.jsonl`
      : 'Already flagged',
    3000,
  );
}

/**
 * "Unflag" on a line whose content is not flagged: says so. A flag is the content's hash, so once
 * a flagged line is edited its flag no longer matches it; when a flag of this dataset matches no
 * line and was recorded at this line, it is probably this line's earlier content: offers to
 * remove that flag (otherwise reverting the edit, or a git checkout, would bring it back).
 */
async function notFlagged(s: Services, doc: vscode.TextDocument, line: number) {
  const present = new Set<string>();
  for (let i = 0; i < doc.lineCount; i++) {
    const h = lineHashAt(doc, i);
    if (h) present.add(h);
  }
  const stale = [...s.flags.flagsOf(doc.uri.fsPath).values()].filter((e) => !present.has(e.hash));
  const mine = stale.filter((e) => e.line === line + 1);
  const name = basename(doc.uri.fsPath);
  if (mine.length === 1) {
    const old = mine[0];
    const unflag = 'Unflag the earlier version';
    const pick = await vscode.window.showWarningMessage(
      `Influence Lens: line ${line + 1} of ${name} is not flagged as it is now. Its earlier content, flagged at line ${old.line} (hash ${old.hash}${old.reason ? `: ${old.reason}` : ''}), is still flagged and would be removed by an export if the line were reverted.`,
      unflag,
    );
    if (pick === unflag) await s.flags.unflag(doc.uri.fsPath, [old.hash]);
    return;
  }
  if (!stale.length) {
    void vscode.window.showInformationMessage(
      `Influence Lens: line ${line + 1} of ${name} is not flagged; nothing was changed.`,
    );
    return;
  }
  // which stale flag was this line's cannot be told (the line moved too): the person picks
  const choose = 'Unflag one of them…';
  const answer = await vscode.window.showWarningMessage(
    `Influence Lens: line ${line + 1} of ${name} is not flagged; nothing was changed. ${stale.length} flag(s) of ${name} match no line now (examples edited or removed since); if this line was one of them before an edit, its flag still applies to the earlier content.`,
    choose,
  );
  if (answer !== choose) return;
  const pick = await vscode.window.showQuickPick(
    stale.map((e) => ({
      label: `line ${e.line} when flagged`,
      description: e.reason,
      detail: `hash ${e.hash}${e.query ? ` · query ${JSON.stringify(e.query.slice(0, 80))}` : ''}`,
      e,
    })),
    { title: `Unflag which example of ${name} (it matches no line now)?` },
  );
  if (pick) await s.flags.unflag(doc.uri.fsPath, [pick.e.hash]);
}

async function unflagNodes(s: Services, node?: FlagNode, nodes?: FlagNode[]) {
  const list = (nodes?.length ? nodes : node ? [node] : []).filter(
    (n): n is Extract<FlagNode, { kind: 'flag' }> => n.kind === 'flag',
  );
  const byDataset = new Map<string, string[]>();
  for (const n of list) byDataset.set(n.group.dataset, [...(byDataset.get(n.group.dataset) ?? []), n.entry.hash]);
  for (const [dataset, hashes] of byDataset) await s.flags.unflag(dataset, hashes);
}

async function unflagAll(s: Services, node?: FlagNode) {
  const g = await pickGroup(s, node, 'Unflag every example of which dataset?');
  if (!g) return;
  const ok = await vscode.window.showWarningMessage(
    `Remove all ${g.entries.length} flags of ${basename(g.dataset)}?`,
    { modal: true, detail: 'Their lines are removed from the .exclude.jsonl sidecar (git can bring them back).' },
    'Unflag all',
  );
  if (ok)
    await s.flags.unflag(
      g.dataset,
      g.entries.map((e) => e.hash),
    );
}

async function editReason(s: Services, node?: FlagNode) {
  if (node?.kind !== 'flag') return;
  const reason = await vscode.window.showInputBox({
    title: 'Influence Lens: why is this example flagged?',
    value: node.entry.reason,
    ignoreFocusOut: true,
  });
  if (reason !== undefined) await s.flags.setReason(node.group.dataset, node.entry.hash, reason);
}

async function openFlag(node?: FlagNode) {
  if (node?.kind !== 'flag') return;
  await revealExample(node.group.dataset, node.now?.line ?? node.entry.line, node.entry.hash);
}

/** The dataset a command acts on: the tree node's, the active editor's, or the user's pick. */
async function pickGroup(s: Services, node: FlagNode | undefined, title: string): Promise<FlagGroup | undefined> {
  if (node) return node.group;
  const groups = s.flags.all();
  const active = vscode.window.activeTextEditor?.document.uri;
  const mine = active && groups.find((g) => g.dataset === active.fsPath);
  if (mine) return mine;
  // the active editor holds a dataset without flags: acting on another one must be chosen, never implied
  const unflagged =
    active?.scheme === 'file' && /\.jsonl$/i.test(active.fsPath) && !isSidecarPath(active.fsPath)
      ? basename(active.fsPath)
      : undefined;
  if (!groups.length) {
    void vscode.window.showInformationMessage(
      `Influence Lens: nothing is flagged${unflagged ? ` in ${unflagged}` : ''} yet. Flag examples from the results panel or a dataset hover first.`,
    );
    return undefined;
  }
  if (groups.length === 1 && !unflagged) return groups[0];
  const pick = await vscode.window.showQuickPick(
    groups.map((g) => ({
      label: basename(g.dataset),
      description: `${g.entries.length} flagged`,
      detail: g.dataset,
      g,
    })),
    { title, placeHolder: unflagged ? `${unflagged} has no flags: pick a flagged dataset, or Escape` : undefined },
  );
  return pick?.g;
}

async function exportCommand(s: Services, node?: FlagNode) {
  const g = await pickGroup(s, node, 'Export a cleaned copy of which dataset?');
  if (!g) return;
  if (!existsSync(g.dataset)) throw new Error(`the dataset ${g.dataset} is missing`);
  s.flags.assertSaved(g.dataset, 'export');
  // the copy is made from the file on disk: unsaved edits would be missing from it without a word
  if (!(await offerSave(g.dataset, 'Export'))) return;
  const out = cleanedPathFor(g.dataset);
  let replace = false;
  if (existsSync(out)) {
    const ok = await vscode.window.showWarningMessage(
      `${basename(out)} exists. Replace it with a new cleaned copy?`,
      { modal: true, detail: `The source ${basename(g.dataset)} is never modified.` },
      'Replace',
    );
    if (ok !== 'Replace') return;
    replace = true;
  }
  const r = exportCleaned(g.dataset, out, { replace });
  const missing = r.missing.length
    ? ` ${r.missing.length} flagged example(s) were not found in the file (edited since?).`
    : '';
  const flagged = new Set(r.removed.map((x) => x.hash)).size;
  const copies = r.removed.length > flagged ? ` (${flagged} flagged; identical copies go with them)` : '';
  const pick = await vscode.window.showInformationMessage(
    `Influence Lens: wrote ${basename(r.outPath)}: ${r.kept} examples kept, ${r.removed.length} flagged removed${copies}.${missing}` +
      (r.other ? ` ${r.other} line(s) that are not records were kept as they are.` : ''),
    'Open',
  );
  if (pick === 'Open') await vscode.window.showTextDocument(vscode.Uri.file(r.outPath));
}

/** Export's wording: a flag is content, so identical copies of a flagged line go with it. */
function copiesNote(removed: ReadonlyArray<{ hash: string }>): string {
  const flagged = new Set(removed.map((r) => r.hash)).size;
  return removed.length > flagged ? ` (${flagged} flagged; identical copies go with them)` : '';
}

async function applyRemoval(s: Services, node?: FlagNode) {
  const g = await pickGroup(s, node, 'Remove the flagged examples from which dataset?');
  if (!g) return;
  // the flags as they are on disk now, not the list read when the tree last refreshed
  s.flags.assertSaved(g.dataset, 'apply removal');
  const excluded = readFlagsForRemoval(sidecarPathFor(g.dataset));
  const doc = await openDataset(g.dataset);
  if (!doc) {
    const exp = 'Export cleaned dataset';
    const pick = await vscode.window.showWarningMessage(
      `Influence Lens: ${basename(g.dataset)} is above 50 MB, which VS Code does not let extensions edit. Nothing was changed: Export cleaned dataset writes a copy without the flagged examples.`,
      exp,
    );
    if (pick === exp) await exportCommand(s, { kind: 'dataset', group: g });
    return;
  }
  const text = doc.getText();
  // the edit is saved by the person: the kept lines must come back as they are on disk
  const rewrites = editorRewrites(readFileSync(g.dataset), doc.isDirty ? undefined : text);
  if (rewrites) {
    const exp = 'Export cleaned dataset';
    const pick = await vscode.window.showWarningMessage(
      `Influence Lens: ${basename(g.dataset)} has ${rewrites}, so saving it after Apply removal would also rewrite lines that are kept. Nothing was changed: Export cleaned dataset writes a copy with every kept line byte for byte.`,
      exp,
    );
    if (pick === exp) await exportCommand(s, { kind: 'dataset', group: g });
    return;
  }
  const removed = filterDataset(text, excluded).removed;
  if (!removed.length) {
    void vscode.window.showInformationMessage(`Influence Lens: no flagged example is left in ${basename(g.dataset)}.`);
    return;
  }
  const edit = new vscode.WorkspaceEdit();
  for (const [a, b] of removalSpans(text, excluded))
    edit.delete(doc.uri, new vscode.Range(doc.positionAt(a), doc.positionAt(b)), {
      label: 'Remove flagged example',
      needsConfirmation: false,
    });
  if (!(await vscode.workspace.applyEdit(edit))) throw new Error('the editor refused the edit');
  await vscode.window.showTextDocument(doc, { preview: false });
  void vscode.window.showInformationMessage(
    `Influence Lens: removed ${removed.length} flagged example(s) from ${basename(g.dataset)}${copiesNote(removed)} (not saved: Undo brings them back; save to keep).`,
  );
}
