// The server's configuration file, influence-lens.json. Its shape is defined once, by
// influence-lens.schema.json at the repository root (editors use it for completion); the
// loader validates with that very schema (./schema), then checks what a schema cannot say
// (ids that must refer to each other, files that must exist, the device). Every problem names
// the field, e.g. `influence-lens.json: models.finetuned.model: is required`.
//
//   {
//     "$schema": "./influence-lens.schema.json",
//     "models": { "pretrained": { "model": "base" }, "finetuned": { "model": "ft", "factors": "ft-factors" } },
//     "datasets": { "train": "data/train.jsonl" },
//     "modules": "mlp", "damping": "heuristic", "device": "cpu",
//     "port": 0, "maxConcurrent": 2
//   }

import { statSync } from 'node:fs';
import { basename, dirname, isAbsolute, resolve } from 'node:path';
import { visit } from 'jsonc-parser';
import schemaJson from '../../../influence-lens.schema.json' with { type: 'json' };
import { canonicalJson } from '../../common/ids';
import { formatIssue, type JsonSchema, validateSchema } from '../../common/json-schema';
import { readFileNoWait } from '../../common/read-file';
import { defaultDiscoveryFile } from '../../transport/discovery';
import { DEFAULT_LIMITS } from '../../transport/server';
import { parseDamping } from '../attribution/stage';
import { parseTraining } from '../data/training';
import { parseCheckpointsSetting } from '../model/checkpoints';
import { defaultCacheDir } from '../model/engine';
import type { Device } from '../model/onnx/session';
import { DEFAULTS } from '../settings';
import { checkDevice } from './device';
import type { ServiceConfig, StageConfig } from './influence-service';

export const CONFIG_SCHEMA: JsonSchema = schemaJson as JsonSchema;
export const CONFIG_FILE_NAME = 'influence-lens.json';

/** A problem in influence-lens.json (the server's configuration file), naming the field. */
export class ConfigFileError extends Error {
  override name = 'ConfigFileError';
}

/** How the server listens and how much it takes on. */
export interface ServerSettings {
  host: string;
  port: number;
  maxConcurrent: number;
  maxQueued: number;
  maxFrameBytes: number;
  discoveryFile: string;
}

export interface Config {
  /** the configuration file (absolute path), when there was one */
  file?: string;
  service: ServiceConfig;
  server: ServerSettings;
  /** where the fine-tuned model is in the file: "models.finetuned" (a pair, or one stage written so) or "models" */
  finetunedField?: string;
}

export function defaultServerSettings(): ServerSettings {
  return { host: '127.0.0.1', port: 0, ...DEFAULT_LIMITS, discoveryFile: defaultDiscoveryFile() };
}

/** The file as written (after schema validation). */
interface RawStage {
  model: string;
  base?: string;
  factors?: string;
  fitDataset?: string;
  checkpoints?: 'auto' | 'off' | string[];
  training?: string | Record<string, unknown>;
}
interface RawConfig {
  models: RawStage | { finetuned: RawStage; pretrained?: RawStage };
  datasets: Record<string, string>;
  datasetStage?: Record<string, 'finetuned' | 'pretrained'>;
  modules?: 'mlp' | 'all';
  damping?: number | string;
  device?: Device;
  threads?: number;
  cacheDir?: string;
  host?: string;
  port?: number;
  maxConcurrent?: number;
  maxQueued?: number;
  maxFrameBytes?: number;
  discoveryFile?: string;
  store?: { k?: number; minExamples?: number; rerank?: number; checkpoints?: boolean };
  limits?: { maxTopK?: number; maxTextChars?: number };
}

/**
 * Validates a parsed configuration and resolves its paths against `baseDir`. Pure: touches no
 * files (see `checkConfigFiles`). `source` prefixes every message (the file name).
 */
export function parseConfig(value: unknown, opts: { baseDir: string; source?: string }): Config {
  const source = opts.source ?? CONFIG_FILE_NAME;
  const fail = (lines: string[]): never => {
    throw new ConfigFileError(lines.map((l) => `${source}: ${l}`).join('\n'));
  };
  const issues = validateSchema(value, CONFIG_SCHEMA);
  if (issues.length) fail(issues.slice(0, 10).map((i) => formatIssue(i, '(the whole file)')));
  const raw = value as RawConfig;
  const path = (p: string) => (isAbsolute(p) ? p : resolve(opts.baseDir, p));

  const pair = 'finetuned' in raw.models ? raw.models : undefined;
  const single = pair ? undefined : (raw.models as RawStage);
  const datasets = Object.fromEntries(Object.entries(raw.datasets).map(([id, p]) => [id, path(p)]));
  const ids = Object.keys(datasets);
  const problems: string[] = [];
  const stage = (s: RawStage, field: string): StageConfig => {
    if (s.fitDataset !== undefined && !ids.includes(s.fitDataset))
      problems.push(`${field}.fitDataset: "${s.fitDataset}" is not a dataset id in "datasets" (${ids.join(', ')})`);
    return {
      model: path(s.model),
      ...(s.base !== undefined ? { base: path(s.base) } : {}),
      ...(s.factors !== undefined ? { factors: path(s.factors) } : {}),
      ...(s.fitDataset !== undefined ? { fitDataset: s.fitDataset } : {}),
      ...(s.checkpoints !== undefined ? { checkpoints: parseCheckpointsSetting(s.checkpoints, opts.baseDir) } : {}),
      ...(s.training !== undefined ? { training: training(s.training, `${field}.training`) } : {}),
    };
  };
  const training = (value: unknown, field: string) => {
    try {
      return parseTraining(value);
    } catch (e) {
      problems.push(`${field}: ${(e as Error).message}`);
      return undefined;
    }
  };
  const finetuned = stage(pair ? pair.finetuned : single!, pair ? 'models.finetuned' : 'models');
  const pretrained = pair?.pretrained ? stage(pair.pretrained, 'models.pretrained') : undefined;
  // influence is summed over the checkpoints of the model whose completions are explained only
  if (pair?.pretrained?.checkpoints !== undefined)
    problems.push(
      "models.pretrained.checkpoints: only the fine-tuned model's training checkpoints are used; move it to models.finetuned",
    );
  for (const [id, which] of Object.entries(raw.datasetStage ?? {})) {
    if (!ids.includes(id))
      problems.push(`datasetStage.${id}: "${id}" is not a dataset id in "datasets" (${ids.join(', ')})`);
    else if (which === 'pretrained' && !pretrained)
      problems.push(`datasetStage.${id}: "pretrained" needs a pre-trained model in models.pretrained`);
  }
  let damping: ReturnType<typeof parseDamping>;
  try {
    damping = parseDamping(raw.damping === undefined ? 'heuristic' : String(raw.damping));
  } catch (e) {
    problems.push(`damping: ${(e as Error).message}`);
  }
  if (problems.length) fail(problems);

  const service: ServiceConfig = {
    finetuned,
    ...(pretrained ? { pretrained } : {}),
    datasets,
    ...(raw.datasetStage ? { datasetStage: raw.datasetStage } : {}),
    ...(raw.modules ? { modules: raw.modules } : {}),
    damping,
    device: raw.device ?? 'cpu',
    ...(raw.threads !== undefined ? { threads: raw.threads } : {}),
    cacheDir: raw.cacheDir !== undefined ? path(raw.cacheDir) : defaultCacheDir(),
    ...(raw.store ? { store: { ...DEFAULTS.store, ...raw.store } } : {}),
    ...(raw.limits ? { limits: raw.limits } : {}),
  };
  const d = defaultServerSettings();
  const server: ServerSettings = {
    host: raw.host ?? d.host,
    port: raw.port ?? d.port,
    maxConcurrent: raw.maxConcurrent ?? d.maxConcurrent,
    maxQueued: raw.maxQueued ?? d.maxQueued,
    maxFrameBytes: raw.maxFrameBytes ?? d.maxFrameBytes,
    discoveryFile: raw.discoveryFile !== undefined ? path(raw.discoveryFile) : d.discoveryFile,
  };
  return { service, server, finetunedField: pair ? 'models.finetuned' : 'models' };
}

/** Checks that the models and datasets named in the configuration exist. */
export function checkConfigFiles(cfg: Config, source = cfg.file ? basename(cfg.file) : CONFIG_FILE_NAME): void {
  const problems: string[] = [];
  const stages: Array<[string, StageConfig | undefined]> = [
    [cfg.finetunedField ?? (cfg.service.pretrained ? 'models.finetuned' : 'models'), cfg.service.finetuned],
    ['models.pretrained', cfg.service.pretrained],
  ];
  for (const [field, s] of stages) {
    if (!s) continue;
    const kind = kindOf(s.model);
    if (kind !== 'dir')
      problems.push(`${field}.model: ${s.model} ${kind === 'none' ? 'does not exist' : 'is not a directory'}`);
    else if (
      kindOf(resolve(s.model, 'config.json')) !== 'file' &&
      kindOf(resolve(s.model, 'adapter_config.json')) !== 'file'
    )
      problems.push(
        `${field}.model: ${s.model} has no config.json (expected a Hugging Face checkpoint directory) and no adapter_config.json (a LoRA adapter)`,
      );
    if (s.base !== undefined && kindOf(resolve(s.base, 'config.json')) !== 'file')
      problems.push(`${field}.base: ${s.base} has no config.json (expected the base model's checkpoint directory)`);
    if (s.factors && kindOf(s.factors) === 'file')
      problems.push(
        `${field}.factors: ${s.factors} is a file; it must be a directory (it is created by "fit" when absent)`,
      );
  }
  for (const [id, p] of Object.entries(cfg.service.datasets)) {
    const kind = kindOf(p);
    if (kind !== 'file') problems.push(`datasets.${id}: ${p} ${kind === 'none' ? 'does not exist' : 'is not a file'}`);
  }
  if (problems.length) throw new ConfigFileError(problems.map((l) => `${source}: ${l}`).join('\n'));
}

function kindOf(p: string): 'file' | 'dir' | 'other' | 'none' {
  try {
    const s = statSync(p);
    return s.isFile() ? 'file' : s.isDirectory() ? 'dir' : 'other';
  } catch {
    return 'none';
  }
}

/** Reads, validates and resolves a configuration file, and checks its files (not the device). */
export function readConfigFile(file: string): Config {
  const abs = resolve(file);
  const source = basename(abs);
  let text: string;
  try {
    text = readFileNoWait(abs, 'utf8');
  } catch (e) {
    throw new ConfigFileError(
      `cannot read the configuration ${abs}: ${(e as NodeJS.ErrnoException).code ?? (e as Error).message}`,
    );
  }
  let value: unknown;
  try {
    value = JSON.parse(text);
  } catch (e) {
    throw new ConfigFileError(`${source}: not valid JSON: ${describeJsonError(text, e as Error)}`);
  }
  const twice = duplicateKeys(text);
  if (twice.length)
    throw new ConfigFileError(
      twice
        .slice(0, 10)
        .map(
          (d) =>
            `${source}: "${d.path}" is given twice (lines ${d.lines.join(' and ')}); JSON would keep the last one without a word: remove one`,
        )
        .join('\n'),
    );
  const cfg = { ...parseConfig(value, { baseDir: dirname(abs), source }), file: abs };
  // a running server refuses requests once the file holds other settings (InfluenceService)
  cfg.service.configFile = { path: abs, json: canonicalJson(value) };
  checkConfigFiles(cfg, source);
  return cfg;
}

/** `readConfigFile`, then makes sure the configured device works (no silent CPU fallback). */
export async function loadConfig(file: string): Promise<Config> {
  const cfg = readConfigFile(file);
  try {
    await checkDevice(cfg.service.device ?? 'cpu');
  } catch (e) {
    throw new ConfigFileError(`${basename(cfg.file!)}: ${(e as Error).message}`);
  }
  return cfg;
}

/**
 * Keys written twice in one object (jsonc-parser's visitor sees every property; JSON.parse keeps
 * the last): `"damping": 0.001, "damping": "heuristic"` served heuristic damping, and a second
 * "datasets" object dropped the first's datasets.
 */
export function duplicateKeys(text: string): Array<{ path: string; lines: [number, number] }> {
  const out: Array<{ path: string; lines: [number, number] }> = [];
  const objects: Array<Map<string, number>> = [];
  visit(text, {
    onObjectBegin: () => void objects.push(new Map()),
    onObjectEnd: () => void objects.pop(),
    onObjectProperty: (key, _offset, _length, line, _char, pathSupplier) => {
      const seen = objects[objects.length - 1];
      const first = seen.get(key);
      if (first !== undefined) out.push({ path: [...pathSupplier(), key].join('.'), lines: [first + 1, line + 1] });
      else seen.set(key, line);
    },
  });
  return out;
}

/** JSON.parse's message with the line and column of its position. */
function describeJsonError(text: string, e: Error): string {
  const m = /position (\d+)/.exec(e.message);
  if (!m) return e.message;
  const pos = Number(m[1]);
  const before = text.slice(0, pos).split('\n');
  return `${e.message.replace(/ in JSON at position \d+.*$/, '')} at line ${before.length}, column ${before[before.length - 1].length + 1}`;
}
