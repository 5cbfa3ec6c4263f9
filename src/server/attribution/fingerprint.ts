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
  cacheDir ??= defaultCacheDir();
  const h = createHash('sha256');
  h.update(config);
  // a LoRA adapter: its settings, but not where its base was found (the base's config.json
  // and weights are already hashed by content), so moving the folders keeps the factors
  // (as parsed and in canonical form, without the keys that only say how it was made: an edit of
  // its layout, its PEFT version or its dropout made factors "another model's")
  if (ck.adapter)
    h.update(
      `adapter:${canonicalJson(Object.fromEntries(Object.entries(ck.adapter.config).filter(([k]) => !RUN_ONLY_ADAPTER_KEYS.has(k))))}\n`,
    );
  // the digests pinned on the opened checkpoint: the bytes its graphs' snapshot holds
  for (const f of ck.files) h.update(`${basename(f)}:${pinnedDigest(ck, f, cacheDir)}\n`);
  return hex16(h);
}

/** The data: the ordered content hashes of the examples used, and how they were tokenized. */
export function dataFingerprint(exampleHashes: string[], extra: Record<string, unknown> = {}): string {
  const h = createHash('sha256');
  h.update(JSON.stringify(extra));
  for (const x of exampleHashes) h.update(x);
  return hex16(h);
}
