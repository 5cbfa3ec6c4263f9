// influence-lens serve: the local influence server the editor talks to (JSON-RPC over a
// WebSocket on 127.0.0.1, token-authenticated). With no --config it serves the embedded default.
import { basename } from 'node:path';
import { checkToken } from '../../transport/discovery';
import { closeOnSignals, startServer } from '../../transport/server';
import { defaultServiceConfig } from '../defaults';
import { type Config, defaultServerSettings, loadConfig } from '../service/config';
import { serviceHandlers } from '../service/handlers';
import { WorkerService } from '../service/worker-service';
import { CHECKPOINTS_OPTION, checkpointsSetting } from './checkpoints';
import { CliError, int, parse } from './util';

export async function runServe(argv: string[]): Promise<void> {
  const { values: v } = parse(argv, {
    config: { type: 'string' },
    port: { type: 'string' },
    host: { type: 'string' },
    // the editor starts a private server: no discovery file, and it ends with the editor
    'no-discovery': { type: 'boolean' },
    'watch-parent': { type: 'string' },
    ...CHECKPOINTS_OPTION,
  });
  // an empty host is every interface to Node (and an unusable ws://:port/ URL), as the config's
  // "host" refuses it: say an address instead
  if (v.host !== undefined && !v.host.trim())
    throw new CliError('--host must name an address (127.0.0.1 by default; 0.0.0.0 for every interface)');
  let cfg: Config;
  if (v.config) cfg = await loadConfig(v.config);
  else cfg = { service: defaultServiceConfig(), server: defaultServerSettings() };
  overrideNotes(cfg, v);
  if (v.port !== undefined) {
    const port = int(v.port, '--port', 0);
    if (port < 0 || port > 65535) throw new CliError('--port must be 0..65535');
    cfg.server.port = port;
  }
  if (v.host !== undefined) cfg.server.host = v.host;
  if (v.checkpoints !== undefined) cfg.service.finetuned.checkpoints = checkpointsSetting(v.checkpoints);
  const parent = v['watch-parent'] === undefined ? undefined : int(v['watch-parent'], '--watch-parent', 0);
  if (parent !== undefined && parent <= 0) throw new CliError('--watch-parent must be a process id');
  // a bad token is the user's setting: one line, before any model is loaded
  const envToken = process.env.INFLUENCE_LENS_TOKEN;
  if (envToken !== undefined)
    try {
      checkToken(envToken, 'INFLUENCE_LENS_TOKEN');
    } catch (e) {
      throw new CliError((e as Error).message);
    }
  // the models, datasets and tensor work live in worker threads; this thread only answers the protocol
  const service = await WorkerService.start(cfg.service);
  let server: Awaited<ReturnType<typeof startServer>>;
  try {
    server = await startServer({
      handlers: serviceHandlers(service),
      info: () => service.currentInfo(),
      host: cfg.server.host,
      port: cfg.server.port,
      limits: {
        maxConcurrent: cfg.server.maxConcurrent,
        maxQueued: cfg.server.maxQueued,
        maxFrameBytes: cfg.server.maxFrameBytes,
      },
      discoveryFile: v['no-discovery'] ? false : cfg.server.discoveryFile,
      log: (level, message) => process.stderr.write(`[${level}] ${message}\n`),
    });
  } catch (e) {
    // the worker threads would keep this process alive, waiting for a server that never came
    await service.close();
    throw listenError(e, cfg.server.host, cfg.server.port, v.config);
  }
  closeOnSignals(server);
  if (parent !== undefined) watchParent(parent, () => void server.close().then(() => process.exit(0)));
  const info = service.info();
  process.stdout.write(
    `influence-lens server on ${server.url}\n` +
      `token: ${server.token}\n` +
      (server.discoveryFile ? `discovery file: ${server.discoveryFile} (mode 0600)\n` : '') +
      `model: ${info.model}; datasets: ${info.datasets.join(', ')}; methods now: ${info.methods.join(', ')}\n` +
      Object.entries(info.unavailable)
        .map(([m, why]) => `  ${m}: ${why}\n`)
        .join(''),
  );
}

/**
 * A flag wins over the configuration file; where the file says otherwise, a note on stderr says
 * which (a `--checkpoints auto` over `"checkpoints": "off"` summed over checkpoints without a word).
 */
function overrideNotes(
  cfg: Config,
  v: { port?: string; host?: string; checkpoints?: string; 'no-discovery'?: boolean },
): void {
  const file = cfg.service.configFile;
  if (!file) return;
  const raw = JSON.parse(file.json) as Record<string, unknown> & { models?: Record<string, unknown> };
  const stage = (raw.models?.finetuned ?? raw.models) as Record<string, unknown> | undefined;
  const name = basename(file.path);
  const note = (flag: string, key: string, value: unknown) =>
    process.stderr.write(`note: ${flag} overrides "${key}": ${JSON.stringify(value)} in ${name}\n`);
  if (v.port !== undefined && raw.port !== undefined && Number(v.port) !== raw.port)
    note(`--port ${v.port}`, 'port', raw.port);
  if (v.host !== undefined && raw.host !== undefined && v.host !== raw.host) note(`--host ${v.host}`, 'host', raw.host);
  if (v.checkpoints !== undefined && stage?.checkpoints !== undefined && stage.checkpoints !== v.checkpoints)
    note(`--checkpoints ${v.checkpoints}`, 'checkpoints', stage.checkpoints);
  if (v['no-discovery'] && raw.discoveryFile !== undefined) note('--no-discovery', 'discoveryFile', raw.discoveryFile);
}

/** A failed listen said of the setting that chose the address, in one line. */
function listenError(e: unknown, host: string, port: number, config: string | undefined): unknown {
  const code = (e as NodeJS.ErrnoException).code;
  const where = config ? `--host/--port or "host"/"port" in ${config}` : '--host/--port';
  if (code === 'EADDRINUSE')
    return new CliError(
      `port ${port} on ${host} is in use (another server?): choose another with ${where} (0 picks a free one)`,
    );
  if (code === 'ENOTFOUND' || code === 'EAI_AGAIN')
    return new CliError(`host "${host}" does not resolve to an address: correct ${where} (127.0.0.1 by default)`);
  if (code === 'EADDRNOTAVAIL')
    return new CliError(`host "${host}" is not an address of this machine: correct ${where} (127.0.0.1 by default)`);
  if (code === 'EACCES')
    return new CliError(
      `port ${port} on ${host} needs privileges this user lacks: choose one above 1023 with ${where}`,
    );
  return e;
}

/** Calls `gone` once the process `pid` no longer exists (polled: no OS-specific parent-death signal). */
function watchParent(pid: number, gone: () => void): void {
  const timer = setInterval(() => {
    try {
      process.kill(pid, 0);
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code === 'EPERM') return; // alive, someone else's
      clearInterval(timer);
      process.stderr.write(`[info] the process ${pid} that started this server is gone: stopping\n`);
      gone();
    }
  }, 2000);
  timer.unref();
}
