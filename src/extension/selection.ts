// What is prompt and what is completion, from an editor selection. Pure (no `vscode`): offsets
// are UTF-16 code units into the document text, as `TextDocument.offsetAt` counts them.
//
// 1. The selection is one whole JSONL record with "prompt"/"completion" or "messages": it is
//    split by its fields (completion = the completion field, or the last assistant turn).
// 2. The selection lies inside one string field of a JSONL record (e.g. ` Sydney` inside
//    "completion"): completion = the selected decoded text, prompt = the record's rendered
//    text before it, JSON escapes decoded.
// 3. Anything else: completion = the selection, prompt = the document text before it (at most
//    `maxPromptChars`, cut at a line start when one is near), CRLF line breaks read as \n.
//    Not in a JSONL dataset (`jsonl`): there the text before a selection is other records' JSON,
//    never a prompt, so a selection that is neither 1 nor 2 is refused, saying why.
import type { ChatTemplate } from '../common/records/chat-template';
import { decodedRange, parseJsonWithSource } from './jsonl/json-source';
import { documentRange, parseRecordLine, type RecordField, type RenderedRecord, renderRecord } from './jsonl/record';

export interface QuerySplit {
  prompt: string;
  completion: string;
  /** 'record': a whole record split by its fields; 'field': inside one field; 'text': plain text */
  how: 'record' | 'field' | 'text';
  /** in words, for the UI ("prompt/completion record", "completion field of line 12", ...) */
  description: string;
  /** the document range of each completion unit (for the editor heatmap) */
  completionStarts: number[];
  completionEnds: number[];
  /** the prompt was cut to `maxPromptChars` */
  promptTruncated: boolean;
  /** a whole chat record: the conversation, which the server renders with the model's chat
   * template (prompt/completion above are then this side's rendering, for display) */
  messages?: Array<{ role: string; content: string }>;
  /** what the person should know about how the selection was read (a chat reply explained whole) */
  note?: string;
}

export type SplitResult = { ok: true; split: QuerySplit } | { ok: false; message: string };

export interface SplitOptions {
  /** longest prompt taken from the text before a plain selection (default 4000) */
  maxPromptChars?: number;
  /** the model's chat template, so chat records split as the server renders them (else the stand-in) */
  chatTemplate?: ChatTemplate;
  /** the document is a JSONL dataset: a selection is read by its records only (never as plain text) */
  jsonl?: boolean;
}

const NOT_A_RECORD = new Set(['not a JSON object', 'no "text", "prompt" or "messages" field']);

export function splitSelection(doc: string, start: number, end: number, options: SplitOptions = {}): SplitResult {
  if (end < start) [start, end] = [end, start];
  if (end === start) return { ok: false, message: 'Select the completion to explain (nothing is selected).' };
  const selected = doc.slice(start, end);

  // 1. a whole record
  const lead = selected.length - selected.trimStart().length;
  const trimmed = selected.trim();
  if (trimmed.startsWith('{') && trimmed.endsWith('}')) {
    const base = start + lead;
    let rendered: RenderedRecord | string | undefined;
    try {
      rendered = renderRecord(parseJsonWithSource(trimmed, base), options.chatTemplate);
    } catch {
      const first = trimmed.split('\n', 1)[0].trim();
      if (first !== trimmed && typeof parseRecordLine(first, base, options.chatTemplate) !== 'string')
        return { ok: false, message: 'The selection holds more than one JSONL record: select one record.' };
    }
    if (rendered !== undefined && !(typeof rendered === 'string' && NOT_A_RECORD.has(rendered))) {
      if (typeof rendered === 'string')
        return { ok: false, message: `The selected record is not usable: ${rendered}.` };
      if (!rendered.split)
        return {
          ok: false,
          message:
            'A {"text"} record has no completion: select the part of its text to explain, and the text before it becomes the prompt.',
        };
      const { promptEnd, completionEnd } = rendered.split;
      if (completionEnd <= promptEnd) return { ok: false, message: 'The selected record has an empty completion.' };
      return {
        ok: true,
        split: fromRecord(rendered, promptEnd, completionEnd, 'record', describeRecord(rendered, doc, base)),
      };
    }
  }

  // 2. inside one field of a record
  const lineStart = doc.lastIndexOf('\n', start - 1) + 1;
  let lineEnd = doc.indexOf('\n', start);
  if (lineEnd < 0) lineEnd = doc.length;
  if (end <= lineEnd) {
    const line = doc.slice(lineStart, lineEnd).replace(/\r$/, '');
    if (line.trimStart().startsWith('{')) {
      const rendered = parseRecordLine(line, lineStart, options.chatTemplate);
      // a training record the server refuses (a message with "tool_calls" or a "weight", content
      // as a list of parts): its text before the selection is JSON, never a prompt, so refused
      // with the reason rather than read as plain text
      if (typeof rendered === 'string' && !rendered.startsWith('not valid JSON') && !NOT_A_RECORD.has(rendered))
        return { ok: false, message: `The record on line ${lineNumberAt(doc, start)} is not usable: ${rendered}.` };
      if (typeof rendered !== 'string') {
        const f = rendered.fields.find((x) => start >= x.source.start + 1 && end <= x.source.end - 1);
        if (!f)
          return {
            ok: false,
            message:
              'Select a whole JSONL record, or text inside one of its fields (prompt, completion, text or a message content).',
          };
        const [a, b] = wholeCharacters(f.source.value, ...decodedRange(f.source, start, end));
        if (b <= a) return { ok: false, message: 'The selection holds no text of the field.' };
        const lineNo = lineNumberAt(doc, start);
        // a chat: explained as the server renders it, with the model's chat template, one whole
        // assistant reply at a time (the stand-in rendering of its text would be a prompt the model never saw)
        if (rendered.value.kind === 'messages')
          return chatTurn(line, lineStart, rendered, f, a, b, lineNo, options.chatTemplate);
        return {
          ok: true,
          split: fromRecord(rendered, f.offset + a, f.offset + b, 'field', `the ${f.name} field of line ${lineNo}`),
        };
      }
    }
  }

  if (options.jsonl) return { ok: false, message: notInOneRecord(doc, start, end, lineStart, options.chatTemplate) };

  // 3. plain text
  const max = options.maxPromptChars ?? 4000;
  let from = Math.max(0, start - max);
  const truncated = from > 0;
  if (truncated) {
    // start at a line when one begins in the first quarter of the window
    const nl = doc.indexOf('\n', from);
    if (nl >= 0 && nl < start && nl - from < max / 4) from = nl + 1;
    // never start on the second half of a surrogate pair
    const c = doc.charCodeAt(from);
    if (c >= 0xdc00 && c <= 0xdfff) from++;
  }
  // a CRLF file's line breaks are sent as \n, as the same text in a JSONL record decodes: the
  // model's tokens (and its scores) must not depend on how the editor saved the file
  const starts: number[] = [];
  const ends: number[] = [];
  let completion = '';
  // a selection that ends between \r and \n leaves its \r out, as the LF file has none
  const n = selected.endsWith('\r') && doc[end] === '\n' ? selected.length - 1 : selected.length;
  for (let i = 0; i < n; i++) {
    const crlf = selected[i] === '\r' && selected[i + 1] === '\n';
    starts.push(start + i);
    ends.push(start + i + (crlf ? 2 : 1));
    completion += crlf ? '\n' : selected[i];
    if (crlf) i++;
  }
  return {
    ok: true,
    split: {
      // (a selection that starts inside a CRLF leaves its \r to the prompt: dropped too)
      prompt: doc
        .slice(from, start)
        .replace(/\r\n/g, '\n')
        .replace(/\r$/, selected.startsWith('\n') ? '' : '\r'),
      completion,
      how: 'text',
      description: truncated ? `the selection, after the ${start - from} characters before it` : 'the selection',
      completionStarts: starts,
      completionEnds: ends,
      promptTruncated: truncated,
    },
  };
}

/** The document range of completion units [a, b) of a split. */
export function completionDocumentRange(split: QuerySplit, a: number, b: number): [number, number] {
  const n = split.completionStarts.length;
  a = Math.max(0, Math.min(a, n));
  b = Math.max(a, Math.min(b, n));
  if (n === 0) return [0, 0];
  if (b === a) {
    const at = a < n ? split.completionStarts[a] : split.completionEnds[n - 1];
    return [at, at];
  }
  return [split.completionStarts[a], split.completionEnds[b - 1]];
}

function fromRecord(
  r: RenderedRecord,
  promptEnd: number,
  completionEnd: number,
  how: 'record' | 'field',
  description: string,
): QuerySplit {
  const starts: number[] = [];
  const ends: number[] = [];
  for (let i = promptEnd; i < completionEnd; i++) {
    const [s, e] = documentRange(r, i, i + 1);
    starts.push(s);
    ends.push(e);
  }
  return {
    prompt: r.text.slice(0, promptEnd),
    completion: r.text.slice(promptEnd, completionEnd),
    how,
    description,
    completionStarts: starts,
    completionEnds: ends,
    promptTruncated: false,
    // up to the last assistant reply, which is what is explained (a chat may end with a user's turn)
    messages: how === 'record' && r.value.kind === 'messages' ? upToLastReply(r.value.messages) : undefined,
  };
}

/**
 * A selection inside message i of a chat record (`{"messages"}` or TRL's conversational
 * prompt/completion): the conversation up to and including that message, sent as `messages`, so
 * the server renders it with the model's chat template and explains that whole assistant reply
 * (a middle turn too). A user's or system message, or a prompt message of a conversational
 * record, is not trained on: refused, saying what to select.
 */
function chatTurn(
  line: string,
  lineStart: number,
  rendered: RenderedRecord,
  f: RecordField,
  a: number,
  b: number,
  lineNo: number,
  template: ChatTemplate | undefined,
): SplitResult {
  if (rendered.value.kind !== 'messages') throw new Error('chatTurn: not a chat record');
  const { messages, paths, scoredFrom } = rendered.value;
  const i = paths.findIndex((p) => f.name === `${p}.content`);
  const m = messages[i];
  if (i < 0 || !m)
    return { ok: false, message: `Select text in a message's "content" (${f.name} is not one), or the whole line.` };
  if (m.role !== 'assistant' || i < scoredFrom)
    return {
      ok: false,
      message:
        `${paths[i]} is ${i < scoredFrom ? "the prompt's" : `the ${m.role}'s`} message, which the model is not trained on: ` +
        'select text in an assistant reply (its whole reply is explained, with the conversation before it), or the whole line (its last reply).',
    };
  // the record cut after message i: the same document positions, so the heatmap lands on this reply
  const source = parseJsonWithSource(line, lineStart);
  if (source.kind !== 'object') throw new Error('chatTurn: the line is no longer an object');
  const [field, k] = /^(\w+)\[(\d+)\]$/.exec(paths[i])!.slice(1);
  const cut = {
    ...source,
    entries: source.entries.map((e) =>
      e.key.value === field && e.value.kind === 'array'
        ? { ...e, value: { ...e.value, items: e.value.items.slice(0, Number(k) + 1) } }
        : e,
    ),
  };
  const turn = renderRecord(cut, template);
  if (typeof turn === 'string' || !turn.split)
    return {
      ok: false,
      message: `The conversation up to ${paths[i]} is not usable: ${typeof turn === 'string' ? turn : 'no reply'}.`,
    };
  const whole = a === 0 && b === m.content.length;
  const what = `the assistant reply ${paths[i]} of line ${lineNo}, with the conversation before it`;
  return {
    ok: true,
    split: {
      ...fromRecord(turn, turn.split.promptEnd, turn.split.completionEnd, 'record', what),
      ...(whole ? {} : { note: `A chat reply is explained whole: ${what} (not only the selected part).` }),
    },
  };
}

/** [a, b) widened so it never cuts a surrogate pair (an emoji written as two \\u escapes). */
function wholeCharacters(text: string, a: number, b: number): [number, number] {
  const low = (i: number) => i > 0 && i < text.length && text.charCodeAt(i) >= 0xdc00 && text.charCodeAt(i) <= 0xdfff;
  return [low(a) ? a - 1 : a, low(b) ? b + 1 : b];
}

function upToLastReply<M extends { role: string }>(messages: M[]): M[] {
  const last = messages.map((m) => m.role).lastIndexOf('assistant');
  return messages.slice(0, last + 1);
}

function describeRecord(r: RenderedRecord, doc: string, at: number): string {
  const what = r.kind === 'messages' ? 'chat record (last assistant turn)' : 'prompt/completion record';
  return `the ${what} on line ${lineNumberAt(doc, at)}`;
}

const CUSTOM_SPLIT = 'or run "Explain with a custom prompt/completion split…" to give any prompt and completion';

/** Why a selection in a JSONL dataset is neither one whole record nor text inside one of its fields. */
function notInOneRecord(doc: string, start: number, end: number, lineStart: number, template?: ChatTemplate): string {
  const first = lineNumberAt(doc, start);
  // a selection that ends right after a line break ends on the line before it
  const last = lineNumberAt(doc, doc[end - 1] === '\n' ? end - 1 : end);
  if (last > first)
    return `The selection spans lines ${first}–${last} of a JSONL file, which holds one record per line: select one whole record, or text inside one of its fields (${CUSTOM_SPLIT}).`;
  let lineEnd = doc.indexOf('\n', start);
  if (lineEnd < 0) lineEnd = doc.length;
  const line = doc.slice(lineStart, lineEnd).replace(/\r$/, '');
  if (!line.trim()) return `Line ${first} is empty: select a record or text inside one of its fields.`;
  // base 0: a JSON error's offset is then the column in the line, not a position in the document
  const rendered = parseRecordLine(line, 0, template);
  if (typeof rendered === 'string')
    return `Line ${first} is not a JSONL record (${rendered}): the server skips it when it reads the dataset, and its JSON is no prompt; fix the line, ${CUSTOM_SPLIT}.`;
  return `Select a whole JSONL record, or text inside one of its fields (prompt, completion, text or a message content) (${CUSTOM_SPLIT}).`;
}

function lineNumberAt(doc: string, offset: number): number {
  let n = 1;
  for (let i = doc.indexOf('\n'); i >= 0 && i < offset; i = doc.indexOf('\n', i + 1)) n++;
  return n;
}
