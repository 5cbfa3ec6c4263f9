// A small JSON Schema (draft-07 subset) validator, so the configuration loader checks a file
// with the very schema the editor uses (influence-lens.schema.json), and method params can be
// described the same way. Messages name the field and say what is wrong, e.g.
//   models.finetuned.model: is required
//   port: must be ≤ 65535 (got 70000)
// Supported keywords are listed in KEYWORDS; `assertSupportedSchema` refuses others, so a
// schema can never silently mean more than we check. No Node APIs (the client may import it).

export type JsonSchema = boolean | { [keyword: string]: unknown };

export interface SchemaIssue {
  /** path segments from the root: property names and array indexes */
  path: Array<string | number>;
  message: string;
  /** the keyword that failed */
  keyword?: string;
}

/** Keywords that constrain values. */
const ASSERTIONS = new Set([
  '$ref',
  'type',
  'enum',
  'const',
  'properties',
  'required',
  'additionalProperties',
  'propertyNames',
  'minProperties',
  'maxProperties',
  'items',
  'minItems',
  'maxItems',
  'minimum',
  'maximum',
  'exclusiveMinimum',
  'exclusiveMaximum',
  'minLength',
  'maxLength',
  'pattern',
  'anyOf',
  'oneOf',
  'if',
  'then',
  'else',
  // VS Code's JSON language service extensions, honoured here too
  'patternErrorMessage',
  'errorMessage',
]);
/** Keywords that only annotate. */
const ANNOTATIONS = new Set([
  '$schema',
  '$id',
  '$comment',
  'title',
  'description',
  'markdownDescription',
  'default',
  'examples',
  'enumDescriptions',
  'markdownEnumDescriptions',
  'deprecationMessage',
  'definitions',
  '$defs',
]);
export const KEYWORDS: ReadonlySet<string> = new Set([...ASSERTIONS, ...ANNOTATIONS]);

/** Throws if the schema uses a keyword this validator does not implement (or a $ref it cannot resolve). */
export function assertSupportedSchema(schema: JsonSchema, root: JsonSchema = schema, at = '#'): void {
  if (typeof schema === 'boolean') return;
  if (typeof schema !== 'object' || schema === null || Array.isArray(schema))
    throw new Error(`${at}: a schema must be an object or a boolean`);
  for (const [k, v] of Object.entries(schema)) {
    if (!KEYWORDS.has(k)) throw new Error(`${at}: unsupported schema keyword "${k}"`);
    if (k === '$ref') resolveRef(root, v as string);
    if (k === 'properties' || k === 'definitions' || k === '$defs')
      for (const [name, sub] of Object.entries(v as object)) assertSupportedSchema(sub, root, `${at}/${k}/${name}`);
    if (['additionalProperties', 'propertyNames', 'items', 'if', 'then', 'else'].includes(k))
      assertSupportedSchema(v as JsonSchema, root, `${at}/${k}`);
    if (k === 'anyOf' || k === 'oneOf')
      for (const [i, sub] of (v as JsonSchema[]).entries()) assertSupportedSchema(sub, root, `${at}/${k}/${i}`);
  }
}

function resolveRef(root: JsonSchema, ref: string): JsonSchema {
  const m = /^#\/(definitions|\$defs)\/([^/]+)$/.exec(ref);
  const target =
    m && typeof root === 'object' ? (root[m[1]] as Record<string, JsonSchema> | undefined)?.[m[2]] : undefined;
  if (target === undefined) throw new Error(`cannot resolve $ref "${ref}" (only #/definitions/<name> is supported)`);
  return target;
}

/** Validates `value`; returns every issue found (empty: valid). */
export function validateSchema(value: unknown, schema: JsonSchema, root: JsonSchema = schema): SchemaIssue[] {
  const issues: SchemaIssue[] = [];
  check(value, schema, root, [], issues);
  return issues;
}

/** `a.b[2]["odd key"]`; `rootLabel` for the empty path. */
export function formatPath(path: ReadonlyArray<string | number>, rootLabel = '(root)'): string {
  if (!path.length) return rootLabel;
  let s = '';
  for (const p of path) {
    if (typeof p === 'number') s += `[${p}]`;
    else if (/^[A-Za-z_$][A-Za-z0-9_$]*$/.test(p)) s += s ? `.${p}` : p;
    else s += `[${JSON.stringify(p)}]`;
  }
  return s;
}

export function formatIssue(issue: SchemaIssue, rootLabel?: string): string {
  return `${formatPath(issue.path, rootLabel)}: ${issue.message}`;
}

function typeOf(v: unknown): string {
  if (v === null) return 'null';
  if (Array.isArray(v)) return 'array';
  if (typeof v === 'number') return Number.isInteger(v) ? 'integer' : 'number';
  return typeof v;
}

function hasType(v: unknown, t: string): boolean {
  switch (t) {
    case 'object':
      return typeof v === 'object' && v !== null && !Array.isArray(v);
    case 'array':
      return Array.isArray(v);
    case 'string':
      return typeof v === 'string';
    case 'number':
      return typeof v === 'number' && Number.isFinite(v);
    case 'integer':
      return typeof v === 'number' && Number.isInteger(v);
    case 'boolean':
      return typeof v === 'boolean';
    case 'null':
      return v === null;
    default:
      return false;
  }
}

function show(v: unknown): string {
  const s = JSON.stringify(v);
  if (s === undefined) return String(v);
  return s.length > 60 ? `${s.slice(0, 57)}...` : s;
}

function article(t: string): string {
  return /^[aeiou]/.test(t) ? `an ${t}` : `a ${t}`;
}

function check(value: unknown, schema: JsonSchema, root: JsonSchema, path: Array<string | number>, out: SchemaIssue[]) {
  if (schema === true) return;
  if (schema === false) {
    out.push({ path, message: 'is not allowed here' });
    return;
  }
  const s = schema as Record<string, unknown>;
  const start = out.length;
  checkKeywords(value, s, root, path, out);
  if (typeof s.errorMessage === 'string' && out.length > start) {
    out.length = start;
    out.push({ path, message: s.errorMessage });
  }
}

function checkKeywords(
  value: unknown,
  s: Record<string, unknown>,
  root: JsonSchema,
  path: Array<string | number>,
  out: SchemaIssue[],
) {
  if (typeof s.$ref === 'string') check(value, resolveRef(root, s.$ref), root, path, out);

  if (s.type !== undefined) {
    const types = Array.isArray(s.type) ? (s.type as string[]) : [s.type as string];
    if (!types.some((t) => hasType(value, t))) {
      out.push({
        path,
        message: `must be ${types.map(article).join(' or ')} (got ${typeOf(value)} ${show(value)})`,
        keyword: 'type',
      });
      return; // the other keywords would only add noise
    }
  }
  if (Array.isArray(s.enum) && !s.enum.some((e) => deepEqual(e, value))) {
    out.push({ path, message: `must be one of ${s.enum.map(show).join(', ')} (got ${show(value)})` });
    return;
  }
  if ('const' in s && !deepEqual(s.const, value))
    out.push({ path, message: `must be ${show(s.const)} (got ${show(value)})` });

  if (typeof value === 'number') {
    if (typeof s.minimum === 'number' && value < s.minimum)
      out.push({ path, message: `must be ≥ ${s.minimum} (got ${value})` });
    if (typeof s.maximum === 'number' && value > s.maximum)
      out.push({ path, message: `must be ≤ ${s.maximum} (got ${value})` });
    if (typeof s.exclusiveMinimum === 'number' && value <= s.exclusiveMinimum)
      out.push({ path, message: `must be > ${s.exclusiveMinimum} (got ${value})` });
    if (typeof s.exclusiveMaximum === 'number' && value >= s.exclusiveMaximum)
      out.push({ path, message: `must be < ${s.exclusiveMaximum} (got ${value})` });
  }

  if (typeof value === 'string') {
    if (typeof s.minLength === 'number' && value.length < s.minLength)
      out.push({
        path,
        message: s.minLength === 1 ? 'must not be empty' : `must be at least ${s.minLength} characters long`,
      });
    if (typeof s.maxLength === 'number' && value.length > s.maxLength)
      out.push({ path, message: `must be at most ${s.maxLength} characters long (got ${value.length})` });
    if (typeof s.pattern === 'string' && !new RegExp(s.pattern, 'u').test(value))
      out.push({
        path,
        message:
          typeof s.patternErrorMessage === 'string'
            ? `${s.patternErrorMessage} (got ${show(value)})`
            : `must match ${s.pattern} (got ${show(value)})`,
      });
  }

  if (Array.isArray(value)) {
    if (typeof s.minItems === 'number' && value.length < s.minItems)
      out.push({ path, message: `must have at least ${s.minItems} item${s.minItems === 1 ? '' : 's'}` });
    if (typeof s.maxItems === 'number' && value.length > s.maxItems)
      out.push({ path, message: `must have at most ${s.maxItems} items (got ${value.length})` });
    if (s.items !== undefined)
      value.forEach((item, i) => {
        check(item, s.items as JsonSchema, root, [...path, i], out);
      });
  }

  if (hasType(value, 'object')) {
    const obj = value as Record<string, unknown>;
    const keys = Object.keys(obj);
    const props = (s.properties ?? {}) as Record<string, JsonSchema>;
    if (Array.isArray(s.required))
      for (const r of s.required as string[])
        if (!Object.hasOwn(obj, r)) out.push({ path: [...path, r], message: 'is required' });
    if (typeof s.minProperties === 'number' && keys.length < s.minProperties)
      out.push({
        path,
        message:
          s.minProperties === 1 ? 'must have at least one entry' : `must have at least ${s.minProperties} entries`,
      });
    if (typeof s.maxProperties === 'number' && keys.length > s.maxProperties)
      out.push({ path, message: `must have at most ${s.maxProperties} entries (got ${keys.length})` });
    for (const k of keys) {
      if (s.propertyNames !== undefined) {
        const sub: SchemaIssue[] = [];
        check(k, s.propertyNames as JsonSchema, root, [...path, k], sub);
        for (const i of sub) out.push({ path: i.path, message: `(the name) ${i.message}` });
      }
      if (Object.hasOwn(props, k)) check(obj[k], props[k], root, [...path, k], out);
      else if (s.additionalProperties === false) {
        const near = closest(k, Object.keys(props));
        out.push({
          path: [...path, k],
          message: `is not a known field${near ? `; did you mean "${near}"?` : ''} (known: ${Object.keys(props).join(', ')})`,
        });
      } else if (s.additionalProperties !== undefined && s.additionalProperties !== true)
        check(obj[k], s.additionalProperties as JsonSchema, root, [...path, k], out);
    }
  }

  for (const kw of ['anyOf', 'oneOf'] as const) {
    const branches = s[kw] as JsonSchema[] | undefined;
    if (!branches) continue;
    const results = branches.map((b) =>
      validateSchema(value, b, root).map((i) => ({ ...i, path: [...path, ...i.path] })),
    );
    const passing = results.filter((r) => r.length === 0).length;
    if (kw === 'anyOf' ? passing >= 1 : passing === 1) continue;
    if (passing > 1) out.push({ path, message: 'matches more than one of the allowed forms' });
    else {
      const wrongType = (r: SchemaIssue[]) => r.some((i) => i.keyword === 'type' && i.path.length === path.length);
      if (results.every(wrongType)) {
        // no branch has the right type: name them all
        const types = branches.flatMap((b) => {
          const t = typeof b === 'object' ? (b.$ref ? resolveRef(root, b.$ref as string) : b) : b;
          return typeof t === 'object' && t.type !== undefined ? [t.type].flat() : [];
        }) as string[];
        out.push({
          path,
          message: `must be ${[...new Set(types)].map(article).join(' or ')} (got ${typeOf(value)} ${show(value)})`,
          keyword: 'type',
        });
      } else {
        // report the branch that came closest: one of the right type, with the fewest issues
        const cost = (r: SchemaIssue[]) => r.length + (wrongType(r) ? 1000 : 0);
        out.push(...results.reduce((a, b) => (cost(b) < cost(a) ? b : a)));
      }
    }
  }

  if (s.if !== undefined) {
    const ok = validateSchema(value, s.if as JsonSchema, root).length === 0;
    const branch = ok ? s.then : s.else;
    if (branch !== undefined) check(value, branch as JsonSchema, root, path, out);
  }
}

function deepEqual(a: unknown, b: unknown): boolean {
  if (a === b) return true;
  if (typeof a !== 'object' || typeof b !== 'object' || a === null || b === null) return false;
  if (Array.isArray(a) !== Array.isArray(b)) return false;
  const ka = Object.keys(a);
  const kb = Object.keys(b);
  return (
    ka.length === kb.length &&
    ka.every((k) => deepEqual((a as Record<string, unknown>)[k], (b as Record<string, unknown>)[k]))
  );
}

/** The known name within edit distance 2 of `k`, if exactly one is closest. */
function closest(k: string, known: string[]): string | undefined {
  if (k.length < 3) return undefined;
  let best: string | undefined;
  let bestD = 3;
  for (const c of known) {
    const d = editDistance(k.toLowerCase(), c.toLowerCase());
    if (d < bestD) {
      bestD = d;
      best = c;
    }
  }
  return best;
}

function editDistance(a: string, b: string): number {
  if (Math.abs(a.length - b.length) > 2) return 3;
  let prev = Array.from({ length: b.length + 1 }, (_, j) => j);
  for (let i = 1; i <= a.length; i++) {
    const cur = [i];
    for (let j = 1; j <= b.length; j++)
      cur[j] = Math.min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (a[i - 1] === b[j - 1] ? 0 : 1));
    prev = cur;
  }
  return prev[b.length];
}
