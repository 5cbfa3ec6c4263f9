// Training records and how they become model text, plus which characters the training loss
// scored. Influence is computed on the same loss the model was trained with, so the spans
// here must match the fine-tuning convention: prompts and user turns are context, not targets.
import { DataError } from './errors';

/** A character range [start, end) in UTF-16 code units (JS string indices). */
export type Span = [number, number];

export type RecordKind = 'text' | 'prompt_completion' | 'messages';

export interface FormattedRecord {
  kind: RecordKind;
  text: string;
  /** Character ranges whose tokens the training loss scores. */
  spans: Span[];
}

export interface ChatMessage {
  role: string;
  content: string;
}

export const ACCEPTED_SHAPES =
  'accepted shapes: {"text": string}, {"prompt": string, "completion": string}, ' +
  '{"messages": [{"role": string, "content": string}, ...]}';

// Roles go inside `<|role|>` markers, so they must not be able to forge or break one.
const ROLE_PATTERN = /^[A-Za-z0-9_.-]+$/;

/**
 * The chat template: each message becomes `<|role|>\n` + content + `\n`, concatenated, e.g.
 * `<|user|>\nWhat is the capital of France?\n<|assistant|>\nParis\n`. Spans cover each assistant
 * content plus its trailing `\n`, so the model is also scored on learning where to stop.
 * The server renders queries with this same function so queries and training data agree.
 */
export function renderMessages(messages: readonly ChatMessage[]): { text: string; spans: Span[] } {
  let text = '';
  const spans: Span[] = [];
  for (const m of messages) {
    text += `<|${m.role}|>\n`;
    const start = text.length;
    text += `${m.content}\n`;
    if (m.role === 'assistant') spans.push([start, text.length]);
  }
  return { text, spans };
}

/**
 * prompt + completion are concatenated with no separator: the user controls spacing (e.g. a
 * completion starting with ' ' or '\n'), exactly as most fine-tuning scripts do.
 */
export function promptCompletionSpans(prompt: string, completion: string): Span[] {
  return [[prompt.length, prompt.length + completion.length]];
}

/** Validates a parsed JSONL value and renders it; `where` (usually `file:line`) prefixes errors. */
export function formatRecord(value: unknown, where: string): FormattedRecord {
  const fail = (what: string): never => {
    throw new DataError(`${where}: ${what}; ${ACCEPTED_SHAPES}`);
  };
  if (typeof value !== 'object' || value === null || Array.isArray(value)) {
    return fail(`expected a JSON object, got ${describe(value)}`);
  }
  const rec = value as Record<string, unknown>;
  const present = ['text', 'prompt', 'messages'].filter((k) => k in rec);
  if (present.length === 0 && 'completion' in rec) return fail('"completion" without "prompt"');
  if (present.length === 0) return fail('no "text", "prompt" or "messages" field');
  if (present.length > 1) return fail(`ambiguous record with both ${present.map((k) => `"${k}"`).join(' and ')}`);

  if ('text' in rec) {
    if (typeof rec.text !== 'string') return fail(`"text" must be a string, got ${describe(rec.text)}`);
    // An empty text has no tokens, hence no gradient: almost certainly a data bug.
    if (rec.text === '') return fail('"text" is empty');
    return { kind: 'text', text: rec.text, spans: [[0, rec.text.length]] };
  }

  if ('prompt' in rec) {
    if (typeof rec.prompt !== 'string') return fail(`"prompt" must be a string, got ${describe(rec.prompt)}`);
    if (!('completion' in rec)) return fail('"prompt" without "completion"');
    if (typeof rec.completion !== 'string') {
      return fail(`"completion" must be a string, got ${describe(rec.completion)}`);
    }
    if (rec.completion === '') return fail('"completion" is empty, so nothing is trained on');
    return {
      kind: 'prompt_completion',
      text: rec.prompt + rec.completion,
      spans: promptCompletionSpans(rec.prompt, rec.completion),
    };
  }

  const msgs = rec.messages;
  if (!Array.isArray(msgs)) return fail(`"messages" must be an array, got ${describe(msgs)}`);
  if (msgs.length === 0) return fail('"messages" is empty');
  const messages: ChatMessage[] = msgs.map((m, i) => {
    if (typeof m !== 'object' || m === null || Array.isArray(m)) {
      return fail(`messages[${i}] must be an object, got ${describe(m)}`);
    }
    const { role, content } = m as Record<string, unknown>;
    if (typeof role !== 'string' || !ROLE_PATTERN.test(role)) {
      return fail(`messages[${i}].role must be a name like "user" or "assistant", got ${describe(role)}`);
    }
    if (typeof content !== 'string') return fail(`messages[${i}].content must be a string, got ${describe(content)}`);
    return { role, content };
  });
  if (!messages.some((m) => m.role === 'assistant')) {
    return fail('"messages" has no "assistant" turn, so nothing is trained on');
  }
  return { kind: 'messages', ...renderMessages(messages) };
}

/**
 * Per-position loss weights under the convention "position t predicts token t+1": weight[t] is 1
 * when token t+1 overlaps a span, else 0. The last position predicts nothing, so it is always 0.
 * `offsets` are the tokenizer's per-token character ranges; tokens with an empty range (special
 * tokens such as BOS, often [0, 0]) never overlap. A token straddling a span edge counts, since
 * its prediction does involve scored characters.
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

function describe(v: unknown): string {
  if (v === undefined) return 'nothing';
  if (v === null) return 'null';
  if (Array.isArray(v)) return 'an array';
  if (typeof v === 'object') return 'an object';
  const s = JSON.stringify(v);
  return `${typeof v} ${s.length > 40 ? `${s.slice(0, 37)}...` : s}`;
}
