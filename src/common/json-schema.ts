// JSON Schema validation (draft-07) with Ajv, and messages a person can act on. The
// configuration loader checks influence-lens.json with the very schema the editor uses
// (influence-lens.schema.json), and the transport checks each request's params with the
// schemas in src/protocol/params-schema. Messages name the field and the closest allowed form:
//   models.finetuned.model: is required
//   port: must be ≤ 65535 (got 70000)
//   maxConcurent: is not a known field; did you mean "maxConcurrent"? (known: …)
//   damping: must be a string or a number (got boolean true)
// Ajv runs in strict mode: a keyword it does not know throws when the schema is compiled, so a
// schema can never silently mean more than is checked. VS Code's own annotation keywords are
// declared; `patternErrorMessage` and `errorMessage` (VS Code's JSON language service) replace
// the generic message, as they do in the editor.
import { Ajv, type ErrorObject, type ValidateFunction } from 'ajv';

export type JsonSchema = boolean | { [keyword: string]: unknown };

export interface SchemaIssue {
  /** path segments from the root: property names and array indexes */
  path: Array<string | number>;
  message: string;
  /** the keyword that failed */
  keyword?: string;
}

const ajv = new Ajv({
  allErrors: true,
  // errors carry the failing value and the schema node, which the messages below need
  verbose: true,
  strictSchema: true,
  strictNumbers: true,
  strictTypes: false,
  strictTuples: false,
  strictRequired: false,
  allowUnionTypes: true,
  // a schema's `$id`s are its own business; compile each one on its own
  addUsedSchema: false,
});
// VS Code's JSON language service keywords: annotations, or messages honoured below
ajv.addVocabulary([
  'markdownDescription',
  'enumDescriptions',
  'markdownEnumDescriptions',
  'deprecationMessage',
  'patternErrorMessage',
  'errorMessage',
]);

const compiled = new WeakMap<object, WeakMap<object, ValidateFunction>>();

/** The validator of `schema`, whose `$ref`s resolve against `root` (compiled once per pair). */
function compile(schema: object, root: object): ValidateFunction {
  const byRoot = compiled.get(root) ?? new WeakMap<object, ValidateFunction>();
  compiled.set(root, byRoot);
  let fn = byRoot.get(schema);
  if (!fn) {
    const r = root as Record<string, unknown>;
    // a sub-schema (an anyOf branch) sees the root's definitions, so its $refs resolve
    const withDefs = schema === root ? schema : { ...schema, definitions: r.definitions ?? {}, $defs: r.$defs ?? {} };
    fn = ajv.compile(withDefs);
    byRoot.set(schema, fn);
  }
  return fn;
}

/** Throws (with Ajv's message) if the schema uses a keyword Ajv does not know or a `$ref` it cannot resolve. */
export function assertSupportedSchema(schema: JsonSchema): void {
  if (typeof schema === 'object' && schema !== null) compile(schema, schema);
}

/** Validates `value`; returns every issue found (empty: valid), one per problem, closest form first. */
export function validateSchema(value: unknown, schema: JsonSchema, root: JsonSchema = schema): SchemaIssue[] {
  if (schema === true) return [];
  if (schema === false) return [{ path: [], message: 'is not allowed here' }];
  const fn = compile(schema, typeof root === 'object' ? root : schema);
  if (fn(value)) return [];
  return explain(fn.errors ?? [], value, typeof root === 'object' ? root : schema);
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

// ---- from Ajv's errors to messages ----

type Node = Record<string, unknown>;

/** JSON pointer → path segments (array indexes as numbers, where the value is an array). */
function pathOf(pointer: string, value: unknown): Array<string | number> {
  if (!pointer) return [];
  const out: Array<string | number> = [];
  let v = value;
  for (const raw of pointer.slice(1).split('/')) {
    const seg = raw.replace(/~1/g, '/').replace(/~0/g, '~');
    const key = Array.isArray(v) && /^\d+$/.test(seg) ? Number(seg) : seg;
    out.push(key);
    v = v !== null && typeof v === 'object' ? (v as Record<string | number, unknown>)[key] : undefined;
  }
  return out;
}

function within(pointer: string, base: string): boolean {
  return pointer === base || pointer.startsWith(`${base}/`);
}

/** Every schema node reachable from `s` (its sub-schemas and what their `$ref`s point to). */
function subtree(s: unknown, root: Node, seen = new Set<unknown>()): Set<unknown> {
  if (s === null || typeof s !== 'object' || seen.has(s)) return seen;
  seen.add(s);
  const node = s as Node;
  if (typeof node.$ref === 'string') subtree(resolveRef(root, node.$ref), root, seen);
  for (const [k, v] of Object.entries(node)) {
    if (k === 'enum' || k === 'const' || k === 'default' || k === 'examples') continue;
    if (Array.isArray(v)) for (const x of v) subtree(x, root, seen);
    else if (typeof v === 'object') subtree(v, root, seen);
  }
  return seen;
}

function resolveRef(root: Node, ref: string): unknown {
  const m = /^#\/(definitions|\$defs)\/([^/]+)$/.exec(ref);
  return m ? (root[m[1]] as Node | undefined)?.[m[2]] : undefined;
}

function explain(errors: ErrorObject[], rootValue: unknown, root: object): SchemaIssue[] {
  const r = root as Node;
  // errors another one explains better: those inside an anyOf/oneOf (the branch that came
  // closest is reported instead) or under a node with its own errorMessage
  const covered: Array<{ at: string; nodes: Set<unknown> }> = [];
  for (const e of errors) {
    const parent = e.parentSchema as Node | undefined;
    if (!parent) continue;
    if (typeof parent.errorMessage === 'string' || e.keyword === 'anyOf' || e.keyword === 'oneOf') {
      const nodes = subtree(parent, r);
      nodes.delete(parent);
      covered.push({ at: e.instancePath, nodes });
    }
  }
  const isCovered = (e: ErrorObject) =>
    covered.some((c) => within(e.instancePath, c.at) && c.nodes.has(e.parentSchema));
  const typeFailed = new Set(
    errors.filter((e) => e.keyword === 'type').map((e) => `${e.instancePath}\u0000${String(e.schemaPath)}`),
  );

  const out: SchemaIssue[] = [];
  const seenMessages = new Set<string>();
  const push = (issue: SchemaIssue) => {
    const key = `${formatPath(issue.path)}\u0000${issue.message}`;
    if (seenMessages.has(key)) return;
    seenMessages.add(key);
    out.push(issue);
  };
  for (const e of errors) {
    if (isCovered(e)) continue;
    const parent = (e.parentSchema ?? {}) as Node;
    const value = (e as ErrorObject & { data?: unknown }).data;
    const path = pathOf(e.instancePath, rootValue);
    // an error about a property's name (propertyNames) is reported at that property
    const name = (e as ErrorObject & { propertyName?: string }).propertyName;
    if (typeof parent.errorMessage === 'string') {
      push({ path, message: parent.errorMessage });
      continue;
    }
    // a value of the wrong type: the other keywords of that node would only add noise
    if (e.keyword !== 'type' && hasTypeError(e, typeFailed)) continue;
    const issue = describe(e, parent, name ?? value, path, r);
    if (issue && name !== undefined) push({ ...issue, path: [...path, name], message: `(the name) ${issue.message}` });
    else if (issue) push(issue);
  }
  return out;
}

function hasTypeError(e: ErrorObject, typeFailed: Set<string>): boolean {
  const node = String(e.schemaPath).replace(/\/[^/]*$/, '');
  return typeFailed.has(`${e.instancePath}\u0000${node}/type`);
}

function describe(
  e: ErrorObject,
  parent: Node,
  value: unknown,
  path: Array<string | number>,
  root: Node,
): SchemaIssue | undefined {
  const p = e.params as Record<string, unknown>;
  switch (e.keyword) {
    case 'type': {
      const types = [p.type as string | string[]].flat().flatMap((t) => String(t).split(','));
      return {
        path,
        keyword: 'type',
        message: `must be ${types.map(article).join(' or ')} (got ${typeOf(value)} ${show(value)})`,
      };
    }
    case 'enum':
      return {
        path,
        keyword: 'enum',
        message: `must be one of ${(p.allowedValues as unknown[]).map(show).join(', ')} (got ${show(value)})`,
      };
    case 'const':
      return { path, keyword: 'const', message: `must be ${show(p.allowedValue)} (got ${show(value)})` };
    case 'minimum':
    case 'maximum':
    case 'exclusiveMinimum':
    case 'exclusiveMaximum':
      return {
        path,
        keyword: e.keyword,
        message: `must be ${p.comparison} ${p.limit} (got ${show(value)})`.replace('>=', '≥').replace('<=', '≤'),
      };
    case 'minLength':
      return {
        path,
        keyword: e.keyword,
        message: p.limit === 1 ? 'must not be empty' : `must be at least ${p.limit} characters long`,
      };
    case 'maxLength':
      return {
        path,
        keyword: e.keyword,
        message: `must be at most ${p.limit} characters long (got ${(value as string).length})`,
      };
    case 'pattern':
      return {
        path,
        keyword: e.keyword,
        message:
          typeof parent.patternErrorMessage === 'string'
            ? `${parent.patternErrorMessage} (got ${show(value)})`
            : `must match ${p.pattern} (got ${show(value)})`,
      };
    case 'minItems':
      return { path, keyword: e.keyword, message: `must have at least ${p.limit} item${p.limit === 1 ? '' : 's'}` };
    case 'maxItems':
      return {
        path,
        keyword: e.keyword,
        message: `must have at most ${p.limit} items (got ${(value as unknown[]).length})`,
      };
    case 'minProperties':
      return {
        path,
        keyword: e.keyword,
        message: p.limit === 1 ? 'must have at least one entry' : `must have at least ${p.limit} entries`,
      };
    case 'maxProperties':
      return {
        path,
        keyword: e.keyword,
        message: `must have at most ${p.limit} entries (got ${Object.keys(value as object).length})`,
      };
    case 'required':
      return { path: [...path, p.missingProperty as string], keyword: e.keyword, message: 'is required' };
    case 'additionalProperties': {
      const known = Object.keys((parent.properties ?? {}) as object);
      const name = p.additionalProperty as string;
      const near = closest(name, known);
      return {
        path: [...path, name],
        keyword: e.keyword,
        message: `is not a known field${near ? `; did you mean "${near}"?` : ''} (known: ${known.join(', ')})`,
      };
    }
    case 'propertyNames':
      return undefined; // the name's own error follows, with `propertyName`
    case 'false schema':
      return { path, keyword: e.keyword, message: 'is not allowed here' };
    case 'if':
      return undefined; // the failing then/else branch reports its own errors
    case 'anyOf':
    case 'oneOf':
      return branchIssue(e, parent, value, path, root);
    default:
      return { path, keyword: e.keyword, message: e.message ?? `fails "${e.keyword}"` };
  }
}

/** An anyOf/oneOf that failed: name the forms when none has the right type, else the closest one's problems. */
function branchIssue(
  e: ErrorObject,
  parent: Node,
  value: unknown,
  path: Array<string | number>,
  root: Node,
): SchemaIssue | undefined {
  if (e.keyword === 'oneOf' && Array.isArray((e.params as { passingSchemas?: unknown }).passingSchemas))
    return { path, keyword: 'oneOf', message: 'matches more than one of the allowed forms' };
  const branches = parent[e.keyword] as JsonSchema[];
  const results = branches.map((b) => validateSchema(value, b, root));
  const wrongType = (r: SchemaIssue[]) => r.some((i) => i.keyword === 'type' && i.path.length === 0);
  if (results.every(wrongType)) {
    const types = branches.flatMap((b) => {
      const t = typeof b === 'object' && typeof b.$ref === 'string' ? resolveRef(root, b.$ref) : b;
      return t !== null && typeof t === 'object' && (t as Node).type !== undefined ? [(t as Node).type].flat() : [];
    }) as string[];
    return {
      path,
      keyword: 'type',
      message: `must be ${[...new Set(types)].map(article).join(' or ')} (got ${typeOf(value)} ${show(value)})`,
    };
  }
  const cost = (r: SchemaIssue[]) => r.length + (wrongType(r) ? 1000 : 0);
  const best = results.reduce((a, b) => (cost(b) < cost(a) ? b : a));
  // one issue per error object: the rest of the closest branch's issues are joined into it
  const [first, ...rest] = best.map((i) => ({ ...i, path: [...path, ...i.path] }));
  if (!first) return undefined;
  return rest.length ? { ...first, message: `${first.message}; ${rest.map((i) => formatIssue(i)).join('; ')}` } : first;
}

function typeOf(v: unknown): string {
  if (v === null) return 'null';
  if (Array.isArray(v)) return 'array';
  if (typeof v === 'number') return Number.isInteger(v) ? 'integer' : 'number';
  return typeof v;
}

function show(v: unknown): string {
  // JSON.parse reads 1e400 as Infinity, which JSON.stringify writes as null
  if (typeof v === 'number' && !Number.isFinite(v)) return String(v);
  let s: string | undefined;
  try {
    s = JSON.stringify(v);
  } catch {
    s = undefined; // too deep or cyclic: say what it is instead
  }
  if (s === undefined) return Array.isArray(v) ? '[…]' : typeof v === 'object' && v ? '{…}' : String(v);
  return s.length > 60 ? `${s.slice(0, 57)}...` : s;
}

function article(t: string): string {
  return /^[aeiou]/.test(t) ? `an ${t}` : `a ${t}`;
}

/** The known name within edit distance 2 of `k`, if exactly one is closest (also the CLI's flag hint). */
export function closest(k: string, known: string[]): string | undefined {
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
