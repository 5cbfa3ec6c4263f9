// A JSONL training record rendered as the model sees it, with every rendered UTF-16 unit mapped
// back to the document. The rendering must match the server's (`src/server/data/format.ts`):
// `{"text"}` as is, `{"prompt","completion"}` concatenated with no separator, and
// `{"messages"}` as `<|role|>\n` + content + `\n` per message. Pure: no `vscode` import.
import { parseJsonWithSource, property, type SourceString, type SourceValue } from './json-source';

export type RecordKind = 'text' | 'prompt_completion' | 'messages';

export interface RecordField {
  /** 'text' | 'prompt' | 'completion' | 'messages[3].content' */
  name: string;
  source: SourceString;
  /** where the field's content starts in the rendered text */
  offset: number;
}

export interface RenderedRecord {
  kind: RecordKind;
  text: string;
  /** per rendered unit: the document range it came from; template text (role markers, the
   * newline after a message) is an empty range at the nearest content boundary */
  starts: number[];
  ends: number[];
  fields: RecordField[];
  /** how a whole selected record splits into prompt = text[0, promptEnd) and
   * completion = text[promptEnd, completionEnd); absent for `{"text"}` records */
  split?: { promptEnd: number; completionEnd: number };
}

const ROLE = /^[A-Za-z0-9_.-]+$/;

/** Renders a parsed record; returns a sentence saying what is wrong with it otherwise. */
export function renderRecord(v: SourceValue): RenderedRecord | string {
  if (v.kind !== 'object') return 'not a JSON object';
  const text = property(v, 'text');
  const prompt = property(v, 'prompt');
  const completion = property(v, 'completion');
  const messages = property(v, 'messages');
  const present = [text, prompt, messages].filter((x) => x !== undefined).length;
  if (present === 0) return 'no "text", "prompt" or "messages" field';
  if (present > 1) return 'a record with more than one of "text", "prompt" and "messages"';
  const out = new Builder();
  if (text) {
    if (text.kind !== 'string') return '"text" is not a string';
    out.field('text', text);
    return out.done('text');
  }
  if (prompt) {
    if (prompt.kind !== 'string') return '"prompt" is not a string';
    if (completion?.kind !== 'string') return '"prompt" without a string "completion"';
    out.field('prompt', prompt);
    const promptEnd = out.length;
    out.field('completion', completion);
    return out.done('prompt_completion', { promptEnd, completionEnd: out.length });
  }
  if (messages!.kind !== 'array') return '"messages" is not an array';
  let split: RenderedRecord['split'];
  for (const [i, m] of messages!.items.entries()) {
    if (m.kind !== 'object') return `messages[${i}] is not an object`;
    const role = property(m, 'role');
    const content = property(m, 'content');
    if (role?.kind !== 'string' || !ROLE.test(role.value)) return `messages[${i}].role is not a role name`;
    if (content?.kind !== 'string') return `messages[${i}].content is not a string`;
    out.template(`<|${role.value}|>\n`, content.start + 1);
    const start = out.length;
    out.field(`messages[${i}].content`, content);
    out.template('\n', content.end - 1);
    if (role.value === 'assistant') split = { promptEnd: start, completionEnd: out.length };
  }
  if (!split) return '"messages" has no "assistant" turn';
  return out.done('messages', split);
}

/** Parses and renders one JSONL line that starts at document offset `base`. */
export function parseRecordLine(line: string, base: number): RenderedRecord | string {
  let v: SourceValue;
  try {
    v = parseJsonWithSource(line, base);
  } catch (e) {
    return `not valid JSON (${(e as Error).message})`;
  }
  return renderRecord(v);
}

/** The document range of rendered units [a, b) (an empty range at `a` when a === b). */
export function documentRange(r: RenderedRecord, a: number, b: number): [number, number] {
  if (b <= a) {
    const at = a < r.starts.length ? r.starts[a] : r.ends[r.ends.length - 1];
    return [at, at];
  }
  return [r.starts[a], r.ends[b - 1]];
}

class Builder {
  text = '';
  starts: number[] = [];
  ends: number[] = [];
  fields: RecordField[] = [];
  get length() {
    return this.text.length;
  }
  field(name: string, s: SourceString) {
    this.fields.push({ name, source: s, offset: this.text.length });
    this.text += s.value;
    for (let j = 0; j < s.value.length; j++) {
      this.starts.push(s.map[j]);
      this.ends.push(s.map[j + 1]);
    }
  }
  template(t: string, anchor: number) {
    this.text += t;
    for (let j = 0; j < t.length; j++) {
      this.starts.push(anchor);
      this.ends.push(anchor);
    }
  }
  done(kind: RecordKind, split?: RenderedRecord['split']): RenderedRecord {
    return { kind, text: this.text, starts: this.starts, ends: this.ends, fields: this.fields, split };
  }
}
