// influence-lens serve: the local influence server the editor talks to (JSON-RPC over a
// WebSocket on 127.0.0.1, token-authenticated). With no --config it serves the embedded default.
import { METHODS } from '../../protocol/types';
import { defaultServiceConfig } from '../defaults';
import { generate } from '../model/generate';
import { type Config, defaultServerSettings, loadConfig } from '../rpc/config';
import { closeOnSignals, type MethodTable, startServer } from '../rpc/server';
import { InfluenceService, type Work } from '../service/influence-service';
import { CliError, int, parse } from './util';

const id = { type: 'string', minLength: 1, maxLength: 200 } as const;

/** The influence methods, with the schemas their params must satisfy. */
export function serviceHandlers(service: InfluenceService): MethodTable {
  const work = (ctx: { signal: AbortSignal; progress: Work['progress']; partial: (v: unknown) => void }): Work => ({
    signal: ctx.signal,
    progress: ctx.progress,
    partial: ctx.partial,
  });
  return {
    explain: {
      heavy: true,
      title: 'Explaining the completion',
      params: {
        type: 'object',
        required: ['dataset', 'method', 'topK'],
        // one query (prompt + completion), or several in one pass (queries)
        oneOf: [{ required: ['prompt', 'completion'] }, { required: ['queries'] }],
        additionalProperties: false,
        properties: {
          prompt: { type: 'string' },
          completion: { type: 'string', minLength: 1 },
          queries: {
            type: 'array',
            minItems: 1,
            maxItems: 64,
            items: {
              type: 'object',
              required: ['prompt', 'completion'],
              additionalProperties: false,
              properties: { prompt: { type: 'string' }, completion: { type: 'string', minLength: 1 } },
            },
          },
          dataset: id,
          method: { enum: [...METHODS] },
          topK: { type: 'integer', minimum: 1, maximum: 1000 },
          candidates: { enum: ['all', 'retrieved'] },
          compare: { type: 'array', items: { enum: [...METHODS] }, maxItems: 6 },
        },
      },
      handler: (p, ctx) => ('queries' in p ? service.explainMany(p, work(ctx)) : service.explain(p, work(ctx))),
    },
    generate: {
      heavy: true,
      title: 'Completing with the model',
      params: {
        type: 'object',
        required: ['prompt'],
        additionalProperties: false,
        properties: {
          prompt: { type: 'string', maxLength: 20000 },
          maxTokens: { type: 'integer', minimum: 1, maximum: 256 },
          temperature: { type: 'number', minimum: 0, maximum: 5 },
          seed: { type: 'integer' },
        },
      },
      handler: async (p: { prompt: string; maxTokens?: number; temperature?: number; seed?: number }) => {
        const [g] = await generate(service.model, [p.prompt], {
          maxNewTokens: p.maxTokens ?? 16,
          temperature: p.temperature ?? 0,
          seed: p.seed ?? 0,
        });
        return { prompt: p.prompt, completion: g.text, logprobs: g.logprobs };
      },
    },
    getExample: {
      params: {
        type: 'object',
        required: ['dataset', 'line'],
        additionalProperties: false,
        properties: { dataset: id, line: { type: 'integer', minimum: 1 }, hash: { type: 'string', maxLength: 64 } },
      },
      handler: (p: { dataset: string; line: number; hash?: string }) => service.getExample(p.dataset, p.line, p.hash),
    },
    scanDataset: {
      heavy: true,
      title: 'Scanning the dataset',
      params: {
        type: 'object',
        required: ['dataset'],
        additionalProperties: false,
        properties: { dataset: id, topK: { type: 'integer', minimum: 1, maximum: 10000 } },
      },
      handler: (p: { dataset: string; topK?: number }, ctx) => service.scanDataset(p.dataset, p.topK ?? 50, work(ctx)),
    },
    fit: {
      heavy: true,
      title: 'Fitting EK-FAC factors',
      params: {
        type: 'object',
        additionalProperties: false,
        properties: { stage: { enum: ['finetuned', 'pretrained'] } },
      },
      handler: async (p: { stage?: 'finetuned' | 'pretrained' }, ctx) => {
        const r = await service.fit(p.stage ?? 'finetuned', work(ctx));
        return { ...r, info: service.info() };
      },
    },
    index: {
      heavy: true,
      title: 'Indexing training gradients',
      params: { type: 'object', required: ['dataset'], additionalProperties: false, properties: { dataset: id } },
      handler: async (p: { dataset: string }, ctx) => {
        const s = await service.index(p.dataset, work(ctx));
        return { dataset: p.dataset, examples: s.size, bytes: s.bytes };
      },
    },
    reload: {
      params: { type: 'object', required: ['dataset'], additionalProperties: false, properties: { dataset: id } },
      handler: (p: { dataset: string }) => service.reload(p.dataset),
    },
  };
}

export async function runServe(argv: string[]): Promise<void> {
  const { values: v } = parse(argv, {
    config: { type: 'string' },
    port: { type: 'string' },
    host: { type: 'string' },
    // the editor starts a private server: no discovery file, and it ends with the editor
    'no-discovery': { type: 'boolean' },
    'watch-parent': { type: 'string' },
  });
  let cfg: Config;
  if (v.config) cfg = await loadConfig(v.config);
  else cfg = { service: defaultServiceConfig(), server: defaultServerSettings() };
  if (v.port !== undefined) {
    const port = int(v.port, '--port', 0);
    if (port < 0 || port > 65535) throw new CliError('--port must be 0..65535');
    cfg.server.port = port;
  }
  if (v.host !== undefined) cfg.server.host = v.host;
  const parent = v['watch-parent'] === undefined ? undefined : int(v['watch-parent'], '--watch-parent', 0);
  if (parent !== undefined && parent <= 0) throw new CliError('--watch-parent must be a process id');
  const service = new InfluenceService(cfg.service);
  service.open();
  const server = await startServer({
    handlers: serviceHandlers(service),
    info: () => service.info(),
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
