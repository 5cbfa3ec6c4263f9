// "Explain this completion" (selection → prompt/completion → results panel + editor heatmap),
// "Explain with a custom split", "Complete with model", and the panel's requests (open an
// example, flag it, switch method).

import { createHash } from 'node:crypto';
import * as vscode from 'vscode';
import { fileStamp } from '../../common/file-stamp';
import { parseJsonLine } from '../../common/json-line';
import { METHOD_LABELS } from '../../protocol/methods';
import type { ExampleId, ExplainParams, Method } from '../../protocol/types';
import { type Settings, SettingsError, settings } from '../config';
import { currentLine, offerSave, revealExample } from '../datasets';
import { STALE_NOTE } from '../history';
import { type QuerySplit, splitSelection } from '../selection';
import { chooseDataset, reportError, runnable, type Services } from '../services';
import type { PanelHandlers } from '../views/results-panel';

/** A kept result shown with no server to check it against (a reloaded window, a stopped server). */
export const UNCHECKED_NOTE =
  'Kept from an earlier explanation and not checked: no server is running. Explain again to check it against the current model, factors and settings.';

interface Query {
  prompt: string;
  completion: string;
  dataset: string;
  /** where the completion is in an editor (for the heatmap decoration) */
  editor?: vscode.TextEditor;
  split?: QuerySplit;
  /** the editor document's version the split's offsets belong to */
  version?: number;
}

export class ExplainController {
  private last?: Query;
  private running?: vscode.CancellationTokenSource;
  /** method switches so far (the panel's tabs), so that only the latest acts */
  private switches = 0;
  /** completions inserted by "Complete with model", by document: their prompt is the one generated from */
  private generated = new Map<string, { start: number; end: number; version: number; prompt: string }>();
  /** the compare methods (with their reasons) already said to be left out, so it is said once */
  private uncompared = new Set<string>();

  constructor(private readonly s: Services) {}

  /** The command: explain the active editor's selection. */
  async explainSelection(): Promise<void> {
    const editor = vscode.window.activeTextEditor;
    if (!editor) {
      void vscode.window.showWarningMessage('Influence Lens: open a file and select the completion to explain.');
      return;
    }
    const version = editor.document.version;
    const split = this.splitOf(editor);
    if (!split) return;
    if (split.note) void vscode.window.showInformationMessage(`Influence Lens: ${split.note}`);
    await this.explain(split.prompt, split.completion, { editor, split, version });
  }

  /** The command: edit the prompt and completion before explaining. */
  async explainWithSplit(): Promise<void> {
    const editor = vscode.window.activeTextEditor;
    const version = editor?.document.version;
    // the boxes show what is sent: a JSONL selection that is no record's field may prefill them
    // as plain text (the text before it as the prompt), which the person sees and edits
    const split = editor && !editor.selection.isEmpty ? this.splitOf(editor, { prefill: true }) : undefined;
    // a selection that cannot be explained was refused, saying why: no empty boxes after it
    if (editor && !editor.selection.isEmpty && !split) return;
    // a chat is explained as the model's chat template renders it, not as text the person edits
    // here (an edited prompt was dropped: the conversation was sent as it is in the file)
    if (split?.messages) {
      void vscode.window.showWarningMessage(
        'Influence Lens: a chat record is explained as the model’s chat template renders it, so its prompt and completion cannot be edited here. Select an assistant reply (or the whole line) and run “Explain this completion”; to explain another text, edit the conversation in the file.',
      );
      return;
    }
    const prompt = await vscode.window.showInputBox({
      title: 'Influence Lens: prompt (1/2)',
      prompt: 'The context the model saw. Use \\n for a newline.',
      value: escapeNl(split?.prompt ?? ''),
      ignoreFocusOut: true,
    });
    if (prompt === undefined) return;
    const completion = await vscode.window.showInputBox({
      title: 'Influence Lens: completion (2/2)',
      prompt: 'The text whose likelihood is explained. Use \\n for a newline.',
      value: escapeNl(split?.completion ?? ''),
      ignoreFocusOut: true,
      validateInput: (v) => (v ? undefined : 'The completion cannot be empty.'),
    });
    if (!completion) return;
    const p = unescapeNl(prompt);
    const c = unescapeNl(completion);
    await this.explain(p, c, split && c === split.completion && editor ? { editor, split, version } : {});
  }

  private splitOf(editor: vscode.TextEditor, o: { prefill?: boolean } = {}): QuerySplit | undefined {
    const doc = editor.document;
    const start = doc.offsetAt(editor.selection.start);
    const end = doc.offsetAt(editor.selection.end);
    const g = this.generated.get(doc.uri.toString());
    if (g && g.start === start && g.end === end && g.version === doc.version) {
      const completion = doc.getText(editor.selection);
      return {
        prompt: g.prompt,
        completion,
        how: 'text',
        description: "the model's completion",
        completionStarts: Array.from(completion, (_, i) => start + i),
        completionEnds: Array.from(completion, (_, i) => start + i + 1),
        promptTruncated: false,
      };
    }
    const r = splitSelection(doc.getText(), start, end, {
      maxPromptChars: settings(doc.uri).maxPromptChars,
      // in a dataset the text before a selection is other records' JSON, never a prompt
      jsonl: !o.prefill && (doc.languageId === 'jsonl' || /\.jsonl$/i.test(doc.uri.path)),
    });
    if (!r.ok) {
      void vscode.window.showWarningMessage(`Influence Lens: ${r.message}`);
      return undefined;
    }
    return r.split;
  }

  /** Explains prompt + completion against the chosen dataset with the configured method. */
  async explain(
    prompt: string,
    completion: string,
    where: { editor?: vscode.TextEditor; split?: QuerySplit; version?: number } = {},
  ) {
    try {
      const info = await this.s.info();
      const dataset = await chooseDataset(this.s, info);
      if (!dataset) return;
      this.last = { prompt, completion, dataset, ...where };
      await this.run(settings().method);
    } catch (e) {
      await reportError(e, () => this.explain(prompt, completion, where));
    }
  }

  /** Runs the last query with a method (fitting factors first when the person agrees) and shows the result. */
  private async run(wanted: Method): Promise<void> {
    const q = this.last;
    if (!q) return;
    const cfg = settings();
    if (cfg.problems.length) throw new SettingsError(cfg.problems);
    // the server scores the file on disk: results from it would point at lines the editor no longer has
    const path = await this.s.datasets.resolve(q.dataset);
    if (path && !(await offerSave(path, 'The server scores the dataset as it'))) return;
    const method = await runnable(this.s, wanted, await this.s.info());
    if (!method) {
      this.s.panel.post({ type: 'error', method: wanted, message: `${METHOD_LABELS[wanted]} did not run.` });
      return;
    }
    const info = await this.s.info();
    this.running?.cancel();
    const cts = new vscode.CancellationTokenSource();
    this.running = cts;
    const params = paramsOf(q, method, cfg, info);
    this.noteUncompared(cfg.compare, method, info);
    // what the result depends on, before the server reads anything (a file saved mid-run below)
    const before = await this.context(params, info);
    const short = q.completion.replace(/\s+/g, ' ').trim().slice(0, 40);
    this.s.panel.show();
    this.s.panel.post({ type: 'colors', colors: cfg.colors });
    this.s.panel.post({ type: 'busy', method, message: `Explaining “${short}” with ${METHOD_LABELS[method]}…` });
    try {
      const result = await vscode.window.withProgress(
        {
          location: vscode.ProgressLocation.Notification,
          title: `Influence Lens: explaining “${short}”`,
          cancellable: true,
        },
        (progress, token) => {
          token.onCancellationRequested(() => cts.cancel());
          return this.s.client.explain(
            params,
            (p) => {
              this.s.panel.post({ type: 'partial', partial: p });
              progress.report({ message: `${p.scored} of ${p.total} examples scored` });
            },
            cts.token,
            (p) => progress.report({ message: p.message }),
          );
        },
      );
      if (cts.token.isCancellationRequested) return;
      this.s.panel.post({
        type: 'result',
        result,
        methods: info.methods,
        dataset: q.dataset,
        // the dataset changed while it was scored: this result matches no context, not even its own
        // and the files the server scored with: a result from before a refit or retrain is not current after it
        context:
          before === (await this.context(params, info))
            ? `${before}:${result.revision ?? ''}`
            : `${before}:changed-while-scored`,
      });
      this.s.history.add(q.dataset, result, await this.s.datasets.resolve(q.dataset).catch(() => undefined));
      // the server knows more once it has read the dataset (factors fitted on other data): logged
      void this.s.refreshWarnings();
      await this.pushFlags();
      if (q.editor && q.split && cfg.editorHeatmap && !q.editor.document.isClosed) {
        // the split's offsets are of the text when it was explained: after an edit they would shade other characters
        if (q.version === undefined || q.editor.document.version === q.version)
          this.s.heatmap.apply(q.editor, q.split, result);
        else
          vscode.window.setStatusBarMessage(
            '$(info) Influence Lens: the text changed while it was explained; the editor heatmap is in the results panel only',
            8000,
          );
      }
    } catch (e) {
      // replaced by a newer run (another method chosen): that run owns the panel now
      if (this.running !== cts) return;
      const message = e instanceof Error ? e.message : String(e);
      this.s.panel.post({ type: 'error', method, message: cts.token.isCancellationRequested ? 'Cancelled.' : message });
      if (!cts.token.isCancellationRequested) await reportError(e, () => this.run(method));
    } finally {
      if (this.running === cts) this.running = undefined;
      cts.dispose();
    }
  }

  /**
   * What a result depends on beyond its method: the query, the dataset's file as the server read
   * it, the server and its model, and the settings that change what is scored. The panel keeps
   * other methods' results only while this stays the same.
   */
  private async context(params: ExplainParams, info: { model: string; datasetPaths?: Record<string, string> }) {
    const cfg = settings();
    let file: string | null = null;
    try {
      const path = await this.s.datasets.resolve(params.dataset);
      if (path) {
        // ctime too (fileStamp), as the server's own dataset check: touch -r still moves it
        const stamp = fileStamp(path);
        file = stamp === undefined ? null : `${path}:${stamp}`;
      }
    } catch {
      file = null;
    }
    const what = [
      params.prompt,
      params.completion,
      JSON.stringify(params.messages ?? null),
      params.dataset,
      file,
      info.model,
      cfg.serverUrl,
      cfg.serverConfig,
      cfg.serverCommand,
      params.topK,
      params.candidates,
    ];
    return createHash('sha256').update(JSON.stringify(what)).digest('hex').slice(0, 32);
  }

  /** The panel's handlers: open, flag, switch method, (re)load. */
  handlers(): PanelHandlers {
    return {
      open: (id) => void this.open(id),
      flag: (m) => void this.flag(m.id, m.score, m.method, m.flagged),
      method: (m, cached) => void this.switchMethod(m, cached),
      ready: () => {
        this.s.panel.post({ type: 'colors', colors: settings().colors });
        void this.pushFlags();
      },
    };
  }

  /** The panel's method switch; `cached`: the panel holds a result of it, shown unless its context changed. */
  private async switchMethod(method: Method, cached: boolean) {
    if (!this.last) {
      // after a reload: the query is in the restored panel state
      const r = Object.values(this.s.panel.mirror.results)[0];
      const dataset = this.s.panel.mirror.dataset;
      if (!r || !dataset) return;
      this.last = { prompt: r.query.prompt, completion: r.query.completion, dataset };
    }
    // a later switch wins: a check still waiting on the server must not run its method over it
    const mine = ++this.switches;
    try {
      if (cached) {
        const cfg = settings();
        // no server yet (a reloaded window): show the cached result rather than start one to
        // check it, and say that it was not checked
        if (!this.s.lastInfo()) {
          this.s.panel.post({ type: 'notice', method, message: UNCHECKED_NOTE });
          return;
        }
        // the server as it is now, not as of the last result: factors refitted or a model retrained
        // since make another revision, and changed settings leave the method refused; either way
        // the cached result is not current (an unreachable server: the run reports it)
        const info = await this.s.info(true).catch(() => undefined);
        if (mine !== this.switches) return;
        if (info?.methods.includes(method)) {
          const now = `${await this.context(paramsOf(this.last, method, cfg, info), info)}:${info.revision ?? ''}`;
          if (now === this.s.panel.mirror.context) return;
        }
      }
      if (mine !== this.switches) return;
      await this.run(method);
    } catch (e) {
      await reportError(e);
    }
  }

  private async open(id: ExampleId) {
    try {
      const path = await this.s.datasets.require(id.dataset);
      await revealExample(path, id.line, id.hash);
    } catch (e) {
      await reportError(e);
    }
  }

  private async flag(id: ExampleId, score: number, method: Method, flagged: boolean) {
    try {
      const path = await this.s.datasets.require(id.dataset);
      if (!flagged) {
        await this.s.flags.unflag(path, [id.hash]);
        return;
      }
      const r = this.s.panel.mirror.results[method];
      const e = r && [...r.supporting, ...r.opposing].find((x) => x.id.hash === id.hash);
      const completion = r?.query.completion ?? this.last?.completion ?? '';
      const what = !e ? 'flagged' : e.sign === 'neutral' ? `similar #${e.rank}` : `${e.sign} #${e.rank}`;
      // a panel restored after a retrain or refit shows an earlier model's ranking: the reason says so
      const stale = !!e && r?.revision !== undefined && this.s.history.isOlder(r.revision);
      // the result was scored on the file as it was then: record where the example is now, and
      // say so when it is no longer there (a flag then removes nothing from this file)
      const now = currentLine(path, id.line, id.hash);
      if (now === undefined) {
        const anyway = 'Flag anyway';
        const pick = await vscode.window.showWarningMessage(
          `Influence Lens: the example ${id.hash} (line ${id.line} when it was scored) is no longer in ${vscode.workspace.asRelativePath(path)}: it was edited or removed since. Its flag would remove nothing from the file as it is.`,
          anyway,
        );
        if (pick !== anyway) {
          await this.pushFlags(); // the panel's button shows the flag as it is: not set
          return;
        }
      }
      await this.s.flags.flag(path, [
        {
          hash: id.hash,
          line: now ?? id.line,
          reason: `${what} for ${JSON.stringify(completion.trim())} (${METHOD_LABELS[method]}${stale ? `, ${STALE_NOTE}` : ''})`,
          score,
          query: r ? r.query.prompt + r.query.completion : '',
        },
      ]);
    } catch (e) {
      await reportError(e);
    }
  }

  /** Sends the panel the flags of the dataset its results are about. */
  async pushFlags(): Promise<void> {
    const dataset = this.s.panel.mirror.dataset;
    if (!dataset) return;
    // a dataset path that cannot be resolved shows no flags (open and flag say why)
    const path = await this.s.datasets.resolve(dataset).catch(() => undefined);
    const flags = path ? this.s.flags.flagsOf(path) : new Map();
    this.s.panel.setFlags(Object.fromEntries([...flags].map(([h, e]) => [h, { hash: h, reason: e.reason }])));
  }

  /** The command: insert the model's completion after the prompt (the selection, or the text before the cursor). */
  async complete(): Promise<void> {
    const editor = vscode.window.activeTextEditor;
    if (!editor) {
      void vscode.window.showWarningMessage('Influence Lens: open a file and put the cursor after the prompt.');
      return;
    }
    const doc = editor.document;
    const sel = editor.selection;
    const endOff = doc.offsetAt(sel.end);
    const version = doc.version;
    const cfg = settings(doc.uri);
    if (cfg.problems.length) {
      await reportError(new SettingsError(cfg.problems));
      return;
    }
    // in a JSONL file, on a record's line or a blank one, the text before the cursor is JSON,
    // not a prompt the model was trained on (other files: a line of JSON may be part of a prompt)
    if (/\.jsonl$/i.test(doc.uri.fsPath) && endsInRecord(doc, sel.end.line)) {
      void vscode.window.showWarningMessage(
        'Influence Lens: Complete with model continues plain text, and the cursor is in a JSONL record (the text before it is JSON). Put the prompt in a plain-text file, or select a whole record or its completion and run Explain this completion.',
      );
      return;
    }
    const max = cfg.maxPromptChars;
    const prompt = sel.isEmpty ? doc.getText().slice(Math.max(0, endOff - max), endOff) : doc.getText(sel);
    if (!prompt) {
      void vscode.window.showWarningMessage('Influence Lens: there is no prompt before the cursor.');
      return;
    }
    try {
      const g = await vscode.window.withProgress(
        {
          location: vscode.ProgressLocation.Notification,
          title: 'Influence Lens: completing with the model',
          cancellable: true,
        },
        (_p, token) => this.s.client.generate({ prompt, maxTokens: 32 }, token),
      );
      if (!g.completion) {
        void vscode.window.showInformationMessage('Influence Lens: the model stopped at once (empty completion).');
        return;
      }
      // the position was taken before the request: after an edit it may be inside another record
      if (doc.isClosed || doc.version !== version) {
        void vscode.window.showWarningMessage(
          `Influence Lens: ${vscode.workspace.asRelativePath(doc.uri)} changed while the model was completing, so nothing was inserted (the completion was ${JSON.stringify(g.completion.slice(0, 60))}). Run Complete with model again.`,
        );
        return;
      }
      const at = sel.end;
      const ok = await editor.edit((b) => b.insert(at, g.completion));
      if (!ok) throw new Error('the editor refused the edit');
      const start = doc.offsetAt(at);
      const end = start + g.completion.length;
      editor.selection = new vscode.Selection(doc.positionAt(start), doc.positionAt(end));
      this.generated.set(doc.uri.toString(), { start, end, version: doc.version, prompt });
      const pick = await vscode.window.showInformationMessage(
        `Influence Lens: inserted the model's completion ${JSON.stringify(g.completion.slice(0, 60))}.`,
        'Explain it',
      );
      if (pick === 'Explain it') {
        editor.selection = new vscode.Selection(doc.positionAt(start), doc.positionAt(end));
        await this.explainSelection();
      }
    } catch (e) {
      await reportError(e, () => this.complete());
    }
  }

  /**
   * `influenceLens.compare` methods the server cannot run now are left out of the request (it would
   * refuse the whole explain); say which and why, once per reason, instead of comparing with fewer
   * methods than the settings list and not saying so.
   */
  private noteUncompared(
    compare: Method[],
    method: Method,
    info: { methods: Method[]; unavailable?: Partial<Record<Method, string | null>> },
  ): void {
    const left = compare.filter((m) => m !== method && !info.methods.includes(m));
    if (!left.length) return;
    const why = left
      .map((m) => `${METHOD_LABELS[m]} (${info.unavailable?.[m] ?? 'this server does not offer it'})`)
      .join('; ');
    if (this.uncompared.has(why)) return;
    this.uncompared.add(why);
    void vscode.window.showWarningMessage(
      `Influence Lens: the result is not compared with ${left.length === 1 ? 'a method' : 'methods'} of influenceLens.compare that the server cannot run now: ${why}.`,
    );
  }

  dispose(): void {
    this.running?.cancel();
  }
}

function paramsOf(q: Query, method: Method, cfg: Settings, info: { methods: Method[] }): ExplainParams {
  return {
    prompt: q.prompt,
    completion: q.completion,
    // a whole chat record goes as messages: the server renders it with the model's chat template
    messages: q.split?.messages,
    dataset: q.dataset,
    method,
    topK: cfg.topK,
    candidates: cfg.candidates,
    compare: [...new Set(cfg.compare)].filter((m) => m !== method && info.methods.includes(m)),
  };
}

function escapeNl(s: string): string {
  return s.replace(/\\/g, '\\\\').replace(/\n/g, '\\n');
}

function unescapeNl(s: string): string {
  return s.replace(/\\(\\|n)/g, (_, c) => (c === 'n' ? '\n' : '\\'));
}

/** Whether line `n` is a JSON record's, or blank after one (the text before it is then JSON). */
function endsInRecord(doc: vscode.TextDocument, n: number): boolean {
  for (let i = n; i >= 0; i--) {
    const p = parseJsonLine(doc.lineAt(i).text);
    if (p.kind !== 'blank') return p.kind === 'value';
  }
  return false;
}
