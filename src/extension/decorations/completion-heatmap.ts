// The completion-side heatmap in the editor: after an explanation, each completion token in the
// document is shaded by the summed influence of the examples shown (the same values as the
// panel's query heatmap), with the value and −log p in the token's hover. One decoration type per
// color step, created once (as GitLens' heatmap does); cleared when the text under it changes.
import * as vscode from 'vscode';
import { BUCKETS, bucketBackground, bucketOf, formatScore, symmetricScale } from '../../common/display';
import { sumPerToken } from '../../common/heatmap';
import { SIGNED_METHODS } from '../../protocol/methods';
import type { ExplainResult } from '../../protocol/types';
import { completionDocumentRange, type QuerySplit } from '../selection';

export class CompletionHeatmap implements vscode.Disposable {
  private types = new Map<number, vscode.TextEditorDecorationType>();
  /** the document and the offsets [start, end) the shaded tokens span, moved with edits before them */
  private shown?: { uri: string; start: number; end: number };
  private readonly disposables: vscode.Disposable[] = [];

  constructor(private colors: { supporting: string; opposing: string }) {
    this.disposables.push(
      vscode.workspace.onDidChangeTextDocument((e) => {
        const shown = this.shown;
        if (!shown || e.document.uri.toString() !== shown.uri) return;
        // an edit that touches the shaded text clears it (its values are of the text explained);
        // one before it moves it (the editor moves the decorations, this keeps the span with them)
        let shift = 0;
        for (const c of e.contentChanges) {
          if (c.rangeOffset + c.rangeLength < shown.start) shift += c.text.length - c.rangeLength;
          else if (c.rangeOffset <= shown.end) return this.clear();
        }
        shown.start += shift;
        shown.end += shift;
      }),
    );
  }

  setColors(colors: { supporting: string; opposing: string }): void {
    this.colors = colors;
    this.clear();
    for (const t of this.types.values()) t.dispose();
    this.types.clear();
  }

  private type(bucket: number): vscode.TextEditorDecorationType {
    let t = this.types.get(bucket);
    if (!t) {
      const strong = Math.abs(bucket) >= 3;
      t = vscode.window.createTextEditorDecorationType({
        backgroundColor: bucketBackground(bucket, BUCKETS, this.colors),
        borderRadius: '2px',
        // not color alone: solid underline for supporting, dashed for opposing
        textDecoration: strong
          ? `underline ${bucket > 0 ? 'solid' : 'dashed'} ${bucket > 0 ? this.colors.supporting : this.colors.opposing}`
          : undefined,
        fontWeight: Math.abs(bucket) >= 4 ? 'bold' : undefined,
        rangeBehavior: vscode.DecorationRangeBehavior.ClosedClosed,
      });
      this.types.set(bucket, t);
    }
    return t;
  }

  apply(editor: vscode.TextEditor, split: QuerySplit, r: ExplainResult): void {
    this.clear();
    const n = r.query.completionTokens.offsets.length;
    const shown = [...r.supporting, ...r.opposing];
    if (!SIGNED_METHODS.includes(r.method) || !shown.some((e) => e.completionTokenScores?.length)) return;
    const values = sumPerToken(
      shown.map((e) => e.completionTokenScores),
      n,
    );
    const scale = symmetricScale(values);
    const byBucket = new Map<number, vscode.DecorationOptions[]>();
    let start = Number.POSITIVE_INFINITY;
    let end = Number.NEGATIVE_INFINITY;
    r.query.completionTokens.offsets.forEach(([s, e], k) => {
      const [ds, de] = completionDocumentRange(split, s, e);
      if (de <= ds) return;
      start = Math.min(start, ds);
      end = Math.max(end, de);
      const range = new vscode.Range(editor.document.positionAt(ds), editor.document.positionAt(de));
      const b = bucketOf(values[k], scale);
      const hover = new vscode.MarkdownString(
        `**Influence Lens** · token ${JSON.stringify(r.query.completion.slice(s, e))}\n\n` +
          `summed influence of the ${shown.length} examples shown: **${formatScore(values[k])}** ` +
          `(${values[k] > 0 ? 'supporting' : values[k] < 0 ? 'opposing' : 'neutral'})\n\n` +
          `−log p = ${r.query.completionTokens.values[k].toPrecision(3)}`,
      );
      const list = byBucket.get(b) ?? [];
      list.push({ range, hoverMessage: hover });
      byBucket.set(b, list);
    });
    for (const [b, list] of byBucket) editor.setDecorations(this.type(b), list);
    if (start < end) this.shown = { uri: editor.document.uri.toString(), start, end };
  }

  clear(): void {
    if (!this.shown) return;
    for (const ed of vscode.window.visibleTextEditors)
      if (ed.document.uri.toString() === this.shown.uri) for (const t of this.types.values()) ed.setDecorations(t, []);
    this.shown = undefined;
  }

  dispose(): void {
    for (const t of this.types.values()) t.dispose();
    for (const d of this.disposables) d.dispose();
  }
}
