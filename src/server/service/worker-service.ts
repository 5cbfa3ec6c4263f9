// The influence service run in worker threads, so the server's event loop only moves messages:
// `status` and the WebSocket stay responsive while gradients are computed, datasets parsed and
// factors fitted. Two lanes, each a worker thread with its own InfluenceService (its own model,
// ORT sessions and dataset cache, all keyed by file content/stamp as in the service):
//   heavy  explain with gradients or hidden states, scanDataset, fit, index, generate, reload
//   light  getExample and BM25-only explains, which must not wait behind gradient work
// Cancelling a request sets its shared flag, which the worker checks between batches (see
// ./service-worker), so the work itself stops, not only the reply.
import { Worker } from 'node:worker_threads';
import {
  type ExplainManyParams,
  type ExplainManyResult,
  type ExplainParams,
  type ExplainResult,
  type GenerateParams,
  METHODS,
} from '../../protocol/types';
import {
  ConfigFileWatch,
  type Example,
  isLightExplain,
  type ReloadResult,
  type ScanResult,
  type ServiceApi,
  type ServiceConfig,
  ServiceError,
  type StageConfig,
  type Work,
} from './influence-service';
import type { FromWorker, SerializedError, ServiceInfoSnapshot, ToWorker } from './worker-messages';

/** How long `status` waits for the heavy lane's fresh description before answering with the last one. */
const INFO_WAIT_MS = 2000;

type LaneName = 'heavy' | 'light';

export class WorkerService implements ServiceApi {
  private lanes = new Map<LaneName, Lane>();
  private snapshot: ServiceInfoSnapshot | undefined;
  private closed = false;

  private constructor(readonly config: ServiceConfig) {}

  /** Starts both worker threads and waits until each has opened its models. */
  static async start(config: ServiceConfig): Promise<WorkerService> {
    const s = new WorkerService(config);
    try {
      const [info] = await Promise.all([s.lane('heavy').ready, s.lane('light').ready]);
      s.snapshot ??= info;
    } catch (e) {
      await s.close();
      throw e;
    }
    return s;
  }

  /** The heavy lane's service description, as of its last answer (it changes only by fit and reload). */
  info(): ServiceInfoSnapshot {
    if (!this.snapshot) throw new ServiceError('the service is still starting', 'not_ready');
    // the snapshot is the heavy lane's last answer; once influence-lens.json holds other settings
    // the lanes refuse every request, and status must say so at once
    this.configWatch ??= new ConfigFileWatch(this.config.configFile);
    const stale = this.configWatch.changed();
    if (stale)
      return {
        ...this.snapshot,
        methods: [],
        unavailable: Object.fromEntries(METHODS.map((m) => [m, stale])),
      };
    return this.snapshot;
  }

  private configWatch?: ConfigFileWatch;

  /**
   * The heavy lane's description after it read again what changed on disk (its `currentInfo`), or
   * the last snapshot when it does not answer within INFO_WAIT_MS (a long synchronous step).
   */
  async currentInfo(): Promise<ServiceInfoSnapshot> {
    if (!this.configWatch?.changed()) {
      let timer: ReturnType<typeof setTimeout> | undefined;
      const late = new Promise<undefined>((r) => {
        timer = setTimeout(() => r(undefined), INFO_WAIT_MS);
      });
      // the answer updates the snapshot (onInfo) whenever it comes
      const asked = this.call('heavy', 'info', []).catch(() => undefined);
      await Promise.race([asked, late]);
      clearTimeout(timer);
    }
    return this.info();
  }

  explain(p: ExplainParams, work?: Work): Promise<ExplainResult> {
    return this.call(isLightExplain(p) ? 'light' : 'heavy', 'explain', [p], work) as Promise<ExplainResult>;
  }

  explainMany(p: ExplainManyParams, work?: Work): Promise<ExplainManyResult> {
    return this.call('heavy', 'explainMany', [p], work) as Promise<ExplainManyResult>;
  }

  getExample(datasetId: string, line: number, hash?: string): Promise<Example> {
    return this.call('light', 'getExample', [datasetId, line, hash]) as Promise<Example>;
  }

  scanDataset(datasetId: string, topK: number, work?: Work): Promise<ScanResult> {
    return this.call('heavy', 'scanDataset', [datasetId, topK], work) as Promise<ScanResult>;
  }

  fit(which: 'finetuned' | 'pretrained', work?: Work) {
    return this.call('heavy', 'fit', [which], work) as ReturnType<ServiceApi['fit']>;
  }

  index(datasetId: string, work?: Work): Promise<{ size: number; bytes: number }> {
    return this.call('heavy', 'index', [datasetId], work) as Promise<{ size: number; bytes: number }>;
  }

  /** Re-reads the dataset in both lanes (in parallel), so the light lane does not parse it on its next request. */
  async reload(datasetId: string): Promise<ReloadResult> {
    const [r] = await Promise.all([
      this.call('heavy', 'reload', [datasetId]),
      this.call('light', 'reload', [datasetId]),
    ]);
    return r as ReloadResult;
  }

  generate(p: GenerateParams, work?: Work) {
    return this.call('heavy', 'generate', [p], work) as ReturnType<ServiceApi['generate']>;
  }

  /** Stops both worker threads; calls in flight fail. */
  async close(): Promise<void> {
    this.closed = true;
    await Promise.all([...this.lanes.values()].map((l) => l.terminate()));
    this.lanes.clear();
  }

  private lane(name: LaneName): Lane {
    if (this.closed) throw new ServiceError('the service is shutting down', 'not_ready');
    let l = this.lanes.get(name);
    // a lane whose thread died (a native crash, out of memory) is started again on the next call
    if (!l || l.stopped) {
      l =
        name === 'heavy'
          ? new Lane(name, this.config, (info) => (this.snapshot = info))
          : new Lane(name, lightConfig(this.config), () => {});
      this.lanes.set(name, l);
    }
    return l;
  }

  private call(lane: LaneName, method: string, args: unknown[], work: Work = {}): Promise<unknown> {
    return this.lane(lane).call(method, args, work);
  }
}

/**
 * The light lane never uses EK-FAC factors (BM25 and getExample need none), so it does not load
 * them, and one ORT thread is enough for a query's forward/backward: the cores stay with the heavy lane.
 */
export function lightConfig(c: ServiceConfig): ServiceConfig {
  const noFactors = (s: StageConfig): StageConfig => ({ ...s, factors: undefined, watchedFactors: s.factors });
  return {
    ...c,
    finetuned: noFactors(c.finetuned),
    pretrained: c.pretrained && noFactors(c.pretrained),
    threads: 1,
  };
}

interface Pending {
  resolve: (v: unknown) => void;
  reject: (e: unknown) => void;
  work: Work;
}

/** One worker thread and the calls in flight on it. */
class Lane {
  readonly ready: Promise<ServiceInfoSnapshot>;
  stopped: string | undefined;
  private readonly worker: Worker;
  private readonly pending = new Map<number, Pending>();
  private nextId = 1;

  constructor(
    readonly name: LaneName,
    config: ServiceConfig,
    private readonly onInfo: (info: ServiceInfoSnapshot) => void,
  ) {
    this.worker = spawn({ config });
    this.ready = new Promise<ServiceInfoSnapshot>((resolve, reject) => {
      this.worker.on('message', (m: FromWorker) => {
        if (m.type === 'ready') {
          onInfo(m.info);
          resolve(m.info);
        } else if (m.type === 'failed')
          // a broken input (a truncated tokenizer.json, ...) stays an error a person acts on across
          // the thread boundary, so `serve` refuses it in one line naming the file
          reject(
            m.error.userError && !m.error.serviceError
              ? new ServiceError(m.error.message, 'not_ready')
              : toError(m.error),
          );
        else this.onMessage(m);
      });
      this.worker.on('error', (e) => {
        reject(e);
        this.stop(`it failed: ${e.message}`);
      });
      this.worker.on('exit', (code) => {
        reject(new Error(`the ${name} service worker exited (code ${code}) while opening the models`));
        this.stop(`it exited (code ${code})`);
      });
    });
    this.ready.catch(() => {});
  }

  async call(method: string, args: unknown[], work: Work): Promise<unknown> {
    await this.ready;
    if (this.stopped) throw new Error(`the ${this.name} service worker stopped: ${this.stopped}`);
    if (work.signal?.aborted) throw new ServiceError('cancelled', 'cancelled');
    const id = this.nextId++;
    const flag = new SharedArrayBuffer(4);
    const onAbort = () => {
      Atomics.store(new Int32Array(flag), 0, 1);
      this.post({ type: 'cancel', id });
    };
    work.signal?.addEventListener('abort', onAbort, { once: true });
    try {
      return await new Promise((resolve, reject) => {
        this.pending.set(id, { resolve, reject, work });
        this.post({ type: 'call', id, method, args, flag });
      });
    } finally {
      work.signal?.removeEventListener('abort', onAbort);
    }
  }

  terminate(): Promise<number> {
    this.stop('the service is shutting down');
    return this.worker.terminate();
  }

  private post(m: ToWorker) {
    this.worker.postMessage(m);
  }

  private onMessage(m: Exclude<FromWorker, { type: 'ready' | 'failed' }>) {
    const p = this.pending.get(m.id);
    if (!p) return;
    switch (m.type) {
      case 'progress':
        p.work.progress?.(m.message, m.done, m.total);
        return;
      case 'partial':
        p.work.partial?.(m.value as never);
        return;
      case 'result':
        this.pending.delete(m.id);
        this.onInfo(m.info);
        p.resolve(m.value);
        return;
      case 'error':
        this.pending.delete(m.id);
        if (m.info) this.onInfo(m.info);
        p.reject(toError(m.error));
    }
  }

  private stop(why: string) {
    if (this.stopped) return;
    this.stopped = why;
    for (const p of this.pending.values()) p.reject(new Error(`the ${this.name} service worker stopped: ${why}`));
    this.pending.clear();
  }
}

function toError(e: SerializedError): Error {
  const err = e.serviceError ? new ServiceError(e.message, e.code as ServiceError['code']) : new Error(e.message);
  if (!e.serviceError && e.code) Object.assign(err, { code: e.code });
  if (e.stack) err.stack = e.stack;
  return err;
}

/**
 * From the bundle (dist/cli.mjs) the worker is dist/service-worker.mjs; from the TypeScript
 * sources (tests, tsx) the worker registers tsx first, since worker threads do not inherit
 * the parent's module hooks.
 */
function spawn(workerData: { config: ServiceConfig }): Worker {
  const here = import.meta.url;
  if (here.endsWith('.ts')) {
    const entry = new URL('./service-worker.ts', here).href;
    const tsx = import.meta.resolve('tsx/esm/api');
    const boot = `import(${JSON.stringify(tsx)}).then((m) => { m.register(); return import(${JSON.stringify(entry)}); })`;
    return new Worker(boot, { eval: true, workerData });
  }
  return new Worker(new URL('./service-worker.mjs', here), { workerData });
}
