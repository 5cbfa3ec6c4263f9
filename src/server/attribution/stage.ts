// Opening a model together with its EK-FAC factors, and refusing pairs that do not belong
// together: factors fitted on another model, factors for other modules, broken factors.
import { existsSync } from 'node:fs';
import { join } from 'node:path';
import { canonicalJson } from '../../common/ids';
import { readFileNoWait } from '../../common/read-file';
import { contextLength, tokenizationKey } from '../data/tokenize';
import { describeTraining, sameTraining, trainingArgument } from '../data/training';
import { configDifference } from '../model/checkpoints';
import { type EngineOptions, Model, type ModuleSelection } from '../model/engine';
import { FIT_VERSION, fitVersionChange, loadFactors, preconditionerFor, readFitSettings } from './ekfac/factors-io';
import type { Damping, Preconditioner } from './ekfac/precondition';
import type { Stage } from './explain';
import { dataFingerprint, modelChange, modelFingerprint, modelParts } from './fingerprint';
import { SettingError } from './setup';

export class StageError extends SettingError {
  override name = 'StageError';
}

/** Factors fitted on records tokenized under another training convention than the model is read under. */
export class TrainingMismatchError extends StageError {
  override name = 'TrainingMismatchError';
}

/** What differs between the tokenization factors were fitted under and the model's now, in words. */
function tokenizationChanges(
  fitted: Record<string, unknown> | null | undefined,
  now: Record<string, unknown>,
): string[] {
  if (!fitted) return []; // written before it was stored: dataFingerprint warnings cover it
  const what: Record<string, string> = {
    tokenization: "this program's tokenization version changed",
    tokenizer: 'tokenizer.json or tokenizer_config.json changed',
    chatTemplate: 'the chat template changed',
    generationBlocks: "this program's reading of the chat template's {% generation %} blocks changed",
    prefixTurns:
      "this program's reading of the chat template's assistant turns changed (an empty reply now trains its turn's end)",
  };
  // the training convention has its own, more precise refusal above
  return Object.keys(what)
    .filter((k) => JSON.stringify(fitted[k] ?? null) !== JSON.stringify(now[k] ?? null))
    .map((k) => what[k]);
}

/**
 * Whether our factors in `dir` were fitted on these examples as the model tokenizes them now
 * (`maxLength` and `tokenizationKey` as fit-job.ts fingerprints them), or on other data: null when
 * unknown (kronfluence's factors, an older arguments file). Explanations still use factors of
 * other data (a folder the user names is never refitted behind their back), but say so.
 */
export function factorsFitOn(
  dir: string,
  exampleHashes: string[],
  model: Pick<Model, 'config' | 'tokenizer'>,
): boolean | null {
  const fit = readFitSettings(dir);
  if (!fit?.dataFingerprint) return null;
  const hashes =
    fit.maxExamples === null || fit.maxExamples === undefined ? exampleHashes : exampleHashes.slice(0, fit.maxExamples);
  return (
    dataFingerprint(hashes, { maxLength: contextLength(model.config), ...tokenizationKey(model.tokenizer) }) ===
    fit.dataFingerprint
  );
}

/** `factorsFitOn` said for a command line: a warning when the factors are known to be of other data. */
export function otherDataWarning(
  dir: string | undefined,
  data: { path: string; hashes: string[] },
  model: Pick<Model, 'config' | 'tokenizer'>,
): string | undefined {
  if (!dir || factorsFitOn(dir, data.hashes, model) !== false) return undefined;
  return `the EK-FAC factors in ${dir} were fitted on other data than ${data.path} (another file, or this one before an edit): scores use them as they are; to match, fit them again on ${data.path} into a new folder`;
}

/** Below this fraction of a module's largest Λ, a damping leaves scores to float32 rounding. */
const TINY_DAMPING = 1e-5;

/**
 * A warning when an absolute damping is tiny next to the eigenvalues it is added to: directions
 * the data barely covers are divided by about λ, and float32 scores there are rounding noise (an
 * adversarial check on singular factors: λ = 1e-8 flipped a score's sign against a float64
 * kronfluence run, 1e-6 moved it by 22%, 1e-3 agreed). The heuristic (relative) damping scales
 * with Λ and is not checked.
 */
function tinyDamping(lambda: number, preconditioners: Map<string, Preconditioner>): string | undefined {
  const low: Array<[string, number]> = [];
  for (const [name, p] of preconditioners) {
    let least = Number.POSITIVE_INFINITY;
    for (let i = 0; i < p.inverse.length; i++) if (p.inverse[i] < least) least = p.inverse[i];
    const largest = 1 / least - lambda; // inverse = 1 / (Λ + λ)
    if (lambda < TINY_DAMPING * largest) low.push([name, largest]);
  }
  if (!low.length) return undefined;
  const [name, largest] = low[0];
  return `damping λ = ${lambda} is below ${TINY_DAMPING.toExponential(0)} of the largest eigenvalue of ${low.length === 1 ? 'module' : `${low.length} modules, e.g.`} ${name} (${largest.toExponential(2)}): directions the data barely covers are divided by about λ, and float32 scores there are rounding noise; use the heuristic damping or a larger one`;
}

export interface OpenedStage extends Stage {
  /** the module selection the factors cover ('all' without factors) */
  modules: ModuleSelection;
  /** a line to show the user (e.g. foreign factors that cannot be checked) */
  warnings: string[];
}

export function openStage(
  modelDir: string,
  factorsDir: string | undefined,
  options: {
    damping?: Damping;
    engine?: EngineOptions;
    model?: Model;
    /** the selection the caller was told to score (a config's or a flag's): factors fitted over
     * another are refused, never silently put in its place */
    modules?: ModuleSelection;
    /** where `modules` came from, for the message ('"modules" in influence-lens.json', '--modules') */
    modulesFrom?: string;
    /** the flag that sets this model's training convention, for the message (default --training) */
    trainingFlag?: string;
  } = {},
): OpenedStage {
  const model = options.model ?? Model.open(modelDir, options.engine);
  const unread = model.unreadWeightsWarning();
  if (!factorsDir) return { model, modules: options.modules ?? 'all', warnings: unread ? [unread] : [] };
  // in the model's precision (float32 bases and Λ for a float32 model); scoring needs no covariances
  const factors = loadFactors(factorsDir, { precision: model.precision, covariances: false });
  const warnings: string[] = unread ? [unread] : [];
  // before the other checks: an earlier fit's fingerprints may be of another recipe, which would
  // read as another model or other data; null: another tool's factors, whose fit is its own
  const version = factors.args.fitVersion;
  if (version !== null && version !== undefined && version !== FIT_VERSION)
    throw new StageError(
      `the factors in ${factorsDir} were fitted by ${version < FIT_VERSION ? 'an earlier' : 'a later'} version of influence-lens, whose factors differ from this version's for the same model, data and settings (${fitVersionChange(version)}): ` +
        'fit them again (into a new folder, or move this one aside)',
      'factors',
    );
  const fp = factors.args.modelFingerprint;
  if (fp) {
    const mine = modelFingerprint(model.checkpoint, model.options.cacheDir);
    const changed =
      fp !== mine && factors.args.modelParts
        ? modelChange(factors.args.modelParts, modelParts(model.checkpoint, model.options.cacheDir))
        : '';
    if (fp !== mine)
      throw new StageError(
        `the factors in ${factorsDir} were fitted on another model (fingerprint ${fp}; ${modelDir} is ${mine}${changed ? `; since the fit: ${changed}` : ''}); ` +
          'fit factors for this model',
        'factors',
      );
  } else {
    warnings.push(
      `${factorsDir} has no model fingerprint (written by another tool?); cannot check it matches ${modelDir}`,
    );
  }
  // the candidates are tokenized under the model's training convention: under another than the
  // factors' they are other token sequences (an EOS more or less, other trained tokens)
  const fittedUnder = factors.args.training;
  const now = model.tokenizer.training;
  if (fittedUnder && !sameTraining(fittedUnder, now))
    throw new TrainingMismatchError(
      `the factors in ${factorsDir} were fitted on records tokenized under the training convention ${describeTraining(fittedUnder)}, ` +
        `but ${modelDir} is read under ${describeTraining(now)}, so its examples would be other tokens than the factors saw: ` +
        `ask for the factors' convention (${trainingArgument(fittedUnder, options.trainingFlag)}, or "training" on this model in influence-lens.json) or fit the factors again under this one`,
    );
  const tokenizedOtherwise = tokenizationChanges(factors.args.tokenization, tokenizationKey(model.tokenizer));
  if (tokenizedOtherwise.length)
    throw new TrainingMismatchError(
      `the factors in ${factorsDir} were fitted on records tokenized otherwise than ${modelDir} tokenizes them now (${tokenizedOtherwise.join('; ')} since the fit), so its examples would be other tokens than the factors saw: fit the factors again (into a new folder, or move this one aside)`,
    );
  const names = Object.keys(factors.modules);
  const all = model.modules('all');
  const unknown = names.filter((n) => !all.some((m) => m.name === n));
  if (unknown.length)
    throw new StageError(
      `the factors in ${factorsDir} track modules this model does not have (${unknown.slice(0, 3).join(', ')}${unknown.length > 3 ? ', …' : ''})`,
    );
  const mlp = model.modules('mlp').map((m) => m.name);
  const fitted: ModuleSelection = names.every((n) => mlp.includes(n)) ? 'mlp' : 'all';
  // compared as sets: where every tracked module is an MLP one (e.g. a LoRA adapter on the MLP
  // only), "mlp" and "all" are the same modules
  const asked = options.modules && model.modules(options.modules).map((m) => m.name);
  const same = !!asked && asked.length === names.length && asked.every((n) => names.includes(n));
  const modules: ModuleSelection = same ? options.modules! : fitted;
  if (options.modules !== undefined && !same)
    throw new StageError(
      `the factors in ${factorsDir} were fitted over ${fitted === 'all' ? 'all' : 'the MLP'} modules, but ${options.modulesFrom ?? 'the setting'} asks for ${options.modules}: ` +
        `fit factors over ${options.modules === 'all' ? 'all' : 'the MLP'} modules (into another folder), or ask for ${fitted}`,
      'modules',
    );
  const want = model.modules(modules).map((m) => m.name);
  const lacking = want.filter((n) => !names.includes(n));
  if (lacking.length)
    throw new StageError(
      `the factors in ${factorsDir} lack ${lacking.length} module(s) (e.g. ${lacking[0]}); refit them over ${modules === 'all' ? 'all' : 'the MLP'} modules`,
      'modules',
    );
  for (const m of all.filter((x) => names.includes(x.name))) {
    const f = factors.modules[m.name];
    if (f.dOut !== m.dOut || f.dA !== m.dIn + (m.hasBias ? 1 : 0))
      throw new StageError(
        `factors of ${m.name} are ${f.dOut}×${f.dA}, the model's module is ${m.dOut}×${m.dIn + (m.hasBias ? 1 : 0)}`,
      );
  }
  const damping = options.damping ?? factors.args.damping;
  const preconditioners = new Map<string, Preconditioner>();
  for (const name of want) {
    const mf = factors.modules[name];
    try {
      preconditioners.set(name, preconditionerFor(mf, damping, model.precision));
    } catch (e) {
      throw new StageError(`${factorsDir}: ${(e as Error).message}`);
    }
    // the Λ sums are not needed once the inverse is made (the bases are shared with it), and the
    // loaded factors are not kept: at the SmolLM-135M shape they are 425 MB in float32
    mf.lambda = undefined;
  }
  // a relative damping of 0 is no damping at all, as an absolute 0 (a relative one above 0 scales
  // with Λ and is not checked)
  const lambda = 'absolute' in damping ? damping.absolute : damping.relative === 0 ? 0 : undefined;
  const low = lambda !== undefined ? tinyDamping(lambda, preconditioners) : undefined;
  if (low) warnings.push(low);
  return { model, preconditioners, modules, warnings };
}

/**
 * tokenizer_config.json keys that never change a token id: what transformers writes about where
 * and how it was loaded (transformers 5's save_pretrained adds "is_local" and "local_files_only"),
 * padding and truncation sides, decoding options. The chat template is compared neither: each
 * stage renders its own data with its own (a base model without one, a fine-tune that adds one).
 */
const TOKENIZER_METADATA = new Set([
  'is_local',
  'local_files_only',
  'name_or_path',
  '_commit_hash',
  'tokenizer_file',
  'model_input_names',
  'padding_side',
  'truncation_side',
  'clean_up_tokenization_spaces',
  'processor_class',
  'auto_map',
  'model_max_length',
  'chat_template',
  // transformers 5 writes its loader's name ("backend": "tokenizers", "tokenizer_class":
  // "TokenizersBackend") where the Hub's files say PreTrainedTokenizerFast: only whether the
  // class is LlamaTokenizer changes ids (transformers 5 rebuilds that one), compared below
  'backend',
  'tokenizer_class',
]);

/** What of tokenizer_config.json's tokenizer_class can change ids: transformers 5 rebuilds LlamaTokenizer. */
const llamaClass = (c: Record<string, unknown>) =>
  c.tokenizer_class === 'LlamaTokenizer' || c.tokenizer_class === 'LlamaTokenizerFast';

/** What makes two tokenizer folders encode differently ("tokenizer.json: model", …), or undefined. */
export function tokenizerDifference(dirA: string, dirB: string): string | undefined {
  const read = (dir: string, file: string): Record<string, unknown> => {
    const path = join(dir, file);
    if (!existsSync(path)) return {};
    try {
      const v = JSON.parse(readFileNoWait(path, 'utf8'));
      return typeof v === 'object' && v !== null && !Array.isArray(v) ? v : { '': v };
    } catch {
      return { '': readFileNoWait(path, 'utf8') };
    }
  };
  for (const [file, skip] of [
    ['tokenizer.json', new Set<string>()],
    ['tokenizer_config.json', TOKENIZER_METADATA],
  ] as const) {
    const a = read(dirA, file);
    const b = read(dirB, file);
    const keys = [...new Set([...Object.keys(a), ...Object.keys(b)])].filter((k) => !skip.has(k)).sort();
    const differs = keys.filter((k) => canonicalJson(a[k] ?? null) !== canonicalJson(b[k] ?? null));
    if (file === 'tokenizer_config.json' && llamaClass(a) !== llamaClass(b)) differs.push('tokenizer_class');
    if (differs.length) return `${file}: ${differs.map((k) => (k ? `"${k}"` : 'its content')).join(', ')}`;
  }
  return undefined;
}

/**
 * Two stages must share a tokenizer: candidates are tokenized once for both. Files that differ
 * only in what never changes an id (transformers' own bookkeeping when it saves a tokenizer, a
 * chat template) are the same tokenizer.
 */
/**
 * A warning when the pre-trained model's config.json describes another architecture than the
 * fine-tuned one's (a rope_theta or norm epsilon changed): multi-stage influence takes the fine-tune
 * to continue the same model, and its regime check measures weights only. Not refused: a fine-tune
 * may extend the context on purpose (rope scaling).
 */
export function stagesConfigWarning(finetuned: Model, pretrained: Model): string | undefined {
  const d = configDifference(finetuned.checkpoint.config, pretrained.checkpoint.config);
  return d
    ? `the pre-trained model ${pretrained.checkpoint.dir} has another config.json than the fine-tuned ${finetuned.checkpoint.dir} (${d}): multi-stage influence takes the fine-tune to continue the same architecture, so its scores are only as meaningful as that holds`
    : undefined;
}

export function checkSameTokenizer(a: Model, b: Model): void {
  if (a.tokenizer.sha256 === b.tokenizer.sha256) return;
  const differs = tokenizerDifference(a.checkpoint.tokenizerDir, b.checkpoint.tokenizerDir);
  if (differs)
    throw new StageError(
      `${a.checkpoint.dir} and ${b.checkpoint.dir} have different tokenizers (${differs} differ); multi-stage influence needs one tokenizer`,
    );
}

/**
 * The largest damping taken (absolute, or as a multiple of mean Λ): 1/(Λ+λ) must stay a normal
 * float32 (> 1.2e-38) for any sensible Λ; a damping this large already makes EK-FAC a scaled
 * gradient dot product.
 */
export const MAX_DAMPING = 1e30;

/** Parses a damping setting: a number is absolute; "heuristic" or "0.1x" style is relative to mean(Λ). */
export function parseDamping(v: string | undefined): Damping | undefined {
  if (v === undefined) return undefined;
  if (v === 'heuristic') return { relative: 0.1 };
  // a decimal number (as the config schema's pattern): Number() also read "0x10" as 16 and
  // "0b1" as 1; finite, and small enough that 1/(Λ+λ) is not flushed to zero in float32
  // (every score would be 0)
  const m = /^((?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?)(x?)$/.exec(v.trim());
  const n = m ? Number(m[1]) : Number.NaN;
  if (Number.isFinite(n) && n <= MAX_DAMPING) return m![2] ? { relative: n } : { absolute: n };
  throw new StageError(
    `damping must be a non-negative number up to ${MAX_DAMPING} (absolute λ), "heuristic" (0.1 × mean Λ), or a factor like "0.01x" (got "${v}")`,
    'damping',
  );
}
