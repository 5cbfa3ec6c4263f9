// tokenizer.json through @huggingface/tokenizers, plus what that library does not give:
// character offsets of every token, in UTF-16 code units (VS Code positions), which the
// token heatmaps and completion-only loss masks need.
//
// Offsets come from each token's bytes: byte-level BPE tokens (GPT-2, Pythia, Llama 3,
// Qwen) spell bytes through the GPT-2 byte↔unicode table; SentencePiece-style tokens
// (Llama 2, Mistral) use ▁ for a space and <0xNN> for byte fallback. We walk the token
// bytes along the text's UTF-8 bytes; a token that splits a character covers the whole
// character, as Hugging Face's offsets do.
import { existsSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import { Tokenizer } from '@huggingface/tokenizers';

export class TokenizerError extends Error {}

export interface Encoded {
  ids: number[];
  tokens: string[];
  /** [start, end) of each token in `text`, UTF-16 code units; [p, p] for added special tokens */
  offsets: Array<[number, number]>;
  text: string;
}

export interface TokenizerHandle {
  /** Encode with the tokenizer's own special tokens (e.g. a BOS) unless addSpecialTokens is false. */
  encode(text: string, options?: { addSpecialTokens?: boolean }): Encoded;
  decode(ids: number[], options?: { skipSpecialTokens?: boolean }): string;
  vocabSize: number;
  bosTokenId?: number;
  eosTokenId?: number;
  padTokenId?: number;
  idToToken(id: number): string | undefined;
  tokenToId(token: string): number | undefined;
}

type Json = Record<string, unknown>;

function readJson(path: string): Json {
  try {
    return JSON.parse(readFileSync(path, 'utf8'));
  } catch (e) {
    throw new TokenizerError(`${path}: not valid JSON (${(e as Error).message})`);
  }
}

/** GPT-2's table: every byte gets a printable unicode character. */
function byteLevelDecoder(): Map<string, number> {
  const bs: number[] = [];
  for (let b = 33; b <= 126; b++) bs.push(b);
  for (let b = 161; b <= 172; b++) bs.push(b);
  for (let b = 174; b <= 255; b++) bs.push(b);
  const cs = [...bs];
  let n = 0;
  for (let b = 0; b < 256; b++)
    if (!bs.includes(b)) {
      bs.push(b);
      cs.push(256 + n++);
    }
  const m = new Map<string, number>();
  for (let i = 0; i < bs.length; i++) m.set(String.fromCodePoint(cs[i]), bs[i]);
  return m;
}

function usesType(node: unknown, type: string): boolean {
  if (!node || typeof node !== 'object') return false;
  const n = node as Json;
  if (n.type === type) return true;
  for (const key of ['decoders', 'pretokenizers', 'normalizers'])
    if (Array.isArray(n[key]) && (n[key] as unknown[]).some((c) => usesType(c, type))) return true;
  return false;
}

function tokenName(v: unknown): string | undefined {
  if (typeof v === 'string') return v;
  if (v && typeof v === 'object' && typeof (v as Json).content === 'string') return (v as Json).content as string;
  return undefined;
}

export function loadTokenizer(dir: string): TokenizerHandle {
  const path = join(dir, 'tokenizer.json');
  if (!existsSync(path))
    throw new TokenizerError(
      `${dir}: no tokenizer.json (save the tokenizer with tokenizer.save_pretrained(dir); slow-only tokenizers are not supported)`,
    );
  const tj = readJson(path);
  const cfgPath = join(dir, 'tokenizer_config.json');
  const tc = existsSync(cfgPath) ? readJson(cfgPath) : {};
  let tok: Tokenizer;
  try {
    tok = new Tokenizer(tj, tc);
  } catch (e) {
    throw new TokenizerError(`${path}: cannot load (${(e as Error).message})`);
  }
  const vocab = tok.get_vocab(true);
  let vocabSize = 0;
  for (const id of vocab.values()) vocabSize = Math.max(vocabSize, id + 1);

  const added = new Map<string, boolean>(); // content → special
  for (const a of (tj.added_tokens as Json[] | undefined) ?? []) added.set(a.content as string, !!a.special);
  const byteLevel = usesType(tj.decoder, 'ByteLevel') || usesType(tj.pre_tokenizer, 'ByteLevel');
  const b2 = byteLevel ? byteLevelDecoder() : undefined;
  const utf8 = new TextEncoder();

  /** the bytes a token stands for in the (pre-normalization) text */
  const tokenBytes = (t: string): number[] => {
    if (added.has(t)) return [...utf8.encode(t)];
    if (b2) {
      const out: number[] = [];
      for (const ch of t) {
        const b = b2.get(ch);
        if (b === undefined) return [...utf8.encode(t)];
        out.push(b);
      }
      return out;
    }
    const m = /^<0x([0-9A-Fa-f]{2})>$/.exec(t);
    if (m) return [Number.parseInt(m[1], 16)];
    return [...utf8.encode(t.replaceAll('▁', ' ').replace(/^##/, ''))];
  };

  const idOf = (name: unknown, configKey: string): number | undefined => {
    const n = tokenName(name);
    if (n !== undefined) {
      const id = tok.token_to_id(n);
      if (id !== undefined) return id;
    }
    const fromTc = tc[configKey];
    return typeof fromTc === 'number' ? fromTc : undefined;
  };
  const bosTokenId = idOf(tc.bos_token, 'bos_token_id');
  const eosTokenId = idOf(tc.eos_token, 'eos_token_id');
  const padTokenId = idOf(tc.pad_token, 'pad_token_id') ?? eosTokenId;

  const encode = (text: string, options: { addSpecialTokens?: boolean } = {}): Encoded => {
    const plain = tok.encode(text, { add_special_tokens: false });
    const offsets = alignOffsets(text, plain.tokens.map(tokenBytes));
    if (options.addSpecialTokens === false) return { ids: plain.ids, tokens: plain.tokens, offsets, text };
    // The post-processor adds tokens (a BOS, …) around the content; they cover no text.
    const full = tok.encode(text, { add_special_tokens: true });
    const n = plain.ids.length;
    let start = -1;
    for (let s = 0; s + n <= full.ids.length && start < 0; s++)
      if (plain.ids.every((id, i) => full.ids[s + i] === id)) start = s;
    if (start < 0) return { ids: plain.ids, tokens: plain.tokens, offsets, text };
    const full_offsets: Array<[number, number]> = full.ids.map((_, i): [number, number] => {
      if (i < start) return [0, 0];
      if (i >= start + n) return [text.length, text.length];
      return offsets[i - start];
    });
    return { ids: full.ids, tokens: full.tokens, offsets: full_offsets, text };
  };

  return {
    encode,
    decode: (ids, o = {}) => tok.decode(ids, { skip_special_tokens: o.skipSpecialTokens ?? false }),
    vocabSize,
    bosTokenId,
    eosTokenId,
    padTokenId,
    idToToken: (id) => tok.id_to_token(id),
    tokenToId: (t) => tok.token_to_id(t),
  };
}

/**
 * Map token byte strings onto the text. Where the tokens' bytes follow the text's UTF-8
 * bytes we get exact offsets; a leading space that a SentencePiece normalizer prepended
 * is skipped; where a normalizer changed the text (lowercasing, NFKC) we resynchronise at
 * the next matching token and give the unmatched tokens an empty range at the cursor.
 */
export function alignOffsets(text: string, tokens: number[][]): Array<[number, number]> {
  const bytes = new TextEncoder().encode(text);
  // byte index → UTF-16 index of the character that contains it, and that character's end
  const charStart = new Int32Array(bytes.length + 1);
  const charEnd = new Int32Array(bytes.length + 1);
  let bi = 0;
  for (let ci = 0; ci < text.length; ) {
    const cp = text.codePointAt(ci)!;
    const units = cp > 0xffff ? 2 : 1;
    const nb = cp < 0x80 ? 1 : cp < 0x800 ? 2 : cp < 0x10000 ? 3 : 4;
    for (let k = 0; k < nb; k++) {
      charStart[bi + k] = ci;
      charEnd[bi + k] = ci + units;
    }
    bi += nb;
    ci += units;
  }
  charStart[bytes.length] = text.length;
  charEnd[bytes.length] = text.length;

  const matchesAt = (tb: number[], at: number) => {
    if (at + tb.length > bytes.length) return false;
    for (let k = 0; k < tb.length; k++) if (bytes[at + k] !== tb[k]) return false;
    return true;
  };
  const out: Array<[number, number]> = [];
  let cursor = 0;
  for (const tb0 of tokens) {
    let tb = tb0;
    if (tb.length && tb[0] === 0x20 && !matchesAt(tb, cursor) && matchesAt(tb.slice(1), cursor)) tb = tb.slice(1);
    if (tb.length === 0) {
      out.push([charStart[cursor], charStart[cursor]]);
      continue;
    }
    let at = matchesAt(tb, cursor) ? cursor : -1;
    if (at < 0)
      for (let s = cursor + 1; s < Math.min(bytes.length, cursor + 64) && at < 0; s++) if (matchesAt(tb, s)) at = s;
    if (at < 0) {
      out.push([charStart[cursor], charStart[cursor]]);
      continue;
    }
    out.push([charStart[at], charEnd[at + tb.length - 1]]);
    cursor = at + tb.length;
  }
  return out;
}
