// Hovers on training-data JSONL files: for the record under the pointer, its content hash, its
// flag (with reason) and how it ranked in recent explanations, with Flag / Unflag links.
import * as vscode from 'vscode';
import { formatPercentile, formatScore, formatValue } from '../../common/display';
import { METHOD_LABELS, SIGNED_METHODS } from '../../protocol/methods';
import { settings } from '../config';
import type { FlagStore } from '../flags/flag-store';
import { lineHashAt } from '../flags/hash';
import { isSidecarPath } from '../flags/sidecar';
import { type History, STALE_NOTE } from '../history';

export const HOVER_COMMANDS = ['influenceLens.flagLine', 'influenceLens.unflagLine', 'influenceLens.showResults'];

export class JsonlHoverProvider implements vscode.HoverProvider {
  constructor(
    private readonly flags: FlagStore,
    private readonly history: History,
  ) {}

  provideHover(doc: vscode.TextDocument, pos: vscode.Position): vscode.Hover | undefined {
    if (!settings(doc.uri).hovers || doc.uri.scheme !== 'file' || isSidecarPath(doc.uri.fsPath)) return undefined;
    const hash = lineHashAt(doc, pos.line);
    if (!hash) return undefined;
    const flag = this.flags.flagsOf(doc.uri.fsPath).get(hash);
    const hits = this.history.hits(hash, doc.uri.fsPath).slice(0, 5);
    const md = new vscode.MarkdownString(undefined, true);
    md.isTrusted = { enabledCommands: HOVER_COMMANDS };
    md.supportThemeIcons = true;
    md.appendMarkdown(`**Influence Lens** · line ${pos.line + 1} · hash \`${hash}\`\n\n`);
    if (flag) md.appendMarkdown(`$(flag) **Flagged for removal**${flag.reason ? `: ${esc(flag.reason)}` : ''}\n\n`);
    if (hits.length) {
      md.appendMarkdown('Influence on recent queries:\n\n');
      for (const h of hits) {
        const q = h.completion.replace(/\s+/g, ' ').trim().slice(0, 40);
        md.appendMarkdown(
          `- ${h.sign === 'neutral' ? 'similar' : `**${h.sign}**`} #${h.rank} for “${esc(q)}” ` +
            `(${METHOD_LABELS[h.method]}, ${SIGNED_METHODS.includes(h.method) ? formatScore(h.score) : formatValue(h.score)}, ${formatPercentile(h.percentile)})` +
            // a ranking from before a retrain or refit is not the current model's
            (h.stale ? ` · *${h.staleNote ?? STALE_NOTE}*` : '') +
            '\n',
        );
      }
      md.appendMarkdown('\n');
    } else {
      md.appendMarkdown('Not among the examples of a recent explanation.\n\n');
    }
    // the hash too: the links must act on the example shown, not on whatever holds this line later
    const args = encodeURIComponent(JSON.stringify([doc.uri.toString(), pos.line, hash]));
    md.appendMarkdown(
      flag
        ? `[$(close) Unflag](command:influenceLens.unflagLine?${args} "Remove the flag from the sidecar")`
        : `[$(flag) Flag for removal](command:influenceLens.flagLine?${args} "Add this example to the dataset's .exclude.jsonl")`,
    );
    if (hits.length) md.appendMarkdown(' · [$(preview) Show results](command:influenceLens.showResults)');
    return new vscode.Hover(md, doc.lineAt(pos.line).range);
  }
}

function esc(s: string): string {
  return s.replace(/[\\`*_{}[\]()#+\-.!|<>]/g, '\\$&');
}
