// "Scan dataset": the training examples with the highest self-influence (unusual or memorized
// examples first), in a quick pick: Enter opens one, the flag button flags or unflags it.
import * as vscode from 'vscode';
import { formatScore, recordText } from '../../common/display';
import type { ScannedExample } from '../client';
import { revealExample } from '../datasets';
import { chooseDataset, fitStages, reportError, type Services } from '../services';
import { textPreview } from '../views/flagged-tree';

interface Item extends vscode.QuickPickItem {
  example: ScannedExample;
}

export async function scanDataset(s: Services): Promise<void> {
  try {
    const info = await s.info();
    const dataset = await chooseDataset(s, info);
    if (!dataset) return;
    // self-influence uses the fine-tuned model's EK-FAC factors
    if (info.needsFit.ekfac?.length) {
      const fit = 'Fit factors now';
      const pick = await vscode.window.showInformationMessage(
        'Influence Lens: scanning ranks examples by self-influence, which needs the EK-FAC factors of the fine-tuned model (not fitted yet).',
        fit,
      );
      if (pick !== fit) return;
      await fitStages(s, info.needsFit.ekfac);
      await s.info(true);
    }
    const r = await vscode.window.withProgress(
      {
        location: vscode.ProgressLocation.Notification,
        title: `Influence Lens: scanning ${dataset}`,
        cancellable: true,
      },
      (progress, token) =>
        s.client.scanDataset({ dataset, topK: 50 }, token, (p) => progress.report({ message: p.message })),
    );
    // the server knows more once it has read the dataset (factors fitted on other data): logged
    void s.refreshWarnings();
    const path = await s.datasets.resolve(dataset);
    const flagOn = { iconPath: new vscode.ThemeIcon('flag'), tooltip: 'Flag for removal' };
    const flagOff = { iconPath: new vscode.ThemeIcon('close'), tooltip: 'Unflag' };
    const items = (): Item[] => {
      const flags = path ? s.flags.flagsOf(path) : new Map();
      return r.examples.map((e) => ({
        // from the record as written: a chat's rendered text starts with the template's preamble
        label: `#${e.rank}  ${textPreview(recordText(e.record) ?? e.text)}`,
        description: `line ${e.id.line} · self-influence ${formatScore(e.selfInfluence)}${flags.has(e.id.hash) ? ' · flagged' : ''}`,
        buttons: path ? [flags.has(e.id.hash) ? flagOff : flagOn] : [],
        example: e,
      }));
    };
    const qp = vscode.window.createQuickPick<Item>();
    qp.title = `Influence Lens: ${r.examples.length} of ${r.scored} examples of ${dataset} with the highest self-influence`;
    qp.placeholder = 'Unusual or memorized examples first. Enter opens one; the flag button flags it for removal.';
    qp.matchOnDescription = true;
    qp.items = items();
    qp.onDidAccept(async () => {
      const e = qp.selectedItems[0]?.example;
      if (!e) return;
      try {
        await revealExample(path ?? (await s.datasets.require(dataset)), e.id.line, e.id.hash);
      } catch (err) {
        void reportError(err);
      }
    });
    qp.onDidTriggerItemButton(async ({ item }) => {
      if (!path) return;
      const e = item.example;
      try {
        if (s.flags.flagsOf(path).has(e.id.hash)) await s.flags.unflag(path, [e.id.hash]);
        else
          await s.flags.flag(path, [
            {
              hash: e.id.hash,
              line: e.id.line,
              reason: `self-influence #${e.rank} (${formatScore(e.selfInfluence)})`,
              score: e.selfInfluence,
              query: '',
            },
          ]);
      } catch (err) {
        void reportError(err);
        return;
      }
      const active = qp.activeItems[0]?.example.id.hash;
      qp.items = items();
      qp.activeItems = qp.items.filter((i) => i.example.id.hash === active);
    });
    qp.onDidHide(() => qp.dispose());
    qp.show();
  } catch (e) {
    void reportError(e, () => scanDataset(s));
  }
}
