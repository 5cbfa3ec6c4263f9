// The three accepted JSONL record shapes, validated once for the server (dataset loading, the
// `tokenize` command) and the editor (selection parser, hovers). Pure: no Node or VS Code imports.

export interface ChatMessage {
  role: string;
  content: string;
}

export type RecordValue =
  | { kind: 'text'; text: string }
  | { kind: 'prompt_completion'; prompt: string; completion: string }
  | { kind: 'messages'; messages: ChatMessage[] };

export type RecordKind = RecordValue['kind'];

export const ACCEPTED_SHAPES =
  'accepted shapes: {"text": string}, {"prompt": string, "completion": string}, ' +
  '{"messages": [{"role": string, "content": string}, ...]}';

// Roles go inside the stand-in's `<|role|>` markers, so they must not be able to forge or break one.
export const ROLE_PATTERN = /^[A-Za-z0-9_.-]+$/;

/** Problems a person can act on; `shape` is true when the value is not a record at all. */
export class RecordShapeError extends Error {
  constructor(
    message: string,
    readonly notARecord = false,
  ) {
    super(message);
  }
}

/** Validates a parsed JSONL value; throws RecordShapeError with a short reason otherwise. */
export function recordValue(value: unknown): RecordValue {
  const fail = (what: string, notARecord = false): never => {
    throw new RecordShapeError(what, notARecord);
  };
  if (typeof value !== 'object' || value === null || Array.isArray(value)) {
    return fail(`expected a JSON object, got ${describe(value)}`, true);
  }
  const rec = value as Record<string, unknown>;
  const present = ['text', 'prompt', 'messages'].filter((k) => k in rec);
  if (present.length === 0 && 'completion' in rec) return fail('"completion" without "prompt"');
  if (present.length === 0) return fail('no "text", "prompt" or "messages" field', true);
  if (present.length > 1) return fail(`ambiguous record with both ${present.map((k) => `"${k}"`).join(' and ')}`);

  if ('text' in rec) {
    if (typeof rec.text !== 'string') return fail(`"text" must be a string, got ${describe(rec.text)}`);
    // An empty text has no tokens, hence no gradient: almost certainly a data bug.
    if (rec.text === '') return fail('"text" is empty');
    return { kind: 'text', text: rec.text };
  }

  if ('prompt' in rec) {
    if (typeof rec.prompt !== 'string') return fail(`"prompt" must be a string, got ${describe(rec.prompt)}`);
    if (!('completion' in rec)) return fail('"prompt" without "completion"');
    if (typeof rec.completion !== 'string') {
      return fail(`"completion" must be a string, got ${describe(rec.completion)}`);
    }
    if (rec.completion === '') return fail('"completion" is empty, so nothing is trained on');
    return { kind: 'prompt_completion', prompt: rec.prompt, completion: rec.completion };
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
  return { kind: 'messages', messages };
}

export function describe(v: unknown): string {
  if (v === undefined) return 'nothing';
  if (v === null) return 'null';
  if (Array.isArray(v)) return 'an array';
  if (typeof v === 'object') return 'an object';
  const s = JSON.stringify(v);
  return `${typeof v} ${s.length > 40 ? `${s.slice(0, 37)}...` : s}`;
}
