// A small JSON parser that remembers where every value came from, so a decoded string can be
// mapped back to the document: `map[i]` is the document offset (UTF-16 code units, as VS Code's
// `offsetAt` counts) of the source text that produced decoded unit `i`. An escape such as `\n`,
// `\"` or `\u00e9` is one decoded unit from several source units; a literal surrogate pair is two
// decoded units from two source units. Pure: no `vscode` import, unit-tested.

export interface SourceString {
  kind: 'string';
  value: string;
  /** offset of the opening quote */
  start: number;
  /** offset just past the closing quote */
  end: number;
  /** length value.length + 1; map[value.length] is the offset of the closing quote */
  map: number[];
}

export interface SourceObject {
  kind: 'object';
  start: number;
  end: number;
  entries: Array<{ key: SourceString; value: SourceValue }>;
}

export interface SourceArray {
  kind: 'array';
  start: number;
  end: number;
  items: SourceValue[];
}

export interface SourceScalar {
  kind: 'number' | 'boolean' | 'null';
  start: number;
  end: number;
}

export type SourceValue = SourceString | SourceObject | SourceArray | SourceScalar;

export class JsonSourceError extends Error {
  constructor(
    message: string,
    /** document offset where parsing failed */
    readonly offset: number,
  ) {
    super(message);
  }
}

const SIMPLE_ESCAPES: Record<string, string> = {
  '"': '"',
  '\\': '\\',
  '/': '/',
  b: '\b',
  f: '\f',
  n: '\n',
  r: '\r',
  t: '\t',
};

/**
 * Parses `text` (one JSON value, surrounding whitespace allowed); `base` is added to every offset
 * (the offset of `text` in the document). Throws JsonSourceError on anything JSON.parse rejects.
 */
export function parseJsonWithSource(text: string, base = 0): SourceValue {
  let i = 0;
  const fail = (what: string): never => {
    throw new JsonSourceError(`${what} at offset ${base + i}`, base + i);
  };
  const ws = () => {
    while (i < text.length) {
      const c = text.charCodeAt(i);
      if (c === 0x20 || c === 0x09 || c === 0x0a || c === 0x0d) i++;
      else break;
    }
  };
  const str = (): SourceString => {
    const start = i;
    i++; // opening quote
    let value = '';
    const map: number[] = [];
    for (;;) {
      if (i >= text.length) fail('unterminated string');
      const c = text[i];
      if (c === '"') break;
      if (c === '\\') {
        const at = i;
        const e = text[i + 1];
        if (e === 'u') {
          const hex = text.slice(i + 2, i + 6);
          if (!/^[0-9a-fA-F]{4}$/.test(hex)) fail('bad \\u escape');
          value += String.fromCharCode(Number.parseInt(hex, 16));
          map.push(base + at);
          i += 6;
        } else if (e !== undefined && e in SIMPLE_ESCAPES) {
          value += SIMPLE_ESCAPES[e];
          map.push(base + at);
          i += 2;
        } else {
          fail('bad escape');
        }
        continue;
      }
      if (c.charCodeAt(0) < 0x20) fail('control character in string');
      value += c;
      map.push(base + i);
      i++;
    }
    map.push(base + i);
    i++; // closing quote
    return { kind: 'string', value, start: base + start, end: base + i, map };
  };
  const literal = (word: string, kind: 'boolean' | 'null'): SourceScalar => {
    if (text.startsWith(word, i)) {
      const start = i;
      i += word.length;
      return { kind, start: base + start, end: base + i };
    }
    return fail('unexpected token');
  };
  const num = (): SourceScalar => {
    const m = /^-?(0|[1-9]\d*)(\.\d+)?([eE][+-]?\d+)?/.exec(text.slice(i, i + 400));
    if (!m) fail('unexpected token');
    const start = i;
    i += m![0].length;
    return { kind: 'number', start: base + start, end: base + i };
  };
  const value = (depth: number): SourceValue => {
    if (depth > 512) fail('nesting too deep');
    ws();
    const c = text[i];
    if (c === '"') return str();
    if (c === '{') {
      const start = i++;
      const entries: SourceObject['entries'] = [];
      ws();
      if (text[i] === '}') {
        i++;
        return { kind: 'object', start: base + start, end: base + i, entries };
      }
      for (;;) {
        ws();
        if (text[i] !== '"') fail('expected a property name');
        const key = str();
        ws();
        if (text[i] !== ':') fail("expected ':'");
        i++;
        entries.push({ key, value: value(depth + 1) });
        ws();
        if (text[i] === ',') {
          i++;
          continue;
        }
        if (text[i] === '}') {
          i++;
          return { kind: 'object', start: base + start, end: base + i, entries };
        }
        fail("expected ',' or '}'");
      }
    }
    if (c === '[') {
      const start = i++;
      const items: SourceValue[] = [];
      ws();
      if (text[i] === ']') {
        i++;
        return { kind: 'array', start: base + start, end: base + i, items };
      }
      for (;;) {
        items.push(value(depth + 1));
        ws();
        if (text[i] === ',') {
          i++;
          continue;
        }
        if (text[i] === ']') {
          i++;
          return { kind: 'array', start: base + start, end: base + i, items };
        }
        fail("expected ',' or ']'");
      }
    }
    if (c === 't') return literal('true', 'boolean');
    if (c === 'f') return literal('false', 'boolean');
    if (c === 'n') return literal('null', 'null');
    if (c === '-' || (c >= '0' && c <= '9')) return num();
    return fail(i >= text.length ? 'unexpected end of JSON' : 'unexpected token');
  };
  const v = value(0);
  ws();
  if (i < text.length) fail('unexpected text after the JSON value');
  return v;
}

/** The value of an object's property (the last one, as JSON.parse keeps), or undefined. */
export function property(obj: SourceObject, name: string): SourceValue | undefined {
  let found: SourceValue | undefined;
  for (const e of obj.entries) if (e.key.value === name) found = e.value;
  return found;
}

/**
 * The decoded range [a, b) of a string whose source overlaps the document range [start, end):
 * a boundary that falls inside an escape sequence is widened to the whole escape.
 */
export function decodedRange(s: SourceString, start: number, end: number): [number, number] {
  const n = s.value.length;
  // first unit whose source ends after `start`
  let a = 0;
  while (a < n && s.map[a + 1] <= start) a++;
  // last unit whose source starts before `end`
  let b = n;
  while (b > a && s.map[b - 1] >= end) b--;
  return [a, b];
}
