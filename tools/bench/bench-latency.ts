// Responsiveness of a running `influence-lens serve` (the embedded default), measured from a
// client over its WebSocket, as the editor sees it:
//   1. under load: 2 gradient explains kept running at all times, while `status`, `getExample`
//      and a BM25 explain are sent one after another → p50 / p95 / max of each
//      (goals: status and getExample p95 ≤ 100 ms, bm25 p95 ≤ 300 ms);
//   2. cancel: a fit and a scan cancelled mid-work → ms until `status` shows the heavy slot free
//      and no request running, and whether final factors were written anyway (goal: ≤ 1000 ms, no);
//   3. reload: a dataset with one long line (--reload-mb, default 10; 0 skips) reloaded while
//      `status` is sent every 50 ms → the slowest `status` during the reload.
// It starts the server as a child process with the repository's own CLI, so the same script
// measures any checkout:   node --import tsx tools/bench/bench-latency.ts [--quick] [--report FILE]
import { type ChildProcess, spawn } from 'node:child_process';
import { copyFileSync, existsSync, mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { cpus, hostname, tmpdir } from 'node:os';
import { dirname, join, resolve } from 'node:path';
import { OUR_ARGUMENTS_FILE } from '../../src/server/attribution/ekfac/factors-io';
import { CliError, HelpRequested, parse } from '../../src/server/cli/util';
import { RpcClient } from '../../src/transport/client';
import { reportHeader } from './machine';

// the CLI's parser: --help lists the options, a misspelt flag names the one meant (one line, no stack)
const v = (() => {
  try {
    return parse(process.argv.slice(2), {
      quick: { type: 'boolean' },
      report: { type: 'string' },
      'reload-mb': { type: 'string' },
    }).values;
  } catch (e) {
    if (e instanceof HelpRequested) process.stdout.write(`options:\n${e.options}\n`);
    else process.stderr.write(`bench:latency: ${e instanceof CliError ? e.message : (e as Error).stack}\n`);
    process.exit(e instanceof HelpRequested ? 0 : 1);
  }
})();
const root = resolve(dirname(new URL(import.meta.url).pathname), '..', '..');
const say = (s: string) => process.stdout.write(`${s}\n`);
const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));
const samples = v.quick ? 15 : 40;

interface Server {
  child: ChildProcess;
  client: RpcClient;
}

async function startServe(cache: string, args: string[] = []): Promise<Server> {
  // the checkout's sources (not a possibly stale bundle in dist/)
  const cli = ['--import', 'tsx', join(root, 'src/server/cli.ts')];
  const child = spawn(process.execPath, [...cli, 'serve', '--no-discovery', ...args], {
    cwd: root,
    env: { ...process.env, INFLUENCE_LENS_CACHE: cache },
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  let out = '';
  child.stderr!.on('data', () => {});
  const { url, token } = await new Promise<{ url: string; token: string }>((ok, fail) => {
    child.stdout!.on('data', (d) => {
      out += d;
      const url = /server on (ws:\/\/\S+)/.exec(out)?.[1];
      const token = /token: (\S+)/.exec(out)?.[1];
      if (url && token) ok({ url, token });
    });
    child.once('exit', (code) => fail(new Error(`serve exited (${code}) before listening: ${out}`)));
  });
  return { child, client: await RpcClient.connect({ url, token }) };
}

async function stopServe(s: Server) {
  await s.client.close();
  s.child.kill('SIGTERM');
  await new Promise((r) => s.child.once('exit', r));
}

function stats(ms: number[]) {
  const s = [...ms].sort((a, b) => a - b);
  const p = (f: number) => s[Math.min(s.length - 1, Math.floor(f * s.length))];
  return { n: s.length, p50_ms: round(p(0.5)), p95_ms: round(p(0.95)), max_ms: round(s[s.length - 1]) };
}
const round = (x: number) => Math.round(x * 10) / 10;

async function timed(f: () => Promise<unknown>): Promise<number> {
  const t = performance.now();
  await f();
  return performance.now() - t;
}

const query = { prompt: 'Q: What is the capital of France?\nA:', completion: ' Paris', dataset: 'finetune', topK: 10 };

async function underLoad(c: RpcClient) {
  // warm graphs, datasets and indexes first (not timed)
  await c.request('explain', { ...query, method: 'gdp' });
  await c.request('explain', { ...query, method: 'bm25' });
  await c.request('getExample', { dataset: 'finetune', line: 1 });
  const lines = readFileSync(join(root, 'assets/default/data/finetune.jsonl'), 'utf8').trim().split('\n').length;
  const light = async () => {
    const out = { status: [] as number[], getExample: [] as number[], bm25: [] as number[] };
    for (let i = 0; i < samples; i++) {
      out.status.push(await timed(() => c.status()));
      out.getExample.push(
        await timed(() => c.request('getExample', { dataset: 'finetune', line: 1 + ((i * 37) % lines) })),
      );
      out.bm25.push(await timed(() => c.request('explain', { ...query, method: 'bm25' })));
      await sleep(50);
    }
    return out;
  };
  const idle = await light();
  let stop = false;
  let heavyDone = 0;
  const heavy = async () => {
    while (!stop) {
      await c.request('explain', { ...query, method: 'gdp' });
      heavyDone++;
    }
  };
  const workers = [heavy(), heavy()];
  await sleep(300); // both heavy explains are running
  const loaded = await light();
  stop = true;
  await Promise.all(workers);
  return {
    idle: { status: stats(idle.status), getExample: stats(idle.getExample), bm25: stats(idle.bm25) },
    loaded: { status: stats(loaded.status), getExample: stats(loaded.getExample), bm25: stats(loaded.bm25) },
    heavyExplainsCompleted: heavyDone,
  };
}

/** Starts `method`, cancels it after its first progress report, and times until status shows it gone. */
async function cancelMidWork(c: RpcClient, method: string, params: object) {
  const ac = new AbortController();
  let first!: () => void;
  const working = new Promise<void>((r) => {
    first = r;
  });
  const pending = c.request(method, params, {
    signal: ac.signal,
    onProgress: (p) => {
      if (p.kind === 'report' && p.done !== undefined) first();
    },
  });
  pending.catch(() => {});
  await working;
  const t = performance.now();
  ac.abort();
  await pending.catch(() => {});
  const acknowledged = performance.now() - t;
  for (;;) {
    const s = await c.status();
    if (s.heavy.running === 0 && s.requests.length === 0) break;
    if (performance.now() - t > 120_000) throw new Error(`${method} still running 120 s after the cancel`);
    await sleep(20);
  }
  return { acknowledged_ms: round(acknowledged), slot_free_ms: round(performance.now() - t) };
}

async function cancels(c: RpcClient, cache: string) {
  const factors = join(cache, 'default', 'factors-finetuned', OUR_ARGUMENTS_FILE);
  const fit = await cancelMidWork(c, 'fit', { stage: 'finetuned' });
  const wroteFactors = existsSync(factors);
  // the scan needs factors: finish the fit (resuming from partials where the cancel left them)
  await c.request('fit', { stage: 'finetuned' });
  const scan = await cancelMidWork(c, 'scanDataset', { dataset: 'finetune', topK: 10 });
  return { fit: { ...fit, final_factors_written_after_cancel: wroteFactors }, scan };
}

async function reloadLongLine(cache: string, mb: number) {
  const dir = join(cache, 'reload');
  mkdirSync(dir, { recursive: true });
  const data = join(dir, 'train.jsonl');
  copyFileSync(join(root, 'assets/default/data/finetune.jsonl'), data);
  writeFileSync(
    join(dir, 'influence-lens.json'),
    JSON.stringify({ models: { model: join(root, 'assets/default/finetuned') }, datasets: { train: data } }),
  );
  const s = await startServe(cache, ['--config', join(dir, 'influence-lens.json')]);
  try {
    await s.client.request('getExample', { dataset: 'train', line: 1 });
    const words = Array.from({ length: (mb * 1024 * 1024) / 8 }, (_, i) => `w${i % 9973} `).join('');
    writeFileSync(data, `${readFileSync(data, 'utf8')}${JSON.stringify({ text: words.slice(0, mb * 1024 * 1024) })}\n`);
    const t = performance.now();
    const reload = s.client.request('reload', { dataset: 'train' });
    let done = false;
    reload.then(
      () => (done = true),
      () => (done = true),
    );
    const status: number[] = [];
    while (!done) {
      status.push(await timed(() => s.client.status()));
      await sleep(50);
    }
    const reloadMs = performance.now() - t;
    const r = await reload.catch((e) => ({ error: (e as Error).message }));
    return { mb, reload_ms: round(reloadMs), status: stats(status), result: r };
  } finally {
    await stopServe(s);
  }
}

const cache = mkdtempSync(join(tmpdir(), 'il-bench-latency-'));
const report: Record<string, unknown> = {
  ...reportHeader('latency'),
};
try {
  say(`bench latency: the embedded default served by ${root} (${cpus().length} CPUs), cache ${cache}`);
  const s = await startServe(cache);
  try {
    const load = await underLoad(s.client);
    report.load = load;
    for (const phase of ['idle', 'loaded'] as const)
      for (const [k, st] of Object.entries(load[phase]))
        say(
          `  ${phase === 'idle' ? 'idle          ' : 'with 2 explains'} ${k.padEnd(10)} p50 ${st.p50_ms} ms, p95 ${st.p95_ms} ms, max ${st.max_ms} ms (n=${st.n})`,
        );
    say(`  (${load.heavyExplainsCompleted} gdp explains completed while loaded)`);
    const c = await cancels(s.client, cache);
    report.cancel = c;
    say(
      `  cancel fit:  answered in ${c.fit.acknowledged_ms} ms, slot free after ${c.fit.slot_free_ms} ms; final factors written anyway: ${c.fit.final_factors_written_after_cancel}`,
    );
    say(`  cancel scan: answered in ${c.scan.acknowledged_ms} ms, slot free after ${c.scan.slot_free_ms} ms`);
  } finally {
    await stopServe(s);
  }
  const mb = Number(v['reload-mb'] ?? '10');
  if (mb > 0) {
    const r = await reloadLongLine(cache, mb);
    report.reload = r;
    say(
      `  reload with one ${mb} MB line: ${r.reload_ms} ms; status meanwhile p50 ${r.status.p50_ms} ms, max ${r.status.max_ms} ms (n=${r.status.n})`,
    );
  }
  say(
    '  goals: status / getExample p95 ≤ 100 ms and bm25 p95 ≤ 300 ms with 2 explains; cancel frees the slot ≤ 1000 ms',
  );
} finally {
  rmSync(cache, { recursive: true, force: true });
}
const file = v.report ?? join(root, 'bench/out', `latency-${(report.date as string).slice(0, 10)}-${hostname()}.json`);
mkdirSync(dirname(file), { recursive: true });
writeFileSync(file, `${JSON.stringify(report, null, 2)}\n`);
say(`  report: ${file}`);
