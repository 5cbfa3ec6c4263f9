// A private influence server for this editor window: `influence-lens serve --port 0` started
// with a fresh token in INFLUENCE_LENS_TOKEN (never on a command line, where `ps` shows it),
// no discovery file, and `--watch-parent` so it ends with the editor even after a crash. It is
// started on first use and again after it exits. No `vscode` import (tested with a real server).
import { type ChildProcess, spawn } from 'node:child_process';
import { existsSync, statSync } from 'node:fs';
import { newToken } from '../../transport/discovery';
import { type Cancellation, CancelledError, ClientError } from './influence-client';
import type { Connector } from './server-client';

export interface LocalServerOptions {
  /** the influence-lens CLI: a .js/.mjs/.cjs file (run with `node`) or an executable */
  command: string;
  /** the Node.js that runs a .js command (default: `node` on PATH) */
  node?: string;
  /** an influence-lens.json; none: the embedded default model and data */
  config?: string;
  cwd?: string;
  /** the server's stderr, line by line (its log), and what this class does */
  log?: (line: string) => void;
  /** give up when the server has not said where it listens by then (default 120 s: it opens the models first) */
  startTimeoutMs?: number;
  env?: NodeJS.ProcessEnv;
  /** the server stopped after it was ready, not by `dispose` (killed, crashed): how, in words */
  onStopped?: (why: string) => void;
}

const READY = /^influence-lens server on (ws:\/\/\S+)/m;

export class LocalServer implements Connector {
  private child: ChildProcess | undefined;
  private started: Promise<{ url: string; token: string }> | undefined;

  constructor(private readonly opts: LocalServerOptions) {}

  get label(): string {
    return this.child?.pid ? `local server (pid ${this.child.pid})` : 'local server';
  }

  /** The command line, for messages (the token is not on it). */
  get commandLine(): string {
    return [...this.argv()].map((a) => (/[\s"']/.test(a) ? JSON.stringify(a) : a)).join(' ');
  }

  endpoint(token?: Cancellation): Promise<{ url: string; token: string }> {
    if (!this.started) {
      const p = this.start(token);
      this.started = p;
      p.catch(() => {
        if (this.started === p) this.started = undefined;
      });
    }
    return this.started;
  }

  private *argv(): Generator<string> {
    const { command, config } = this.opts;
    if (/\.[cm]?js$/.test(command)) yield this.opts.node ?? 'node';
    yield command;
    yield* ['serve', '--port', '0', '--no-discovery', '--watch-parent', String(process.pid)];
    if (config) yield* ['--config', config];
  }

  private start(cancel?: Cancellation): Promise<{ url: string; token: string }> {
    const log = this.opts.log ?? (() => {});
    const secret = newToken();
    const [exe, ...args] = [...this.argv()];
    // a CLI path that is not there (or a folder) is the setting's fault: said of the setting, not
    // as node's MODULE_NOT_FOUND dump or a spawn EACCES
    const cmd = this.opts.command;
    if (/[\\/]/.test(cmd)) {
      const problem = !existsSync(cmd) ? 'does not exist' : statSync(cmd).isDirectory() ? 'is a folder' : undefined;
      if (problem)
        return Promise.reject(
          new ClientError(
            `the influence-lens CLI ${cmd} ${problem}: set influenceLens.server.command to the CLI (bin/influence-lens.js of the influence-lens package, or node_modules/.bin/influence-lens), or clear it to use the one found automatically`,
          ),
        );
    }
    log(`starting the server: ${this.commandLine}`);
    const child = spawn(exe, args, {
      cwd: this.opts.cwd,
      env: { ...(this.opts.env ?? process.env), INFLUENCE_LENS_TOKEN: secret },
      stdio: ['ignore', 'pipe', 'pipe'],
    });
    this.child = child;
    let out = '';
    let err = '';
    child.stdout?.setEncoding('utf8');
    child.stderr?.setEncoding('utf8');
    child.stderr?.on('data', (d: string) => {
      err = (err + d).slice(-4000);
      for (const line of d.split('\n')) if (line.trim()) log(line);
    });
    let ready = false;
    return new Promise((resolve, reject) => {
      let settled = false;
      const finish = (f: () => void) => {
        if (settled) return;
        settled = true;
        clearTimeout(timer);
        sub?.dispose();
        f();
      };
      const timeoutMs = this.opts.startTimeoutMs ?? 120_000;
      const timer = setTimeout(() => {
        child.kill('SIGTERM');
        finish(() =>
          reject(
            new ClientError(
              `the local server did not start within ${timeoutMs / 1000} s (${this.commandLine})${tail(err)}`,
              true,
            ),
          ),
        );
      }, timeoutMs);
      const sub = cancel?.onCancellationRequested(() => {
        child.kill('SIGTERM');
        finish(() => reject(new CancelledError()));
      });
      child.stdout?.on('data', (d: string) => {
        out += d;
        const m = READY.exec(out);
        if (m) finish(() => resolve({ url: m[1], token: secret }));
        if (m) ready = true;
        if (out.length > 100_000) out = out.slice(-10_000);
      });
      child.on('error', (e: NodeJS.ErrnoException) => {
        const why =
          e.code === 'ENOENT'
            ? `"${exe}" was not found. Set influenceLens.server.command to the influence-lens CLI ` +
              '(bin/influence-lens.js of the influence-lens package, or node_modules/.bin/influence-lens)' +
              (exe === (this.opts.node ?? 'node') ? ', and make sure Node.js 20 or newer is on PATH' : '')
            : e.message;
        finish(() => reject(new ClientError(`cannot start the local server: ${why}`)));
      });
      child.on('exit', (code, signal) => {
        const ours = this.child === child;
        if (ours) {
          this.child = undefined;
          this.started = undefined;
        }
        log(`the server exited (${signal ?? `code ${code}`})`);
        // a server that served and then went away (not one this object stopped): the status bar
        // must not go on naming its model as if it were there
        if (ours && ready) this.opts.onStopped?.(`the local server stopped (${signal ?? `exit code ${code}`})`);
        finish(() =>
          reject(
            new ClientError(
              // its own error first: the command line after it is long
              `the local server stopped before it was ready${tail(err)} (${signal ?? `exit code ${code}`}; ${this.commandLine})`,
              true,
            ),
          ),
        );
      });
    });
  }

  dispose(): void {
    this.child?.kill('SIGTERM');
    this.child = undefined;
    this.started = undefined;
  }
}

/** The end of the server's log, where it says why it failed. */
function tail(stderr: string): string {
  const lines = stderr.trim().split('\n').filter(Boolean).slice(-4);
  return lines.length ? `: ${lines.join(' | ')}` : '';
}
