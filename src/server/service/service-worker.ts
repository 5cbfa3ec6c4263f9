// The body of a service worker thread (see ./worker-service): it opens its own InfluenceService
// (models, ORT sessions, datasets) and runs the calls the main thread posts, so tensor work,
// scoring, store builds and dataset parsing never block the server's event loop.
//
// Cancellation: each call comes with a one-integer SharedArrayBuffer that the main thread sets
// when the request is cancelled. The worker reads it at every progress report (the loops report
// after each batch) and aborts the call's AbortSignal, which the loops check before the next batch,
// so a cancel stops the work even while this thread never returns to its event loop. A `cancel`
// message does the same when the thread is idle between awaits.
import { parentPort, workerData } from 'node:worker_threads';
import { isUserError } from '../user-errors';
import { InfluenceService, type ServiceConfig, ServiceError, type Work } from './influence-service';
import type { FromWorker, ToWorker } from './worker-messages';

const port = parentPort;
if (!port) throw new Error('service-worker.ts runs as a worker thread (see worker-service.ts)');
const { config } = workerData as { config: ServiceConfig };

const running = new Map<number, { abort: AbortController; flag: Int32Array }>();
const post = (m: FromWorker) => port.postMessage(m);

let service: InfluenceService;
try {
  service = new InfluenceService(config);
  service.open();
  post({ type: 'ready', info: service.info() });
} catch (e) {
  post({ type: 'failed', error: serializeError(e) });
  process.exit(1);
}

port.on('message', (m: ToWorker) => {
  if (m.type === 'cancel') {
    running.get(m.id)?.abort.abort(new Error('cancelled'));
    return;
  }
  void call(m.id, m.method, m.args, new Int32Array(m.flag));
});

async function call(id: number, method: string, args: unknown[], flag: Int32Array) {
  const abort = new AbortController();
  running.set(id, { abort, flag });
  const poll = () => {
    if (!abort.signal.aborted && Atomics.load(flag, 0) !== 0) abort.abort(new Error('cancelled'));
  };
  const work: Work = {
    signal: abort.signal,
    progress: (message, done, total) => {
      poll();
      post({ type: 'progress', id, message, done, total });
    },
    partial: (value) => {
      poll();
      post({ type: 'partial', id, value });
    },
  };
  try {
    poll();
    const value = await run(method, args, work);
    post({ type: 'result', id, value, info: service.info() });
  } catch (e) {
    post({ type: 'error', id, error: serializeError(e), info: safeInfo() });
  } finally {
    running.delete(id);
  }
}

// biome-ignore lint/suspicious/noExplicitAny: arguments arrive as posted by worker-service.ts, which types them
function run(method: string, a: any[], work: Work): Promise<unknown> | unknown {
  switch (method) {
    case 'explain':
      return service.explain(a[0], work);
    case 'explainMany':
      return service.explainMany(a[0], work);
    case 'getExample':
      return service.getExample(a[0], a[1], a[2]);
    case 'scanDataset':
      return service.scanDataset(a[0], a[1], work);
    case 'fit':
      return service.fit(a[0], work);
    case 'index':
      return service.index(a[0], work).then((s) => ({ size: s.size, bytes: s.bytes }));
    case 'reload':
      return service.reload(a[0]);
    case 'generate':
      return service.generate(a[0], work);
    case 'info':
      return service.currentInfo();
    default:
      throw new Error(`the service worker has no method "${method}"`);
  }
}

function safeInfo() {
  try {
    return service.info();
  } catch {
    return undefined;
  }
}

function serializeError(e: unknown) {
  const err = e as { name?: unknown; message?: unknown; code?: unknown; stack?: unknown } | null | undefined;
  return {
    name: typeof err?.name === 'string' ? err.name : 'Error',
    message: typeof err?.message === 'string' ? err.message : String(e),
    code: typeof err?.code === 'string' ? err.code : undefined,
    stack: typeof err?.stack === 'string' ? err.stack : undefined,
    serviceError: e instanceof ServiceError,
    userError: isUserError(e),
  };
}
