// What the server does, independent of how requests arrive: it holds the models, their factors,
// the datasets (by id, from the configuration only) and the gradient stores, and answers
// explain / getExample / scanDataset / fit / index / reload / generate. The JSON-RPC layer
// (src/server/rpc) validates frames and calls these methods with a cancellation signal and
// progress callbacks; the CLI and tests can call them directly.
import { statSync } from 'node:fs';
import { join } from 'node:path';
import type {
  ExplainManyParams,
  ExplainManyResult,
  ExplainParams,
  ExplainPartial,
  ExplainResult,
  Method,
} from '../../protocol/types';
import { METHODS } from '../../protocol/types';
import type { Damping } from '../attribution/ekfac/precondition';
import { Corpus, ExplainError, explain, explainMany } from '../attribution/explain';
import { dataFingerprint, modelFingerprint } from '../attribution/fingerprint';
import { runFitJob } from '../attribution/fit-job';
import { selfInfluenceScores } from '../attribution/influence';
import { checkSameTokenizer, type OpenedStage, openStage } from '../attribution/stage';
import { loadDataset } from '../data/dataset';
import { contextLength } from '../data/tokenize';
import { GradientStore } from '../index/gradient-store';
import { Model, type ModuleSelection } from '../model/engine';
import type { Device } from '../model/onnx/session';

export interface StageConfig {
  model: string;
  /** factors directory; fitted on demand by `fit` when absent */
  factors?: string;
  /** the dataset id the factors are fitted on (default: the first dataset) */
  fitDataset?: string;
}

export interface ServiceConfig {
  /** the model that produced the completions (the fine-tuned one in a two-stage setup) */
  finetuned: StageConfig;
  pretrained?: StageConfig;
  /** dataset id → JSONL path */
  datasets: Record<string, string>;
  /** which stage's model scores each dataset's examples (default: finetuned) */
  datasetStage?: Record<string, 'finetuned' | 'pretrained'>;
  modules: ModuleSelection;
  damping?: Damping;
  device?: Device;
  threads?: number;
  cacheDir: string;
  store?: { k: number; minExamples: number; rerank: number };
  limits?: { maxTopK?: number; maxTextChars?: number };
}

/** Errors whose message is meant for the person using the editor. */
export class ServiceError extends Error {
  constructor(
    message: string,
    readonly code: 'invalid_params' | 'not_ready' | 'data_changed' | 'cancelled' = 'invalid_params',
  ) {
    super(message);
  }
}

export interface Work {
  signal?: AbortSignal;
  progress?: (message: string, done: number, total: number) => void;
  partial?: (p: ExplainPartial) => void;
}

interface LoadedDataset {
  corpus: Corpus;
  path: string;
  stamp: string;
  fingerprint: string;
}

export class InfluenceService {
  private stages = new Map<'finetuned' | 'pretrained', OpenedStage>();
  private data = new Map<string, LoadedDataset>();
  private stores = new Map<string, GradientStore>();

  constructor(readonly config: ServiceConfig) {
    if (!Object.keys(config.datasets).length) throw new ServiceError('the configuration names no dataset');
  }

  /** Opens the models (and factors where they exist). Factors that are missing are not an error here. */
  open(): void {
    this.stages.set('finetuned', this.openStage(this.config.finetuned));
    if (this.config.pretrained) {
      const pt = this.openStage(this.config.pretrained);
      checkSameTokenizer(this.stages.get('finetuned')!.model, pt.model);
      this.stages.set('pretrained', pt);
    }
  }

  private openStage(c: StageConfig): OpenedStage {
    const engine = { device: this.config.device, threads: this.config.threads };
    const model = Model.open(c.model, engine);
    try {
      const st = openStage(c.model, c.factors && exists(c.factors) ? c.factors : undefined, {
        damping: this.config.damping,
        model,
      });
      if (!st.preconditioners) st.modules = this.config.modules;
      return st;
    } catch (e) {
      // broken or foreign factors: keep serving the baselines and say why ekfac is unavailable
      const stage: OpenedStage = { model, modules: this.config.modules, warnings: [(e as Error).message] };
      return stage;
    }
  }

  private stage(which: 'finetuned' | 'pretrained'): OpenedStage {
    const s = this.stages.get(which);
    if (!s) throw new ServiceError(`no ${which} model is configured`, 'not_ready');
    return s;
  }

  /** the opened stages (benchmarks and tests) */
  openedStages(): Record<'finetuned' | 'pretrained', OpenedStage> {
    return Object.fromEntries(this.stages) as Record<'finetuned' | 'pretrained', OpenedStage>;
  }

  /** the model whose completions are explained (and that `generate` runs) */
  get model(): Model {
    return this.stage('finetuned').model;
  }

  info() {
    const ft = this.stage('finetuned');
    const pt = this.stages.get('pretrained');
    const methods = METHODS.filter((m) => this.unavailable(m) === null);
    return {
      model: this.config.finetuned.model,
      stages: [
        { name: 'finetuned', model: this.config.finetuned.model, factors: !!ft.preconditioners },
        ...(pt ? [{ name: 'pretrained', model: this.config.pretrained!.model, factors: !!pt.preconditioners }] : []),
      ],
      datasets: Object.keys(this.config.datasets),
      datasetPaths: { ...this.config.datasets },
      device: this.config.device ?? 'cpu',
      methods,
      unavailable: Object.fromEntries(METHODS.filter((m) => !methods.includes(m)).map((m) => [m, this.unavailable(m)])),
      modules: ft.model.modules(this.config.modules).map((m) => m.name),
      warnings: [...ft.warnings, ...(pt?.warnings ?? [])],
    };
  }

  /** Why a method cannot run now (null when it can). */
  private unavailable(m: Method): string | null {
    const ft = this.stages.get('finetuned');
    const pt = this.stages.get('pretrained');
    if (m === 'ekfac' && !ft?.preconditioners) return 'no EK-FAC factors for the model yet: run "fit"';
    if (m === 'multistage') {
      if (!pt) return 'no pre-trained model is configured';
      if (!ft?.preconditioners || !pt.preconditioners) return 'both stages need EK-FAC factors: run "fit" for each';
    }
    return null;
  }

  /** A dataset by id, reloaded when its file changed on disk. */
  dataset(id: string): LoadedDataset {
    const path = this.config.datasets[id];
    if (!path)
      throw new ServiceError(`unknown dataset "${id}"; configured: ${Object.keys(this.config.datasets).join(', ')}`);
    const stamp = fileStamp(path);
    const have = this.data.get(id);
    if (have && have.stamp === stamp) return have;
    const ds = loadDataset(path, { skipMalformed: true });
    const model = this.modelFor(id);
    const corpus = new Corpus(id, ds, model);
    const loaded = {
      corpus,
      path,
      stamp,
      fingerprint: dataFingerprint(
        ds.examples.map((e) => e.hash),
        { maxLength: contextLength(model.config) },
      ),
    };
    this.data.set(id, loaded);
    return loaded;
  }

  private modelFor(datasetId: string): Model {
    return this.stage(this.config.datasetStage?.[datasetId] ?? 'finetuned').model;
  }

  reload(id: string): { dataset: string; examples: number; skipped: number } {
    this.data.delete(id);
    const d = this.dataset(id);
    return { dataset: id, examples: d.corpus.size, skipped: d.corpus.dataset.skipped.length };
  }

  /** The checks every query passes before any work starts. */
  private checkExplain(p: ExplainParams): void {
    const limits = { maxTopK: 200, maxTextChars: 20000, ...this.config.limits };
    if (typeof p.prompt !== 'string' || typeof p.completion !== 'string')
      throw new ServiceError('prompt and completion must be strings');
    if (p.prompt.length + p.completion.length > limits.maxTextChars)
      throw new ServiceError(`prompt + completion is longer than ${limits.maxTextChars} characters`);
    if (!METHODS.includes(p.method))
      throw new ServiceError(`unknown method "${p.method}"; use one of ${METHODS.join(', ')}`);
    if (!(Number.isInteger(p.topK) && p.topK >= 1 && p.topK <= limits.maxTopK))
      throw new ServiceError(`topK must be an integer from 1 to ${limits.maxTopK}`);
    for (const m of [p.method, ...(p.compare ?? [])]) {
      if (!METHODS.includes(m)) throw new ServiceError(`unknown method "${m}" in compare`);
      const why = this.unavailable(m);
      if (why) throw new ServiceError(`${m} is unavailable: ${why}`, 'not_ready');
    }
  }

  async explain(p: ExplainParams, work: Work = {}): Promise<ExplainResult> {
    this.checkExplain(p);
    const d = this.dataset(p.dataset);
    const ft = this.stage('finetuned');
    const pt = this.stages.get('pretrained');
    const store = await this.storeFor(p, d, work);
    try {
      const result = await explain({ model: ft, pretrained: pt, modules: ft.modules }, d.corpus, {
        prompt: p.prompt,
        completion: p.completion,
        method: p.method,
        topK: p.topK,
        compare: p.compare,
        candidates: p.candidates === 'retrieved' ? 'retrieved' : 'all',
        store,
        rerank: this.config.store?.rerank,
        signal: work.signal,
        onProgress: work.progress,
        onPartial: work.partial,
      });
      if (fileStamp(d.path) !== d.stamp)
        throw new ServiceError(
          `${p.dataset} changed on disk while it was being explained; explain again to use the new file`,
          'data_changed',
        );
      return result;
    } catch (e) {
      if (work.signal?.aborted) throw new ServiceError('cancelled', 'cancelled');
      if (e instanceof ExplainError) throw new ServiceError(e.message);
      throw e;
    }
  }

  /** Several queries against one dataset, scored in one pass (each result as `explain` alone would give). */
  async explainMany(p: ExplainManyParams, work: Work = {}): Promise<ExplainManyResult> {
    if (!Array.isArray(p.queries) || !p.queries.length) throw new ServiceError('queries must be a non-empty array');
    // every query passes the single-query checks (text length, methods, availability, top-k)
    for (const q of p.queries) this.checkExplain({ ...p, ...q });
    const d = this.dataset(p.dataset);
    const ft = this.stage('finetuned');
    const pt = this.stages.get('pretrained');
    const store = await this.storeFor({ ...p, ...p.queries[0] }, d, work);
    try {
      const results = await explainMany(
        { model: ft, pretrained: pt, modules: ft.modules },
        d.corpus,
        p.queries.map((q) => ({
          prompt: q.prompt,
          completion: q.completion,
          method: p.method,
          topK: p.topK,
          compare: p.compare,
          candidates: p.candidates === 'retrieved' ? ('retrieved' as const) : ('all' as const),
          store,
          rerank: this.config.store?.rerank,
          signal: work.signal,
          onProgress: work.progress,
        })),
      );
      if (fileStamp(d.path) !== d.stamp)
        throw new ServiceError(
          `${p.dataset} changed on disk while it was being explained; explain again to use the new file`,
          'data_changed',
        );
      return { results };
    } catch (e) {
      if (work.signal?.aborted) throw new ServiceError('cancelled', 'cancelled');
      if (e instanceof ExplainError) throw new ServiceError(e.message);
      throw e;
    }
  }

  /** The gradient store for a large dataset (built on first use, cached on disk by fingerprints). */
  private async storeFor(p: ExplainParams, d: LoadedDataset, work: Work) {
    const cfg = this.config.store;
    if (!cfg || p.candidates === 'retrieved' || d.corpus.size < cfg.minExamples) return undefined;
    if (p.method !== 'ekfac' && p.method !== 'gdp') return undefined;
    const model = this.modelFor(p.dataset);
    if (model !== this.stage('finetuned').model) return undefined;
    return { model, store: await this.index(p.dataset, work) };
  }

  /** Builds (or loads) the dataset's gradient store. */
  async index(datasetId: string, work: Work = {}): Promise<GradientStore> {
    const cfg = this.config.store ?? { k: 16, minExamples: 0, rerank: 50 };
    const d = this.dataset(datasetId);
    const model = this.modelFor(datasetId);
    const identity = {
      modelFingerprint: modelFingerprint(model.checkpoint),
      dataFingerprint: d.fingerprint,
      k: cfg.k,
      seed: 0,
      modules: this.config.modules,
    };
    const key = JSON.stringify(identity);
    const cached = this.stores.get(key);
    if (cached) return cached;
    const dir = join(
      this.config.cacheDir,
      'stores',
      `${safe(datasetId)}-${identity.modelFingerprint}-${identity.dataFingerprint}-k${cfg.k}`,
    );
    let store = GradientStore.load(dir, identity);
    if (!store) {
      store = await GradientStore.build(model, d.corpus.tokens, identity, {
        signal: work.signal,
        onProgress: (done, total) => work.progress?.('indexing gradients', done, total),
      });
      store.save(dir);
    }
    this.stores.set(key, store);
    return store;
  }

  getExample(datasetId: string, line: number, hash?: string) {
    const d = this.dataset(datasetId);
    const ex =
      d.corpus.dataset.examples.find((e) => e.line === line) ??
      (hash ? d.corpus.dataset.examples.find((e) => e.hash === hash) : undefined);
    if (!ex) throw new ServiceError(`${datasetId} has no example at line ${line}`);
    if (hash && ex.hash !== hash) {
      const moved = d.corpus.dataset.examples.find((e) => e.hash === hash);
      if (!moved)
        throw new ServiceError(
          `the example ${hash} is no longer in ${datasetId} (the file was edited)`,
          'data_changed',
        );
      return this.describe(datasetId, d, moved.index);
    }
    return this.describe(datasetId, d, ex.index);
  }

  private describe(datasetId: string, d: LoadedDataset, index: number) {
    const ex = d.corpus.dataset.examples[index];
    const tok = d.corpus.tokens[index];
    return {
      id: { dataset: datasetId, line: ex.line, hash: ex.hash },
      kind: ex.kind,
      text: ex.text,
      record: ex.record,
      tokens: { offsets: tok.offsets, ids: tok.ids },
    };
  }

  /** Training examples ranked by self-influence (needs factors). */
  async scanDataset(datasetId: string, topK: number, work: Work = {}) {
    const ft = this.stage('finetuned');
    if (!ft.preconditioners) throw new ServiceError('scanning needs EK-FAC factors: run "fit" first', 'not_ready');
    const d = this.dataset(datasetId);
    const s = await selfInfluenceScores(ft.model, ft.preconditioners, d.corpus.tokens, {
      modules: ft.modules,
      onProgress: (done, total) => work.progress?.('self-influence', done, total),
    });
    const order = Array.from(s.keys()).sort((a, b) => s[b] - s[a]);
    return {
      dataset: datasetId,
      scored: s.length,
      examples: order
        .slice(0, topK)
        .map((i, r) => ({ ...this.describe(datasetId, d, i), rank: r + 1, selfInfluence: s[i] })),
    };
  }

  /** Fits a stage's factors on its dataset, then reopens the stage so ekfac becomes available. */
  async fit(which: 'finetuned' | 'pretrained', work: Work = {}) {
    const c = which === 'finetuned' ? this.config.finetuned : this.config.pretrained;
    if (!c) throw new ServiceError(`no ${which} model is configured`);
    if (!c.factors) throw new ServiceError(`the configuration names no factors directory for the ${which} model`);
    const datasetId = c.fitDataset ?? Object.keys(this.config.datasets)[0];
    const path = this.config.datasets[datasetId];
    if (!path) throw new ServiceError(`fitDataset "${datasetId}" is not a configured dataset`);
    const r = await runFitJob({
      modelDir: c.model,
      dataPath: path,
      out: c.factors,
      modules: this.config.modules,
      labels: 'sampled',
      seed: 0,
      skipMalformed: true,
      model: this.stage(which).model,
      onProgress: (stage, done, total) => work.progress?.(stage, done, total),
    });
    this.stages.set(which, this.openStage(c));
    return r;
  }
}

function exists(p: string): boolean {
  try {
    statSync(p);
    return true;
  } catch {
    return false;
  }
}

function fileStamp(path: string): string {
  try {
    const s = statSync(path);
    return `${s.size}:${s.mtimeMs}`;
  } catch {
    throw new ServiceError(`the dataset file ${path} is missing`, 'data_changed');
  }
}

function safe(id: string): string {
  return id.replace(/[^A-Za-z0-9_.-]/g, '_').slice(0, 60);
}
