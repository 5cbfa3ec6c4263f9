// Records → rendered text → token ids and per-position loss weights, the unit every graph
// consumes. One path for `fit`, `explain`, `gradients`, `train` and `tokenize`:
//   1. render (src/common/records): messages through the model's chat template when it has one;
//   2. encode: plain texts with the tokenizer's own special tokens (BOS per its post_processor),
//      chat renderings without (the template writes them, as apply_chat_template(tokenize=True));
//   3. weights: position t is 1 iff token t+1 overlaps a scored span (format.ts); a special token
//      the post-processor adds after the content (an EOS) is scored when the content's last token
//      is, as transformers' labels = input_ids and TRL's completion mask score it in training.
// Sequences longer than the model's context are cut at the end (the count is reported, never
// silent); the loss weights follow the cut.
import { ChatTemplateError } from '../../common/records/chat-template';
import type { RenderedRecord, Rendering } from '../../common/records/render';
import { checkUnicode, RecordShapeError } from '../../common/records/shape';
import { ConfigError, longropeContext } from '../model/architectures/common';
import type { TokenizerHandle } from '../model/tokenizer';
import { DataError, QueryError } from './errors';
import { renderForModel, type Span, targetWeightsFromOffsets } from './format';
import { trainingArgument, trainingKey } from './training';

export interface TokenizedText {
  ids: number[];
  /** per position t: 1 if the loss scores token t+1 */
  weights: number[];
  /** character range of each token in `text` (UTF-16 units), as Python `tokenizers` reports it */
  offsets: Array<[number, number]>;
  /** tokens dropped at the end to fit the context (a lower bound when `truncatedAtLeast`) */
  truncated: number;
  /** the text was far longer than the context and only a prefix was tokenized (`encodeHead`) */
  truncatedAtLeast?: boolean;
  /** the rendered text the ids encode */
  text: string;
  rendering: Rendering;
}

/**
 * Bumped whenever rendering or masking changes what a record's ids/weights are, so caches keyed
 * by it (fitted factors, gradient stores) are rebuilt. 2: offsets identical to Python
 * `tokenizers`; messages through the model's chat template. 3: a post-processor's trailing
 * special (EOS) is scored after a scored last token. 4: a message's "name" reaches the chat
 * template; the training convention (training.ts) keys the tokens.
 */
export const TOKENIZATION_VERSION = 4;

/**
 * Bumped when the tokens of chat templates with `{% generation %}` blocks change, keying only
 * those (factors of other models stay valid). 2: every block trained, by the content it holds;
 * the block tags keep jinja2's trim_blocks / lstrip_blocks (a newline after a block was kept).
 */
export const GENERATION_BLOCKS_VERSION = 2;

/**
 * Bumped when the tokens of chat templates without `{% generation %}` blocks change (an assistant
 * turn located by rendering the conversation before it), keying only the templates whose tokens the
 * change moves (`emptyReplyChanged`). 2: an empty reply trains its turn up to its end marker
 * (Qwen3's empty last reply, whose template writes a <think> block before the marker, trained
 * nothing and was left out of the fit).
 */
export const PREFIX_TURNS_VERSION = 2;

/**
 * Whether PREFIX_TURNS_VERSION's change gives this tokenizer's chat template other tokens: only
 * then are its caches keyed by it (Llama 3's, Gemma 3's factors stay valid). A template that does
 * not compile counts as changed (its records are refused anyway).
 */
function emptyReplyChanged(tok: TokenizerHandle): boolean {
  if (!tok.chatTemplateSource || tok.chatTemplateSource.generationBlocks) return false;
  try {
    return tok.chatTemplate()?.emptyReplyPlacementMatters() ?? false;
  } catch {
    return true;
  }
}

/** What, besides the examples, decides their tokens: for cache keys and provenance. */
export function tokenizationKey(tok: TokenizerHandle): Record<string, unknown> {
  return {
    tokenization: TOKENIZATION_VERSION,
    tokenizer: tok.sha256,
    chatTemplate: tok.chatTemplateSource?.sha256 ?? null,
    ...(tok.chatTemplateSource?.generationBlocks ? { generationBlocks: GENERATION_BLOCKS_VERSION } : {}),
    ...(emptyReplyChanged(tok) ? { prefixTurns: PREFIX_TURNS_VERSION } : {}),
    training: trainingKey(tok.training),
  };
}

/** Whether two tokenizers turn every record into the same tokens (`tokenizationKey` alike). */
export function sameTokenization(a: TokenizerHandle, b: TokenizerHandle): boolean {
  return JSON.stringify(tokenizationKey(a)) === JSON.stringify(tokenizationKey(b));
}

/**
 * A training record's rendering as its trainer trained on it (the tokenizer's training
 * convention): the EOS appended to a text or completion, every token of a chat scored.
 */
export function asTrained(tok: TokenizerHandle, r: RenderedRecord): { text: string; spans: Span[] } {
  const t = tok.training;
  if (r.kind === 'messages') {
    if (t.chatLoss === 'assistant') return { text: r.text, spans: r.spans };
    // every token: of the whole conversation, or (a conversational prompt/completion, whose loss
    // is the completion's alone) from the end of the prompt with its generation prompt on
    return { text: r.text, spans: [[r.promptCompletion ? r.spans[0][0] : 0, r.text.length]] };
  }
  const eos = tok.eosToken;
  if (!t.appendEos || eos === undefined || r.text.endsWith(eos)) return { text: r.text, spans: r.spans };
  // the EOS continues the scored span (the whole text, or the completion)
  const text = r.text + eos;
  const spans = r.spans.map(([s, e]): Span => (e === r.text.length ? [s, text.length] : [s, e]));
  return { text, spans };
}

export function tokenizeText(
  tok: TokenizerHandle,
  text: string,
  spans: Span[],
  maxLength: number,
  rendering: Rendering = 'plain',
  /** score a post-processor's trailing special (EOS) after a scored last token (training records) */
  scoreTrailing = true,
): TokenizedText {
  const enc = encodeHead((t) => tok.encode(t, { addSpecialTokens: rendering !== 'chat_template' }), text, maxLength);
  const fromPrefix = enc.text.length < text.length;
  let { ids, offsets, sources } = enc;
  let truncated = 0;
  if (ids.length > maxLength) {
    truncated = ids.length - maxLength;
    ids = ids.slice(0, maxLength);
    offsets = offsets.slice(0, maxLength);
    sources = sources.slice(0, maxLength);
  }
  const weights = targetWeightsFromOffsets(sources, spans);
  // the content's last token is at contentEnd - 1; the specials after it cover no text
  const contentEnd = enc.ids.length - enc.trailing;
  if (scoreTrailing && enc.trailing > 0 && contentEnd >= 1 && contentEnd <= ids.length) {
    const [ls, le] = enc.sources[contentEnd - 1];
    if (le > ls && spans.some(([s, e]) => ls < e && le > s))
      for (let p = contentEnd; p < ids.length; p++) weights[p - 1] = 1;
  }
  return { ids, offsets, weights, truncated, ...(fromPrefix ? { truncatedAtLeast: true } : {}), text, rendering };
}

/** One JSONL record (the parsed value), rendered for this model and tokenized as it was trained. */
export function tokenizeRecord(tok: TokenizerHandle, record: unknown, where: string, maxLength: number): TokenizedText {
  const r = renderForModel(record, where, tok.chatTemplate());
  const limit = Math.min(maxLength, tok.training.maxLength ?? maxLength);
  const checked = typeof record === 'object' && record !== null && checkedAtLoad.get(tok)?.get(record) === limit;
  return tokenizeTrained(tok, r, limit, where, checked);
}

/**
 * Records whose ids `checkTrainable` (at loading) already compared with transformers 5's, by
 * tokenizer handle, with the length they were cut to: tokenizing them does not compare again.
 */
const checkedAtLoad = new WeakMap<TokenizerHandle, WeakMap<object, number>>();

/**
 * Throws the DataError tokenizing this record as trained would (`tokenizeRecord`, with the model's
 * context `maxLength`), computing no more than that takes: what `loadDataset` calls so that such a
 * record is a bad line of the file (named, or skipped under skipMalformed) instead of stopping
 * every later use of the dataset. Under the default trainer that is rendering a chat with the
 * model's template; under "trl", every refusal of `tokenizeTrained`, of which only the transformers
 * 4/5 comparison (LlamaTokenizer files) encodes the text, ids only, and is not repeated at tokenization.
 */
export function checkTrainable(
  tok: TokenizerHandle,
  record: unknown,
  kind: RenderedRecord['kind'],
  where: string,
  maxLength: number,
): void {
  if (tok.training.trainer !== 'trl') {
    if (kind === 'messages') renderForModel(record, where, tok.chatTemplate());
    return;
  }
  const r = renderForModel(record, where, tok.chatTemplate());
  refuseUntrained(tok, r, where);
  if (r.prompt) renderedPrompt(r, where);
  if (!tok.transformers5 || typeof record !== 'object' || record === null) return;
  const limit = Math.min(maxLength, tok.training.maxLength ?? maxLength);
  const { text } = asTrained(tok, r);
  const specials = r.rendering !== 'chat_template';
  const ids = encodeHead((t) => ({ ids: tok.encodeIds(t, specials) }), text, limit).ids;
  checkTransformers5(tok, r, text, ids.slice(0, limit), ids.length > limit, where);
  const checked = checkedAtLoad.get(tok) ?? new WeakMap<object, number>();
  checkedAtLoad.set(tok, checked.set(record, limit));
}

/** How many leading ids two sequences share (TRL's common_prefix_length). */
function commonPrefix(a: readonly number[], b: readonly number[]): number {
  let n = 0;
  while (n < a.length && n < b.length && a[n] === b[n]) n++;
  return n;
}

/**
 * A rendered training record tokenized as its trainer trained on it (the tokenizer's training
 * convention, training.ts). The "trl" trainer's loss is TRL SFTTrainer's labels: every token of
 * `input_ids` but the first, less, for a prompt/completion, the tokens before the completion's
 * start, which is where the tokenized prompt alone (a conversational one with its generation
 * prompt) and the tokenized whole first differ (TRL's common_prefix_length; a token wholly in
 * the prompt is trained when the completion changed it: "…the Spr" + "ee." gives "▁Sp" "ree").
 * Records TRL did not train on as we would tokenize them are refused (`refuseUntrained`,
 * `checkTransformers5`). `checked`: the transformers 4/5 comparison was made when the dataset was
 * loaded (`checkTrainable`).
 */
export function tokenizeTrained(
  tok: TokenizerHandle,
  r: RenderedRecord,
  maxLength: number,
  where: string,
  checked = false,
): TokenizedText {
  const trl = tok.training.trainer === 'trl';
  if (trl) refuseUntrained(tok, r, where);
  const { text, spans } = asTrained(tok, r);
  const t = tokenizeText(tok, text, spans, maxLength, r.rendering);
  if (!trl) return t;
  if (!checked) checkTransformers5(tok, r, text, t.ids, t.truncated > 0, where);
  // TRL's completion mask: 0 on the common prefix of the prompt's ids and the whole's. The
  // prompt's ids are compared with tokenizer.json's alone: where transformers 5 gives the whole
  // the same ids (checked above), it gives the prompt ids that part from the whole's at the same
  // token, since the two tokenizations differ only at the start of a text or of the text after a
  // special token, and each such start in the prompt is one in the whole
  const from = r.prompt
    ? Math.max(
        1,
        commonPrefix(
          encodeHead(
            (p) => ({ ids: tok.encodeIds(p, r.rendering !== 'chat_template') }),
            renderedPrompt(r, where),
            maxLength,
          ).ids,
          t.ids,
        ),
      )
    : 1;
  const assistantOnly = r.kind === 'messages' && tok.training.chatLoss === 'assistant';
  const weights = t.weights.map((w, i) => (i + 1 >= from && i + 1 < t.ids.length && (!assistantOnly || w > 0) ? 1 : 0));
  return { ...t, weights };
}

/**
 * What the "trl" trainer refuses before any token: a chat without the tokenizer's chat template
 * (TRL stops on it), and a chat under assistant-only loss whose template has no `{% generation %}`
 * blocks. For such a template TRL 1.16's assistant_only_loss does not mask the assistant turns as
 * `ChatTemplate` locates them: it stops ("not training-compatible": Llama-3's and Qwen3's
 * templates) or swaps in its own training template (Gemma-3's, which also trains the "\n" after
 * each <end_of_turn>), which we do not emulate. A template with the blocks TRL uses as it is, with
 * transformers' assistant mask, which `ChatTemplate` reads the same way. Text and plain
 * prompt/completion records are tokenized alike with or without assistant_only_loss (TRL itself
 * refuses the option on a dataset that is not conversational).
 */
function refuseUntrained(tok: TokenizerHandle, r: RenderedRecord, where: string): void {
  if (r.rendering === 'stand-in')
    throw new DataError(
      `${where}: TRL's SFTTrainer renders a conversation with the tokenizer's chat template and stops without one (transformers: "tokenizer.chat_template is not set"), and this tokenizer has none, so the model was not trained on this record as rendered here; put the template it was trained with beside tokenizer.json (chat_template.jinja), or remove this line`,
    );
  if (r.kind === 'messages' && tok.training.chatLoss === 'assistant' && !tok.chatTemplate()?.hasGenerationBlocks)
    throw new DataError(
      `${where}: TRL's assistant_only_loss does not train this chat's assistant turns as they are located here: the chat template has no {% generation %} blocks, for which TRL 1.16 stops ("not training-compatible", e.g. Llama-3's and Qwen3's templates) or swaps in its own training template (e.g. Gemma-3's, which also trains the "\\n" after each <end_of_turn>), which is not emulated, so the "${tok.training.name}" convention refuses a conversation. If the model was trained with assistant_only_loss=False, pass ${trainingArgument({ ...tok.training, chatLoss: 'all' })}; to score the assistant turns as this tool locates them anyway, knowing they may not be what TRL trained, pass ${trainingArgument({ ...tok.training, trainer: 'default' })}`,
    );
}

/** A prompt/completion's prompt as rendered alone; a chat template failing on it makes the record a bad one. */
function renderedPrompt(r: RenderedRecord, where: string): string {
  try {
    return r.prompt!();
  } catch (e) {
    if (!(e instanceof ChatTemplateError)) throw e;
    throw new DataError(
      `${where}: the conversational prompt alone, rendered with the generation prompt as TRL tokenizes it to find where the completion starts, fails: ${e.message}; TRL stops on such a record: edit or remove this line`,
    );
  }
}

/**
 * Refuses a text whose ids transformers 5 gives otherwise than tokenizer.json and transformers 4
 * (`ids`, cut to the record's length when `truncated`): TRL 1.16 runs on both, so which tokens the
 * model was trained on is unknown.
 */
function checkTransformers5(
  tok: TokenizerHandle,
  r: RenderedRecord,
  text: string,
  ids: readonly number[],
  truncated: boolean,
  where: string,
): void {
  const v5 = tok.transformers5;
  if (!v5) return;
  // cut to `ids` (truncated): only those tokens are compared, so only they are computed
  const other = truncated
    ? encodeHead((t) => ({ ids: v5.encode(t, r.rendering !== 'chat_template') }), text, ids.length).ids
    : v5.encode(text, r.rendering !== 'chat_template');
  const at = commonPrefix(other, ids);
  if (at === ids.length && (truncated || other.length === ids.length)) return;
  const show = (xs: readonly number[]) =>
    xs
      .slice(at, at + 3)
      .map((id) => JSON.stringify(tok.idToToken(id)))
      .join(' ');
  const what =
    r.kind === 'text'
      ? 'this text'
      : r.kind === 'prompt_completion'
        ? 'this record (its prompt + completion)'
        : 'this conversation as rendered';
  throw new DataError(
    `${where}: transformers 5 tokenizes ${what} otherwise than tokenizer.json and transformers 4 (token ${at}: ${show(other)} instead of ${show(ids)}): ${v5.why}. TRL 1.16 runs on either, so which tokens the model was trained on is unknown, and the "trl" trainer refuses the record: edit this line (e.g. remove a leading space) or remove it; if the model was trained with transformers 4, pass ${trainingArgument({ ...tok.training, trainer: 'default' })}, which keeps the other fields and follows tokenizer.json`,
  );
}

/**
 * The context length a checkpoint supports (config keys differ by architecture). A longrope model
 * (Phi-3.5, Phi-4-mini) gets its pre-training context (original_max_position_embeddings), where
 * transformers keeps the short RoPE factors: beyond it transformers switches every sequence of a
 * padded batch to the long ones, so a result would depend on which sequences share a batch.
 */
export function contextLength(config: Record<string, unknown>): number {
  // a longrope model (Phi-3.5, Phi-4-mini) is run only where transformers keeps its short factors
  const longrope = longropeContext(config);
  for (const k of ['max_position_embeddings', 'n_positions', 'n_ctx', 'seq_length']) {
    const v = config[k];
    if (v === undefined || v === null) continue;
    // 0 or a fraction is no context: read as "no limit" it let any length through
    if (!(typeof v === 'number' && Number.isInteger(v) && v > 0))
      throw new ConfigError(
        `config.json: "${k}" is ${JSON.stringify(v)}; it must be a positive integer (the model's context length)`,
      );
    return longrope === undefined ? v : Math.min(v, longrope);
  }
  return longrope ?? 2048;
}

/**
 * What `contextLength`'s number is, for messages: "the model's context", or for a longrope model
 * its pre-training context and why nothing longer is run.
 */
export function contextName(config: Record<string, unknown>): string {
  return longropeContext(config) === undefined
    ? "the model's context"
    : "the model's LongRoPE pre-training context (original_max_position_embeddings; beyond it transformers switches a padded batch to the long RoPE factors, so scores would depend on batching)";
}

/**
 * A query: the prompt is context, only the completion's tokens are explained. With `messages`
 * (a chat record), the conversation is rendered like training data and its last assistant turn
 * is the completion; `prompt`/`completion` are then ignored.
 */
function tokenizeQueryAs(
  tok: TokenizerHandle,
  prompt: string,
  completion: string,
  maxLength: number,
  messages?: unknown,
) {
  let text: string;
  let spans: Span[];
  let rendering: Rendering = 'plain';
  let promptLength: number;
  let rendered: RenderedRecord | undefined;
  if (messages !== undefined) {
    const r = renderForModel({ messages }, 'the query', tok.chatTemplate());
    // the reply explained is the last message: turns after it would be dropped without a word
    const last = (messages as Array<{ role?: unknown; content?: unknown }>).at(-1);
    if (last?.role !== 'assistant')
      throw new QueryError(
        `the last message must be the assistant's (the completion to explain); it is ${JSON.stringify(last?.role)}'s`,
      );
    if (last.content === '') throw new QueryError('the last assistant message is empty: there is nothing to explain');
    // TRL renders every conversation with the chat template and refuses one without it: the
    // training chats are refused under "trl" (refuseUntrained), so a stand-in query would be
    // explained by data rendered in a way the model never saw
    if (r.rendering === 'stand-in' && tok.training.trainer === 'trl')
      throw new QueryError(
        `the tokenizer has no chat template, and under the "${tok.training.name}" training convention (TRL's SFTTrainer) a conversation is only what its chat template renders: put the template the model was trained with beside tokenizer.json (chat_template.jinja), or explain the reply as a prompt and a completion`,
      );
    rendered = r;
    [promptLength] = r.last.span;
    text = r.text.slice(0, r.last.span[1]);
    spans = [r.last.span];
    rendering = r.rendering;
  } else {
    if (!completion) throw new QueryError('the completion is empty: there is nothing to explain');
    // as in a dataset's records (the CLI's query files are read as records): the tokenizer would
    // read an unpaired surrogate as U+FFFD, explaining another text than the one sent
    try {
      checkUnicode(prompt, 'the prompt');
      checkUnicode(completion, 'the completion');
    } catch (e) {
      if (e instanceof RecordShapeError) throw new QueryError(e.message);
      throw e;
    }
    text = prompt + completion;
    spans = [[prompt.length, text.length]];
    promptLength = prompt.length;
  }
  // the query explains the completion's text: an EOS after it is not part of what was highlighted
  const t = tokenizeText(tok, text, spans, maxLength, rendering, false);
  // a query far longer than the context is refused from the prefix tokenizeText read (a 10 MB line
  // tokenized whole took 51 s and 3.2 GB before it was refused): its tokens, less the margin for
  // the word cut at its end, are a lower bound on the whole text's
  if (t.truncated)
    throw new QueryError(
      t.truncatedAtLeast
        ? `prompt + completion is more than ${t.ids.length + t.truncated - headMargin(maxLength)} tokens (its first ${headOf(text, maxLength)!.length} of ${text.length} characters alone); the model takes ${maxLength}`
        : `prompt + completion is ${t.ids.length + t.truncated} tokens; the model takes ${maxLength}`,
    );
  // the text's first token is never predicted (no token before it): when it holds completion
  // characters (an empty prompt and no BOS), part of the completion would go unexplained silently
  const [first] = t.offsets;
  if (first && first[1] > first[0] && first[1] > spans[0][0] && first[0] < spans[0][1])
    throw new QueryError(
      `the completion starts the text (${promptLength ? 'its first token also holds the prompt' : 'the prompt is empty'} and the tokenizer adds no BOS): its first token ${JSON.stringify(text.slice(first[0], first[1]))} has no token before it to be predicted from, so it cannot be explained; give a prompt before the completion`,
    );
  if (!t.weights.some((w) => w > 0))
    throw new QueryError('no completion token to explain (the completion vanished in tokenization)');
  return { ...t, promptLength, rendered };
}

/**
 * What a query holds that the tokenizer has no token for: each such word becomes the unknown
 * token (e.g. <unk>), so the model is explained predicting <unk> there, not the word (a
 * word-level tokenizer read " Cairo" as <unk>, scored like any word). A warning, not a
 * refusal: the score is still the model's; undefined when there is none (or no unknown token).
 */
export function unknownWordsWarning(
  tok: TokenizerHandle,
  q: {
    ids: readonly number[];
    offsets: ReadonlyArray<readonly [number, number]>;
    text: string;
    promptLength: number;
    /** a chat query's rendering: only its messages' text is the person's (not the template's markup) */
    rendered?: { pieces: ReadonlyArray<{ start: number; end: number }> };
  },
): string | undefined {
  const unk = tok.unkToken;
  if (!unk) return undefined;
  const written = (s: number, e: number) => !q.rendered || q.rendered.pieces.some((p) => s < p.end && e > p.start);
  const words = { completion: new Set<string>(), prompt: new Set<string>() };
  for (let i = 0; i < q.ids.length; i++) {
    if (q.ids[i] !== unk.id) continue;
    const [s, e] = q.offsets[i];
    if (!written(s, e)) continue; // a chat template's (or the stand-in's) own markup
    const word = q.text.slice(s, e).trim();
    if (!word || word === unk.text) continue; // the unknown token written as itself
    words[e > q.promptLength ? 'completion' : 'prompt'].add(word);
  }
  const list = (w: Set<string>) =>
    [...w]
      .slice(0, 5)
      .map((x) => JSON.stringify(x))
      .join(', ') + (w.size > 5 ? `, … (${w.size} in all)` : '');
  const parts = [
    words.completion.size ? `the completion's ${list(words.completion)}` : '',
    words.prompt.size ? `the prompt's ${list(words.prompt)}` : '',
  ].filter(Boolean);
  if (!parts.length) return undefined;
  return `${parts.join(' and ')} ${words.completion.size + words.prompt.size > 1 ? 'are' : 'is'} not in the tokenizer's vocabulary: the model reads ${words.completion.size + words.prompt.size > 1 ? 'each' : 'it'} as its unknown token ${unk.text} (id ${unk.id}), so the scores explain ${unk.text} there, not ${words.completion.size + words.prompt.size > 1 ? 'those words' : 'that word'}`;
}

/** Characters of a text tokenized to know its first tokens (or that a query cannot fit), per token of the context. */
const PREFIX_CHARS_PER_TOKEN = 64;

/** Tokens past `maxLength` that a prefix's encoding must reach: its last words may be cut. */
function headMargin(maxLength: number): number {
  return Math.max(16, Math.ceil(maxLength / 100));
}

/** `text` cut after `maxLength` × PREFIX_CHARS_PER_TOKEN characters (never inside a surrogate pair), or undefined when shorter. */
function headOf(text: string, maxLength: number): string | undefined {
  let cap = maxLength * PREFIX_CHARS_PER_TOKEN;
  if (text.length <= cap) return undefined;
  const c = text.charCodeAt(cap - 1);
  if (c >= 0xd800 && c <= 0xdbff) cap--;
  return text.slice(0, cap);
}

/**
 * An encoding whose first `maxLength` tokens are the whole text's: of a prefix when the text is
 * far longer than the context (its tokens beyond the first maxLength are never read), else of the
 * whole text. A 50 MB record was tokenized whole to keep 128 tokens: 2.5 minutes, then V8 ran
 * out of memory (5 MB took 15 s and 1.7 GB). The prefix is used only when its tokens pass
 * maxLength by `headMargin`, so the words its end cuts lie past the tokens kept; otherwise the
 * whole text is encoded, as before.
 */
function encodeHead<E extends { ids: readonly number[]; trailing?: number }>(
  encode: (text: string) => E,
  text: string,
  maxLength: number,
): E {
  const head = headOf(text, maxLength);
  if (head !== undefined) {
    const e = encode(head);
    if (e.ids.length - (e.trailing ?? 0) - headMargin(maxLength) > maxLength) return e;
  }
  return encode(text);
}

export function tokenizeQuery(
  tok: TokenizerHandle,
  prompt: string,
  completion: string,
  maxLength: number,
  messages?: unknown,
): ReturnType<typeof tokenizeQueryAs> {
  try {
    return tokenizeQueryAs(tok, prompt, completion, maxLength, messages);
  } catch (e) {
    // a malformed `messages` is the request's, not a dataset file's
    if (e instanceof DataError) throw new QueryError(e.message);
    throw e;
  }
}

/** Why examples have no trained token: too short to have a next token, or cut before it. */
export function describeUntrained(tokens: Array<{ ids: number[]; weights: number[] }>, limit: number): string {
  const untrained = tokens.filter((t) => !t.weights.some((w) => w > 0));
  const short = untrained.filter((t) => t.ids.length < 2).length;
  const cut = untrained.length - short;
  return [
    short ? `${short} of a single token, with no next token to predict` : '',
    cut ? `${cut} whose trained part lies past the cut at ${limit} tokens` : '',
  ]
    .filter(Boolean)
    .join('; ');
}

/** Every example of a dataset, tokenized for the model; `truncated` counts examples cut to fit. */
export function tokenizeExamples(
  tok: TokenizerHandle,
  examples: ReadonlyArray<{ record: unknown; line: number }>,
  maxLength: number,
  where = 'line',
): { tokens: TokenizedText[]; truncated: number } {
  const tokens = examples.map((e) => tokenizeRecord(tok, e.record, `${where}:${e.line}`, maxLength));
  return { tokens, truncated: tokens.filter((t) => t.truncated > 0).length };
}
