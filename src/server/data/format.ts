// Training records and how they become model text, plus which characters the training loss
// scored. Influence is computed on the same loss the model was trained with, so the spans
// here must match the fine-tuning convention: prompts and user turns are context, not targets.
// Validation and rendering live in src/common/records/ (shared with the editor); this file
// adds the server's error type and the token-level loss weights.
import type { ChatTemplate } from '../../common/records/chat-template';
import { type RenderedRecord, renderRecord, renderStandIn, type Span } from '../../common/records/render';
import {
  ACCEPTED_SHAPES,
  type ChatMessage,
  type RecordKind,
  RecordShapeError,
  type RecordValue,
  recordValue,
} from '../../common/records/shape';
import { DataError } from './errors';

export type { ChatMessage, RecordKind, RecordValue, RenderedRecord, Span };
export { ACCEPTED_SHAPES };

export interface FormattedRecord {
  kind: RecordKind;
  text: string;
  /** Character ranges whose tokens the training loss scores. */
  spans: Span[];
}

/**
 * The stand-in chat rendering (models without a chat template): each message becomes
 * `<|role|>\n` + content + `\n`, e.g. `<|user|>\nWhat is the capital of France?\n<|assistant|>\nParis\n`.
 * Spans cover each assistant content plus its trailing `\n`, so the model is also scored on
 * learning where to stop.
 */
export function renderMessages(messages: readonly ChatMessage[]): { text: string; spans: Span[] } {
  const r = renderStandIn({
    kind: 'messages',
    messages: [...messages],
    scoredFrom: 0,
    paths: messages.map((_, i) => `messages[${i}]`),
  });
  return { text: r.text, spans: r.spans };
}

/**
 * prompt + completion are concatenated with no separator: the user controls spacing (e.g. a
 * completion starting with ' ' or '\n'), exactly as most fine-tuning scripts do.
 */
export function promptCompletionSpans(prompt: string, completion: string): Span[] {
  return [[prompt.length, prompt.length + completion.length]];
}

/** Validates a parsed JSONL value; `where` (usually `file:line`) prefixes errors. */
export function parseRecord(value: unknown, where: string): RecordValue {
  try {
    return recordValue(value);
  } catch (e) {
    if (e instanceof RecordShapeError) throw new DataError(`${where}: ${e.message}; ${ACCEPTED_SHAPES}`);
    throw e;
  }
}

/** Validates and renders with the stand-in (model-independent): what dataset loading keeps. */
export function formatRecord(value: unknown, where: string): FormattedRecord {
  const r = renderRecord(parseRecord(value, where));
  return { kind: r.kind, text: r.text, spans: r.spans };
}

/** Renders a record for a model: messages through its chat template when it has one. */
export function renderForModel(value: unknown, where: string, template: ChatTemplate | undefined): RenderedRecord {
  const v = parseRecord(value, where);
  try {
    return renderRecord(v, template);
  } catch (e) {
    throw new DataError(`${where}: ${(e as Error).message}`);
  }
}

/**
 * Per-position loss weights under the convention "position t predicts token t+1": weight[t] is 1
 * when token t+1 overlaps a span, else 0. The last position predicts nothing, so it is always 0.
 * `offsets` are the characters each token's bytes come from (see Encoded.sources); special tokens
 * a post-processor adds (BOS) have an empty range and never overlap. A token straddling a span
 * edge counts, since its prediction does involve scored characters (as transformers'
 * return_assistant_tokens_mask marks every token from the one holding a span's first character
 * to the one holding its last).
 */
export function targetWeightsFromOffsets(offsets: readonly Span[], spans: readonly Span[]): number[] {
  const weights = new Array<number>(offsets.length).fill(0);
  for (let t = 0; t + 1 < offsets.length; t++) {
    const [ts, te] = offsets[t + 1];
    if (te <= ts) continue;
    for (const [s, e] of spans) {
      if (ts < e && te > s) {
        weights[t] = 1;
        break;
      }
    }
  }
  return weights;
}
