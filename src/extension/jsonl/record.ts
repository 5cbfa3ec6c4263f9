// A JSONL training record rendered as the model sees it, with every rendered UTF-16 unit mapped
// back to the document. The rendering is the server's own (src/common/records/render.ts): this
// file only adds where each field's characters sit in the document. Pure: no `vscode` import.
import type { ChatTemplate } from '../../common/records/chat-template';
import { type Rendering, renderRecord as renderShared } from '../../common/records/render';
import { type RecordKind, RecordShapeError, type RecordValue, recordValue } from '../../common/records/shape';
import { parseJsonWithSource, type SourceString, type SourceValue } from './json-source';

export type { RecordKind };

export interface RecordField {
  /** 'text' | 'prompt' | 'completion' | 'messages[3].content' */
  name: string;
  source: SourceString;
  /** where the field's content starts in the rendered text (field unit i is rendered unit offset + i) */
  offset: number;
}

export interface RenderedRecord {
  kind: RecordKind;
  /** the validated record */
  value: RecordValue;
  text: string;
  rendering: Rendering;
  /** per rendered unit: the document range it came from; template text (role markers, end-of-turn
   * tokens) is an empty range at the start of the next field, or the end of the last one */
  starts: number[];
  ends: number[];
  /** the fields that appear verbatim in the rendered text */
  fields: RecordField[];
  /** how a whole selected record splits into prompt = text[0, promptEnd) and
   * completion = text[promptEnd, completionEnd) (the last scored span); absent for `{"text"}` records */
  split?: { promptEnd: number; completionEnd: number };
}

/** The plain JSON value of a parsed source value, remembering each string field's source. */
function plain(v: SourceValue, path: string, strings: Map<string, SourceString>): unknown {
  switch (v.kind) {
    case 'string':
      strings.set(path, v);
      return v.value;
    case 'object':
      return Object.fromEntries(
        v.entries.map((e) => [e.key.value, plain(e.value, path ? `${path}.${e.key.value}` : e.key.value, strings)]),
      );
    case 'array':
      return v.items.map((x, i) => plain(x, `${path}[${i}]`, strings));
    default:
      return v.kind === 'null' ? null : v.kind === 'boolean' ? true : 0; // only strings are rendered
  }
}

/**
 * Renders a parsed record (with the model's chat template when given one, else the stand-in);
 * returns a sentence saying what is wrong with it otherwise.
 */
export function renderRecord(v: SourceValue, template?: ChatTemplate): RenderedRecord | string {
  if (v.kind !== 'object') return 'not a JSON object';
  const strings = new Map<string, SourceString>();
  let r: ReturnType<typeof renderShared>;
  let value: RecordValue;
  try {
    value = recordValue(plain(v, '', strings));
    r = renderShared(value, template);
  } catch (e) {
    if (e instanceof RecordShapeError) return e.message;
    return (e as Error).message;
  }
  const n = r.text.length;
  const starts = new Array<number>(n).fill(-1);
  const ends = new Array<number>(n).fill(-1);
  const fields: RecordField[] = [];
  for (const p of r.pieces) {
    const source = strings.get(p.field);
    if (!source) continue;
    fields.push({ name: p.field, source, offset: p.start - p.fieldStart });
    for (let j = 0; j < p.end - p.start; j++) {
      starts[p.start + j] = source.map[p.fieldStart + j];
      ends[p.start + j] = source.map[p.fieldStart + j + 1];
    }
  }
  // template units: an empty range at the next field's start, else at the previous field's end
  let next = -1;
  for (let i = n - 1; i >= 0; i--) {
    if (starts[i] >= 0 && ends[i] > starts[i]) next = starts[i];
    else if (next >= 0) starts[i] = ends[i] = next;
  }
  let prev = v.start;
  for (let i = 0; i < n; i++) {
    if (starts[i] >= 0) prev = ends[i];
    else starts[i] = ends[i] = prev;
  }
  const split = r.kind === 'text' ? undefined : { promptEnd: r.last.span[0], completionEnd: r.last.span[1] };
  return { kind: r.kind, value, text: r.text, rendering: r.rendering, starts, ends, fields, split };
}

/** Parses and renders one JSONL line that starts at document offset `base`. */
export function parseRecordLine(line: string, base: number, template?: ChatTemplate): RenderedRecord | string {
  let v: SourceValue;
  try {
    v = parseJsonWithSource(line, base);
  } catch (e) {
    return `not valid JSON (${(e as Error).message})`;
  }
  return renderRecord(v, template);
}

/** The document range of rendered units [a, b) (an empty range at `a` when a === b). */
export function documentRange(r: RenderedRecord, a: number, b: number): [number, number] {
  if (b <= a) {
    const at = a < r.starts.length ? r.starts[a] : r.ends[r.ends.length - 1];
    return [at, at];
  }
  return [r.starts[a], r.ends[b - 1]];
}
