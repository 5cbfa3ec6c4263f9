// tokenizer.json through @huggingface/tokenizers, plus what that library does not give:
// character offsets of every token, in UTF-16 code units (VS Code positions), which the
// token heatmaps and completion-only loss masks need. Offsets are those Python `tokenizers`
// reports for the same tokenizer.json (converted from code points to UTF-16 units):
// the text is split on added tokens, normalized with alignment (alignment.ts), given the
// pre-tokenizer's character changes (Metaspace ▁, a ByteLevel prefix space), and each token's
// bytes are walked along the result. Special tokens the post-processor adds (a BOS) get [0, 0].
// Components whose offsets we do not reproduce are refused at load time.
import { createHash } from 'node:crypto';
import { existsSync } from 'node:fs';
import { basename, join } from 'node:path';
import { Tokenizer } from '@huggingface/tokenizers';
import { restoreReplacedPath } from '../../common/atomic-write';
import { jsonText, readRegularFile } from '../../common/read-file';
import { ChatTemplate, ChatTemplateError, hasGenerationBlocks } from '../../common/records/chat-template';
import { DEFAULT_TRAINING, type TrainingConvention } from '../data/training';
import { AlignedString, applyNormalizer, applyPreTokenizer, TokenizerError } from './alignment';
import { BYTE_LEVEL_CHARS } from './byte-level';

export { TokenizerError };

export interface Encoded {
  ids: number[];
  tokens: string[];
  /** [start, end) of each token in `text`, UTF-16 code units, as Python `tokenizers` reports them;
   * [0, 0] for special tokens the post-processor adds */
  offsets: Array<[number, number]>;
  /** the characters each token's bytes come from: `offsets` before a ByteLevel post-processor's
   * trim_offsets (which shrinks a lone-space token to an empty range). Loss masks use these. */
  sources: Array<[number, number]>;
  text: string;
  /** how many tokens the post-processor put after the content (an EOS); 0 without special tokens */
  trailing: number;
}

export interface TokenizerHandle {
  /** Encode with the tokenizer's own special tokens (e.g. a BOS) unless addSpecialTokens is false. */
  encode(text: string, options?: { addSpecialTokens?: boolean }): Encoded;
  /** `encode(text, { addSpecialTokens }).ids` alone, without the offsets (one pass of the tokenizer) */
  encodeIds(text: string, addSpecialTokens: boolean): number[];
  decode(ids: number[], options?: { skipSpecialTokens?: boolean }): string;
  vocabSize: number;
  bosTokenId?: number;
  eosTokenId?: number;
  padTokenId?: number;
  idToToken(id: number): string | undefined;
  tokenToId(token: string): number | undefined;
  /** the model's unknown token (tokenizer.json's model.unk_token), which text outside the vocabulary becomes */
  unkToken?: { id: number; text: string };
  /** the model's chat template (chat_template.jinja or tokenizer_config.json), compiled on first
   * use; undefined when the tokenizer has none. Throws TokenizerError when it does not parse. */
  chatTemplate(): ChatTemplate | undefined;
  /** where the chat template came from and a digest of its source, for provenance and cache keys */
  chatTemplateSource?: { file: string; sha256: string; generationBlocks: boolean };
  /** sha256 of tokenizer.json and tokenizer_config.json as read: what the ids depend on (with
   * the chat template's digest above), so that factors and stores made with another tokenizer
   * are never taken for this one's */
  sha256: string;
  /** tokenizer_config.json's eos_token, as text (what TRL appends to a record) */
  eosToken?: string;
  /**
   * The ids transformers 5 gives, where it does not read tokenizer.json's normalizer and
   * pre-tokenizer but builds its tokenizer class's own (`transformersV5Pipeline`) and that build
   * differs from the file's; absent otherwise. transformers 4 reads tokenizer.json as written, so
   * a text whose ids differ here was trained on other ids depending on the transformers version.
   */
  transformers5?: {
    tokenizerClass: string;
    /** why transformers 5 builds that class and where its ids differ, for the refusal */
    why: string;
    encode(text: string, addSpecialTokens: boolean): number[];
  };
  /** how the model was trained on its records (data/training.ts): set by `withTraining` */
  training: TrainingConvention;
}

type Json = Record<string, unknown>;

/** A JSON file, its bytes added to `digest` (under its name, so two files never run together). */
function readJson(path: string, digest?: ReturnType<typeof createHash>): Json {
  try {
    const bytes = readRegularFile(path, (what) => new TokenizerError(`${path} is ${what}`));
    digest?.update(`${basename(path)}:${bytes.length}:`).update(bytes);
    return JSON.parse(jsonText(bytes, path, (m) => new TokenizerError(m)));
  } catch (e) {
    if (e instanceof TokenizerError) throw e;
    throw new TokenizerError(`${path}: not valid JSON (${(e as Error).message})`);
  }
}

/** GPT-2's table read backwards: the byte each of its characters stands for. */
function byteLevelDecoder(): Map<string, number> {
  return new Map(BYTE_LEVEL_CHARS.map((c, b) => [c, b]));
}

function usesType(node: unknown, type: string): boolean {
  if (!node || typeof node !== 'object') return false;
  const n = node as Json;
  if (n.type === type) return true;
  for (const key of ['decoders', 'pretokenizers', 'normalizers'])
    if (Array.isArray(n[key]) && (n[key] as unknown[]).some((c) => usesType(c, type))) return true;
  return false;
}

/** The tokenizer models the tokenizers library implements (any other would be read as something else). */
const TOKENIZER_MODELS = ['BPE', 'WordPiece', 'WordLevel', 'Unigram'];

const isId = (v: unknown): boolean => Number.isInteger(v) && (v as number) >= 0;

/**
 * What tokenizer.json says about ids must be ids: a model type the library knows, vocabulary and
 * added-token ids that are integers >= 0. A vocabulary entry of -1 was fed to the model as -1
 * (ONNX Runtime reads it as the last embedding row), and an unknown model type was read as another;
 * Python's tokenizers refuses both files.
 */
function checkIds(tj: Json, path: string): void {
  const model = tj.model as Json | undefined;
  if (!model || typeof model !== 'object') throw new TokenizerError(`${path}: no "model" section`);
  // no "type" at all: older files, whose model the library infers from its fields, as Python's does
  if (model.type !== undefined && !TOKENIZER_MODELS.includes(String(model.type)))
    throw new TokenizerError(
      `${path}: the tokenizer model type ${JSON.stringify(model.type)} is not one the tokenizers library implements (${TOKENIZER_MODELS.join(', ')})`,
    );
  const vocab = model.vocab;
  // for…in, not Object.entries: a 151k vocabulary took 92 ms that way, 31 ms this way
  if (model.type !== 'Unigram' && vocab && typeof vocab === 'object' && !Array.isArray(vocab))
    for (const token in vocab as Json) {
      const id = (vocab as Json)[token];
      if (!isId(id))
        throw new TokenizerError(
          `${path}: the vocabulary gives token ${JSON.stringify(token)} the id ${JSON.stringify(id)}; ids are integers >= 0`,
        );
    }
  for (const a of (tj.added_tokens as Json[] | undefined) ?? [])
    if (!isId(a?.id))
      throw new TokenizerError(
        `${path}: added token ${JSON.stringify(a?.content)} has the id ${JSON.stringify(a?.id)}; ids are integers >= 0`,
      );
}

/**
 * The ids a post-processor writes for its special tokens must be those tokens' ids: Python's
 * tokenizers emits the ids it gives (a TemplateProcessing that said [7] for "<|endoftext|>" gave
 * input_ids starting with 7), while the library here looked the token up (0, or <unk> for a token
 * outside the vocabulary), so the model would read other ids than in training.
 */
function checkPostProcessorIds(pp: unknown, vocab: Map<string, number>, path: string): void {
  if (!pp || typeof pp !== 'object') return;
  const p = pp as Json;
  const say = (token: unknown, given: unknown) => {
    const own = vocab.get(String(token));
    throw new TokenizerError(
      `${path}: the post_processor writes id ${JSON.stringify(given)} for the special token ${JSON.stringify(token)}, ${
        own === undefined ? 'which is not in the vocabulary' : `whose id in the vocabulary is ${own}`
      }: the file contradicts itself (Python's tokenizers would write ${JSON.stringify(given)}); fix the post_processor's ids`,
    );
  };
  if (p.type === 'Sequence') {
    for (const q of (p.processors as unknown[] | undefined) ?? []) checkPostProcessorIds(q, vocab, path);
    return;
  }
  if (p.type === 'TemplateProcessing') {
    for (const [name, sp] of Object.entries((p.special_tokens as Json | undefined) ?? {})) {
      const s = sp as Json;
      const ids = Array.isArray(s?.ids) ? (s.ids as unknown[]) : [];
      const tokens = Array.isArray(s?.tokens) ? (s.tokens as unknown[]) : [];
      if (ids.length !== tokens.length) say(name, ids);
      ids.forEach((id, i) => {
        if (vocab.get(String(tokens[i])) !== id) say(tokens[i], id);
      });
    }
    return;
  }
  // BertProcessing / RobertaProcessing: "sep" and "cls" as [token, id]
  for (const key of ['sep', 'cls']) {
    const pair = p[key];
    if (Array.isArray(pair) && pair.length === 2 && vocab.get(String(pair[0])) !== pair[1]) say(pair[0], pair[1]);
  }
}

function tokenName(v: unknown): string | undefined {
  if (typeof v === 'string') return v;
  if (v && typeof v === 'object' && typeof (v as Json).content === 'string') return (v as Json).content as string;
  return undefined;
}

export function loadTokenizer(
  dir: string,
  /** the model's config.json model_type: transformers 5 picks the tokenizer class by it too */
  options: { modelType?: string } = {},
): TokenizerHandle {
  const path = join(dir, 'tokenizer.json');
  restoreReplacedPath(dir); // a tokenizer folder (or the corpus around it) a writer killed between its two renames set aside
  if (!existsSync(path))
    throw new TokenizerError(
      `${dir}: no tokenizer.json (save the tokenizer with tokenizer.save_pretrained(dir); slow-only tokenizers are not supported)`,
    );
  // every file that decides the ids, by content: caches and fitted factors are keyed by it
  const files = createHash('sha256');
  const tj = readJson(path, files);
  const cfgPath = join(dir, 'tokenizer_config.json');
  const tc = existsSync(cfgPath) ? readJson(cfgPath, files) : {};
  checkIds(tj, path);
  let tok: Tokenizer;
  try {
    tok = new Tokenizer(tj, tc);
  } catch (e) {
    throw new TokenizerError(`${path}: cannot load (${(e as Error).message})`);
  }
  const vocab = tok.get_vocab(true);
  checkPostProcessorIds(tj.post_processor, vocab, path);
  let vocabSize = 0;
  for (const id of vocab.values()) vocabSize = Math.max(vocabSize, id + 1);

  for (const key of ['remove_space', 'do_lowercase_and_remove_accent'])
    if (tc[key] === true) throw new TokenizerError(`${cfgPath}: "${key}": true is not supported`);
  // the tokenizer library keeps single_word but its splitter never reads it: such a token would
  // also match inside words ("Qzxy" as "Qzx" + "y"), ids unlike transformers'
  const singleWord = ((tj.added_tokens as Json[] | undefined) ?? []).find((a) => a?.single_word === true);
  if (singleWord)
    throw new TokenizerError(
      `${path}: added token ${JSON.stringify(singleWord.content)} (id ${singleWord.id}) has "single_word": true, which is not supported: the tokenizer library would also match it inside words, giving other ids than transformers gave in training`,
    );
  const where = path;
  // the library's parts, called one section at a time so that every token's section is known
  const lib = tok as unknown as LibInternals;
  const model = (tj.model ?? {}) as Json;
  const byteLevel = usesType(tj.decoder, 'ByteLevel') || usesType(tj.pre_tokenizer, 'ByteLevel');
  const b2 = byteLevel ? byteLevelDecoder() : undefined;
  const utf8 = new TextEncoder();
  const unk = typeof model.unk_token === 'string' ? model.unk_token : undefined;
  const prefix = typeof model.continuing_subword_prefix === 'string' ? model.continuing_subword_prefix : '';
  const suffix = typeof model.end_of_word_suffix === 'string' ? model.end_of_word_suffix : '';
  const trim = byteLevelTrim(tj.post_processor);
  // refuse now what alignment cannot follow, rather than at the first record
  const probe = AlignedString.of('a b');
  applyNormalizer(probe, tj.normalizer, where);
  applyPreTokenizer(probe, tj.pre_tokenizer, true, where);

  /** the bytes a (non-added) token stands for in the normalized, pre-tokenized text */
  const tokenBytes = (t: string): number[] => {
    if (b2) {
      const out: number[] = [];
      for (const ch of t) {
        const b = b2.get(ch);
        if (b === undefined) return [...utf8.encode(t)];
        out.push(b);
      }
      return out;
    }
    const m = model.byte_fallback === true ? /^<0x([0-9A-Fa-f]{2})>$/.exec(t) : null;
    if (m) return [Number.parseInt(m[1], 16)];
    let u = t;
    if (prefix && u.startsWith(prefix)) u = u.slice(prefix.length);
    if (suffix && u.endsWith(suffix)) u = u.slice(0, u.length - suffix.length);
    return [...utf8.encode(u)];
  };

  /** tokens of one normalized piece between added tokens, with offsets into the original text */
  const encodePiece = (piece: AlignedString, sectionIndex: number, out: Content) => {
    const text = piece.text;
    const pieces = lib.pre_tokenizer ? lib.pre_tokenizer(text, { section_index: sectionIndex }) : [text];
    const tokens = lib.model(pieces);
    applyPreTokenizer(piece, tj.pre_tokenizer, sectionIndex === 0, where);
    // per byte of the pre-tokenized piece: the original range of its character
    const bytes: number[] = [];
    const starts: number[] = [];
    const ends: number[] = [];
    for (const c of piece.chars) {
      // one byte for ASCII without a TextEncoder call (per character, it was most of this loop's time)
      const code = c.ch.length === 1 ? c.ch.charCodeAt(0) : 0x80;
      if (code < 0x80) {
        bytes.push(code);
        starts.push(c.start);
        ends.push(c.end);
        continue;
      }
      for (const b of utf8.encode(c.ch)) {
        bytes.push(b);
        starts.push(c.start);
        ends.push(c.end);
      }
    }
    const matchesAt = (tb: number[], at: number) => {
      if (at + tb.length > bytes.length) return false;
      for (let k = 0; k < tb.length; k++) if (bytes[at + k] !== tb[k]) return false;
      return true;
    };
    let cursor = 0;
    let pending: number[] = []; // unknown tokens: they cover what lies before the next known one
    const settle = (upTo: number) => {
      const r: [number, number] =
        upTo > cursor ? [starts[cursor], ends[upTo - 1]] : [starts[cursor] ?? 0, starts[cursor] ?? 0];
      for (const i of pending) out.offsets[i] = r;
      pending = [];
    };
    for (const t of tokens) {
      const tb = tokenBytes(t);
      let at = -1;
      for (let s = cursor; s + tb.length <= bytes.length && at < 0 && tb.length > 0; s++) if (matchesAt(tb, s)) at = s;
      out.tokens.push(t);
      out.offsets.push([0, 0]);
      if (at < 0) {
        if (t === unk) {
          pending.push(out.offsets.length - 1);
          continue;
        }
        throw new TokenizerError(
          `${where}: cannot place token ${JSON.stringify(t)} in ${JSON.stringify(text.slice(0, 80))}; offsets would be wrong`,
        );
      }
      if (pending.length) settle(at);
      out.offsets[out.offsets.length - 1] = [starts[at], ends[at + tb.length - 1]];
      cursor = at + tb.length;
    }
    if (pending.length) settle(bytes.length);
  };

  /** the content tokens of `text` (no post-processor specials), with Python-identical offsets */
  const encodeContent = (text: string): Content => {
    const out: Content = { tokens: [], offsets: [] };
    const sections = lib.splitter_unnormalized.split(text);
    const begin: number[] = [];
    const bounds = sections.map((sec) => {
      begin.push(begin.length ? begin[begin.length - 1] + sections[begin.length - 1].length : 0);
      const s = begin[begin.length - 1];
      return [s, s + sec.length];
    });
    // added tokens with lstrip/rstrip swallow the whitespace next to them
    sections.forEach((sec, i) => {
      const a = lib.added_tokens_map.get(sec);
      if (!a) return;
      if (a.lstrip && i > 0) {
        const prev = sections[i - 1];
        const n = prev.length - prev.trimEnd().length;
        bounds[i - 1][1] -= n;
        bounds[i][0] -= n;
      }
      if (a.rstrip && i + 1 < sections.length) {
        const next = sections[i + 1];
        const n = next.length - next.trimStart().length;
        bounds[i + 1][0] += n;
        bounds[i][1] += n;
      }
    });
    sections.forEach((sec, i) => {
      const [s, e] = bounds[i];
      if (lib.added_tokens_map.has(sec)) {
        out.tokens.push(sec);
        out.offsets.push([s, e]);
        return;
      }
      if (e <= s) return;
      const raw = text.slice(s, e);
      const norm = AlignedString.of(raw, s);
      applyNormalizer(norm, tj.normalizer, where);
      const expected = lib.normalizer ? lib.normalizer(raw) : raw;
      if (norm.text !== expected)
        throw new TokenizerError(
          `${where}: normalizing ${JSON.stringify(raw.slice(0, 80))} gives a different text than the tokenizer library; offsets would be wrong`,
        );
      // added tokens that match the normalized text
      let from = 0;
      for (const sub of lib.splitter_normalized.split(norm.text)) {
        const n = Array.from(sub).length;
        const piece = new AlignedString(norm.chars.slice(from, from + n));
        from += n;
        if (sub.length === 0) continue;
        if (lib.added_tokens_map.has(sub)) {
          out.tokens.push(sub);
          out.offsets.push([piece.chars[0].start, piece.chars[piece.chars.length - 1].end]);
        } else encodePiece(piece, i, out);
      }
    });
    out.sources = out.offsets.map(([a, b]) => [a, b]);
    if (trim) trimOffsets(out, trim.addPrefixSpace);
    return out;
  };

  const idOfToken = (t: string) =>
    lib.added_tokens_map.get(t)?.id ?? lib.model.tokens_to_ids.get(t) ?? lib.model.unk_token_id;

  let contentLead = 0; // how many tokens the post-processor puts before the content (set below)
  const encode = (text: string, options: { addSpecialTokens?: boolean } = {}): Encoded => {
    const content = encodeContent(text);
    const ids = content.tokens.map(idOfToken);
    const plain = tok.encode(text, { add_special_tokens: false });
    if (plain.ids.length !== ids.length || plain.ids.some((id, i) => id !== ids[i]))
      throw new TokenizerError(
        `${where}: internal error: the sectioned encoding of ${JSON.stringify(text.slice(0, 80))} differs from the library's`,
      );
    const sources = content.sources!;
    if (options.addSpecialTokens === false)
      return { ids, tokens: content.tokens, offsets: content.offsets, sources, text, trailing: 0 };
    // The post-processor adds tokens (a BOS, …) around the content; they cover no text: [0, 0] as in Python.
    const full = tok.encode(text, { add_special_tokens: true });
    const n = ids.length;
    // the content sits after the post-processor's leading specials (a text may itself hold a "<s>")
    const at = (s: number) => s + n <= full.ids.length && ids.every((id, i) => full.ids[s + i] === id);
    let start = at(contentLead) ? contentLead : -1;
    for (let s = 0; s + n <= full.ids.length && start < 0; s++) if (at(s)) start = s;
    if (start < 0)
      throw new TokenizerError(
        `${where}: the post_processor changed the tokens of ${JSON.stringify(text.slice(0, 80))}`,
      );
    const place = (per: Array<[number, number]>) =>
      full.ids.map((_, i): [number, number] => (i >= start && i < start + n ? per[i - start] : [0, 0]));
    return {
      ids: full.ids,
      tokens: full.tokens,
      offsets: place(content.offsets),
      sources: place(sources),
      text,
      trailing: full.ids.length - start - n,
    };
  };

  // built on first use: only the "trl" trainer asks (data/tokenize.ts)
  const v5 = transformersV5Pipeline(tj, tc, options.modelType);
  let rebuilt: Tokenizer | undefined;
  const transformers5: TokenizerHandle['transformers5'] = v5 && {
    tokenizerClass: v5.tokenizerClass,
    why: v5.why,
    encode: (text, addSpecialTokens) => {
      try {
        rebuilt ??= new Tokenizer(v5.json, tc);
      } catch (e) {
        throw new TokenizerError(
          `${path}: cannot load it as transformers 5's ${v5.tokenizerClass} (${(e as Error).message})`,
        );
      }
      return rebuilt.encode(text, { add_special_tokens: addSpecialTokens }).ids;
    },
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

  // BOS/EOS come from tokenizer.json's post_processor, as transformers 5 applies them. Older
  // transformers rebuilt the post-processor from add_bos_token/add_eos_token instead; when the
  // two files disagree the model may have been trained either way, so we refuse.
  const withSpecials = tok.encode('a', { add_special_tokens: true }).ids;
  const withoutSpecials = tok.encode('a', { add_special_tokens: false }).ids;
  contentLead = Math.max(0, withSpecials.indexOf(withoutSpecials[0]));
  const addsFirst = withSpecials.length > withoutSpecials.length && withSpecials[0] !== withoutSpecials[0];
  const addsLast =
    withSpecials.length > withoutSpecials.length &&
    withSpecials[withSpecials.length - 1] !== withoutSpecials[withoutSpecials.length - 1];
  const checks: Array<[string, boolean, number | undefined]> = [
    ['add_bos_token', addsFirst && withSpecials[0] === bosTokenId, bosTokenId],
    ['add_eos_token', addsLast && withSpecials[withSpecials.length - 1] === eosTokenId, eosTokenId],
  ];
  for (const [key, adds, id] of checks) {
    const v = tc[key];
    if (typeof v === 'boolean' && v !== adds && !(v && id === undefined))
      throw new TokenizerError(
        `${cfgPath}: "${key}": ${v}, but tokenizer.json's post_processor ${adds ? 'adds' : 'does not add'} that token; ` +
          'transformers versions disagree on which file wins, so make them agree',
      );
  }

  // The chat template: transformers reads chat_template.jinja first, then tokenizer_config.json.
  const jinjaPath = join(dir, 'chat_template.jinja');
  let templateSource: { file: string; text: string } | undefined;
  if (existsSync(jinjaPath))
    templateSource = {
      file: jinjaPath,
      text: readRegularFile(jinjaPath, (what) => new TokenizerError(`${jinjaPath} is ${what}`)).toString('utf8'),
    };
  else if (typeof tc.chat_template === 'string') templateSource = { file: cfgPath, text: tc.chat_template };
  else if (tc.chat_template !== undefined && tc.chat_template !== null && !Array.isArray(tc.chat_template))
    // read as no template, chats were rendered with the stand-in format
    throw new TokenizerError(
      `${cfgPath}: "chat_template" is ${JSON.stringify(tc.chat_template)}; a chat template is a string of Jinja (or a list of named ones)`,
    );
  else if (Array.isArray(tc.chat_template)) {
    const named = (tc.chat_template as Json[]).find((t) => t.name === 'default');
    if (!named || typeof named.template !== 'string')
      throw new TokenizerError(`${cfgPath}: "chat_template" is a list without a "default" entry`);
    templateSource = { file: cfgPath, text: named.template };
  }
  let compiled: ChatTemplate | undefined;
  const chatTemplate = (): ChatTemplate | undefined => {
    if (!templateSource || compiled) return compiled;
    const tokens: Record<string, string | undefined> = {};
    for (const k of ['bos_token', 'eos_token', 'unk_token', 'pad_token', 'sep_token', 'cls_token', 'mask_token'])
      tokens[k] = tokenName(tc[k]);
    const specials = ((tj.added_tokens as Json[] | undefined) ?? [])
      .filter((a) => a.special)
      .map((a) => String(a.content));
    try {
      compiled = new ChatTemplate({ source: templateSource.text, where: templateSource.file, tokens, specials });
    } catch (e) {
      if (e instanceof ChatTemplateError) throw new TokenizerError(e.message);
      throw e;
    }
    return compiled;
  };

  return {
    sha256: files.digest('hex'),
    chatTemplate,
    chatTemplateSource: templateSource && {
      file: templateSource.file,
      sha256: createHash('sha256').update(templateSource.text).digest('hex'),
      generationBlocks: hasGenerationBlocks(templateSource.text),
    },
    encode,
    encodeIds: (text, addSpecialTokens) => tok.encode(text, { add_special_tokens: addSpecialTokens }).ids,
    decode: (ids, o = {}) => tok.decode(ids, { skip_special_tokens: o.skipSpecialTokens ?? false }),
    vocabSize,
    bosTokenId,
    eosTokenId,
    eosToken: tokenName(tc.eos_token),
    transformers5,
    training: DEFAULT_TRAINING,
    padTokenId,
    idToToken: (id) => tok.id_to_token(id),
    tokenToId: (t) => tok.token_to_id(t),
    ...unknownToken(
      model,
      unk,
      (t) => tok.token_to_id(t),
      (id) => tok.id_to_token(id),
    ),
  };
}

/**
 * The handle for records trained under `training`: one that appends the EOS needs an eos_token
 * that is one token, the eos id (else the appended text would be scored as other tokens).
 */
export function withTraining(tok: TokenizerHandle, training: TrainingConvention, where: string): TokenizerHandle {
  if (training.appendEos) {
    const eos = tok.eosToken;
    if (eos === undefined)
      throw new TokenizerError(
        `${where}: the training convention "${training.name}" appends the tokenizer's eos_token to each record, but tokenizer_config.json names none`,
      );
    if (tok.eosTokenId === undefined)
      throw new TokenizerError(
        `${where}: the training convention "${training.name}" appends the tokenizer's eos_token to each record, but its eos_token ${JSON.stringify(eos)} is not a token of tokenizer.json (and no eos_token_id is given), so what a trainer appended is unknown`,
      );
    const ids = tok.encode(eos, { addSpecialTokens: false }).ids;
    if (ids.length !== 1 || ids[0] !== tok.eosTokenId)
      throw new TokenizerError(
        `${where}: eos_token ${JSON.stringify(eos)} is not one token (it encodes to ${JSON.stringify(ids)}), so appending it, as the training convention "${training.name}" does, is not what a trainer appended`,
      );
  }
  return { ...tok, training };
}

/**
 * The handle, refusing any id past the model's embedding rows: another model's tokenizer.json in
 * the folder would otherwise index past the table (an ONNX Runtime error deep in a run) or, where
 * the table is larger, silently feed the model tokens it never learnt. Only ids actually produced
 * are checked: a tokenizer whose unused added tokens run past the table still works, as in transformers.
 */
export function withEmbeddingRows(
  tok: TokenizerHandle,
  rows: number,
  configPath: string,
  tokenizerPath: string,
): TokenizerHandle {
  const check = (ids: number[]): number[] => {
    const bad = ids.findIndex((id) => id >= rows || id < 0);
    if (bad >= 0)
      throw new TokenizerError(
        `token ${JSON.stringify(tok.idToToken(ids[bad]))} has id ${ids[bad]}, but the model has ${rows} token embeddings ("vocab_size" in ${configPath}): ${tokenizerPath} is not this model's tokenizer`,
      );
    return ids;
  };
  return {
    ...tok,
    encode: (text, options) => {
      const e = tok.encode(text, options);
      check(e.ids);
      return e;
    },
    encodeIds: (text, addSpecialTokens) => check(tok.encodeIds(text, addSpecialTokens)),
  };
}

/** The unknown token: BPE / WordPiece / WordLevel name it (`unk_token`), Unigram gives its id (`unk_id`). */
function unknownToken(
  model: Json,
  unk: string | undefined,
  toId: (t: string) => number | undefined,
  toToken: (id: number) => string | undefined,
): { unkToken?: { id: number; text: string } } {
  if (unk !== undefined && toId(unk) !== undefined) return { unkToken: { id: toId(unk)!, text: unk } };
  const id = model.unk_id;
  const text = isId(id) ? toToken(id as number) : undefined;
  return model.type === 'Unigram' && text !== undefined ? { unkToken: { id: id as number, text } } : {};
}

/**
 * The normalizer, pre-tokenizer and model transformers 5.25's AutoTokenizer builds instead of
 * tokenizer.json's, for the tokenizer classes that build their own, when that differs from the
 * file; undefined when transformers 5 reads the file as written (as transformers 4 always does).
 * Which class it builds (tokenization_auto.py): a model_type whose Hub class it deems wrong
 * (of ours, qwen2) gets its registered class, Qwen2Tokenizer, whatever tokenizer_config.json
 * names; model_type mistral is read as written (its registered class); a LlamaTokenizer(Fast) over
 * a tokenizer.json that mentions "ByteLevel" is loaded as written (TokenizersBackend); otherwise
 * the named class.
 * `LlamaTokenizer` (Llama-2 and its fine-tunes, model_type llama) builds no normalizer and a
 * Metaspace pre-tokenizer whose prepend_scheme is "always" with `"legacy": true`, "first" without,
 * "never" with `"add_prefix_space": false` (LlamaTokenizer.__init__ and _get_prepend_scheme). A
 * legacy Llama-2 tokenizer.json prepends "▁" with a Prepend normalizer instead, so a text that
 * starts with a space (`" Rome"`: `▁` `▁Rome` in the file, `▁Rome` in transformers 5) or follows a
 * special token gets other ids. Other classes transformers 5 rebuilds (T5, Gemma, GPT-2, …) are not
 * emulated; Gemma-3's and GPT-2's gave the files' ids on every record of the TRL golden.
 */
export function transformersV5Pipeline(
  tj: Json,
  tc: Json,
  modelType?: string,
): { tokenizerClass: string; json: Json; why: string } | undefined {
  const named = typeof tc.tokenizer_class === 'string' ? tc.tokenizer_class : undefined;
  const hub = named?.replace(/Fast$/, '');
  const m = (tj.model ?? {}) as Json;
  const same = (a: unknown, b: unknown) => JSON.stringify(a ?? null) === JSON.stringify(b ?? null);
  if (modelType === 'qwen2' || hub === 'Qwen2Tokenizer') {
    // Qwen2Tokenizer.__init__: NFC, its split regex, byte-level without a prefix space, plain BPE
    const pre = {
      type: 'Sequence',
      pretokenizers: [
        { type: 'Split', pattern: { Regex: QWEN2_SPLIT }, behavior: 'Isolated', invert: false },
        { type: 'ByteLevel', add_prefix_space: tc.add_prefix_space === true, trim_offsets: false, use_regex: false },
      ],
    };
    const model = {
      ...m,
      dropout: null,
      unk_token: null,
      continuing_subword_prefix: '',
      end_of_word_suffix: '',
      fuse_unk: false,
      byte_fallback: false,
      ignore_merges: false,
    };
    const sameModel = Object.entries(model).every(([k, v]) => k === 'vocab' || k === 'merges' || same(m[k], v));
    if (same(tj.normalizer, { type: 'NFC' }) && same(tj.pre_tokenizer, pre) && sameModel) return undefined;
    return {
      tokenizerClass: 'Qwen2Tokenizer',
      json: { ...tj, normalizer: { type: 'NFC' }, pre_tokenizer: pre, model },
      why:
        hub === 'Qwen2Tokenizer'
          ? "tokenizer_config.json names Qwen2Tokenizer, which transformers 5 builds with its own normalizer and pre-tokenizer in place of tokenizer.json's"
          : `model_type "qwen2" makes transformers 5 build Qwen2Tokenizer (with its own normalizer and pre-tokenizer) whatever tokenizer_config.json names (${named ?? 'no class'})`,
    };
  }
  // model_type mistral's registered class is MistralCommonBackend (with mistral-common and its
  // tekken / tokenizer.model.vN files) or TokenizersBackend: tokenizer.json as written, never a
  // LlamaTokenizer rebuild (measured: 5.25 gives the file's ids for Metaspace and ByteLevel files)
  if (hub !== 'LlamaTokenizer' || modelType === 'mistral') return undefined;
  // transformers' test: a ByteLevel pre-tokenizer or decoder (Llama-3 style files); it searches the
  // file's text for "ByteLevel", which only those nodes (and a post-processor beside them) hold
  if (usesType(tj.pre_tokenizer, 'ByteLevel') || usesType(tj.decoder, 'ByteLevel')) return undefined;
  const addPrefixSpace = tc.add_prefix_space !== false;
  const scheme = !addPrefixSpace ? 'never' : tc.legacy === true ? 'always' : 'first';
  const pre = { type: 'Metaspace', replacement: '\u2581', prepend_scheme: scheme, split: false };
  // the BPE model as LlamaTokenizer makes it from the file's vocabulary and merges
  const json: Json = {
    ...tj,
    normalizer: null,
    pre_tokenizer: pre,
    model: { ...m, fuse_unk: true, byte_fallback: true, dropout: null },
  };
  const sameModel = m.fuse_unk === true && m.byte_fallback === true && (m.dropout ?? null) === null;
  if (same(tj.normalizer, null) && same(tj.pre_tokenizer, pre) && sameModel) return undefined;
  return {
    tokenizerClass: named ?? 'LlamaTokenizer',
    json,
    why: `its ${named} builds its own pre-tokenizer in place of tokenizer.json's normalizer, which differs where a text starts with a space or follows a special token`,
  };
}

/** Qwen2Tokenizer's PRETOKENIZE_REGEX (transformers 5.25, models/qwen2/tokenization_qwen2.py) */
const QWEN2_SPLIT =
  "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+";

interface Content {
  tokens: string[];
  offsets: Array<[number, number]>;
  sources?: Array<[number, number]>;
}

interface LibInternals {
  splitter_unnormalized: { split(text: string): string[] };
  splitter_normalized: { split(text: string): string[] };
  added_tokens_map: Map<string, { id: number; lstrip: boolean; rstrip: boolean }>;
  normalizer: ((text: string) => string) | null;
  pre_tokenizer: ((text: string, options: { section_index: number }) => string[]) | null;
  model: ((pieces: string[]) => string[]) & { tokens_to_ids: Map<string, number>; unk_token_id: number };
}

/** tokenizer.json's ByteLevel post-processor with trim_offsets (GPT-NeoX), directly or in a Sequence */
function byteLevelTrim(node: unknown): { addPrefixSpace: boolean } | undefined {
  if (!node || typeof node !== 'object') return undefined;
  const n = node as Json;
  if (n.type === 'ByteLevel')
    return n.trim_offsets === true ? { addPrefixSpace: n.add_prefix_space === true } : undefined;
  if (n.type === 'Sequence')
    for (const c of (n.processors as unknown[]) ?? []) {
      const t = byteLevelTrim(c);
      if (t) return t;
    }
  return undefined;
}

/** `tokenizers`' ByteLevel process_offsets: offsets leave out a token's leading/trailing spaces */
function trimOffsets(c: Content, addPrefixSpace: boolean): void {
  const space = (ch: string) => ch === 'Ġ' || /\s/u.test(ch);
  c.tokens.forEach((t, i) => {
    const chars = Array.from(t);
    let lead = 0;
    while (lead < chars.length && space(chars[lead])) lead++;
    let trail = 0;
    while (trail < chars.length && space(chars[chars.length - 1 - trail])) trail++;
    const o = c.offsets[i];
    if (lead > 0) {
      if ((i === 0 || o[0] === 0) && addPrefixSpace && lead === 1) lead = 0;
      o[0] = Math.min(o[0] + lead, o[1]);
    }
    if (trail > 0 && o[1] >= trail) o[1] = Math.max(o[1] - trail, o[0]);
  });
}
