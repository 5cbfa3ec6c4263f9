// What the server does, independent of how requests arrive: it holds the models, their factors,
// the datasets (by id, from the configuration only) and the gradient stores, and answers
// explain / getExample / scanDataset / fit / index / reload / generate. The JSON-RPC layer
// (src/transport, with the method table in ./handlers) validates frames and calls these methods with a cancellation signal and
// progress callbacks; the CLI and tests can call them directly.
import { createHash } from 'node:crypto';
import { statSync } from 'node:fs';
import { isAbsolute, join, relative, resolve } from 'node:path';
import { cleanStaleTemps } from '../../common/atomic-write';
import { canonicalJson } from '../../common/ids';
import { own } from '../../common/own';
import { raceAbort } from '../../common/race-abort';
import { readFileNoWait } from '../../common/read-file';
import { LIMITS } from '../../protocol/limits';
import { methodInfo } from '../../protocol/methods';
import type {
  ExplainManyParams,
  ExplainManyResult,
  ExplainParams,
  ExplainPartial,
  ExplainResult,
  GenerateParams,
  GenerateResult,
  Method,
} from '../../protocol/types';
import { METHODS } from '../../protocol/types';
import {
  fitCheckpoints,
  type OpenedCheckpoints,
  openCheckpointStages,
  selfInfluence,
} from '../attribution/checkpoints';
import { OUR_ARGUMENTS_FILE, readFitSettings } from '../attribution/ekfac/factors-io';
import type { Damping, Preconditioner } from '../attribution/ekfac/precondition';
import { attributionOf, Corpus, ExplainError, explain, explainMany, type StoreRef } from '../attribution/explain';
import { dataFingerprint, modelFingerprint } from '../attribution/fingerprint';
import { FitBusyError, FitJobError, runFitJob } from '../attribution/fit-job';
import {
  checkSameTokenizer,
  factorsFitOn,
  type OpenedStage,
  openStage,
  stagesConfigWarning,
} from '../attribution/stage';
import { loadDataset } from '../data/dataset';
import { DataError } from '../data/errors';
import { contextLength, sameTokenization, tokenizationKey } from '../data/tokenize';
import { describeTraining, type TrainingConvention } from '../data/training';
import { GradientStore, type StoreIdentity } from '../index/gradient-store';
import { preconditionerFingerprint } from '../index/store-projection';
import { type CheckpointsSetting, planCheckpoints } from '../model/checkpoints';
import { movedSincePinned } from '../model/content-digest';
import { EngineError, Model, type ModuleSelection } from '../model/engine';
import { GenerateError, generate } from '../model/generate';
import type { Device } from '../model/onnx/session';
import { DEFAULTS } from '../settings';
import { fileIdentity, servedPaths, stampOf } from './served-files';

export interface StageConfig {
  model: string;
  /** the base checkpoint when `model` is a LoRA adapter (default: its base_model_name_or_path) */
  base?: string;
  /** factors directory; fitted on demand by `fit` when absent */
  factors?: string;
  /** the dataset id the factors are fitted on (default: the first dataset whose datasetStage is this stage, else the first) */
  fitDataset?: string;
  /** training checkpoints to sum ekfac/gdp over (model/checkpoints.ts; default DEFAULTS.checkpoints) */
  checkpoints?: CheckpointsSetting;
  /** how the model was trained on its records (data/training.ts; default: the default convention) */
  training?: TrainingConvention;
  /** `factors` is this program's cache (the embedded default's), not a folder the user named:
   * factors that no longer match are fitted again instead of refused */
  factorsCache?: boolean;
  /** a factors folder whose files count in the revision though they are not loaded (the light
   * lane's, worker-service.ts), so both lanes report the same revision */
  watchedFactors?: string;
}

export interface ServiceConfig {
  /** the model that produced the completions (the fine-tuned one in a two-stage setup) */
  finetuned: StageConfig;
  pretrained?: StageConfig;
  /** dataset id → JSONL path */
  datasets: Record<string, string>;
  /** which stage's model scores each dataset's examples (default: finetuned) */
  datasetStage?: Record<string, 'finetuned' | 'pretrained'>;
  /** the modules every method scores; unset: the factors' (as `influence-lens explain` takes
   * them), or "mlp" without factors */
  modules?: ModuleSelection;
  damping?: Damping;
  device?: Device;
  threads?: number;
  cacheDir: string;
  store?: { k: number; minExamples: number; rerank: number; checkpoints?: boolean };
  limits?: { maxTopK?: number; maxTextChars?: number };
  /**
   * the influence-lens.json these settings were read from, and its JSON as read (canonical): the
   * settings are read once, so a request after the file's settings changed is refused (restart)
   * rather than answered with the old ones
   */
  configFile?: { path: string; json: string };
}

/** Errors whose message is meant for the person using the editor. */
export class ServiceError extends Error {
  constructor(
    message: string,
    readonly code:
      | 'invalid_params'
      | 'not_ready'
      | 'data_changed'
      | 'cancelled'
      | 'data_invalid'
      | 'factors_broken' = 'invalid_params',
  ) {
    super(message);
  }
}

export interface Work {
  signal?: AbortSignal;
  progress?: (message: string, done: number, total: number) => void;
  partial?: (p: ExplainPartial) => void;
}

/**
 * What the RPC methods need from a service. `InfluenceService` implements it in this thread;
 * `WorkerService` (./worker-service) implements it with the work done in worker threads.
 */
export interface ServiceApi {
  info(): ReturnType<InfluenceService['info']>;
  /**
   * `info` after reading again what changed on disk since the stages were opened (factors refitted
   * by the CLI, a retrained model), when no request is running; for `status`, which otherwise
   * went on saying "no factors: run fit" after a CLI fit until the next request
   */
  currentInfo(): Promise<ReturnType<InfluenceService['info']>>;
  explain(p: ExplainParams, work?: Work): Promise<ExplainResult>;
  explainMany(p: ExplainManyParams, work?: Work): Promise<ExplainManyResult>;
  getExample(datasetId: string, line: number, hash?: string): Example | Promise<Example>;
  scanDataset(datasetId: string, topK: number, work?: Work): Promise<ScanResult>;
  fit(which: 'finetuned' | 'pretrained', work?: Work): Promise<Awaited<ReturnType<typeof runFitJob>>>;
  index(datasetId: string, work?: Work): Promise<{ size: number; bytes: number }>;
  reload(datasetId: string): ReloadResult | Promise<ReloadResult>;
  generate(p: GenerateParams, work?: Work): Promise<GenerateResult>;
}

export type Example = ReturnType<InfluenceService['getExample']>;
export type ScanResult = Awaited<ReturnType<InfluenceService['scanDataset']>>;
export type ReloadResult = ReturnType<InfluenceService['reload']>;

/**
 * Explains that need neither gradients nor hidden states (BM25 only): cheap enough to be
 * answered beside gradient work instead of queueing behind it.
 */
export function isLightExplain(p: Pick<ExplainParams, 'method' | 'compare' | 'candidates'>): boolean {
  // no method that runs the model: the light lane (BM25 reads the text alone)
  const modelFree = (m: string) => methodInfo(m)?.usesModel === false;
  return modelFree(p.method) && (p.compare ?? []).every(modelFree) && p.candidates !== 'retrieved';
}

interface LoadedDataset {
  corpus: Corpus;
  path: string;
  stamp: FileStamp;
  /** sha256 of the file's bytes when loaded: tells a metadata-only change from a new file */
  sha256: string;
  fingerprint: string;
}

/**
 * What to do about a factors folder the user named that holds factors this model cannot use: they
 * may be another model's (valid there), so "fit" never replaces them and the advice is to fit
 * elsewhere, or to move them away, never to delete them.
 */
const FOREIGN_FACTORS_ADVICE = (which: 'finetuned' | 'pretrained') =>
  `point the ${which === 'finetuned' ? 'fine-tuned' : 'pre-trained'} model's "factors" in influence-lens.json at a new folder and run "fit" (or move that folder away first if nothing else uses it)`;

/** The modules scored with neither a "modules" setting nor factors to take them from (the schema's default). */
export const DEFAULT_MODULES: ModuleSelection = 'mlp';

/** Models kept open across a reopen for new factors (InfluenceService.reopen). */
interface OpenedModels {
  finetuned?: Model;
  pretrained?: Model;
  /** checkpoint folder → model */
  checkpoints: Map<string, Model>;
}

/**
 * Whether influence-lens.json still holds the settings a server read at its start (it reads them
 * once): the service refuses requests, and `status` reports it, once it holds others. A file
 * saved again with the same settings (formatting, key order) is not a change.
 */
export class ConfigFileWatch {
  /** the stat of the file when its content was last found unchanged */
  private seen?: string;

  constructor(private readonly file: ServiceConfig['configFile']) {}

  changed(): string | undefined {
    const c = this.file;
    if (!c) return undefined;
    // deleted or moved away ('-'): read below, refused as unreadable
    const stat = fileIdentity(c.path);
    if (stat === this.seen) return undefined;
    let now: string | undefined;
    let why = '';
    try {
      now = canonicalJson(JSON.parse(readFileNoWait(c.path, 'utf8')));
    } catch (e) {
      why = ` (it cannot be read now: ${(e as NodeJS.ErrnoException).code ?? (e as Error).message})`;
    }
    if (now === c.json) {
      this.seen = stat;
      return undefined;
    }
    return `${c.path} changed since this server read it${why}: restart \`influence-lens serve\` to use its settings (a server the editor started restarts with "Influence Lens: Reconnect to the server"); until then every request is refused, so that no result comes from the old settings`;
  }
}

export class InfluenceService implements ServiceApi {
  private stages = new Map<'finetuned' | 'pretrained', OpenedStage>();
  /** the files and folders the opened stages read, found when they were opened (see `request`) */
  private watched?: ReturnType<typeof servedPaths>;
  /** their stamp then */
  private served?: string;
  /** the opened models are known stale (a file changed while they were opened or snapshotted) */
  private mustReopen = false;
  /** the same for the models' files alone (weights, configs, tokenizers, checkpoints): when only
   * the factors changed, a reopen keeps the models, their compiled graphs and the tokenized data */
  private watchedModels?: ReturnType<typeof servedPaths>;
  private servedModels?: string;
  /** requests in flight that use the stages, and those waiting for them to finish */
  private active = 0;
  private idle: Array<() => void> = [];
  /** the fine-tune's training checkpoints, when there are (and the configuration does not turn them off) */
  private checkpoints?: OpenedCheckpoints;
  private data = new Map<string, LoadedDataset>();
  /** factorsDataWarnings' last answer per stage, for the factors and dataset it compared */
  private factorsDataChecked = new Map<
    'finetuned' | 'pretrained',
    { factors: OpenedStage['preconditioners']; data: LoadedDataset; warning: string | null }
  >();
  private stores = new Map<string, GradientStore>();
  /** stores being loaded or built, by the same key: a second request waits for the first one's */
  private building = new Map<string, Promise<GradientStore>>();
  /** factors directory → the fit into it that this server runs now */
  private fitting = new Map<string, Promise<unknown>>();
  /** factors directory → why its factors cannot be used (they exist but are broken) */
  private brokenFactors = new Map<string, string>();

  constructor(readonly config: ServiceConfig) {
    this.settingsDigest = settingsDigest(config);
    if (!Object.keys(config.datasets).length) throw new ServiceError('the configuration names no dataset');
  }

  /** Opens the models (and factors where they exist). Factors that are missing are not an error here. */
  open(reuse?: OpenedModels): void {
    // leftovers of a server or fit killed in the middle of a write (see common/atomic-write.ts)
    for (const dir of [this.config.finetuned.factors, this.config.pretrained?.factors, this.config.cacheDir])
      if (dir) cleanStaleTemps(dir);
    this.stages.set('finetuned', this.openStage(this.config.finetuned, reuse?.finetuned));
    this.openCheckpoints(reuse?.checkpoints);
    if (this.config.pretrained) {
      const pt = this.openStage(this.config.pretrained, reuse?.pretrained);
      checkSameTokenizer(this.stages.get('finetuned')!.model, pt.model);
      const configs = stagesConfigWarning(this.stages.get('finetuned')!.model, pt.model);
      if (configs && !pt.warnings.includes(configs)) pt.warnings.push(configs);
      this.stages.set('pretrained', pt);
    } else this.stages.delete('pretrained');
    // the paths change only with the stages (a new checkpoint's folder changes a stamped listing
    // first), so each request only stats them
    this.watched = servedPaths(
      [...this.stages].map(([which, stage]) => {
        const c = this.config[which];
        return { stage, factors: c?.factors ?? c?.watchedFactors };
      }),
      this.checkpoints,
    );
    this.served = stampOf(this.watched);
    this.watchedModels = servedPaths(
      [...this.stages.values()].map((stage) => ({ stage })),
      this.checkpoints,
    );
    this.servedModels = stampOf(this.watchedModels);
    // The stamp is taken now, the weights' digests (fingerprints, factor checks) while opening: a
    // weight file rewritten in between would look current to the stamp while the opened models
    // hold the old digests. Opened again at the next request instead.
    const checkpoints = [
      ...[...this.stages.values()].map((s) => s.model.checkpoint),
      ...(this.checkpoints?.stages ?? []).map((c) => c.stage.model.checkpoint),
    ];
    const moved = checkpoints.flatMap((ck) => movedSincePinned(ck, this.config.cacheDir));
    if (moved.length) {
      this.mustReopen = true;
      throw new ServiceError(
        `${moved[0]} changed while the model was being opened; send the request again once it is written`,
        'not_ready',
      );
    }
    this.mustReopen = false;
  }

  /**
   * Every request that uses the stages runs inside `request`: it first checks that no file they read
   * changed on disk since they were opened (a model retrained into its folder, a tokenizer edited,
   * factors refitted by the CLI) and otherwise opens them again, so that nothing is served, fitted
   * or cached from the old files under the new files' fingerprints. Stages are only reopened while
   * no request uses them: a request that finds the files changed waits until those in flight have
   * finished, and one in flight never sees its stages change. Datasets are tokenized again too
   * (their tokens are the tokenizer's). If the new files cannot be opened, the request fails with
   * the reason, and so does every next one until they can.
   */
  private async request<T>(f: () => Promise<T>): Promise<T> {
    this.checkConfigFile();
    for (;;) {
      if (this.fresh()) break;
      if (this.active === 0) this.reopen();
      else await new Promise<void>((r) => this.idle.push(r));
    }
    this.active++;
    try {
      return await f();
    } catch (e) {
      // a weight file found rewritten when its snapshot was taken (model/engine.ts): the opened
      // model is stale whatever the stamp says, so the next request opens it again
      if (e instanceof EngineError && /changed while it was being read/.test(e.message)) this.mustReopen = true;
      throw e;
    } finally {
      this.leave();
    }
  }

  /** `request` for the synchronous requests (getExample, reload): they never wait, so they refuse instead. */
  private currentNow(): void {
    this.checkConfigFile();
    if (this.fresh()) return;
    if (this.active > 0)
      throw new ServiceError(
        'the model or its factors changed on disk while requests that use the old files are still running: send this one again when they have finished',
        'not_ready',
      );
    this.reopen();
  }

  private configWatch?: ConfigFileWatch;

  /**
   * Refuses every request once influence-lens.json holds other settings than the server read at
   * its start (it reads them once: a result from the old settings would look current). A file
   * saved again with the same settings (formatting, key order) is not a change.
   */
  private checkConfigFile(): void {
    const changed = this.configChanged();
    if (changed) throw new ServiceError(changed, 'not_ready');
  }

  /** Why requests are refused because influence-lens.json changed (undefined while it holds the settings read). */
  private configChanged(): string | undefined {
    this.configWatch ??= new ConfigFileWatch(this.config.configFile);
    return this.configWatch.changed();
  }

  /** Whether the files the stages read are as they were when opened. */
  private fresh(): boolean {
    if (this.mustReopen) return false;
    return this.watched === undefined || stampOf(this.watched) === this.served;
  }

  private leave(): void {
    if (--this.active > 0) return;
    for (const r of this.idle.splice(0)) r();
  }

  /** A request that must reopen the stages itself (fit, when its factors are written): waits for the others. */
  private async quiesce(): Promise<void> {
    this.leave();
    while (this.active > 0) await new Promise<void>((r) => this.idle.push(r));
    this.active++;
  }

  private reopen(): void {
    // Only the factors changed (a refit by the CLI or another server): the models, their compiled
    // graphs and the tokenized datasets stay (at SmolLM-135M a full reopen cost the next explain
    // about 45 s of graph building and tokenizing). Anything else: everything is opened again.
    const reuse =
      this.watchedModels !== undefined && stampOf(this.watchedModels) === this.servedModels
        ? this.openedModels()
        : undefined;
    // the old factors are let go before the new ones are read (both at once doubled them); if the
    // new files cannot be opened, the stages stay without factors, which is what they then are
    const bare = <T extends { preconditioners?: unknown }>(s: T): T => ({ ...s, preconditioners: undefined });
    const before = {
      stages: new Map([...this.stages].map(([k, s]) => [k, bare(s)] as const)),
      checkpoints: this.checkpoints && {
        ...this.checkpoints,
        stages: this.checkpoints.stages.map((c) => ({ ...c, stage: bare(c.stage) })),
      },
    };
    this.stages = before.stages;
    this.checkpoints = before.checkpoints;
    try {
      this.open(reuse);
    } catch (e) {
      this.stages = before.stages;
      this.checkpoints = before.checkpoints;
      throw new ServiceError(
        `the model or its factors changed on disk and cannot be opened again (${(e as Error).message}); fix them, then send the request again`,
        'not_ready',
      );
    }
    // tokens are the tokenizer's: kept only with the same models; stores are the factors'
    if (!reuse) this.data.clear();
    this.stores.clear();
  }

  /** The models now open, for a reopen that keeps them. */
  private openedModels(): OpenedModels {
    return {
      finetuned: this.stages.get('finetuned')?.model,
      pretrained: this.stages.get('pretrained')?.model,
      checkpoints: new Map((this.checkpoints?.stages ?? []).map((c) => [c.stage.model.checkpoint.dir, c.stage.model])),
    };
  }

  /**
   * Identifies the files the opened stages read (changes when any is replaced) and the settings
   * that decide what is scored (a server started again with another damping or modules scores
   * the same files otherwise): results carry it, and the editor keeps a result only while it holds.
   */
  get revision(): string {
    return createHash('sha256')
      .update(`${this.served ?? ''}\0${this.settingsDigest}`)
      .digest('hex')
      .slice(0, 16);
  }

  /** The settings part of the revision, the same in both lanes (worker-service.ts's light lane). */
  private readonly settingsDigest: string;

  private openStage(c: StageConfig, reuse?: Model): OpenedStage {
    // compiled graphs and weight digests go to the configured cache folder too
    const engine = {
      device: this.config.device,
      threads: this.config.threads,
      cacheDir: this.config.cacheDir,
      training: c.training,
    };
    const model = reuse ?? Model.open(c.model, { ...engine, base: c.base });
    // read the tokenizer now: a broken tokenizer.json refuses the start, naming the file,
    // instead of failing every request later
    void model.tokenizer;
    if (c.factors) this.brokenFactors.delete(c.factors);
    try {
      // configured modules are the ones scored, by every method: factors over others are refused
      // unset: the fine-tuned factors decide, and the pre-trained stage's must match them (those
      // just opened: when reopening, the map still holds the previous fine-tuned stage, whose
      // modules may be a fallback of factors since replaced)
      const decided = c === this.config.finetuned ? undefined : this.stages.get('finetuned')?.modules;
      const st = openStage(c.model, c.factors && exists(c.factors) ? c.factors : undefined, {
        damping: this.config.damping,
        model,
        modules: this.config.modules ?? decided,
        modulesFrom:
          this.config.modules !== undefined ? '"modules" in the server\'s config' : "the fine-tuned model's factors",
      });
      if (!st.preconditioners) st.modules = this.config.modules ?? DEFAULT_MODULES;
      return st;
    } catch (e) {
      // broken or foreign factors: keep serving the baselines and say why ekfac is unavailable
      if (c.factors) this.brokenFactors.set(c.factors, (e as Error).message);
      const stage: OpenedStage = {
        model,
        modules: this.config.modules ?? DEFAULT_MODULES,
        warnings: [(e as Error).message],
      };
      return stage;
    }
  }

  /** The fine-tune's checkpoints with whatever factors they have (a checkpoint of another model refuses the start). */
  private openCheckpoints(reuse?: Map<string, Model>): void {
    const c = this.config.finetuned;
    const ft = this.stages.get('finetuned')!;
    const plan = planCheckpoints(c.model, ft.model.checkpoint, c.checkpoints ?? DEFAULTS.checkpoints);
    this.checkpoints = plan
      ? openCheckpointStages(plan, {
          factorsDir: c.factors,
          damping: this.config.damping,
          engine: {
            device: this.config.device,
            threads: this.config.threads,
            cacheDir: this.config.cacheDir,
            training: c.training,
          },
          modules: ft.modules,
          models: reuse,
        })
      : undefined;
  }

  /** What an explanation runs with. */
  private setup() {
    const ft = this.stage('finetuned');
    return { model: ft, pretrained: this.stages.get('pretrained'), modules: ft.modules, checkpoints: this.checkpoints };
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

  /** What every method scores: the configured modules, else the fine-tuned stage's (its factors'). */
  private get modules(): ModuleSelection {
    return this.config.modules ?? this.stage('finetuned').modules;
  }

  /** the model whose completions are explained (and that `generate` runs) */
  get model(): Model {
    return this.stage('finetuned').model;
  }

  async currentInfo(): Promise<ReturnType<InfluenceService['info']>> {
    // while requests run they hold the opened files; the next request reopens after them
    if (this.active === 0 && !this.fresh())
      try {
        this.reopen();
      } catch {
        // the new files cannot be opened: the stages stay without factors, and info says why
      }
    return this.info();
  }

  info() {
    const ft = this.stage('finetuned');
    const pt = this.stages.get('pretrained');
    const methods = METHODS.filter((m) => this.unavailable(m) === null);
    return {
      model: this.config.finetuned.model,
      stages: [
        {
          name: 'finetuned',
          model: this.config.finetuned.model,
          factors: !!ft.preconditioners,
          ...this.factorsUnusable('finetuned', !!ft.preconditioners),
        },
        ...(pt
          ? [
              {
                name: 'pretrained',
                model: this.config.pretrained!.model,
                factors: !!pt.preconditioners,
                ...this.factorsUnusable('pretrained', !!pt.preconditioners),
              },
            ]
          : []),
      ],
      datasets: Object.keys(this.config.datasets),
      datasetPaths: { ...this.config.datasets },
      device: this.config.device ?? 'cpu',
      methods,
      unavailable: Object.fromEntries(METHODS.filter((m) => !methods.includes(m)).map((m) => [m, this.unavailable(m)])),
      modules: ft.model.modules(this.modules).map((m) => m.name),
      warnings: [...ft.warnings, ...(pt?.warnings ?? []), ...this.fitFallbackWarnings(), ...this.factorsDataWarnings()],
      revision: this.revision,
    };
  }

  /**
   * The dataset a stage's factors are fitted on: "fitDataset"; unset, the first dataset that is this
   * stage's training data ("datasetStage"; unmarked ones are the fine-tuned model's), so neither
   * model is fitted on the other's data; else the first dataset.
   */
  private fitDatasetId(which: 'finetuned' | 'pretrained'): string {
    const ids = Object.keys(this.config.datasets);
    return (
      this.config[which]?.fitDataset ??
      ids.find((id) => (own(this.config.datasetStage, id) ?? 'finetuned') === which) ??
      ids[0]
    );
  }

  /**
   * A model of a two-stage setup with no dataset of its own ("datasetStage") and no "fitDataset"
   * is fitted on the first dataset, the other model's training data: allowed (the documented
   * fallback), but not what a user who forgot to mark the pre-training data expects, so said.
   */
  private fitFallbackWarnings(): string[] {
    if (!this.config.pretrained) return [];
    const ids = Object.keys(this.config.datasets);
    const stageOf = (id: string) => own(this.config.datasetStage, id) ?? 'finetuned';
    const out: string[] = [];
    for (const which of ['finetuned', 'pretrained'] as const) {
      const c = this.config[which];
      if (!c?.factors || c.fitDataset !== undefined || ids.some((id) => stageOf(id) === which)) continue;
      out.push(
        `the ${which} model has no dataset of its own (no "datasetStage" entry marks one "${which}") and no "fitDataset": its EK-FAC factors are fitted on "${ids[0]}", the ${stageOf(ids[0])} model's training data. List its training data in "datasets" and mark it in "datasetStage", or set "fitDataset": "${ids[0]}" on models.${which} if that is what you want`,
      );
    }
    return out;
  }

  /**
   * Our factors fitted on other data than the stage's fit dataset ("fitDataset" changed since, or
   * fitted before the default followed "datasetStage", when the fine-tuned model took the first
   * dataset listed): explanations still use them, since a folder the user names is never refitted
   * behind their back, but they are not what the configuration describes, so status says so. Known
   * once the fit dataset is loaded (the first request over it): status never loads a dataset.
   */
  private factorsDataWarnings(
    stages: ReadonlyArray<'finetuned' | 'pretrained'> = ['finetuned', 'pretrained'],
  ): string[] {
    const out: string[] = [];
    for (const which of stages) {
      const c = this.config[which];
      const stage = this.stages.get(which);
      if (!c?.factors || !stage?.preconditioners) continue;
      const id = this.fitDatasetId(which);
      const d = this.data.get(id);
      if (!d) continue;
      // a fit dataset of the other stage ("fitDataset" naming it) is loaded with the other model;
      // its content hashes are the same under either, and the fingerprint is taken under this
      // stage's model, unless lines were skipped: the other convention may skip other records
      if (this.modelFor(id) !== stage.model && d.corpus.dataset.skipped.length) continue;
      // status is asked often: the arguments file is read and the fingerprint taken once per
      // factors and dataset loaded (both objects are new when either is read again)
      const seen = this.factorsDataChecked.get(which);
      if (seen?.factors === stage.preconditioners && seen.data === d) {
        if (seen.warning) out.push(seen.warning);
        continue;
      }
      const warning = this.factorsDataWarning(which, c.factors, id, d, stage);
      this.factorsDataChecked.set(which, { factors: stage.preconditioners, data: d, warning });
      if (warning) out.push(warning);
    }
    return out;
  }

  /**
   * What a result's reader must know about the factors it was scored with (those of other data
   * than their fit dataset), besides the status warnings: the panel shows it with the result.
   */
  private resultWarnings(method: Method): string[] {
    const info = methodInfo(method);
    if (!info?.needsFactors) return [];
    return this.factorsDataWarnings(info.needsPretrained ? ['finetuned', 'pretrained'] : ['finetuned']);
  }

  /** The warning for one stage's factors in `dir` against its loaded fit dataset `d`, or null. */
  private factorsDataWarning(
    which: 'finetuned' | 'pretrained',
    dir: string,
    id: string,
    d: LoadedDataset,
    stage: OpenedStage,
  ): string | null {
    // kronfluence's factors, or an older arguments file: unknown
    if (
      factorsFitOn(
        dir,
        d.corpus.dataset.examples.map((e) => e.hash),
        stage.model,
      ) !== false
    )
      return null;
    const fit = readFitSettings(dir);
    return `the ${which} model's EK-FAC factors (${dir}) were fitted on other data than its fit dataset "${id}" (${d.path}${fit?.maxExamples ? `, first ${fit.maxExamples} examples` : ''}): explanations use them as they are. To fit them on "${id}", move the folder aside and run "fit"; or set "fitDataset" to the dataset they were fitted on (without "fitDataset", a model is fitted on the first dataset of its stage in "datasetStage"; earlier versions fitted the fine-tuned model on the first dataset listed, whatever "datasetStage" said)`;
  }

  /** Why a method cannot run now (null when it can). */
  private unavailable(m: Method): string | null {
    // status and initialize say so too, not only the refused requests
    const stale = this.configChanged();
    if (stale) return stale;
    const ft = this.stages.get('finetuned');
    const pt = this.stages.get('pretrained');
    const needs = methodInfo(m);
    if (needs?.needsPretrained) {
      if (!pt) return 'no pre-trained model is configured';
      // the stage without factors says why (refused factors name their reason, e.g. another convention)
      if (needs.needsFactors && !ft?.preconditioners) return `the fine-tuned model: ${this.noFactors('finetuned')}`;
      if (needs.needsFactors && !pt.preconditioners) return `the pre-trained model: ${this.noFactors('pretrained')}`;
    } else if (needs?.needsFactors && !ft?.preconditioners) return this.noFactors('finetuned');
    else if (needs?.needsFactors && this.checkpoints?.unfitted.length)
      return `${m} sums over the fine-tune's ${this.checkpoints.stages.length} training checkpoints; ${this.checkpoints.unfitted.join(', ')} have no EK-FAC factors yet: run "fit"`;
    return null;
  }

  /** `factorsUnusable` of a stage's info: its factors folder is one that "fit" does not replace. */
  private factorsUnusable(which: 'finetuned' | 'pretrained', loaded: boolean): { factorsUnusable?: string } {
    if (loaded) return {};
    const why = this.noFactors(which);
    return why.endsWith(FOREIGN_FACTORS_ADVICE(which)) ? { factorsUnusable: why } : {};
  }

  /** Why a stage has no factors, and what to do. */
  private noFactors(which: 'finetuned' | 'pretrained'): string {
    const c = this.config[which];
    const dir = c?.factors;
    const broken = dir && this.brokenFactors.get(dir);
    // no folder, or one without a single factor file (empty, or a fit just starting to write it)
    if (!broken || /holds no factors yet/.test(broken)) return 'no EK-FAC factors for the model yet: run "fit"';
    // a fit killed midway: "fit" resumes it in place
    if (/unfinished influence-lens fit/.test(broken)) return `the EK-FAC factors are not finished (${broken})`;
    // our own cache is fitted again by "fit"; a folder the user named is never replaced by it
    return c?.factorsCache && isInside(resolve(dir), resolve(this.config.cacheDir))
      ? `the EK-FAC factors cannot be used (${broken}): run "fit" to fit them again`
      : `the EK-FAC factors cannot be used (${broken}): ${FOREIGN_FACTORS_ADVICE(which)}`;
  }

  /** A dataset by id, reloaded when its file changed on disk. */
  dataset(id: string): LoadedDataset {
    const path = own(this.config.datasets, id);
    if (!path)
      throw new ServiceError(`unknown dataset "${id}"; configured: ${Object.keys(this.config.datasets).join(', ')}`);
    const stamp = fileStamp(path);
    const have = this.data.get(id);
    if (have && unchanged(have, stamp)) return have;
    // the digest of the very bytes parsed (one read), for telling a later metadata-only change
    const model = this.modelFor(id);
    const ds = loadDataset(path, {
      skipMalformed: true,
      sha256: true,
      trainedBy: { tokenizer: model.tokenizer, maxLength: contextLength(model.config) },
    });
    const corpus = new Corpus(id, ds, model);
    const loaded = {
      corpus,
      path,
      stamp,
      sha256: ds.sha256!,
      fingerprint: dataFingerprint(
        ds.examples.map((e) => e.hash),
        { maxLength: contextLength(model.config), ...tokenizationKey(model.tokenizer) },
      ),
    };
    this.data.set(id, loaded);
    return loaded;
  }

  private modelFor(datasetId: string): Model {
    return this.stage(own(this.config.datasetStage, datasetId) ?? 'finetuned').model;
  }

  reload(id: string): { dataset: string; examples: number; skipped: number } {
    this.currentNow();
    this.data.delete(id);
    const d = this.dataset(id);
    return { dataset: id, examples: d.corpus.size, skipped: d.corpus.dataset.skipped.length };
  }

  /** The checks every query passes before any work starts. */
  private checkExplain(p: ExplainParams): void {
    const limits = { maxTopK: LIMITS.topK.max, maxTextChars: LIMITS.explainTextMaxChars, ...this.config.limits };
    if (typeof p.prompt !== 'string' || typeof p.completion !== 'string')
      throw new ServiceError('prompt and completion must be strings');
    if (p.messages !== undefined && !Array.isArray(p.messages)) throw new ServiceError('messages must be an array');
    const chatChars = (p.messages ?? []).reduce((n, m) => n + String(m?.content ?? '').length, 0);
    if (p.prompt.length + p.completion.length + chatChars > limits.maxTextChars)
      throw new ServiceError(
        `prompt + completion is longer than ${limits.maxTextChars} characters${this.config.limits?.maxTextChars ? ' (this server\'s "limits.maxTextChars" in influence-lens.json)' : ''}`,
      );
    if (!METHODS.includes(p.method))
      throw new ServiceError(`unknown method "${p.method}"; use one of ${METHODS.join(', ')}`);
    if (!(Number.isInteger(p.topK) && p.topK >= 1 && p.topK <= limits.maxTopK))
      // a lower limit the server's configuration sets: say where it comes from (the editor's
      // influenceLens.topK accepts up to the protocol's own)
      throw new ServiceError(
        `topK must be an integer from 1 to ${limits.maxTopK}${this.config.limits?.maxTopK ? ' (this server\'s "limits.maxTopK" in influence-lens.json)' : ''}`,
      );
    for (const m of [p.method, ...(p.compare ?? [])]) {
      if (!METHODS.includes(m)) throw new ServiceError(`unknown method "${m}" in compare`);
      const why = this.unavailable(m);
      if (why) throw new ServiceError(`${m} is unavailable: ${why}`, 'not_ready');
      this.checkReadAlike(p.dataset, m);
    }
  }

  /**
   * A dataset is tokenized once, as its stage's model was trained on it ("datasetStage"); a method
   * that scores it with the other stage's model (multistage on a fine-tuning dataset, a
   * single-stage method on a "pretrained" one) met tokens that model's factors were not fitted on
   * when the two training conventions differ: the server's scores then matched no CLI run (an
   * adversarial review: up to 0.92 of the top score apart). Refused, as the CLI refuses it.
   */
  private checkReadAlike(datasetId: string, method: Method): void {
    if (!this.config.pretrained || !methodInfo(method)?.usesModel) return;
    const readBy = this.modelFor(datasetId);
    const scoredBy = this.stage(method === 'multistage' ? 'pretrained' : 'finetuned').model;
    if (readBy === scoredBy) return;
    if (sameTokenization(readBy.tokenizer, scoredBy.tokenizer)) return;
    const which = (m: Model) => (m === this.stage('finetuned').model ? 'fine-tuned' : 'pre-trained');
    throw new ServiceError(
      `dataset "${datasetId}" is read as the ${which(readBy)} model was trained on it (${describeTraining(readBy.tokenizer.training)}), but ${method} scores it with the ${which(scoredBy)} model, trained under ${describeTraining(scoredBy.tokenizer.training)}: its tokens are not the ones that model's factors saw. Use a method of the ${which(readBy)} model's stage on it${method === 'multistage' ? ' (multistage traces into a "pretrained" dataset)' : ''}, or give both models the same "training"`,
    );
  }

  explain(p: ExplainParams, work: Work = {}): Promise<ExplainResult> {
    return this.request(() => this.explainNow(p, work));
  }

  private async explainNow(p: ExplainParams, work: Work): Promise<ExplainResult> {
    const revision = this.revision;
    this.checkExplain(p);
    const d = this.dataset(p.dataset);
    const store = await this.storeFor(p, d, work);
    try {
      const result = await explain(this.setup(), d.corpus, {
        prompt: p.prompt,
        completion: p.completion,
        messages: p.messages,
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
      if (!unchanged(d, fileStamp(d.path)))
        throw new ServiceError(
          `${p.dataset} changed on disk while it was being explained; explain again to use the new file`,
          'data_changed',
        );
      const warnings = [...(result.warnings ?? []), ...this.resultWarnings(p.method), ...d.corpus.notes()];
      return { ...result, revision, ...(warnings.length ? { warnings } : {}) };
    } catch (e) {
      if (work.signal?.aborted) throw new ServiceError('cancelled', 'cancelled');
      if (e instanceof ExplainError) throw new ServiceError(e.message);
      throw e;
    }
  }

  /** Several queries against one dataset, scored in one pass (each result as `explain` alone would give). */
  explainMany(p: ExplainManyParams, work: Work = {}): Promise<ExplainManyResult> {
    if (!Array.isArray(p.queries) || !p.queries.length)
      return Promise.reject(new ServiceError('queries must be a non-empty array'));
    return this.request(() => this.explainManyNow(p, work));
  }

  private async explainManyNow(p: ExplainManyParams, work: Work): Promise<ExplainManyResult> {
    const revision = this.revision;
    // every query passes the single-query checks (text length, methods, availability, top-k): the
    // request's settings with the query's text only (a query's own topK or method, which the
    // schema refuses over RPC, must not pass the checks in place of the ones the work runs with)
    const single = (q: ExplainManyParams['queries'][number]): ExplainParams => ({
      ...p,
      prompt: q?.prompt,
      completion: q?.completion,
      messages: q?.messages,
    });
    for (const q of p.queries) this.checkExplain(single(q));
    const d = this.dataset(p.dataset);
    const store = await this.storeFor(single(p.queries[0]), d, work);
    try {
      const results = await explainMany(
        this.setup(),
        d.corpus,
        p.queries.map((q) => ({
          prompt: q.prompt,
          completion: q.completion,
          // a chat query is rendered with the model's chat template, as `explain` renders it
          messages: q.messages,
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
      if (!unchanged(d, fileStamp(d.path)))
        throw new ServiceError(
          `${p.dataset} changed on disk while it was being explained; explain again to use the new file`,
          'data_changed',
        );
      const warnings = [...this.resultWarnings(p.method), ...d.corpus.notes()];
      return {
        results: results.map((r) => {
          // a query's own warnings (words outside the vocabulary) first, then the dataset's
          const all = [...(r.warnings ?? []), ...warnings];
          return { ...r, revision, ...(all.length ? { warnings: all } : {}) };
        }),
      };
    } catch (e) {
      if (work.signal?.aborted) throw new ServiceError('cancelled', 'cancelled');
      if (e instanceof ExplainError) throw new ServiceError(e.message);
      throw e;
    }
  }

  /**
   * The gradient stores for a large dataset (built on first use, cached on disk by fingerprints):
   * the final model's, or one per checkpoint when the method sums over the fine-tune's checkpoints.
   */
  private async storeFor(p: ExplainParams, d: LoadedDataset, work: Work): Promise<StoreRef[] | undefined> {
    const cfg = this.config.store;
    if (!cfg || p.candidates === 'retrieved' || d.corpus.size < cfg.minExamples) return undefined;
    if (!methodInfo(p.method)?.usesGradientStore) return undefined;
    if (this.modelFor(p.dataset) !== this.stage('finetuned').model) return undefined;
    const overCheckpoints = attributionOf(p.method, this.setup()).over === 'checkpoints';
    // per-checkpoint stores only when configured (settings.ts: store.checkpoints); otherwise the sum is exact
    if (overCheckpoints && !cfg.checkpoints) return undefined;
    // a checkpoint without factors: explain says so (no store is built for a query that cannot run)
    if (overCheckpoints && methodInfo(p.method)?.needsFactors && this.checkpoints!.unfitted.length) return undefined;
    return (await this.indexNow(p.dataset, work, overCheckpoints)).stores;
  }

  /**
   * Builds (or loads) the dataset's gradient stores: by default those the store-using methods
   * (ekfac, gdp) read: with checkpoints and `store.checkpoints`, one store per checkpoint (each
   * projected on that checkpoint's eigenbases and keyed by its weights and factors), otherwise
   * the final model's.
   */
  index(datasetId: string, work: Work = {}): Promise<{ size: number; bytes: number; stores: StoreRef[] }> {
    // without "store" explain never reads one: building it would be minutes of work for nothing
    if (!this.config.store)
      return Promise.reject(
        new ServiceError(
          'no gradient store is configured: add "store": {} to influence-lens.json to use one (without it explain scores every example exactly)',
        ),
      );
    return this.request(() =>
      this.indexNow(
        datasetId,
        work,
        !!this.config.store?.checkpoints &&
          this.modelFor(datasetId) === this.stage('finetuned').model &&
          attributionOf('ekfac', this.setup()).over === 'checkpoints',
      ),
    );
  }

  private async indexNow(
    datasetId: string,
    work: Work,
    overCheckpoints: boolean,
  ): Promise<{ size: number; bytes: number; stores: StoreRef[] }> {
    const model = this.modelFor(datasetId);
    const ft = this.stage('finetuned');
    const terms = overCheckpoints
      ? this.checkpoints!.stages.map((c, i, all) => ({
          model: c.stage.model,
          // with a checkpoint's factors, its store follows its eigenbases (store-projection.ts)
          eigen: c.stage.preconditioners,
          label: ` @ ${c.name} (${i + 1}/${all.length})`,
        }))
      : [{ model, eigen: model === ft.model ? ft.preconditioners : undefined, label: '' }];
    const stores: StoreRef[] = [];
    for (const t of terms)
      stores.push({ model: t.model, store: await this.storeOn(datasetId, t.model, t.eigen, t.label, work) });
    const size = stores[0]?.store.size ?? 0;
    return { size, bytes: stores.reduce((a, s) => a + s.store.bytes, 0), stores };
  }

  /** The store of the dataset's gradients at `model` (loaded and verified, or built into its file). */
  private async storeOn(
    datasetId: string,
    model: Model,
    eigen: Map<string, Preconditioner> | undefined,
    label: string,
    work: Work,
  ): Promise<GradientStore> {
    const cfg = this.config.store ?? DEFAULTS.store;
    const d = this.dataset(datasetId);
    const identity: StoreIdentity = {
      modelFingerprint: modelFingerprint(model.checkpoint, this.config.cacheDir),
      dataFingerprint: d.fingerprint,
      k: cfg.k,
      seed: 0,
      modules: this.modules,
      ...(eigen
        ? {
            projection: 'eigen' as const,
            factorsFingerprint: preconditionerFingerprint(eigen),
            pilot: DEFAULTS.storePilot,
          }
        : {}),
    };
    const key = JSON.stringify(identity);
    for (;;) {
      const cached = this.stores.get(key);
      // a store reads its rows from its file: one changed since it was verified is loaded (verified) again
      if (cached && !cached.stale()) return cached;
      // Another request of this server is building it: wait for that build. Two requests that both
      // built it wrote the file twice, the second over the one the first was reading its rows from
      // ("changed on disk since its checksum was verified"): one of two concurrent explains failed.
      const building = this.building.get(key);
      if (!building) break;
      await untilDoneOrCancelled(building, work);
      // its build failed or was cancelled with its request: loop, and build here
    }
    this.stores.delete(key);
    const dir = join(
      this.config.cacheDir,
      'stores',
      `${safe(datasetId)}-${identity.modelFingerprint}-${identity.dataFingerprint}-k${cfg.k}${eigen ? `-${identity.factorsFingerprint}` : ''}`,
    );
    const built = (async () =>
      GradientStore.load(dir, identity) ??
      (await cancellable(work, () =>
        GradientStore.build(model, d.corpus.tokens, identity, {
          dir,
          preconditioners: eigen,
          signal: work.signal,
          onProgress: (done, total) => work.progress?.(`indexing gradients${label}`, done, total),
        }),
      )))();
    this.building.set(key, built);
    try {
      const store = await built;
      this.stores.set(key, store);
      return store;
    } finally {
      this.building.delete(key);
    }
  }

  getExample(datasetId: string, line: number, hash?: string) {
    this.currentNow();
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
    const tok = d.corpus.token(index);
    return {
      id: { dataset: datasetId, line: ex.line, hash: ex.hash },
      kind: ex.kind,
      // as the model sees it (a chat with its chat template), which the token offsets index
      text: tok.text,
      record: ex.record,
      tokens: { offsets: tok.offsets, ids: tok.ids },
    };
  }

  /** Training examples ranked by self-influence (needs factors). */
  scanDataset(datasetId: string, topK: number, work: Work = {}) {
    return this.request(() => this.scanNow(datasetId, topK, work));
  }

  private async scanNow(datasetId: string, topK: number, work: Work) {
    const ft = this.stage('finetuned');
    this.checkReadAlike(datasetId, 'ekfac');
    if (!ft.preconditioners)
      throw new ServiceError(`scanning needs EK-FAC factors: ${this.noFactors('finetuned')}`, 'not_ready');
    const d = this.dataset(datasetId);
    if (this.checkpoints?.unfitted.length)
      throw new ServiceError(`scanning sums over the training checkpoints: ${this.unavailable('ekfac')}`, 'not_ready');
    const s = await cancellable(work, () =>
      selfInfluence(ft, this.checkpoints, d.corpus.tokens, {
        modules: ft.modules,
        signal: work.signal,
        onProgress: work.progress,
      }),
    );
    const order = Array.from(s.keys()).sort((a, b) => s[b] - s[a]);
    return {
      dataset: datasetId,
      scored: s.length,
      examples: order
        .slice(0, topK)
        .map((i, r) => ({ ...this.describe(datasetId, d, i), rank: r + 1, selfInfluence: s[i] })),
    };
  }

  /** Fits a stage's factors (on the model as it is on disk now, never one replaced since it was opened). */
  fit(which: 'finetuned' | 'pretrained', work: Work = {}) {
    // one fit of a folder at a time in this server: a second (another client's, or a retry right
    // after a cancel while the first still stops) waits for it instead of meeting its lock, which
    // would name this very process as "another fit"; it then finds the factors up to date. It
    // waits outside `request`: the first fit reopens the stages at its end once no request runs.
    const out = (which === 'finetuned' ? this.config.finetuned : this.config.pretrained)?.factors ?? '';
    const prior = this.fitting.get(out);
    const mine = (async () => {
      await prior?.catch(() => {});
      return this.request(() => this.fitNow(which, work));
    })();
    this.fitting.set(out, mine);
    return mine.finally(() => {
      if (this.fitting.get(out) === mine) this.fitting.delete(out);
    });
  }

  private async fitNow(which: 'finetuned' | 'pretrained', work: Work) {
    const c = which === 'finetuned' ? this.config.finetuned : this.config.pretrained;
    if (!c) throw new ServiceError(`no ${which} model is configured`);
    const out = c.factors;
    if (!out) throw new ServiceError(`the configuration names no factors directory for the ${which} model`);
    const datasetId = this.fitDatasetId(which);
    const path = own(this.config.datasets, datasetId);
    if (!path) throw new ServiceError(`fitDataset "${datasetId}" is not a configured dataset`);
    const broken = this.brokenFactors.get(out);
    // replaced when stale only if marked as our cache and inside the cache folder: a config that
    // spreads the default's stage and names its own factors folder keeps the refusal
    const owned = c.factorsCache === true && isInside(resolve(out), resolve(this.config.cacheDir));
    // final factors that exist but cannot be used would be "up to date" for the job: say so
    // instead of reporting success (deleting a folder the user named is their call)
    if (broken && exists(join(out, OUR_ARGUMENTS_FILE)) && !owned)
      throw new ServiceError(
        `${out} holds EK-FAC factors that cannot be used (${broken}); ${FOREIGN_FACTORS_ADVICE(which)}`,
        'factors_broken',
      );
    // factors the user fitted (the CLI's --labels, --seed, --max-examples, --eigendecomposition-dtype)
    // keep their settings: the final model's are then up to date, and its checkpoints get the same fit
    const stored = owned ? null : readFitSettings(out);
    const settings = {
      labels: stored?.labels ?? ('sampled' as const),
      seed: stored?.seed ?? 0,
      maxExamples: stored?.maxExamples ?? undefined,
      eigendecompositionDtype: stored?.eigendecompositionDtype,
    };
    const r = await cancellable(work, () =>
      runFitJob({
        modelDir: c.model,
        replaceStale: owned,
        dataPath: path,
        out,
        modules: this.modules,
        ...settings,
        skipMalformed: true,
        model: this.stage(which).model,
        signal: work.signal,
        onProgress: (stage, done, total) => work.progress?.(stage, done, total),
      }).catch((e) => {
        // another process (a CLI fit, a second server) is fitting into the same folder: busy, not broken
        if (e instanceof FitBusyError) throw new ServiceError(e.message, 'not_ready');
        // factors of another model or data, or partial ones that cannot be read to be resumed
        if (e instanceof FitJobError) throw new ServiceError(e.message, 'factors_broken');
        if (broken && !(e instanceof ServiceError) && !(e instanceof DataError) && !work.signal?.aborted)
          throw new ServiceError(
            `${out} holds EK-FAC factors that cannot be read (${(e as Error).message}); ${FOREIGN_FACTORS_ADVICE(which)}`,
            'factors_broken',
          );
        throw e;
      }),
    );
    if (which === 'finetuned' && this.checkpoints?.stages.length) {
      // the same fit for every training checkpoint the explanations sum over
      const plan = planCheckpoints(c.model, this.model.checkpoint, c.checkpoints ?? DEFAULTS.checkpoints);
      if (plan)
        await cancellable(work, () =>
          fitCheckpoints(plan, {
            factorsDir: out,
            replaceStale: owned,
            dataPath: path,
            modules: this.modules,
            ...settings,
            skipMalformed: true,
            engine: {
              device: this.config.device,
              threads: this.config.threads,
              cacheDir: this.config.cacheDir,
              training: c.training,
            },
            signal: work.signal,
            onProgress: work.progress,
          }).catch((e) => {
            if (e instanceof FitBusyError) throw new ServiceError(e.message, 'not_ready');
            if (e instanceof FitJobError) throw new ServiceError(e.message, 'factors_broken');
            throw e;
          }),
        );
    }
    // the new factors: every stage opened again (not only this one, and not under a request that
    // is still using them), so that nothing else that changed on disk meanwhile is left stale
    await this.quiesce();
    this.reopen();
    return r;
  }

  /** Completes a prompt with the fine-tuned model. */
  generate(p: GenerateParams, work: Work = {}) {
    return this.request(() => this.generateNow(p, work));
  }

  private async generateNow(p: GenerateParams, work: Work): Promise<GenerateResult> {
    const temperature = p.temperature ?? LIMITS.generate.temperature.default;
    const [g] = await cancellable(work, () =>
      generate(this.model, [p.prompt], {
        maxNewTokens: p.maxTokens ?? LIMITS.generate.maxTokens.default,
        temperature,
        seed: p.seed ?? LIMITS.generate.seedDefault,
      }).catch((e) => {
        if (e instanceof GenerateError) throw new ServiceError(`prompt: ${e.message}`);
        // a non-finite logit (generate.ts): the model's fault, said as such, not an internal error
        if (e instanceof EngineError && /is not a finite number/.test(e.message)) throw new ServiceError(e.message);
        throw e;
      }),
    );
    // as the CLI's note: greedy decoding draws nothing, so every seed gives this completion
    const notes =
      p.seed !== undefined && temperature === 0
        ? [`seed ${p.seed} changes nothing: temperature 0 decodes greedily`]
        : [];
    return { prompt: p.prompt, completion: g.text, logprobs: g.logprobs, ...(notes.length ? { notes } : {}) };
  }
}

/**
 * Waits for another request's work; resolves when it settles either way (its own request reports
 * its failure), and throws 'cancelled' as soon as this request is cancelled.
 */
async function untilDoneOrCancelled(other: Promise<unknown>, work: Work): Promise<void> {
  const settled = other.then(
    () => {},
    () => {},
  );
  if (!work.signal) return settled;
  try {
    await raceAbort(settled, work.signal);
  } catch {
    // `settled` never rejects: only the abort gets here
    throw new ServiceError('cancelled', 'cancelled');
  }
}

/** Runs `f`; when the work was cancelled, whatever it threw becomes ServiceError 'cancelled'. */
async function cancellable<T>(work: Work, f: () => Promise<T>): Promise<T> {
  if (work.signal?.aborted) throw new ServiceError('cancelled', 'cancelled');
  try {
    return await f();
  } catch (e) {
    if (work.signal?.aborted) throw new ServiceError('cancelled', 'cancelled');
    throw e;
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

interface FileStamp {
  /** size and mtime: what changes when the file is written */
  key: string;
  /** inode and ctime: what changes when it is replaced (same size and mtime: touch -r; mv) or its metadata changes */
  meta: string;
}

function fileStamp(path: string): FileStamp {
  try {
    const s = statSync(path);
    return { key: `${s.size}:${s.mtimeMs}`, meta: `${s.ino}:${s.ctimeMs}` };
  } catch {
    throw new ServiceError(
      `the dataset file ${path} does not exist: restore it, or fix its path in the configuration`,
      'data_invalid',
    );
  }
}

/**
 * Whether the loaded dataset is still the file on disk. Size and mtime decide; when only the inode
 * or ctime moved (a replacement with the same size and mtime, or a chmod, a sync client's
 * extended attributes), the bytes decide, and a metadata-only change is taken as the same file.
 */
function unchanged(d: LoadedDataset, now: FileStamp): boolean {
  if (d.stamp.key !== now.key) return false;
  if (d.stamp.meta === now.meta) return true;
  let same: boolean;
  try {
    same = fileSha256(d.path) === d.sha256;
  } catch {
    return false;
  }
  if (same) d.stamp = now;
  return same;
}

function fileSha256(path: string): string {
  return createHash('sha256').update(readFileNoWait(path)).digest('hex');
}

function safe(id: string): string {
  return id.replace(/[^A-Za-z0-9_.-]/g, '_').slice(0, 60);
}

/** Whether `path` is `dir` or inside it (both resolved). */
function isInside(path: string, dir: string): boolean {
  const r = relative(dir, path);
  return r === '' || (!r.startsWith('..') && !isAbsolute(r));
}

/**
 * A digest of the settings that decide what a result's scores are: each model's files and
 * training convention, which stage scores a dataset, the modules, the damping, the device and
 * the gradient store. Not which datasets are listed (a result names its file and the panel checks
 * it), the limits, the fit dataset (factors are not refitted behind the user's back: the files
 * are in the revision), the cache folder or the thread count. The light lane holds its factors
 * folder as `watchedFactors`: read as `factors`, so both lanes agree.
 */
function settingsDigest(c: ServiceConfig): string {
  const stage = (s: StageConfig | undefined) =>
    s && {
      model: s.model,
      base: s.base,
      factors: s.factors ?? s.watchedFactors,
      checkpoints: s.checkpoints,
      training: s.training,
    };
  return createHash('sha256')
    .update(
      canonicalJson({
        finetuned: stage(c.finetuned),
        pretrained: stage(c.pretrained),
        datasetStage: c.datasetStage,
        modules: c.modules,
        damping: c.damping,
        device: c.device,
        store: c.store,
      }),
    )
    .digest('hex');
}
