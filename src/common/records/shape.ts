// The accepted JSONL record shapes, validated once for the server (dataset loading, the
// `tokenize` command) and the editor (selection parser, hovers). Pure: no Node or VS Code imports.

export interface ChatMessage {
  role: string;
  content: string;
  /** a participant's name, handed to the chat template as written */
  name?: string;
}

export type RecordValue =
  | { kind: 'text'; text: string }
  | { kind: 'prompt_completion'; prompt: string; completion: string }
  | {
      kind: 'messages';
      messages: ChatMessage[];
      /**
       * the first message whose assistant turns are trained on (TRL's conversational
       * prompt-completion: the prompt's messages are context); 0 for a "messages" record
       */
      scoredFrom: number;
      /** where each message is in the record ("messages[2]", "completion[0]"): names fields in errors and offsets */
      paths: string[];
    };

export type RecordKind = RecordValue['kind'];

export const ACCEPTED_SHAPES =
  'accepted shapes: {"text": string}, {"prompt": string, "completion": string}, ' +
  '{"messages": [{"role": string, "content": string}, ...]}, ' +
  '{"prompt": [messages], "completion": [messages]}';

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

/** Message keys read: role and content (and a name, handed to the template). */
const MESSAGE_KEYS = new Set(['role', 'content', 'name']);

/**
 * Record keys of formats that are not supervised fine-tuning records as accepted here, with what
 * to do. Checked before the accepted shapes: their records may also carry "prompt".
 */
function otherFormat(rec: Record<string, unknown>): string | undefined {
  if ('chosen' in rec || 'rejected' in rec)
    return 'a preference pair ("chosen"/"rejected", as for DPO), not a supervised fine-tuning record: explain the fine-tune with the records it was trained on (e.g. {"prompt": ..., "completion": <chosen>})';
  if ('prompt' in rec && 'completion' in rec && typeof rec.label === 'boolean')
    return 'a KTO record ("label" true/false marks it desirable or not), which a trainer pushes up or down: not a supervised fine-tuning record; keep the desirable ones as {"prompt", "completion"} records without "label"';
  // the other formats' own columns only when no accepted field is there (an Alpaca export with
  // "text", which TRL trains on, is a text record)
  const accepted = ['text', 'prompt', 'messages'].some((k) => k in rec);
  if (!accepted && Array.isArray(rec.conversations))
    return 'a ShareGPT record ("conversations" with "from"/"value"): write it as {"messages": [{"role": ..., "content": ...}, ...]} (human → user, gpt → assistant, system → system), as TRL converts it';
  if (!accepted && 'instruction' in rec && 'output' in rec)
    return 'an Alpaca record ("instruction"/"input"/"output"): write it as {"prompt": ..., "completion": ...} with the prompt template your trainer applied, or as {"messages": [...]}';
  if (rec.tools !== undefined && rec.tools !== null)
    return '"tools" (tool definitions the chat template writes into the prompt) is not supported yet: these records cannot be rendered as the model saw them';
  if (rec.chat_template_kwargs !== undefined && rec.chat_template_kwargs !== null)
    return '"chat_template_kwargs" is not supported: the record cannot be rendered as the model saw it';
  return undefined;
}

/**
 * An unpaired UTF-16 surrogate (JSON "\ud800" with no partner) is not Unicode text: Python's
 * tokenizers refuse such a string, so no trainer saw this record as written, and byte-level
 * tokenizers here would read it as U+FFFD.
 */
const LONE_SURROGATE = /[\uD800-\uDBFF](?![\uDC00-\uDFFF])|(?<![\uD800-\uDBFF])[\uDC00-\uDFFF]/;

export function checkUnicode(s: string, field: string): void {
  const m = LONE_SURROGATE.exec(s);
  if (m)
    throw new RecordShapeError(
      `${field} holds an unpaired surrogate (\\u${m[0].charCodeAt(0).toString(16)} at character ${m.index}), which is not valid Unicode: no tokenizer reads it as written`,
    );
}

/** Validates a parsed JSONL value; throws RecordShapeError with a short reason otherwise. */
export function recordValue(value: unknown): RecordValue {
  const fail = (what: string, notARecord = false): never => {
    throw new RecordShapeError(what, notARecord);
  };
  if (typeof value !== 'object' || value === null || Array.isArray(value)) {
    return fail(`expected a JSON object, got ${describe(value)}`, true);
  }
  // a null field is an absent one: datasets' to_json writes every column of a mixed dataset
  const rec = Object.fromEntries(
    Object.entries(value as Record<string, unknown>).filter(([, v]) => v !== null),
  ) as Record<string, unknown>;
  const other = otherFormat(rec);
  if (other) return fail(other);
  const present = ['text', 'prompt', 'messages'].filter((k) => k in rec);
  if (present.length === 0 && 'completion' in rec)
    return fail(
      (value as Record<string, unknown>).prompt === null
        ? '"completion" with a null "prompt" (a null field counts as absent, as datasets\' to_json writes missing columns)'
        : '"completion" without "prompt"',
    );
  if (present.length === 0) return fail('no "text", "prompt" or "messages" field', true);
  if (present.length > 1) return fail(`ambiguous record with both ${present.map((k) => `"${k}"`).join(' and ')}`);

  if ('text' in rec) {
    if (typeof rec.text !== 'string') return fail(`"text" must be a string, got ${describe(rec.text)}`);
    // An empty text has no tokens, hence no gradient: almost certainly a data bug.
    if (rec.text === '') return fail('"text" is empty');
    checkUnicode(rec.text, '"text"');
    return { kind: 'text', text: rec.text };
  }

  if ('prompt' in rec) {
    if (!('completion' in rec)) return fail('"prompt" without "completion"');
    if (Array.isArray(rec.prompt) || Array.isArray(rec.completion)) {
      // TRL's conversational prompt-completion: the completion's messages are trained on
      if (!Array.isArray(rec.prompt) || !Array.isArray(rec.completion))
        return fail('"prompt" and "completion" must both be strings or both be lists of messages');
      const prompt = messageList(rec.prompt, 'prompt');
      const completion = messageList(rec.completion, 'completion');
      if (completion.length === 0) return fail('"completion" is empty, so nothing is trained on');
      if (!completion.some((m) => m.role === 'assistant'))
        return fail('"completion" has no "assistant" message, so nothing is trained on');
      return {
        kind: 'messages',
        messages: [...prompt, ...completion],
        scoredFrom: prompt.length,
        paths: [...prompt.map((_, i) => `prompt[${i}]`), ...completion.map((_, i) => `completion[${i}]`)],
      };
    }
    if (typeof rec.prompt !== 'string') return fail(`"prompt" must be a string, got ${describe(rec.prompt)}`);
    if (typeof rec.completion !== 'string') {
      return fail(`"completion" must be a string, got ${describe(rec.completion)}`);
    }
    if (rec.completion === '') return fail('"completion" is empty, so nothing is trained on');
    checkUnicode(rec.prompt, '"prompt"');
    checkUnicode(rec.completion, '"completion"');
    return { kind: 'prompt_completion', prompt: rec.prompt, completion: rec.completion };
  }

  const msgs = rec.messages;
  if (!Array.isArray(msgs)) return fail(`"messages" must be an array, got ${describe(msgs)}`);
  if (msgs.length === 0) return fail('"messages" is empty');
  const messages = messageList(msgs, 'messages');
  if (!messages.some((m) => m.role === 'assistant')) {
    return fail('"messages" has no "assistant" turn, so nothing is trained on');
  }
  return { kind: 'messages', messages, scoredFrom: 0, paths: messages.map((_, i) => `messages[${i}]`) };
}

/** A list of chat messages at `field` ("messages", "prompt", "completion"). */
function messageList(list: unknown[], field: string): ChatMessage[] {
  return list.map((m, i) => {
    const at = `${field}[${i}]`;
    if (typeof m !== 'object' || m === null || Array.isArray(m))
      throw new RecordShapeError(`${at} must be an object, got ${describe(m)}`);
    const msg = m as Record<string, unknown>;
    // a key the chat template may read (tool calls, reasoning, a per-turn loss switch) changes
    // what the model saw or was trained on: refused rather than dropped
    // (null, or an empty list of tool calls, is the key's absence: datasets writes them for mixed rows)
    const extra = Object.keys(msg).filter(
      (k) => !MESSAGE_KEYS.has(k) && msg[k] !== null && !(Array.isArray(msg[k]) && (msg[k] as unknown[]).length === 0),
    );
    if (extra.length)
      throw new RecordShapeError(
        `${at} has ${extra.map((k) => `"${k}"`).join(', ')}, which is not read (only "role", "content" and "name" are): ` +
          `tool calls, reasoning and per-turn loss switches change what the model saw or was trained on, so such records are refused rather than scored without them`,
      );
    const { role, content, name } = msg;
    if (typeof role !== 'string' || !ROLE_PATTERN.test(role))
      throw new RecordShapeError(`${at}.role must be a name like "user" or "assistant", got ${describe(role)}`);
    if (typeof content !== 'string')
      throw new RecordShapeError(`${at}.content must be a string, got ${describe(content)}`);
    checkUnicode(content, `${at}.content`);
    if (name === undefined || name === null) return { role, content };
    if (typeof name !== 'string') throw new RecordShapeError(`${at}.name must be a string, got ${describe(name)}`);
    checkUnicode(name, `${at}.name`);
    return { role, content, name };
  });
}

export function describe(v: unknown): string {
  if (v === undefined) return 'nothing';
  if (v === null) return 'null';
  if (Array.isArray(v)) return 'an array';
  if (typeof v === 'object') return 'an object';
  const s = JSON.stringify(v);
  return `${typeof v} ${s.length > 40 ? `${s.slice(0, 37)}...` : s}`;
}
