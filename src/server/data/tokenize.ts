// Rendered records → token ids and per-position loss weights, the unit every graph consumes.
// Sequences longer than the model's context are cut at the end (the count is reported, never
// silent); the loss weights follow the cut.
import type { TokenizerHandle } from '../model/tokenizer';
import { DataError } from './errors';
import { type Span, targetWeightsFromOffsets } from './format';

export interface TokenizedText {
  ids: number[];
  /** per position t: 1 if the loss scores token t+1 */
  weights: number[];
  /** character range of each token in the text (UTF-16 units) */
  offsets: Array<[number, number]>;
  /** tokens dropped at the end to fit the context */
  truncated: number;
}

export function tokenizeText(tok: TokenizerHandle, text: string, spans: Span[], maxLength: number): TokenizedText {
  const enc = tok.encode(text);
  let { ids, offsets } = enc;
  let truncated = 0;
  if (ids.length > maxLength) {
    truncated = ids.length - maxLength;
    ids = ids.slice(0, maxLength);
    offsets = offsets.slice(0, maxLength);
  }
  return { ids, offsets, weights: targetWeightsFromOffsets(offsets, spans), truncated };
}

/** The context length a checkpoint supports (config keys differ by architecture). */
export function contextLength(config: Record<string, unknown>): number {
  for (const k of ['max_position_embeddings', 'n_positions', 'n_ctx', 'seq_length']) {
    const v = config[k];
    if (typeof v === 'number' && v > 0) return v;
  }
  return 2048;
}

/** A query: the prompt is context, only the completion's tokens are explained. */
export function tokenizeQuery(tok: TokenizerHandle, prompt: string, completion: string, maxLength: number) {
  if (!completion) throw new DataError('the completion is empty: there is nothing to explain');
  const text = prompt + completion;
  const t = tokenizeText(tok, text, [[prompt.length, text.length]], maxLength);
  if (t.truncated)
    throw new DataError(`prompt + completion is ${t.ids.length + t.truncated} tokens; the model takes ${maxLength}`);
  if (!t.weights.some((w) => w > 0))
    throw new DataError('no completion token to explain (the completion vanished in tokenization)');
  return { ...t, text, promptLength: prompt.length };
}

/** Every example of a dataset, tokenized for the model; `truncated` counts examples cut to fit. */
export function tokenizeExamples(
  tok: TokenizerHandle,
  examples: Array<{ text: string; spans: Span[] }>,
  maxLength: number,
): { tokens: TokenizedText[]; truncated: number } {
  const tokens = examples.map((e) => tokenizeText(tok, e.text, e.spans, maxLength));
  return { tokens, truncated: tokens.filter((t) => t.truncated > 0).length };
}
