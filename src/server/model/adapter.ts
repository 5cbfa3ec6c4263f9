// PEFT LoRA adapters as `PeftModel.save_pretrained` writes them: adapter_config.json plus
// adapter_model.safetensors, on top of a base checkpoint. The forward is PEFT's LoraLayer
// (Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models"):
//   y = base(x) + scaling · B(A x),  scaling = lora_alpha / r  (rsLoRA: lora_alpha / √r),
// dropout off (inference). Every adapter_config.json setting that would change this forward
// and is not implemented here is refused by name, never ignored.
import { existsSync, realpathSync, statSync } from 'node:fs';
import { isAbsolute, join, resolve } from 'node:path';
import { readFileNoWait } from '../../common/read-file';
import { readSafetensorsHeader, type SafetensorsHeader } from './safetensors';

export const ADAPTER_CONFIG = 'adapter_config.json';
export const ADAPTER_WEIGHTS = 'adapter_model.safetensors';

export class AdapterError extends Error {}

export interface LoraAdapter {
  dir: string;
  configPath: string;
  weightsPath: string;
  header: SafetensorsHeader;
  config: Record<string, unknown>;
  r: number;
  alpha: number;
  /** the factor on B(A x) */
  scaling: number;
  /** list entries match a module name or its last dotted parts; a string is a full-match regex (PEFT's rule) */
  targetModules: string[] | RegExp;
  fanInFanOut: boolean;
}

/** PEFT prefixes every tensor of the wrapped model with this. */
export const PEFT_PREFIX = 'base_model.model.';

export function isAdapterDir(dir: string): boolean {
  return existsSync(join(dir, ADAPTER_CONFIG));
}

const isOff = (v: unknown) =>
  v === null ||
  v === false ||
  (Array.isArray(v) && v.length === 0) ||
  (typeof v === 'object' && v !== null && Object.keys(v).length === 0);

/**
 * adapter_config.json keys and what we accept. Keys that only describe how the adapter was
 * initialised or trained (dropout, init, task bookkeeping) do not change the saved weights'
 * forward and are accepted as they are.
 */
const KEYS: Record<string, { accepts: string; ok(v: unknown): boolean }> = {
  peft_type: { accepts: '"LORA"', ok: (v) => v === 'LORA' },
  r: { accepts: 'a positive integer', ok: (v) => Number.isInteger(v) && (v as number) > 0 },
  lora_alpha: { accepts: 'a finite number', ok: (v) => typeof v === 'number' && Number.isFinite(v) },
  target_modules: {
    accepts: 'a list of module names or a regular expression',
    ok: (v) => typeof v === 'string' || (Array.isArray(v) && v.length > 0 && v.every((x) => typeof x === 'string')),
  },
  // null: what PEFT reads as false
  use_rslora: { accepts: 'true, false or null', ok: (v) => typeof v === 'boolean' || v === null },
  fan_in_fan_out: { accepts: 'true or false', ok: (v) => typeof v === 'boolean' },
  bias: { accepts: '"none" (LoRA bias terms are not implemented)', ok: (v) => v === 'none' },
  lora_bias: { accepts: 'false (or null)', ok: (v) => v === false || v === null },
  use_dora: { accepts: 'false (DoRA is not implemented)', ok: (v) => v === false || v === null },
  modules_to_save: { accepts: 'null (fully trained extra modules are not implemented)', ok: isOff },
  rank_pattern: { accepts: '{} (per-module ranks are not implemented)', ok: isOff },
  alpha_pattern: { accepts: '{} (per-module alphas are not implemented)', ok: isOff },
  layers_to_transform: { accepts: 'null (layer subsets are not implemented)', ok: isOff },
  layer_replication: { accepts: 'null', ok: isOff },
  exclude_modules: { accepts: 'null', ok: isOff },
  target_parameters: { accepts: 'null', ok: isOff },
  trainable_token_indices: { accepts: 'null', ok: isOff },
  use_qalora: { accepts: 'false', ok: (v) => v === false || v === null },
  // PiSSA / OLoRA / LoftQ / CorDA / LoRA-GA initialisations rewrite the base weights, so the saved
  // adapter only holds against the rewritten base; EVA redistributes ranks and may drop layers.
  // gaussian and orthogonal (PEFT's orthogonal_init) only set A and B, which the file holds.
  init_lora_weights: {
    accepts:
      'true, false, "gaussian" or "orthogonal" (PiSSA, OLoRA, LoftQ, CorDA and LoRA-GA rewrite the base weights; EVA redistributes ranks)',
    ok: (v) => v === true || v === false || v === 'gaussian' || v === 'orthogonal',
  },
  loftq_config: { accepts: '{}', ok: isOff },
  task_type: { accepts: '"CAUSAL_LM" or null', ok: (v) => v === 'CAUSAL_LM' || v === null },
  // no effect on the forward of saved weights
  base_model_name_or_path: { accepts: 'a path', ok: () => true },
  lora_dropout: { accepts: 'a number (dropout is off at inference)', ok: (v) => typeof v === 'number' },
  inference_mode: { accepts: 'anything', ok: () => true },
  revision: { accepts: 'anything', ok: () => true },
  peft_version: { accepts: 'anything', ok: () => true },
  auto_mapping: { accepts: 'anything', ok: () => true },
  layers_pattern: { accepts: 'anything (used only with layers_to_transform)', ok: () => true },
  megatron_config: { accepts: 'null', ok: isOff },
  megatron_core: { accepts: 'anything (used only with megatron_config)', ok: () => true },
  qalora_group_size: { accepts: 'anything (used only with use_qalora)', ok: () => true },
  ensure_weight_tying: { accepts: 'anything (used only with modules_to_save / trainable tokens)', ok: () => true },
  eva_config: { accepts: 'anything (initialisation only)', ok: () => true },
  corda_config: { accepts: 'anything (initialisation only)', ok: () => true },
};

/**
 * adapter_config.json keys that describe how the adapter was made or saved, not what its saved
 * weights compute: left out of the model fingerprint, so that factors survive a PEFT upgrade or a
 * changed dropout (fingerprint.ts). Everything else the fingerprint hashes, as parsed.
 */
export const RUN_ONLY_ADAPTER_KEYS: ReadonlySet<string> = new Set([
  'base_model_name_or_path',
  'lora_dropout',
  'inference_mode',
  'revision',
  'peft_version',
  'auto_mapping',
  'init_lora_weights',
  'eva_config',
  'corda_config',
  'task_type',
]);

/** Reads and checks an adapter folder (the base is resolved separately: see resolveBase). */
export function readAdapter(dirIn: string): LoraAdapter {
  const dir = resolve(dirIn);
  const configPath = join(dir, ADAPTER_CONFIG);
  let text: string;
  try {
    text = readFileNoWait(configPath, 'utf8');
  } catch (e) {
    const code = (e as NodeJS.ErrnoException).code;
    throw new AdapterError(
      `${configPath}: cannot read (${code === 'EISDIR' ? 'a directory, not a file' : (code ?? (e as Error).message)})`,
    );
  }
  let config: Record<string, unknown>;
  try {
    config = JSON.parse(text);
  } catch (e) {
    throw new AdapterError(`${configPath}: not valid JSON (${(e as Error).message})`);
  }
  if (!config || typeof config !== 'object' || Array.isArray(config))
    throw new AdapterError(`${configPath}: expected a JSON object`);
  if (config.peft_type !== 'LORA')
    throw new AdapterError(
      `${configPath}: "peft_type" is ${JSON.stringify(config.peft_type)}; only LoRA adapters ("LORA") are supported`,
    );
  for (const [key, value] of Object.entries(config)) {
    const rule = KEYS[key];
    // a key from a newer PEFT: harmless only while it is switched off
    if (!rule) {
      if (isOff(value)) continue;
      throw new AdapterError(
        `${configPath}: "${key}": ${JSON.stringify(value)} is not implemented (only null/false/empty is accepted for it)`,
      );
    }
    if (!rule.ok(value))
      throw new AdapterError(
        `${configPath}: "${key}": ${JSON.stringify(value)} is not supported (accepted: ${rule.accepts})`,
      );
  }
  for (const key of ['r', 'lora_alpha', 'target_modules'])
    if (!(key in config)) throw new AdapterError(`${configPath}: no "${key}"`);
  const weightsPath = join(dir, ADAPTER_WEIGHTS);
  if (!existsSync(weightsPath)) {
    const pickle = existsSync(join(dir, 'adapter_model.bin'))
      ? ' It has adapter_model.bin (PyTorch pickle), which is not read for safety: save with safe_serialization=True.'
      : '';
    throw new AdapterError(`${dir}: no ${ADAPTER_WEIGHTS}.${pickle}`);
  }
  if (!statSync(weightsPath).isFile())
    throw new AdapterError(
      `${weightsPath}: not a file (expected the adapter's weights, as save_pretrained writes them)`,
    );
  const r = config.r as number;
  const alpha = config.lora_alpha as number;
  const tm = config.target_modules as string | string[];
  let targetModules: string[] | RegExp;
  if (typeof tm === 'string') {
    if (tm === 'all-linear')
      throw new AdapterError(
        `${configPath}: "target_modules": "all-linear" was not expanded by PEFT; list the modules`,
      );
    try {
      // Python's leading (?i) (case-insensitive) is JavaScript's flag i
      const ignoreCase = tm.startsWith('(?i)');
      targetModules = new RegExp(`^(?:${pythonAnchors(ignoreCase ? tm.slice(4) : tm)})$`, ignoreCase ? 'i' : '');
    } catch (e) {
      throw new AdapterError(
        `${configPath}: "target_modules" is not a regular expression we can read (${(e as Error).message})`,
      );
    }
  } else targetModules = tm;
  return {
    dir,
    configPath,
    weightsPath,
    header: readSafetensorsHeader(weightsPath),
    config,
    r,
    alpha,
    scaling: config.use_rslora === true ? alpha / Math.sqrt(r) : alpha / r,
    targetModules,
    fanInFanOut: config.fan_in_fan_out === true,
  };
}

/**
 * PEFT reads a string target_modules with Python's re.fullmatch; JavaScript reads the same text
 * alike except for Python's anchors \A and \Z, which JavaScript takes as the letters A and Z.
 * Outside a character class (inside one Python refuses them) they are exactly ^ and $ (no
 * multiline flag), so they are translated; anything else is left as written.
 */
export function pythonAnchors(pattern: string): string {
  let out = '';
  let inClass = false;
  for (let i = 0; i < pattern.length; i++) {
    const c = pattern[i];
    if (c === '\\' && i + 1 < pattern.length) {
      const next = pattern[++i];
      out += !inClass && next === 'A' ? '^' : !inClass && next === 'Z' ? '$' : c + next;
      continue;
    }
    if (!inClass) {
      // Python's named group and back-reference, in JavaScript's spelling
      if (pattern.startsWith('(?P<', i)) {
        out += '(?<';
        i += 3;
        continue;
      }
      const backref = /^\(\?P=(\w+)\)/.exec(pattern.slice(i));
      if (backref) {
        out += `\\k<${backref[1]}>`;
        i += backref[0].length - 1;
        continue;
      }
      // Python's {,n} is {0,n}; JavaScript reads "{,n}" as literal text, so the entry selected less
      const upTo = /^\{,(\d+)\}/.exec(pattern.slice(i));
      if (upTo) {
        out += `{0,${upTo[1]}}`;
        i += upTo[0].length - 1;
        continue;
      }
    }
    if (inClass) {
      if (c === ']') inClass = false;
    } else if (c === '[') {
      inClass = true;
      // a ] right after [ or [^ is a member, not the end, in Python
      let j = i + 1;
      if (pattern[j] === '^') j++;
      if (pattern[j] === ']') j++;
      out += pattern.slice(i, j);
      i = j - 1;
      continue;
    }
    out += c;
  }
  return out;
}

/**
 * The target_modules entries that select the module with this (base model) name: a list entry
 * equal to the name or to its last dotted parts, or the regular expression matching the whole
 * name (peft.tuners.tuners_utils.check_target_module_exists). Every matching entry, not only
 * the first (["q_proj", "self_attn.q_proj"] both select ...self_attn.q_proj).
 */
export function targets(adapter: LoraAdapter, moduleName: string): string[] {
  const t = adapter.targetModules;
  if (t instanceof RegExp) return t.test(moduleName) ? [t.source] : [];
  return t.filter((x) => moduleName === x || moduleName.endsWith(`.${x}`));
}

/** The entries of target_modules as written (a regular expression is one entry). */
export function targetEntries(adapter: LoraAdapter): string[] {
  const t = adapter.config.target_modules;
  return typeof t === 'string' ? [t] : (t as string[]);
}

/**
 * The last name part of the embedding and output-head modules of the supported architectures
 * (Llama family, GPT-2, GPT-NeoX; transformers 5 names GPT-NeoX's embed_out lm_head). LoRA on
 * these is PEFT's Embedding layer or a LoRA on the head, neither of which is implemented.
 */
const EMBEDDING_OR_HEAD = new Set(['embed_tokens', 'wte', 'wpe', 'embed_in', 'lm_head', 'embed_out']);

const lastPart = (name: string) => name.slice(name.lastIndexOf('.') + 1);

/** PEFT's names for what it saves of a LoRA-wrapped (or saved) module, longest first. */
const PEFT_SUFFIXES = [
  '.base_layer.weight',
  '.lora_embedding_A',
  '.lora_embedding_B',
  '.lora_A.weight',
  '.lora_B.weight',
  '.weight',
];

/**
 * Checks target_modules against the base model's module names (every dotted prefix of its
 * weights' names), before anything is built: LoRA on the embeddings or the output head is
 * refused in one line, as is a regular expression that matches no module name at all (a
 * Python-only construct read differently by JavaScript is the likely reason). Entries that
 * match nothing are fine, as in PEFT; that some entry matches a linear layer is checked when
 * the graph is built (engine.ts).
 */
export function checkTargets(adapter: LoraAdapter, baseWeightNames: Iterable<string>, headNames: string[]) {
  const modules = new Set<string>(['lm_head', ...headNames.map((n) => n.replace(/\.weight$/, ''))]);
  for (const name of baseWeightNames) {
    const parts = name.split('.');
    for (let i = 1; i < parts.length; i++) modules.add(parts.slice(0, i).join('.'));
  }
  for (const m of modules)
    if (EMBEDDING_OR_HEAD.has(lastPart(m)) && targets(adapter, m).length)
      throw new AdapterError(
        `${adapter.configPath}: "target_modules" selects ${m}: LoRA on the embeddings or the output head is not supported`,
      );
  const t = adapter.targetModules;
  if (t instanceof RegExp && ![...modules].some((m) => t.test(m)))
    throw new AdapterError(
      `${adapter.configPath}: "target_modules" regular expression ${JSON.stringify(adapter.config.target_modules)} matches no module name of the base model ` +
        '(read as a JavaScript regular expression, with \\A and \\Z as Python means them: other Python-only syntax, such as {,n}, is not understood)',
    );
}

/**
 * Why an adapter tensor that is not a LoRA A/B weight of a linear layer is refused, when it
 * belongs to the embeddings or the output head (LoRA on them, or the copy save_embedding_layers
 * keeps); null otherwise.
 */
export function embeddingOrHeadTensor(adapter: LoraAdapter, tensor: string): string | null {
  const name = tensor.startsWith(PEFT_PREFIX) ? tensor.slice(PEFT_PREFIX.length) : tensor;
  const suffix = PEFT_SUFFIXES.find((s) => name.endsWith(s));
  if (!suffix) return null;
  const module = name.slice(0, -suffix.length);
  if (!EMBEDDING_OR_HEAD.has(lastPart(module))) return null;
  const where = `${adapter.weightsPath}: tensor "${tensor}"`;
  return suffix === '.weight'
    ? `${where} replaces ${module} (save_embedding_layers, e.g. after resizing the vocabulary): replacing the embeddings or the output head is not supported`
    : `${where} adapts ${module}: LoRA on the embeddings or the output head is not supported`;
}

/**
 * The base model folder: `base` when given, else base_model_name_or_path when it is a local
 * folder (a relative path is taken from the adapter folder, then from the working directory).
 * `note` says when `base` replaces another local folder the adapter names: PEFT lets the caller
 * choose, but a mistyped --base (the base model for its instruct variant, of the same shapes)
 * would go unnoticed.
 */
export function resolveBase(adapter: LoraAdapter, base?: string): { dir: string; note?: string } {
  const named = adapter.config.base_model_name_or_path;
  const isDir = (p: string) => existsSync(p) && statSync(p).isDirectory();
  let found: string | undefined;
  if (typeof named === 'string' && named) {
    const candidates = isAbsolute(named) ? [named] : [join(adapter.dir, named), resolve(named)];
    found = candidates.find(isDir);
  }
  if (base) {
    const dir = resolve(base);
    const same = found !== undefined && realpathSync(found) === (isDir(dir) ? realpathSync(dir) : dir);
    return found === undefined || same
      ? { dir }
      : {
          dir,
          note: `the base ${dir} (--base, or "base" in influence-lens.json) replaces the one ${adapter.configPath} names, ${JSON.stringify(named)} (${resolve(found)}): scores are for the adapter on ${dir}`,
        };
  }
  if (found) return { dir: found };
  throw new AdapterError(
    `${adapter.configPath}: "base_model_name_or_path" is ${JSON.stringify(named ?? null)}, not a local folder; ` +
      'pass the base model folder with --base <dir> (or "base" in the influence-lens.json model entry)',
  );
}
