// PEFT LoRA adapters as `PeftModel.save_pretrained` writes them: adapter_config.json plus
// adapter_model.safetensors, on top of a base checkpoint. The forward is PEFT's LoraLayer
// (Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models"):
//   y = base(x) + scaling · B(A x),  scaling = lora_alpha / r  (rsLoRA: lora_alpha / √r),
// dropout off (inference). Every adapter_config.json setting that would change this forward
// and is not implemented here is refused by name, never ignored.
import { existsSync, readFileSync, statSync } from 'node:fs';
import { isAbsolute, join, resolve } from 'node:path';
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
  use_rslora: { accepts: 'true or false', ok: (v) => typeof v === 'boolean' },
  fan_in_fan_out: { accepts: 'true or false', ok: (v) => typeof v === 'boolean' },
  bias: { accepts: '"none" (LoRA bias terms are not implemented)', ok: (v) => v === 'none' },
  lora_bias: { accepts: 'false', ok: (v) => v === false },
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

/** Reads and checks an adapter folder (the base is resolved separately: see resolveBase). */
export function readAdapter(dirIn: string): LoraAdapter {
  const dir = resolve(dirIn);
  const configPath = join(dir, ADAPTER_CONFIG);
  let config: Record<string, unknown>;
  try {
    config = JSON.parse(readFileSync(configPath, 'utf8'));
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
      targetModules = new RegExp(`^(?:${tm})$`);
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

/** Does PEFT adapt the module with this (base model) name? (peft.tuners.tuners_utils.check_target_module_exists) */
export function targets(adapter: LoraAdapter, moduleName: string): string | null {
  const t = adapter.targetModules;
  if (t instanceof RegExp) return t.test(moduleName) ? t.source : null;
  return t.find((x) => moduleName === x || moduleName.endsWith(`.${x}`)) ?? null;
}

/**
 * The base model folder: `base` when given, else base_model_name_or_path when it is a local
 * folder (a relative path is taken from the adapter folder, then from the working directory).
 */
export function resolveBase(adapter: LoraAdapter, base?: string): string {
  if (base) return resolve(base);
  const named = adapter.config.base_model_name_or_path;
  const isDir = (p: string) => existsSync(p) && statSync(p).isDirectory();
  if (typeof named === 'string' && named) {
    const candidates = isAbsolute(named) ? [named] : [join(adapter.dir, named), resolve(named)];
    const found = candidates.find(isDir);
    if (found) return found;
  }
  throw new AdapterError(
    `${adapter.configPath}: "base_model_name_or_path" is ${JSON.stringify(named ?? null)}, not a local folder; ` +
      'pass the base model folder with --base <dir> (or "base" in the influence-lens.json model entry)',
  );
}
