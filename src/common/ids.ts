// Content-based ids: a training example keeps its id when the file is reordered, filtered or
// concatenated, so cached results and user bookmarks survive edits to the data file. The editor
// extension computes the same ids with this same code (src/extension/flags/hash.ts).
import { createHash } from 'node:crypto';

/** sha256 (hex, first 16 chars) of the record's canonical JSON. */
export function contentHash(value: unknown): string {
  return createHash('sha256').update(canonicalJson(value)).digest('hex').slice(0, 16);
}

/** Literal output text on the work stack (as opposed to a value still to be written). */
class Literal {
  constructor(readonly text: string) {}
}
const COMMA = new Literal(',');
const CLOSE_ARRAY = new Literal(']');
const CLOSE_OBJECT = new Literal('}');

/**
 * JSON with object keys sorted recursively and no whitespace; numbers as JSON.stringify writes them.
 * Written with an explicit stack rather than recursion, so a record nested thousands of levels
 * deep hashes like any other instead of overflowing the call stack.
 */
export function canonicalJson(value: unknown): string {
  const out: string[] = [];
  const stack: unknown[] = [value];
  while (stack.length) {
    const v = stack.pop();
    if (v instanceof Literal) out.push(v.text);
    else if (Array.isArray(v)) {
      out.push('[');
      stack.push(CLOSE_ARRAY);
      for (let i = v.length - 1; i >= 0; i--) {
        stack.push(v[i] ?? null);
        if (i > 0) stack.push(COMMA);
      }
    } else if (typeof v === 'object' && v !== null) {
      const obj = v as Record<string, unknown>;
      const keys = Object.keys(obj)
        .filter((k) => obj[k] !== undefined)
        .sort();
      out.push('{');
      stack.push(CLOSE_OBJECT);
      for (let i = keys.length - 1; i >= 0; i--) {
        stack.push(obj[keys[i]]);
        stack.push(new Literal(`${i > 0 ? ',' : ''}${JSON.stringify(keys[i])}:`));
      }
    } else out.push(JSON.stringify(v) ?? 'null');
  }
  return out.join('');
}

/**
 * The value to hash for a JSON line whose numbers a double cannot all hold (ids past 2^53 such as
 * 1234567890123456789 and ...790, which JSON.parse makes the same number; 1e400 and 2e400, both
 * Infinity, written as null), or undefined when every number survives parsing, so that every
 * other record keeps the hash it always had. In the value returned, each such number is its
 * exact decimal value (`<digits>e<exponent>`, a form JSON.stringify never writes, so it cannot
 * match a number that parsed exactly), hashed by `contentHash` in its place.
 */
export function exactHashValue(text: string): unknown {
  if (!MAYBE_INEXACT.test(text)) return undefined; // cheap: no long digit run, no big exponent
  const nonce = `\u0000exact-${Math.random().toString(36).slice(2)}-`;
  const exact: string[] = [];
  let marked = '';
  let from = 0;
  // numbers outside strings (a string is skipped whole, its escapes included)
  const token = /"(?:[^"\\]|\\.)*"|-?\d+(?:\.\d+)?(?:[eE][+-]?\d+)?/g;
  for (let m = token.exec(text); m; m = token.exec(text)) {
    if (m[0].startsWith('"')) continue;
    const decimal = exactDecimal(m[0]);
    const parsed = Number(m[0]);
    if (Number.isFinite(parsed) && exactDecimal(String(parsed)) === decimal) continue;
    marked += `${text.slice(from, m.index)}${JSON.stringify(nonce + exact.length)}`;
    exact.push(decimal);
    from = m.index + m[0].length;
  }
  if (!exact.length) return undefined;
  const swap = (v: unknown): unknown => {
    if (typeof v === 'string' && v.startsWith(nonce)) return new Literal(exact[Number(v.slice(nonce.length))]);
    if (Array.isArray(v)) return v.map(swap);
    if (typeof v === 'object' && v !== null) return Object.fromEntries(Object.entries(v).map(([k, x]) => [k, swap(x)]));
    return v;
  };
  return swap(JSON.parse(marked + text.slice(from)));
}

/** A run of 16+ digits (a decimal point allowed in it), or an exponent of 3+ digits. */
const MAYBE_INEXACT = /\d[\d.]{15}|[eE][+-]?\d{3}/;

/** A JSON number's exact value as `<sign><digits>e<exponent>`, the digits without leading or trailing zeros. */
function exactDecimal(num: string): string {
  const m = /^(-?)(\d+)(?:\.(\d+))?(?:[eE]([+-]?\d+))?$/.exec(num);
  if (!m) return num;
  let digits = m[2] + (m[3] ?? '');
  let exp = BigInt(m[4] ?? 0) - BigInt((m[3] ?? '').length);
  digits = digits.replace(/^0+/, '');
  if (!digits) return '0e0';
  const trailing = digits.length - digits.replace(/0+$/, '').length;
  digits = digits.slice(0, digits.length - trailing);
  exp += BigInt(trailing);
  return `${m[1]}${digits}e${exp}`;
}

/**
 * How deep `value` nests arrays and objects (a scalar is 0, `[]` is 1), counted without recursion;
 * stops counting once past `limit`.
 */
export function nestingDepth(value: unknown, limit = Number.POSITIVE_INFINITY): number {
  let max = 0;
  const stack: Array<[unknown, number]> = [[value, 0]];
  while (stack.length) {
    const [v, d] = stack.pop()!;
    if (typeof v !== 'object' || v === null) continue;
    const depth = d + 1;
    if (depth > max) max = depth;
    if (max > limit) return max;
    for (const child of Array.isArray(v) ? v : Object.values(v)) {
      if (typeof child === 'object' && child !== null) stack.push([child, depth]);
    }
  }
  return max;
}
