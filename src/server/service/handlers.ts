// The method table of `influence-lens serve`: each request declared in src/protocol/requests,
// with the params schema it must satisfy (src/protocol/params-schema) and the service call
// that answers it. The transport (src/transport/server) knows nothing of what these do.
import { LIMITS } from '../../protocol/limits';
import { PARAMS_SCHEMA } from '../../protocol/params-schema';
import { Explain, ExplainMany, Fit, Generate, GetExample, Index, Reload, ScanDataset } from '../../protocol/requests';
import type { MethodContext, MethodTable } from '../../transport/server';
import { on } from '../../transport/server';
import { isLightExplain, type ServiceApi, type Work } from './influence-service';

/** The service's view of a request's context: cancellation, progress, partial results. */
function work(ctx: MethodContext): Work {
  return { signal: ctx.signal, progress: ctx.progress, partial: ctx.partial };
}

export function serviceHandlers(service: ServiceApi): MethodTable {
  return Object.fromEntries([
    on(Explain, {
      // BM25-only explains need no gradients: they run beside gradient work, not behind it
      heavy: (p) => !isLightExplain(p),
      title: 'Explaining the completion',
      params: PARAMS_SCHEMA.explain,
      handler: (p, ctx) => service.explain(p, work(ctx)),
    }),
    on(ExplainMany, {
      heavy: true,
      title: 'Explaining several completions',
      params: PARAMS_SCHEMA.explainMany,
      handler: (p, ctx) => service.explainMany(p, work(ctx)),
    }),
    on(Generate, {
      heavy: true,
      title: 'Completing with the model',
      params: PARAMS_SCHEMA.generate,
      handler: (p, ctx) => service.generate(p, work(ctx)),
    }),
    on(GetExample, {
      params: PARAMS_SCHEMA.getExample,
      handler: (p) => service.getExample(p.dataset, p.line, p.hash),
    }),
    on(ScanDataset, {
      heavy: true,
      title: 'Scanning the dataset',
      params: PARAMS_SCHEMA.scanDataset,
      handler: (p, ctx) => service.scanDataset(p.dataset, p.topK ?? LIMITS.scanTopK.default, work(ctx)),
    }),
    on(Fit, {
      heavy: true,
      title: 'Fitting EK-FAC factors',
      params: PARAMS_SCHEMA.fit,
      handler: async (p, ctx) => {
        const r = await service.fit(p.stage ?? 'finetuned', work(ctx));
        return { ...r, info: service.info() };
      },
    }),
    on(Index, {
      heavy: true,
      title: 'Indexing training gradients',
      params: PARAMS_SCHEMA.index,
      handler: async (p, ctx) => {
        const s = await service.index(p.dataset, work(ctx));
        return { dataset: p.dataset, examples: s.size, bytes: s.bytes };
      },
    }),
    on(Reload, {
      // re-reading a dataset can take long (large files): it counts against the heavy limit
      heavy: true,
      params: PARAMS_SCHEMA.reload,
      handler: (p) => service.reload(p.dataset),
    }),
  ]);
}
