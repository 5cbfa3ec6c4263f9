// A small in-process stand-in for the `vscode` API, enough to run the extension's flag, export
// and completion commands in a unit test: documents are read from disk the way VS Code's text
// model reads them (UTF-8 with U+FFFD for bad bytes, BOM dropped, line endings normalised to the
// majority), edits change the document (not the file), and every message shown is recorded with
// an answer the test queues. Use `loadWithVscodeStub` to import extension modules.
import { readdirSync, readFileSync, statSync } from 'node:fs';
import { register } from 'node:module';
import { join, relative } from 'node:path';

export class Uri {
  private constructor(
    readonly scheme: string,
    readonly fsPath: string,
  ) {}
  static file(p: string): Uri {
    return new Uri('file', p);
  }
  static parse(s: string): Uri {
    const m = /^([a-z-]+):\/\/(.*)$/.exec(s);
    if (!m) throw new Error(`bad uri ${s}`);
    return new Uri(m[1], decodeURIComponent(m[2]));
  }
  /** VS Code's `path` (the file's path with forward slashes, for a file Uri) */
  get path(): string {
    return this.fsPath;
  }
  toString(): string {
    return `${this.scheme}://${encodeURIComponent(this.fsPath).replace(/%2F/g, '/')}`;
  }
}

export class Position {
  constructor(
    readonly line: number,
    readonly character: number,
  ) {}
}
const before = (a: Position, b: Position) => a.line < b.line || (a.line === b.line && a.character < b.character);
export class Range {
  constructor(
    readonly start: Position,
    readonly end: Position,
  ) {}
  /** VS Code's: the overlap, empty where the two only touch, undefined where they are apart */
  intersection(o: Range): Range | undefined {
    const start = before(this.start, o.start) ? o.start : this.start;
    const end = before(this.end, o.end) ? this.end : o.end;
    return before(end, start) ? undefined : new Range(start, end);
  }
}
export class Selection extends Range {
  get active(): Position {
    return this.end;
  }
}

export class EventEmitter<T> {
  private listeners: Array<(e: T) => void> = [];
  event = (f: (e: T) => void) => {
    this.listeners.push(f);
    return { dispose: () => undefined };
  };
  fire(e: T): void {
    for (const f of this.listeners) f(e);
  }
  dispose(): void {
    this.listeners = [];
  }
}

export class CancellationTokenSource {
  private readonly cancelled = new EventEmitter<void>();
  readonly token = {
    isCancellationRequested: false,
    onCancellationRequested: this.cancelled.event,
  };
  cancel(): void {
    this.token.isCancellationRequested = true;
    this.cancelled.fire();
  }
  dispose(): void {
    this.cancelled.dispose();
  }
}

export class MarkdownString {
  isTrusted: unknown;
  supportThemeIcons = false;
  value = '';
  constructor(v = '') {
    this.value = v;
  }
  appendMarkdown(s: string): this {
    this.value += s;
    return this;
  }
}
export class Hover {
  constructor(
    readonly contents: MarkdownString,
    readonly range?: Range,
  ) {}
}
export const ViewColumn = { One: 1 };
export const TreeItemCollapsibleState = { None: 0, Collapsed: 1, Expanded: 2 };
export class TreeItem {
  [k: string]: unknown;
  constructor(
    readonly label: string,
    readonly collapsibleState?: number,
  ) {}
}
export class ThemeIcon {
  constructor(
    readonly id: string,
    readonly color?: unknown,
  ) {}
}
export class ThemeColor {
  constructor(readonly id: string) {}
}
export const ProgressLocation = { Notification: 15 };

/** One change of a document's text, with the offsets of the text before it. */
export interface ContentChange {
  range: Range;
  rangeOffset: number;
  rangeLength: number;
  text: string;
}

/** An open document: the file's text as VS Code's model holds it. */
export class TextDocument {
  text: string;
  version = 1;
  isDirty = false;
  isClosed = false;
  constructor(readonly uri: Uri) {
    this.text = modelText(readFileSync(uri.fsPath));
  }
  get lineCount(): number {
    return this.lines().length;
  }
  private lines(): string[] {
    return this.text.split(/\r?\n/);
  }
  getText(): string {
    return this.text;
  }
  lineAt(i: number | Position) {
    const n = typeof i === 'number' ? i : i.line;
    if (n < 0 || n >= this.lineCount) throw new Error(`Illegal value for line ${n}`);
    const text = this.lines()[n];
    return { text, range: new Range(new Position(n, 0), new Position(n, text.length)) };
  }
  offsetAt(p: Position): number {
    let off = 0;
    for (let i = 0; i < p.line; i++) off = this.text.indexOf('\n', off) + 1;
    return off + p.character;
  }
  positionAt(offset: number): Position {
    const before = this.text.slice(0, offset);
    const line = before.split('\n').length - 1;
    return new Position(line, offset - (before.lastIndexOf('\n') + 1));
  }
  /** An edit as the user's typing makes it. */
  edit(f: (text: string) => string): void {
    const before = this.text;
    const after = f(before);
    // one content change, as VS Code reports a single edit: what lies between the common start and end
    let a = 0;
    while (a < before.length && a < after.length && before[a] === after[a]) a++;
    let b = 0;
    while (
      b < before.length - a &&
      b < after.length - a &&
      before[before.length - 1 - b] === after[after.length - 1 - b]
    )
      b++;
    const range = new Range(this.positionAt(a), this.positionAt(before.length - b));
    this.text = after;
    this.version++;
    this.isDirty = true;
    fake.changedDocument.fire({
      document: this,
      contentChanges: [
        { range, rangeOffset: a, rangeLength: before.length - b - a, text: after.slice(a, after.length - b) },
      ],
    });
  }
  /** Closed without saving (its edits are dropped; VS Code's "Don't Save"). */
  close(): void {
    fake.documents = fake.documents.filter((d) => d !== this);
    this.isClosed = true;
    fake.closed.fire(this);
  }
  async save(): Promise<boolean> {
    const { writeFileSync } = await import('node:fs');
    writeFileSync(this.uri.fsPath, this.text);
    this.isDirty = false;
    return true;
  }
}

/** What VS Code's text model makes of a file's bytes. */
export function modelText(bytes: Buffer): string {
  let t = bytes.toString('utf8').replace(/^\uFEFF/, '');
  const crlf = (t.match(/\r\n/g) ?? []).length;
  const lf = (t.match(/\n/g) ?? []).length;
  const eol = crlf > lf / 2 ? '\r\n' : '\n';
  t = t.replace(/\r?\n/g, eol);
  return t;
}

export interface Shown {
  kind: 'info' | 'warning' | 'error' | 'status' | 'pick';
  message: string;
  detail?: string;
}

/** Everything a test sets up and reads back. */
export const fake = {
  shown: [] as Shown[],
  /** answers to the next questions (message buttons, quick picks, input boxes), in order */
  answers: [] as unknown[],
  documents: [] as TextDocument[],
  commands: new Map<string, (...a: unknown[]) => unknown>(),
  config: {} as Record<string, unknown>,
  workspaceFolder: undefined as string | undefined,
  watchers: [] as Array<{
    glob: string;
    change: EventEmitter<Uri>;
    create: EventEmitter<Uri>;
    delete: EventEmitter<Uri>;
  }>,
  saved: new EventEmitter<TextDocument>(),
  changedDocument: new EventEmitter<{ document: TextDocument; contentChanges: ContentChange[] }>(),
  closed: new EventEmitter<TextDocument>(),
  renamed: new EventEmitter<{ files: Array<{ oldUri: Uri; newUri: Uri }> }>(),
  executed: [] as Array<{ id: string; args: unknown[] }>,
  reset(): void {
    this.shown = [];
    this.answers = [];
    this.documents = [];
    this.config = {};
    this.watchers = [];
    this.executed = [];
    window.activeTextEditor = undefined;
    window.visibleTextEditors = [];
  },
  /** Opens a file in an editor and makes it the active one, the cursor on a 0-based line. */
  async open(path: string, line = 0): Promise<TextDocument> {
    const doc = await workspace.openTextDocument(Uri.file(path));
    const at = new Position(line, 0);
    window.activeTextEditor = {
      document: doc,
      selection: new Selection(at, at),
      async edit(f: (b: { insert(p: Position, t: string): void }) => void) {
        const e = new WorkspaceEdit();
        f({ insert: (p, t) => e.insert(doc.uri, p, t) });
        return workspace.applyEdit(e);
      },
    };
    return doc;
  },
  activeEditor() {
    if (!window.activeTextEditor) throw new Error('no active editor');
    return window.activeTextEditor;
  },
  messages(kind?: Shown['kind']): string[] {
    return this.shown.filter((s) => !kind || s.kind === kind).map((s) => s.message);
  },
};

function ask(kind: Shown['kind'], message: string, rest: unknown[]) {
  const opts = rest[0] && typeof rest[0] === 'object' ? (rest[0] as { detail?: string }) : undefined;
  fake.shown.push({ kind, message, detail: opts?.detail });
  return Promise.resolve(fake.answers.shift());
}

export const window = {
  activeTextEditor: undefined as
    | undefined
    | {
        document: TextDocument;
        selection: Selection;
        edit(f: (b: { insert(p: Position, t: string): void }) => void): Promise<boolean>;
      },
  showInformationMessage: (m: string, ...r: unknown[]) => ask('info', m, r),
  showWarningMessage: (m: string, ...r: unknown[]) => ask('warning', m, r),
  showErrorMessage: (m: string, ...r: unknown[]) => ask('error', m, r),
  setStatusBarMessage: (m: string) => {
    fake.shown.push({ kind: 'status', message: m });
    return { dispose: () => undefined };
  },
  showQuickPick: async (items: unknown, opts?: { title?: string; placeHolder?: string }) => {
    fake.shown.push({ kind: 'pick', message: opts?.title ?? '', detail: opts?.placeHolder });
    const a = fake.answers.shift();
    return typeof a === 'function' ? a(await items) : a;
  },
  showInputBox: async () => fake.answers.shift(),
  showTextDocument: async (d: TextDocument | Uri) => d,
  createOutputChannel: () => {
    const quiet = () => undefined;
    return {
      info: quiet,
      warn: quiet,
      error: quiet,
      debug: quiet,
      trace: quiet,
      appendLine: quiet,
      show: quiet,
      dispose: quiet,
    };
  },
  withProgress: async (_o: unknown, f: (p: unknown, t: unknown) => unknown) =>
    f({ report: () => undefined }, { isCancellationRequested: false, onCancellationRequested: () => undefined }),
  /** editors a test shows (decorations are recorded on them by the test's own setDecorations) */
  visibleTextEditors: [] as unknown[],
  createTextEditorDecorationType: (options: unknown) => ({ options, dispose: () => undefined }),
};
export const DecorationRangeBehavior = { OpenOpen: 0, ClosedClosed: 1, OpenClosed: 2, ClosedOpen: 3 };

export class WorkspaceEdit {
  readonly ops: Array<{ uri: Uri; range: Range; text: string }> = [];
  delete(uri: Uri, range: Range): void {
    this.ops.push({ uri, range, text: '' });
  }
  insert(uri: Uri, at: Position, text: string): void {
    this.ops.push({ uri, range: new Range(at, at), text });
  }
}

export const workspace = {
  get workspaceFolders() {
    return fake.workspaceFolder ? [{ uri: Uri.file(fake.workspaceFolder) }] : undefined;
  },
  get textDocuments() {
    return fake.documents;
  },
  async openTextDocument(uri: Uri): Promise<TextDocument> {
    const have = fake.documents.find((d) => d.uri.toString() === uri.toString());
    if (have) return have;
    if (statSync(uri.fsPath).size > 50 * 1024 * 1024)
      throw new Error(`cannot open ${uri}. Detail: Files above 50MB cannot be synchronized with extensions.`);
    const d = new TextDocument(uri);
    fake.documents.push(d);
    return d;
  },
  async applyEdit(edit: WorkspaceEdit): Promise<boolean> {
    for (const d of new Set(edit.ops.map((o) => fake.documents.find((x) => x.uri.toString() === o.uri.toString())))) {
      if (!d) return false;
      const ops = edit.ops
        .filter((o) => o.uri.toString() === d.uri.toString())
        .map((o) => [d.offsetAt(o.range.start), d.offsetAt(o.range.end), o.text] as const)
        .sort((a, b) => b[0] - a[0]);
      d.edit((t) => ops.reduce((acc, [a, b, s]) => acc.slice(0, a) + s + acc.slice(b), t));
    }
    return true;
  },
  asRelativePath: (p: string | Uri) => {
    const path = typeof p === 'string' ? p : p.fsPath;
    return fake.workspaceFolder ? relative(fake.workspaceFolder, path) : path;
  },
  getConfiguration: () => ({ get: (k: string, d: unknown) => (k in fake.config ? fake.config[k] : d) }),
  /** a watcher the test fires by hand (`fake.watchers`) */
  createFileSystemWatcher: (glob: string) => {
    const w = {
      glob,
      change: new EventEmitter<Uri>(),
      create: new EventEmitter<Uri>(),
      delete: new EventEmitter<Uri>(),
    };
    fake.watchers.push(w);
    return {
      onDidChange: w.change.event,
      onDidCreate: w.create.event,
      onDidDelete: w.delete.event,
      dispose: () => undefined,
    };
  },
  onDidSaveTextDocument: (f: (d: TextDocument) => void) => fake.saved.event(f),
  onDidChangeTextDocument: (f: (e: { document: TextDocument; contentChanges: ContentChange[] }) => void) =>
    fake.changedDocument.event(f),
  onDidCloseTextDocument: (f: (d: TextDocument) => void) => fake.closed.event(f),
  onDidRenameFiles: (f: (e: { files: Array<{ oldUri: Uri; newUri: Uri }> }) => void) => fake.renamed.event(f),
  /** The workspace folder's files matching a glob (the `exclude` glob ignored). */
  findFiles: async (glob: string) =>
    fake.workspaceFolder
      ? (readdirSync(fake.workspaceFolder, { recursive: true }) as string[])
          .filter((f) => globMatches(f, glob))
          .map((f) => Uri.file(join(fake.workspaceFolder as string, f)))
      : [],
};

export const commands = {
  registerCommand(id: string, f: (...a: unknown[]) => unknown) {
    fake.commands.set(id, f);
    return { dispose: () => fake.commands.delete(id) };
  },
  async executeCommand(id: string, ...a: unknown[]) {
    fake.executed.push({ id, args: a });
    return fake.commands.get(id)?.(...a);
  },
};

/** Whether a path matches a glob of the forms the extension uses (`**` any folders, `*` within a name). */
export function globMatches(path: string, glob: string): boolean {
  const re = glob
    .split('**/')
    .map((part) => part.replace(/[.+^${}()|[\]\\]/g, '\\$&').replace(/\*/g, '[^/]*'))
    .join('(?:.*/)?');
  return new RegExp(`^(?:.*/)?${re}$`).test(path);
}

/** A Memento kept in memory. */
export function memento() {
  const m = new Map<string, unknown>();
  return {
    get: <T>(k: string, d?: T) => (m.has(k) ? (m.get(k) as T) : d),
    update: async (k: string, v: unknown) => void m.set(k, v),
    keys: () => [...m.keys()],
  };
}

let registered = false;
/** Imports an extension module (an absolute URL: `new URL('…', import.meta.url)`) with `vscode` resolved to this fake. */
export async function loadWithVscodeStub<T>(specifier: URL): Promise<T> {
  if (!registered) {
    register('./vscode-hooks.mjs', import.meta.url);
    registered = true;
  }
  return (await import(specifier.href)) as T;
}
