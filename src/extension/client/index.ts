// Picks where the server is, from the settings: a configured URL (its token in the editor's
// SecretStorage), or a private server this window starts (`LocalServer`).
import { existsSync } from 'node:fs';
import { isAbsolute, join } from 'node:path';
import * as vscode from 'vscode';
import { readDiscoveryFile } from '../../transport/discovery';
import { settings } from '../config';
import { log } from '../log';
import { type Cancellation, ClientError } from './influence-client';
import { LocalServer } from './local-server';
import { type Connector, ServerClient } from './server-client';

/** `onStopped`: the private server this window started went away after serving (killed, crashed). */
export function createClient(context: vscode.ExtensionContext, onStopped?: (why: string) => void): ServerClient {
  const s = settings();
  return new ServerClient(
    s.serverUrl ? new RemoteServer(context.secrets, s.serverUrl) : localServer(context, onStopped),
  );
}

const CONFIG_FILE = 'influence-lens.json';

/**
 * Calls `changed` when the workspace folder's own influence-lens.json appears or goes while it is
 * what chooses the local server's setup (no server.url, no server.config): the server started
 * before it was written serves the embedded default, whose explanations would silently stand in
 * for the configured model's. (A change to the file itself the server notices: it refuses requests
 * until it is started again.)
 */
export function watchWorkspaceConfig(changed: () => void): vscode.Disposable {
  const watcher = vscode.workspace.createFileSystemWatcher(`**/${CONFIG_FILE}`);
  const onRoot = (uri: vscode.Uri) => {
    const root = vscode.workspace.workspaceFolders?.[0]?.uri.fsPath;
    const s = settings();
    if (root && !s.serverUrl && !s.serverConfig && uri.fsPath === join(root, CONFIG_FILE)) changed();
  };
  const subs = [watcher.onDidCreate(onRoot), watcher.onDidDelete(onRoot), watcher];
  return {
    dispose: () => {
      for (const d of subs) d.dispose();
    },
  };
}

function localServer(context: vscode.ExtensionContext, onStopped?: (why: string) => void): LocalServer {
  const s = settings();
  const root = vscode.workspace.workspaceFolders?.[0]?.uri.fsPath;
  const inRoot = (p: string) => (isAbsolute(p) || !root ? p : join(root, p));
  const config = s.serverConfig
    ? inRoot(s.serverConfig)
    : root && existsSync(join(root, CONFIG_FILE))
      ? join(root, CONFIG_FILE)
      : undefined;
  const command = s.serverCommand ? inRoot(s.serverCommand) : findCli(root, context);
  // the server a platform VSIX carries runs on the editor's own Node.js (no `node` on PATH needed;
  // in an Electron editor ELECTRON_RUN_AS_NODE makes its executable plain Node)
  const bundled = command === bundledServer(context);
  return new LocalServer({
    command,
    node: bundled ? process.execPath : undefined,
    env: bundled ? { ...process.env, ELECTRON_RUN_AS_NODE: '1' } : undefined,
    config,
    cwd: root,
    log: (line) => log.info(`[server] ${line}`),
    onStopped,
  });
}

/** The server bundle inside a platform VSIX (scripts/package-vsix.ts --target). */
function bundledServer(context: vscode.ExtensionContext): string {
  return join(context.extensionPath, 'server', 'cli.mjs');
}

/**
 * The influence-lens CLI: the workspace's node_modules, the workspace itself when it is the
 * influence-lens package, the package this extension was installed from (a development
 * install), the server a platform VSIX carries, or `influence-lens` on PATH.
 */
function findCli(root: string | undefined, context: vscode.ExtensionContext): string {
  const candidates = [
    root && join(root, 'node_modules', '.bin', 'influence-lens'),
    root && join(root, 'bin', 'influence-lens.js'),
    join(context.extensionPath, 'bin', 'influence-lens.js'),
    existsSync(join(context.extensionPath, 'server', 'node_modules', 'onnxruntime-node')) && bundledServer(context),
  ];
  for (const c of candidates) if (c && existsSync(c)) return c;
  return 'influence-lens';
}

const SECRET = (url: string) => `influenceLens.token:${url}`;

/** A server someone else started, at `influenceLens.server.url`. */
class RemoteServer implements Connector {
  constructor(
    private readonly secrets: vscode.SecretStorage,
    private readonly url: string,
  ) {}

  get label(): string {
    return this.url;
  }

  async endpoint(token?: Cancellation): Promise<{ url: string; token: string }> {
    let secret = await this.secrets.get(SECRET(this.url));
    // a server on this machine wrote its token to the discovery file (0600): use it
    const found = readDiscoveryFile();
    if (!secret && found && sameUrl(found.url, this.url)) secret = found.token;
    if (!secret) {
      secret = await vscode.window.showInputBox(
        {
          title: `Influence Lens: token of the server at ${this.url}`,
          prompt:
            "`influence-lens serve` printed it (and wrote it to ~/.cache/influence-lens/server.json). It is kept in the editor's secret storage.",
          password: true,
          ignoreFocusOut: true,
          validateInput: (v) => (v.trim().length >= 16 ? undefined : 'The token has at least 16 characters.'),
        },
        token as vscode.CancellationToken | undefined,
      );
      if (!secret)
        throw new ClientError(`no token for the server at ${this.url}: run "Influence Lens: Reconnect" to enter it`);
      secret = secret.trim();
      await this.secrets.store(SECRET(this.url), secret);
    }
    return { url: this.url, token: secret };
  }

  rejected(): void {
    void this.secrets.delete(SECRET(this.url));
  }

  dispose(): void {}
}

function sameUrl(a: string, b: string): boolean {
  const norm = (u: string) => u.replace(/\/+$/, '').replace('://localhost:', '://127.0.0.1:');
  return norm(a) === norm(b);
}

/** The command "Set server token": stores a token for the configured URL. */
export async function setServerToken(context: vscode.ExtensionContext): Promise<boolean> {
  const url = settings().serverUrl;
  if (!url) {
    void vscode.window.showInformationMessage(
      'Influence Lens: the extension starts its own server (influenceLens.server.url is empty), which needs no token.',
    );
    return false;
  }
  const t = await vscode.window.showInputBox({
    title: `Influence Lens: token of the server at ${url}`,
    password: true,
    ignoreFocusOut: true,
    validateInput: (v) => (v.trim().length >= 16 ? undefined : 'The token has at least 16 characters.'),
  });
  if (!t) return false;
  await context.secrets.store(SECRET(url), t.trim());
  return true;
}

export * from './influence-client';
export type { ServerClient } from './server-client';
