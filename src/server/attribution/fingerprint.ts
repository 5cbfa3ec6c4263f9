// Fingerprints tie factors, caches and results to the exact model and data they came from,
// so a stale or mismatched factor directory is refused instead of silently misused.
import { createHash } from 'node:crypto';
import { basename } from 'node:path';
import { canonicalJson } from '../../common/ids';
import { readFileNoWait } from '../../common/read-file';
import { RUN_ONLY_ADAPTER_KEYS } from '../model/adapter';
import type { Checkpoint } from '../model/checkpoint';
import { pinnedDigest } from '../model/content-digest';
import { defaultCacheDir } from '../model/engine';

const hex16 = (h: ReturnType<typeof createHash>) => h.digest('hex').slice(0, 16);

/**
 * The model: config.json's content and the sha256 of every weight file's bytes (a retrained or
 * edited model differs somewhere, and a sample of its bytes could miss where). Each file is read in
 * full once; its digest is remembered per file identity (see content-digest.ts). The config is
 * hashed as parsed, in canonical form: its bytes changed with line endings (git's autocrlf), key
 * order or a 2.0 written for 2, and the factors were then refused as another model's.
 */
export function modelFingerprint(ck: Checkpoint, cacheDir?: string): string {
  return fingerprintOf(ck, `config:${canonicalJson(ck.config)}\n`, cacheDir);
}

/**
 * The fingerprint versions up to 2026-12-07 computed (config.json's bytes instead of its content),
 * for a full model; undefined for an adapter, whose settings were hashed differently too. Only to
 * recognise a checkpoint that older files name by it (training_args.json's starting weights): the
 * weights are hashed as they are now, so it can only match the same config file and weights.
 */
export function legacyModelFingerprint(ck: Checkpoint, cacheDir?: string): string | undefined {
  if (ck.adapter) return undefined;
  return fingerprintOf(ck, readFileNoWait(ck.configFiles[0]), cacheDir);
}

function fingerprintOf(ck: Checkpoint, config: string | Buffer, cacheDir?: string): string {
  const parts = modelParts(ck, cacheDir);
  const h = createHash('sha256');
  h.update(config);
  if (parts.adapter) h.update(`adapter:${canonicalJson(parts.adapter)}\n`);
  for (const [name, digest] of parts.files) h.update(`${name}:${digest}\n`);
  return hex16(h);
}

/**
 * What a model's fingerprint is made of, stored beside it with factors so that a mismatch can say
 * what changed (an audit: "fitted on another model" named the same adapter folder the user passed
 * both times, and not whether its base, its weights or its settings had changed).
 */
export interface ModelParts {
  /** config.json as parsed (the base's for an adapter) */
  config: Record<string, unknown>;
  /**
   * a LoRA adapter's settings: not where its base was found (the base's config.json and weights
   * are hashed by content, so moving the folders keeps the factors), and without the keys that
   * only say how it was made (an edit of its layout, PEFT version or dropout made factors
   * "another model's")
   */
  adapter?: Record<string, unknown>;
  /** each weight file's name and the sha256 of its bytes, in order */
  files: Array<[string, string]>;
}

export function modelParts(ck: Checkpoint, cacheDir?: string): ModelParts {
  cacheDir ??= defaultCacheDir();
  return {
    config: ck.config,
    ...(ck.adapter
      ? {
          adapter: Object.fromEntries(Object.entries(ck.adapter.config).filter(([k]) => !RUN_ONLY_ADAPTER_KEYS.has(k))),
        }
      : {}),
    // the digests pinned on the opened checkpoint: the bytes its graphs' snapshot holds
    files: ck.files.map((f) => [basename(f), pinnedDigest(ck, f, cacheDir)]),
  };
}

/** `v` read back from a file as ModelParts, or null when it is not one (then no change is named). */
export function readModelParts(v: unknown): ModelParts | null {
  if (typeof v !== 'object' || v === null || Array.isArray(v)) return null;
  const o = v as Record<string, unknown>;
  const isObject = (x: unknown) => typeof x === 'object' && x !== null && !Array.isArray(x);
  const files = o.files;
  if (
    !isObject(o.config) ||
    (o.adapter !== undefined && !isObject(o.adapter)) ||
    !Array.isArray(files) ||
    !files.every((f) => Array.isArray(f) && f.length === 2 && f.every((x) => typeof x === 'string'))
  )
    return null;
  return v as ModelParts;
}

/**
 * What differs between the model factors were fitted on (`before`) and this one, as a clause:
 * config.json's and adapter_config.json's keys with both values, and the weight files whose bytes
 * differ, are new or are gone. Empty when the parts are the same.
 */
export function modelChange(before: ModelParts, now: ModelParts): string {
  const show = (v: unknown) => {
    if (v === undefined) return 'absent';
    const t = canonicalJson(v);
    return t.length > 40 ? `${t.slice(0, 39)}…` : t;
  };
  const keys = (file: string, a: Record<string, unknown> = {}, b: Record<string, unknown> = {}) =>
    [...new Set([...Object.keys(a), ...Object.keys(b)])]
      .sort()
      .filter((k) => canonicalJson(a[k] ?? null) !== canonicalJson(b[k] ?? null) || k in a !== k in b)
      .map((k) => `${file} "${k}" ${show(a[k])} → ${show(b[k])}`);
  const changes = [
    ...keys('config.json', before.config, now.config),
    ...(before.adapter || now.adapter ? keys('adapter_config.json', before.adapter, now.adapter) : []),
  ];
  const was = new Map(before.files);
  const is = new Map(now.files);
  for (const [name, digest] of now.files) {
    if (!was.has(name)) changes.push(`${name} is new`);
    else if (was.get(name) !== digest) changes.push(`${name} holds other bytes`);
  }
  for (const [name] of before.files) if (!is.has(name)) changes.push(`${name} is gone`);
  const shown = changes.slice(0, 6);
  return `${shown.join('; ')}${changes.length > shown.length ? `; and ${changes.length - shown.length} more` : ''}`;
}

/** The data: the ordered content hashes of the examples used, and how they were tokenized. */
export function dataFingerprint(exampleHashes: string[], extra: Record<string, unknown> = {}): string {
  const h = createHash('sha256');
  h.update(JSON.stringify(extra));
  for (const x of exampleHashes) h.update(x);
  return hex16(h);
}
