// A word-level tokenizer for a closed corpus, written as a Hugging Face `tokenizer.json`:
// GPT-2's byte-level pre-tokenizer (words keep their leading space, punctuation and newlines
// are their own pieces) and a WordLevel model whose vocabulary is every piece the corpus
// contains. Decoding is exact (the ByteLevel decoder joins the pieces back), offsets are
// exact (tokenizer.ts aligns byte-level pieces), and @huggingface/tokenizers, Python's
// `tokenizers` and `transformers` all load it. Words outside the corpus become `<|unk|>`.
import { mkdirSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { BYTE_LEVEL_CHARS } from '../model/byte-level';

export const EOS = '<|endoftext|>';
export const PAD = '<|pad|>';
export const UNK = '<|unk|>';
const SPECIALS = [EOS, PAD, UNK];

/** GPT-2's pre-tokenization pattern, as the ByteLevel pre-tokenizer applies it. */
const PATTERN = /'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+/gu;

const utf8 = new TextEncoder();

/** The pieces of `text` as the tokenizer's vocabulary spells them (bytes → GPT-2 unicode table). */
export function preTokenize(text: string): string[] {
  return (text.match(PATTERN) ?? []).map((p) => Array.from(utf8.encode(p), (b) => BYTE_LEVEL_CHARS[b]).join(''));
}

export interface WordTokenizerFiles {
  tokenizer: Record<string, unknown>;
  config: Record<string, unknown>;
  vocabSize: number;
}

/**
 * Vocabulary of every piece in `texts`: the special tokens first (`<|endoftext|>` = 0,
 * `<|pad|>` = 1, `<|unk|>` = 2), then pieces by descending count, ties in code-unit order,
 * so the same texts always give the same ids.
 */
export function buildWordTokenizer(texts: Iterable<string>, maxLength = 128): WordTokenizerFiles {
  const counts = new Map<string, number>();
  for (const t of texts) for (const p of preTokenize(t)) counts.set(p, (counts.get(p) ?? 0) + 1);
  for (const s of SPECIALS) counts.delete(s);
  const pieces = [...counts.entries()].sort((a, b) => b[1] - a[1] || (a[0] < b[0] ? -1 : a[0] > b[0] ? 1 : 0));
  const vocab: Record<string, number> = {};
  SPECIALS.forEach((s, i) => {
    vocab[s] = i;
  });
  pieces.forEach(([p], i) => {
    vocab[p] = SPECIALS.length + i;
  });
  const added = SPECIALS.map((content, id) => ({
    id,
    content,
    single_word: false,
    lstrip: false,
    rstrip: false,
    normalized: false,
    special: true,
  }));
  const byteLevel = { add_prefix_space: false, trim_offsets: true, use_regex: true };
  const tokenizer = {
    version: '1.0',
    truncation: null,
    padding: null,
    added_tokens: added,
    normalizer: null,
    pre_tokenizer: { type: 'ByteLevel', ...byteLevel },
    post_processor: null,
    decoder: { type: 'ByteLevel', ...byteLevel },
    model: { type: 'WordLevel', vocab, unk_token: UNK },
  };
  const config = {
    tokenizer_class: 'PreTrainedTokenizerFast',
    model_max_length: maxLength,
    bos_token: null,
    eos_token: EOS,
    pad_token: PAD,
    unk_token: UNK,
    add_bos_token: false,
    add_eos_token: false,
    clean_up_tokenization_spaces: false,
    added_tokens_decoder: Object.fromEntries(added.map(({ id, ...rest }) => [String(id), rest])),
  };
  return { tokenizer, config, vocabSize: SPECIALS.length + pieces.length };
}

/** Write `tokenizer.json`, `tokenizer_config.json` and `special_tokens_map.json` into `dir`. */
export function writeWordTokenizer(dir: string, files: WordTokenizerFiles): void {
  mkdirSync(dir, { recursive: true });
  writeFileSync(join(dir, 'tokenizer.json'), `${JSON.stringify(files.tokenizer, null, 2)}\n`);
  writeFileSync(join(dir, 'tokenizer_config.json'), `${JSON.stringify(files.config, null, 2)}\n`);
  const map = { eos_token: EOS, pad_token: PAD, unk_token: UNK };
  writeFileSync(join(dir, 'special_tokens_map.json'), `${JSON.stringify(map, null, 2)}\n`);
}
