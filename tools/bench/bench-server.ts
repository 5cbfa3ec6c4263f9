// bench server: explain latency (p50 / p95) through the real server — WebSocket, JSON-RPC,
// authentication, the service — over the whole embedded training set, and candidates/s.
import { mkdirSync, readFileSync, writeFileSync } from 'node:fs';
import { cpus, hostname } from 'node:os';
import { dirname, join } from 'node:path';
import type { ExplainResult, Method } from '../../src/protocol/types';
import { scoreCorpus } from '../../src/server/attribution/explain';
import { parse } from '../../src/server/cli/util';
import { defaultServiceConfig, embeddedDefault } from '../../src/server/defaults';
import { serviceHandlers } from '../../src/server/service/handlers';
import { InfluenceService } from '../../src/server/service/influence-service';
import { spearman } from '../../src/server/util/stats';
import { RpcClient } from '../../src/transport/client';
import { startServer } from '../../src/transport/server';

export async function benchServer(argv: string[]): Promise<void> {
  const { values: v } = parse(argv, { quick: { type: 'boolean' }, report: { type: 'string' } });
  const say = (s: string) => process.stdout.write(`${s}\n`);
  const d = embeddedDefault();
  const service = new InfluenceService(defaultServiceConfig());
  service.open();
  // fit is idempotent (an up-to-date factor folder is left as it is) and also fits the fine-tune's
  // training checkpoints, which a stage's own factors say nothing about
  for (const stage of ['finetuned', 'pretrained'] as const) {
    if (!service.info().stages.find((s) => s.name === stage)?.factors) say(`fitting ${stage} factors (once)...`);
    await service.fit(stage);
  }
  const server = await startServer({
    handlers: serviceHandlers(service),
    info: () => service.info(),
    discoveryFile: false,
  });
  const client = await RpcClient.connect({ url: server.url, token: server.token });
  const queries = (JSON.parse(readFileSync(d.queries, 'utf8')) as Array<{ prompt: string; completion: string }>)
    .slice(0, v.quick ? 6 : 30)
    .map(({ prompt, completion }) => ({ prompt, completion }));
  const runs: Array<{ method: Method; dataset: string }> = [
    { method: 'ekfac', dataset: 'finetune' },
    { method: 'multistage', dataset: 'pretrain' },
    { method: 'bm25', dataset: 'finetune' },
  ];
  const report: Record<string, unknown> = {
    suite: 'server',
    date: new Date().toISOString(),
    host: hostname(),
    cpus: cpus().length,
    node: process.version,
    queries: queries.length,
    results: [] as unknown[],
  };
  say(
    `bench server: ${queries.length} explains per row over the embedded default, through ws://127.0.0.1 (${cpus().length} CPUs)`,
  );
  for (const r of runs) {
    // first request warms graphs and caches; not timed
    await client.request('explain', { ...queries[0], dataset: r.dataset, method: r.method, topK: 10 });
    const ms: number[] = [];
    let scored = 0;
    for (const q of queries) {
      const t = performance.now();
      const res = await client.request<ExplainResult>('explain', {
        ...q,
        dataset: r.dataset,
        method: r.method,
        topK: 10,
      });
      ms.push(performance.now() - t);
      scored = res.scored;
    }
    ms.sort((a, b) => a - b);
    const p = (f: number) => ms[Math.min(ms.length - 1, Math.floor(f * ms.length))];
    const row = {
      ...r,
      candidates: scored,
      p50_ms: p(0.5),
      p95_ms: p(0.95),
      candidates_per_second: scored / (p(0.5) / 1000),
    };
    (report.results as unknown[]).push(row);
    say(
      `  ${r.method.padEnd(10)} on ${r.dataset.padEnd(8)} (${scored} examples): p50 ${row.p50_ms.toFixed(0)} ms, p95 ${row.p95_ms.toFixed(0)} ms → ${Math.round(row.candidates_per_second)} candidates/s`,
    );
  }
  // the gradient store's ranking against exact EK-FAC over the whole fine-tuning set
  const ft = service.openedStages().finetuned;
  const corpus = service.dataset('finetune').corpus;
  const { stores } = await service.index('finetune', {});
  const store = stores[0].store;
  const rhos: number[] = [];
  for (const q of queries) {
    const setup = { model: ft, modules: ft.modules };
    const exact = await scoreCorpus(setup, corpus, { ...q, method: 'ekfac' });
    const approx = await scoreCorpus(setup, corpus, { ...q, method: 'ekfac', store: { model: ft.model, store } });
    rhos.push(spearman(exact, approx));
  }
  rhos.sort((a, b) => a - b);
  const storeRow = {
    k: store.modules[0]?.kA,
    bytes_per_example: store.bytes / store.size,
    spearman_median: rhos[rhos.length >> 1],
    spearman_min: rhos[0],
  };
  report.store = storeRow;
  say(
    `  gradient store (k=${storeRow.k}, ${Math.round(storeRow.bytes_per_example)} bytes/example) vs exact EK-FAC over ${corpus.size} examples: Spearman median ${storeRow.spearman_median.toFixed(3)}, min ${storeRow.spearman_min.toFixed(3)}`,
  );
  await client.close();
  await server.close();
  report.peak_rss_mb = process.resourceUsage().maxRSS / 1024;
  const file = v.report ?? join('bench/out', `server-${(report.date as string).slice(0, 10)}-${hostname()}.json`);
  mkdirSync(dirname(file), { recursive: true });
  writeFileSync(file, `${JSON.stringify(report, null, 2)}\n`);
  say(`  goal: ekfac p50 ≤ 1000 ms on 2 CPU cores; report: ${file}`);
}
