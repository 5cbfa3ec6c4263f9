// A Hugging Face checkpoint directory: config.json plus model.safetensors, or shards
// listed in model.safetensors.index.json. Opening one reads only the headers; weight
// bytes stay on disk (the engine hands them to ONNX Runtime as external data).
import { closeSync, existsSync, lstatSync, openSync, readdirSync, readlinkSync, readSync, statSync } from 'node:fs';
import { join, resolve } from 'node:path';
import { restoreReplacedPath } from '../../common/atomic-write';
import { jsonText, readFileNoWait, readRegularFile } from '../../common/read-file';
import {
  ADAPTER_CONFIG,
  checkTargets,
  embeddingOrHeadTensor,
  isAdapterDir,
  type LoraAdapter,
  PEFT_PREFIX,
  readAdapter,
  resolveBase,
} from './adapter';
import { ARCHITECTURES } from './architectures';
import { type DType, readSafetensorsHeader, readTensorF32, type SafetensorsHeader } from './safetensors';

/** dtypes a checkpoint's weights may have (the graphs cast them to the compute precision) */
export const WEIGHT_DTYPES: readonly DType[] = ['F32', 'F16', 'BF16'];
/** dtypes of buffers, never of weights: such tensors are listed in `Checkpoint.ignored`, not read */
const BUFFER_DTYPES: readonly DType[] = ['U8', 'BOOL', 'I8', 'I16', 'I32', 'I64'];

export class CheckpointError extends Error {}

export interface WeightRef {
  name: string;
  /** absolute path of the safetensors file that holds it */
  file: string;
  dtype: DType;
  shape: number[];
  /** absolute byte offset in `file` */
  byteOffset: number;
  byteLength: number;
}

export interface Checkpoint {
  /** the folder the user named (for a LoRA adapter: the adapter's folder) */
  dir: string;
  /** the base model's config.json (config.json of `dir` unless an adapter) */
  config: Record<string, unknown>;
  /** the JSON files that define the model: config.json, then adapter_config.json for an adapter */
  configFiles: string[];
  /** where tokenizer.json is: `dir` when it has one, else the base model's folder */
  tokenizerDir: string;
  /** a PEFT LoRA adapter over the base checkpoint (its tensors are in `weights` under their own names) */
  adapter?: LoraAdapter;
  /** for an adapter opened on another base than the local one it names: a line saying so */
  baseNote?: string;
  modelType: string;
  /** tensor name → where its bytes are, in file order */
  weights: Map<string, WeightRef>;
  /**
   * integer and boolean tensors of the files, which no architecture reads: the causal-mask buffers
   * (`attn.bias`, `attention.bias`, uint8 or bool) that transformers before 4.31 saved with GPT-2
   * and GPT-NeoX (Pythia) weights, and that transformers ignores when it loads them
   */
  ignored?: Array<{ name: string; dtype: DType }>;
  /** the safetensors files, absolute paths */
  files: string[];
  totalBytes: number;
  has(name: string): boolean;
  /** read one weight as float32 (a copy; used by the trainer, never by inference) */
  readF32(name: string): Float32Array;
}

/**
 * True when two weights hold the same values: same dtype, same shape, same bytes (read in
 * pieces, never whole). A checkpoint may store a tied head twice; only identical copies are
 * one tensor whichever way a loader reads them.
 */
export function sameWeightBytes(ck: Checkpoint, a: string, b: string): boolean {
  // every graph kind asks again: read the bytes once per opened checkpoint
  const memo = sameMemo.get(ck) ?? new Map<string, boolean>();
  sameMemo.set(ck, memo);
  const key = JSON.stringify([a, b]);
  let same = memo.get(key);
  if (same === undefined) {
    same = compareWeightBytes(ck, a, b);
    memo.set(key, same);
  }
  return same;
}

const sameMemo = new WeakMap<Checkpoint, Map<string, boolean>>();

function compareWeightBytes(ck: Checkpoint, a: string, b: string): boolean {
  const x = ck.weights.get(a);
  const y = ck.weights.get(b);
  if (!x || !y) return false;
  if (x.dtype !== y.dtype || x.byteLength !== y.byteLength || x.shape.join() !== y.shape.join()) return false;
  const piece = 1 << 20;
  const bx = Buffer.allocUnsafe(piece);
  const by = Buffer.allocUnsafe(piece);
  const fx = openSync(x.file, 'r');
  const fy = openSync(y.file, 'r');
  try {
    for (let done = 0; done < x.byteLength; done += piece) {
      const n = Math.min(piece, x.byteLength - done);
      if (readFull(fx, bx, n, x.byteOffset + done) !== n || readFull(fy, by, n, y.byteOffset + done) !== n)
        throw new CheckpointError(`${x.file}: unexpected end of file reading "${a}" or "${b}"`);
      if (bx.compare(by, 0, n, 0, n) !== 0) return false;
    }
    return true;
  } finally {
    closeSync(fx);
    closeSync(fy);
  }
}

function readFull(fd: number, buf: Buffer, n: number, position: number): number {
  let got = 0;
  while (got < n) {
    const r = readSync(fd, buf, got, n - got, position + got);
    if (r === 0) break;
    got += r;
  }
  return got;
}

export function readConfig(dir: string): Record<string, unknown> {
  const path = join(dir, 'config.json');
  const snapshots = join(dir, 'snapshots');
  if (!existsSync(path) && existsSync(snapshots)) {
    // the Hugging Face hub cache: models--org--name/snapshots/<revision>/ holds the model
    const revisions = readdirSync(snapshots);
    throw new CheckpointError(
      `${dir}: a Hugging Face hub-cache folder, not a model folder; pass one of its snapshots (${revisions.map((r) => join(snapshots, r)).join(', ') || 'none downloaded yet'})`,
    );
  }
  if (!existsSync(path))
    throw new CheckpointError(
      `${dir}: no config.json (expected a Hugging Face model directory: config.json, model.safetensors, tokenizer.json)`,
    );
  let config: unknown;
  try {
    const bytes = readRegularFile(path, (what) => new CheckpointError(`${path} is ${what}`));
    config = JSON.parse(jsonText(bytes, path, (m) => new CheckpointError(m)));
  } catch (e) {
    if (e instanceof CheckpointError) throw e;
    throw new CheckpointError(`${path}: not valid JSON (${(e as Error).message})`);
  }
  if (!config || typeof config !== 'object' || Array.isArray(config))
    throw new CheckpointError(`${path}: expected a JSON object`);
  return config as Record<string, unknown>;
}

/** Whether an index's weight_map points at `file` alone (then it and the single file agree). */
function indexNamesOnly(index: string, file: string): boolean {
  try {
    const map = (JSON.parse(readFileNoWait(index, 'utf8')) as { weight_map?: Record<string, string> }).weight_map;
    return !!map && typeof map === 'object' && Object.values(map).every((f) => f === file);
  } catch {
    return false; // an unreadable index beside a single file: refused as two layouts
  }
}

/** The safetensors files of a checkpoint: the index's shards, or model.safetensors. */
/** The target of a symbolic link that points nowhere, or undefined. */
function danglingLink(path: string): string | undefined {
  try {
    return lstatSync(path).isSymbolicLink() && !existsSync(path) ? readlinkSync(path) : undefined;
  } catch {
    return undefined;
  }
}

function weightFiles(dir: string): { files: string[]; map?: Record<string, string> } {
  const index = join(dir, 'model.safetensors.index.json');
  const single = join(dir, 'model.safetensors');
  // save_pretrained into a folder that held the other layout leaves the old one behind, and
  // transformers then loads model.safetensors whatever the index says: which is this model is unclear
  if (existsSync(index) && existsSync(single) && !indexNamesOnly(index, 'model.safetensors'))
    throw new CheckpointError(
      `${dir} holds both model.safetensors and model.safetensors.index.json (with its shards): transformers loads model.safetensors and ignores the shards. ` +
        'One of them is most likely left over from an earlier save_pretrained into this folder: delete the stale one (model.safetensors, or the index and its shards)',
    );
  if (existsSync(index)) {
    let parsed: { weight_map?: Record<string, string> };
    try {
      parsed = JSON.parse(readFileNoWait(index, 'utf8'));
    } catch (e) {
      throw new CheckpointError(`${index}: not valid JSON (${(e as Error).message})`);
    }
    if (!parsed.weight_map || typeof parsed.weight_map !== 'object')
      throw new CheckpointError(`${index}: no "weight_map" object`);
    const files = [...new Set(Object.values(parsed.weight_map))].map((f) => join(dir, f));
    for (const f of files)
      if (!existsSync(f)) throw new CheckpointError(`${index} lists shard ${f}, which does not exist`);
    return { files, map: parsed.weight_map };
  }
  if (existsSync(single)) return { files: [single] };
  // a link whose target is missing (the hub cache's snapshot of an interrupted download)
  for (const f of [index, single]) {
    const target = danglingLink(f);
    if (target)
      throw new CheckpointError(
        `${f} is a link to ${target}, which does not exist (an interrupted download into the Hugging Face cache?): download the model again`,
      );
  }
  const present = existsSync(dir) ? readdirSync(dir) : [];
  const hint = present.some((f) => f.endsWith('.bin') || f.endsWith('.pt'))
    ? ' It has PyTorch pickle weights (.bin/.pt), which are not read for safety: save the model with save_pretrained(dir, safe_serialization=True).'
    : '';
  throw new CheckpointError(`${dir}: no model.safetensors or model.safetensors.index.json.${hint}`);
}

export interface OpenOptions {
  /** the base model folder of a LoRA adapter (default: the adapter's base_model_name_or_path) */
  base?: string;
}

export function openCheckpoint(dirIn: string, options: OpenOptions = {}): Checkpoint {
  const dir = resolve(dirIn);
  restoreReplacedPath(dir); // a checkpoint save (or a save of a folder holding it) killed between its two renames
  if (!existsSync(dir) || !statSync(dir).isDirectory())
    throw new CheckpointError(`${dirIn}: not a directory (expected a Hugging Face model directory)`);
  if (isAdapterDir(dir)) return openAdapter(dir, options.base);
  if (options.base)
    throw new CheckpointError(
      `${dirIn}: a base model (${options.base}) was given, but ${dirIn} has no ${ADAPTER_CONFIG} (a base is only for LoRA adapters)`,
    );
  const config = readConfig(dir);
  const modelType = config.model_type;
  if (typeof modelType !== 'string')
    throw new CheckpointError(`${join(dir, 'config.json')}: no "model_type" (e.g. "llama", "gpt2", "gpt_neox")`);

  const { files, map } = weightFiles(dir);
  const headers = new Map<string, SafetensorsHeader>();
  const weights = new Map<string, WeightRef>();
  const ignored: Array<{ name: string; dtype: DType }> = [];
  let totalBytes = 0;
  for (const file of files) {
    const h = readSafetensorsHeader(file);
    headers.set(file, h);
    for (const t of h.tensors.values()) {
      if (map && map[t.name] !== undefined && join(dir, map[t.name]) !== file) continue; // the index decides
      if (weights.has(t.name)) throw new CheckpointError(`${file}: tensor "${t.name}" also appears in another shard`);
      // not a weight: a buffer (no builder reads one; a tensor a builder needs is missing by name then)
      if (BUFFER_DTYPES.includes(t.dtype)) {
        ignored.push({ name: t.name, dtype: t.dtype });
        continue;
      }
      if (!WEIGHT_DTYPES.includes(t.dtype))
        throw new CheckpointError(
          `${file}: tensor "${t.name}" is ${t.dtype}; supported weight dtypes: ${WEIGHT_DTYPES.join(', ')}`,
        );
      weights.set(t.name, { ...t, file });
      totalBytes += t.byteLength;
    }
  }
  const isIgnored = new Set(ignored.map((t) => t.name));
  if (map)
    for (const [name, f] of Object.entries(map))
      if (!weights.has(name) && !isIgnored.has(name))
        throw new CheckpointError(`${join(dir, f)}: has no tensor "${name}", which the index lists there`);
  if (!weights.size) throw new CheckpointError(`${dir}: the safetensors files hold no tensors`);
  withBasePrefix(weights, modelType);

  return {
    dir,
    config,
    configFiles: [join(dir, 'config.json')],
    tokenizerDir: dir,
    modelType,
    weights,
    ...(ignored.length ? { ignored } : {}),
    files,
    totalBytes,
    has: (name) => weights.has(name),
    readF32: (name) => {
      const w = weights.get(name);
      if (!w) throw new CheckpointError(`${dir}: no tensor "${name}"`);
      return readTensorF32(headers.get(w.file)!, w.name); // the name in the file (withBasePrefix)
    },
  };
}

/**
 * A file saved from the base model (LlamaModel, GPT2Model: no key starts with the architecture's
 * base_model_prefix, as in the hub's original gpt2 files) is read as transformers' from_pretrained
 * reads it into the causal LM: the prefix is added to every key but the head's. The map is keyed
 * by the model's names; each WeightRef keeps the name in the file.
 */
function withBasePrefix(weights: Map<string, WeightRef>, modelType: string) {
  const a = ARCHITECTURES.find((x) => x.modelTypes.includes(modelType));
  if (!a) return; // refused by name when the graph is built
  const names = [...weights.keys()];
  if (names.some((n) => n.startsWith(a.basePrefix))) return;
  const entries = [...weights.entries()];
  weights.clear();
  for (const [name, ref] of entries) weights.set(a.headNames.includes(name) ? name : a.basePrefix + name, ref);
}

/** The files besides tokenizer.json that say how text is tokenized or a chat rendered. */
const TOKENIZER_SIDE_FILES = [
  'tokenizer_config.json',
  'chat_template.jinja',
  'chat_template.json',
  'special_tokens_map.json',
  'tokenizer.model',
];

/**
 * Where an adapter's tokenizer is read from: its own folder when it holds tokenizer.json, else the
 * base's. The tokenizer, its special tokens and its chat template are read from one folder, so an
 * adapter folder with a chat template or tokenizer settings of its own but no tokenizer.json would
 * have them ignored for the base's (an audit's adapter rendered its chats with the base's
 * template, without a word): refused unless each such file is byte for byte the base's.
 */
function adapterTokenizerDir(dir: string, baseTokenizerDir: string): string {
  if (existsSync(join(dir, 'tokenizer.json'))) return dir;
  const bytes = (f: string) => readRegularFile(f, (what) => new CheckpointError(`${f} is ${what}`));
  const own = TOKENIZER_SIDE_FILES.filter((name) => {
    const mine = join(dir, name);
    if (!existsSync(mine)) return false;
    const theirs = join(baseTokenizerDir, name);
    return !existsSync(theirs) || !bytes(mine).equals(bytes(theirs));
  });
  if (own.length)
    throw new CheckpointError(
      `${dir} holds ${own.join(', ')} of its own (not the base's) but no tokenizer.json: the tokenizer, its special tokens and its chat template are read from one folder, so ${own.length > 1 ? 'they' : 'it'} would be ignored for the base's in ${baseTokenizerDir}. ` +
        `Save the tokenizer the adapter was trained with next to it (tokenizer.save_pretrained("${dir}") writes tokenizer.json too), or move ${own.length > 1 ? 'these files' : 'it'} out of the folder to use the base's`,
    );
  return baseTokenizerDir;
}

/** "Qwen3ForCausalLM" → "qwen3", "Gemma3TextModel" → "gemma3": the family a transformers class name is of. */
function classFamily(name: string): string {
  return name.replace(/(ForCausalLM|ForConditionalGeneration|LMHeadModel|TextModel|Model)$/, '').toLowerCase();
}

/**
 * PEFT records the class of the model an adapter was trained on (auto_mapping.base_model_class,
 * when it writes one). A base of another family whose modules happen to have the same names and
 * shapes ran without a word; PEFT loads it too (a Mistral model saved with a Llama config is one),
 * so it is said in a notice rather than refused. The class itself may differ within a family
 * (Gemma3TextModel, Gemma3ForCausalLM, Gemma3ForConditionalGeneration).
 */
function baseFamilyNote(adapter: LoraAdapter, base: Checkpoint, baseDir: string): string | undefined {
  const mapping = adapter.config.auto_mapping as { base_model_class?: unknown } | null | undefined;
  const trainedOn = mapping && typeof mapping === 'object' ? mapping.base_model_class : undefined;
  const archs = base.config.architectures;
  if (typeof trainedOn !== 'string' || !Array.isArray(archs) || !archs.length) return undefined;
  if (archs.some((a) => typeof a === 'string' && classFamily(a) === classFamily(trainedOn))) return undefined;
  return `${adapter.configPath} says the adapter was trained on a ${trainedOn} (auto_mapping.base_model_class), but its base ${baseDir} is a ${archs.join(', ')} (config.json "architectures"): the scores are of the adapter on this base; if it is not the model the adapter was trained on, pass that one with --base <dir> (or the model entry's "base" in influence-lens.json)`;
}

/** A LoRA adapter folder: the base checkpoint with the adapter's lora_A / lora_B tensors added. */
function openAdapter(dir: string, baseOption?: string): Checkpoint {
  const adapter = readAdapter(dir);
  const { dir: baseDir, note: baseNote } = resolveBase(adapter, baseOption);
  if (isAdapterDir(baseDir))
    throw new CheckpointError(
      `${baseDir}: the base of adapter ${dir} is itself an adapter (stacked adapters are not supported)`,
    );
  const base = openCheckpoint(baseDir);
  const familyNote = baseFamilyNote(adapter, base, baseDir);
  checkTargets(
    adapter,
    base.weights.keys(),
    ARCHITECTURES.find((a) => a.modelTypes.includes(base.modelType))?.headNames ?? [],
  );
  const weights = new Map(base.weights);
  let adapterBytes = 0;
  for (const t of adapter.header.tensors.values()) {
    // LoRA on the embeddings or the head (lora_embedding_A, lm_head.lora_A, the base_layer copies
    // save_embedding_layers adds), refused as such rather than as an unknown tensor
    const embeddingOrHead = embeddingOrHeadTensor(adapter, t.name);
    if (embeddingOrHead) throw new CheckpointError(embeddingOrHead);
    // PEFT's names for LoRA on a linear layer; anything else (modules_to_save copies, DoRA
    // magnitudes, biases) is another kind of adapter
    const named = /\.lora_[AB]\.([^.]+)\.weight$/.exec(t.name);
    if (named && t.name.startsWith(PEFT_PREFIX))
      throw new CheckpointError(
        `${adapter.weightsPath}: tensor "${t.name}" carries the adapter's name ("${named[1]}") inside its own, as a model's state_dict does: PEFT's save_pretrained (and get_peft_model_state_dict) drop it; save the adapter with save_pretrained`,
      );
    if (!t.name.startsWith(PEFT_PREFIX) || !/\.lora_[AB]\.weight$/.test(t.name))
      throw new CheckpointError(
        `${adapter.weightsPath}: tensor "${t.name}" is not a LoRA A/B weight of a linear layer (only those are supported; see ${ADAPTER_CONFIG})`,
      );
    if (!WEIGHT_DTYPES.includes(t.dtype))
      throw new CheckpointError(
        `${adapter.weightsPath}: tensor "${t.name}" is ${t.dtype}; supported: ${WEIGHT_DTYPES.join(', ')}`,
      );
    weights.set(t.name, { ...t, file: adapter.weightsPath });
    adapterBytes += t.byteLength;
  }
  return {
    ...base,
    dir,
    adapter,
    ...(baseNote || familyNote ? { baseNote: [baseNote, familyNote].filter(Boolean).join('; ') } : {}),
    configFiles: [...base.configFiles, adapter.configPath],
    tokenizerDir: adapterTokenizerDir(dir, base.tokenizerDir),
    weights,
    files: [...base.files, adapter.weightsPath],
    totalBytes: base.totalBytes + adapterBytes,
    has: (name) => weights.has(name),
    readF32: (name) =>
      weights.get(name)?.file === adapter.weightsPath ? readTensorF32(adapter.header, name) : base.readF32(name),
  };
}
