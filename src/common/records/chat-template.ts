// A model's own chat template (tokenizer_config.json's `chat_template`), rendered with
// @huggingface/jinja as transformers.js does, plus which characters are the assistant's: the
// part the training loss scored under assistant-only loss (TRL's `assistant_only_loss`).
//
// Which characters are the assistant's:
//  - a template with `{% generation %}…{% endgeneration %}` blocks: exactly those blocks, as
//    transformers' `return_assistant_tokens_mask` reads them;
//  - otherwise, for assistant message i: from the end of the conversation before it rendered
//    with the generation prompt (what the model was given) to the end of its content, plus the
//    special token right after it (the end-of-turn token the model learnt to emit). A template
//    that does not render conversations prefix by prefix is refused.
// Pure: no Node or VS Code imports, so the editor and the server share it.
import { Environment, Interpreter, Template } from '@huggingface/jinja';
import type { ChatMessage } from './shape';

export type Span = [number, number];

export class ChatTemplateError extends Error {}

export interface ChatTemplateOptions {
  /** the Jinja source */
  source: string;
  /** where it came from, for messages ("<dir>/tokenizer_config.json") */
  where: string;
  /** bos_token, eos_token, … as the template sees them (strings) */
  tokens: Record<string, string | undefined>;
  /** contents of the tokenizer's special added tokens (end-of-turn markers and the like) */
  specials: readonly string[];
}

/** Where one message's content appears verbatim in the rendered text. */
export interface ContentPlacement {
  message: number;
  /** [start, end) in the rendered text */
  start: number;
  end: number;
  /** index in the message's content of the character at `start` (after a template's `| trim`) */
  contentStart: number;
}

export interface RenderedChat {
  text: string;
  /** the assistant turns' characters, one span per assistant message, in order */
  spans: Span[];
  /** assistant message index of each span */
  spanMessages: number[];
  placements: ContentPlacement[];
  /**
   * the conversation's first n messages rendered with the generation prompt, by n: what the
   * assistant turns were located with (templates without generation blocks), so that
   * `renderPrompt` of one of them need not render it again
   */
  prompts?: ReadonlyMap<number, string>;
}

/**
 * @huggingface/jinja 0.5 ignores the argument of str.strip/lstrip/rstrip (`content.lstrip('\n')`
 * strips every whitespace), so Qwen's templates render differently from transformers' jinja2.
 * Give the three methods Python's meaning: strip the characters in `chars`, Python's whitespace
 * without it; and the `trim` filter likewise.
 */
let stripPatched = false;
function patchStripChars(): void {
  if (stripPatched) return;
  stripPatched = true;
  type Value = { value: unknown; builtins: Map<string, unknown> };
  const probe = new Environment().set('s', 'x') as unknown as Value;
  const StringValue = probe.constructor as new (v: string) => Value;
  const FunctionValue = (probe.builtins.get('strip') as object).constructor as new (
    f: (args: Value[]) => Value,
  ) => unknown;
  const proto = StringValue.prototype;
  const original = Object.getOwnPropertyDescriptor(proto, 'builtins')?.get;
  if (!original) throw new Error('@huggingface/jinja: unexpected StringValue layout (cannot fix str.strip)');
  const patched = new WeakSet<Map<string, unknown>>();
  Object.defineProperty(proto, 'builtins', {
    get(this: Value) {
      const m = original.call(this) as Map<string, unknown>;
      if (patched.has(m)) return m;
      patched.add(m);
      const s = String(this.value);
      for (const [name, left, right] of [
        ['strip', true, true],
        ['lstrip', true, false],
        ['rstrip', false, true],
      ] as const)
        m.set(
          name,
          new FunctionValue((args) => {
            const chars = args[0]?.value;
            return new StringValue(
              typeof chars === 'string' ? stripChars(s, chars, left, right) : whitespace(s, left, right),
            );
          }),
        );
      return m;
    },
  });
  // jinja2's `trim` filter is str.strip(chars): Python's whitespace, or the characters given
  type Node = { type: string; value?: string; callee?: Node; args?: unknown[] };
  type Interp = {
    applyFilter(operand: Value, filter: Node, env: unknown): Value;
    evaluateArguments(args: unknown[], env: unknown): [Value[], Map<string, Value>];
  };
  const interp = Interpreter.prototype as unknown as Interp;
  const applyFilter = interp.applyFilter;
  if (typeof applyFilter !== 'function' || typeof interp.evaluateArguments !== 'function')
    throw new Error('@huggingface/jinja: unexpected Interpreter layout (cannot fix the trim filter)');
  interp.applyFilter = function (this: Interp, operand: Value, filter: Node, env: unknown): Value {
    if (operand instanceof StringValue) {
      if (filter.type === 'Identifier' && filter.value === 'trim')
        return new StringValue(whitespace(String(operand.value)));
      if (filter.type === 'CallExpression' && filter.callee?.type === 'Identifier' && filter.callee.value === 'trim') {
        const [positional, keywords] = this.evaluateArguments(filter.args ?? [], env);
        const chars = (positional[0] ?? keywords.get('chars'))?.value;
        const s = String(operand.value);
        return new StringValue(typeof chars === 'string' ? stripChars(s, chars, true, true) : whitespace(s));
      }
    }
    return applyFilter.call(this, operand, filter, env);
  };
}

/**
 * Python's whitespace (str.isspace, what str.strip and jinja2's `trim` remove), which is not
 * JavaScript's: Python's has U+001C–U+001F and U+0085 (a common mojibake of "…"), JavaScript's
 * has U+FEFF (a pasted byte order mark). Llama 3's, Gemma's and many trainers' templates trim
 * message content: with JavaScript's set the rendered text, and so every token id, differed.
 */
const PY_SPACE = '\\t\\n\\v\\f\\r\\x1c-\\x1f \\x85\\xa0\\u1680\\u2000-\\u200a\\u2028\\u2029\\u202f\\u205f\\u3000';
const PY_LEADING = new RegExp(`^[${PY_SPACE}]+`);
const PY_TRAILING = new RegExp(`[${PY_SPACE}]+$`);

/** `s.strip()` / `.lstrip()` / `.rstrip()` as Python does them (no argument: its whitespace). */
export function whitespace(s: string, left = true, right = true): string {
  let out = s;
  if (left) out = out.replace(PY_LEADING, '');
  if (right) out = out.replace(PY_TRAILING, '');
  return out;
}

function stripChars(s: string, chars: string, left: boolean, right: boolean): string {
  const set = new Set(Array.from(chars));
  const cs = Array.from(s);
  let a = 0;
  let b = cs.length;
  if (left) while (a < b && set.has(cs[a])) a++;
  if (right) while (b > a && set.has(cs[b - 1])) b--;
  return cs.slice(a, b).join('');
}

const GEN_OPEN = '\uE000';
const GEN_CLOSE = '\uE001';
const GENERATION = /\{%(-?)\s*(end)?generation\s*(-?)%\}/g;

/** Whether a chat template's source has transformers' `{% generation %}` blocks. */
export function hasGenerationBlocks(source: string): boolean {
  return new RegExp(GENERATION.source).test(source);
}

export class ChatTemplate {
  readonly hasGenerationBlocks: boolean;
  private readonly template: Template;
  private readonly specials: string[];

  constructor(private readonly options: ChatTemplateOptions) {
    patchStripChars();
    // jinja2 reads a template's line endings as '\n' (its lexer normalizes them, and Python opens
    // chat_template.jinja with universal newlines): a template saved with CRLF (a Windows
    // checkout) rendered '\r\n' here, and trim_blocks stopped at the '\r'
    const normalized = options.source.replace(/\r\n?/g, '\n');
    this.hasGenerationBlocks = GENERATION.test(normalized);
    GENERATION.lastIndex = 0;
    // The generation tag is a transformers extension to Jinja: turn it into marker characters. It
    // is a block tag, so jinja2's trim_blocks / lstrip_blocks apply to it (the newline after it is
    // dropped, the indentation before it too): the marker is output between two block tags that
    // keep its whitespace control, `{% if true %}{{ marker }}{% endif %}`. As a bare `{{ marker }}`
    // it kept that newline, and every token after a `{% endgeneration %}\n` shifted by one.
    const source = normalized.replace(
      GENERATION,
      (_, l: string, end: string | undefined, r: string) =>
        `{%${l} if true %}{{ '${end ? GEN_CLOSE : GEN_OPEN}' }}{% endif ${r}%}`,
    );
    try {
      this.template = new Template(source);
    } catch (e) {
      throw new ChatTemplateError(`${options.where}: chat_template does not parse (${(e as Error).message})`);
    }
    boundRangeCalls((this.template as unknown as { parsed: unknown }).parsed);
    this.specials = [...options.specials].filter((s) => s.length > 0).sort((a, b) => b.length - a.length);
  }

  private renderRaw(messages: readonly ChatMessage[], addGenerationPrompt: boolean): string {
    try {
      return this.template.render({
        ...this.options.tokens,
        [BOUNDED_RANGE]: boundedRange,
        messages: messages.map((m) => (m.name === undefined ? { role: m.role, content: m.content } : { ...m })),
        add_generation_prompt: addGenerationPrompt,
      });
    } catch (e) {
      throw new ChatTemplateError(
        `${this.options.where}: chat_template failed on this record (${(e as Error).message})`,
      );
    }
  }

  private checkContents(messages: readonly ChatMessage[]): void {
    for (const [i, m] of messages.entries())
      if (m.content.includes(GEN_OPEN) || m.content.includes(GEN_CLOSE))
        throw new ChatTemplateError(`messages[${i}].content holds U+E000/U+E001, which mark generation blocks`);
  }

  /**
   * The conversation so far with the generation prompt, as `apply_chat_template(messages,
   * add_generation_prompt=True)` renders it: what a trainer tokenizes as a conversational prompt
   * alone (TRL finds where the completion starts from it).
   */
  renderPrompt(messages: readonly ChatMessage[]): string {
    this.checkContents(messages);
    return this.renderRaw(messages, true).replace(/[\uE000\uE001]/g, '');
  }

  render(messages: readonly ChatMessage[]): RenderedChat {
    this.checkContents(messages);
    const raw = this.renderRaw(messages, false);
    return this.hasGenerationBlocks ? this.fromGenerationBlocks(messages, raw) : this.fromPrefixes(messages, raw);
  }

  /**
   * Every `{% generation %}` block is trained (as transformers' assistant mask marks them all);
   * each belongs to the assistant message whose content it holds, or to the last one before it
   * (a template may close a turn in a block of its own: Phi-3's training template adds one for the
   * final EOS, others one for each turn's end marker). Pairing block k with assistant message k
   * dropped such blocks, and gave a turn's second block to the next message.
   */
  private fromGenerationBlocks(messages: readonly ChatMessage[], raw: string): RenderedChat {
    let text = '';
    const blocks: Span[] = [];
    let open = -1;
    for (const ch of raw) {
      if (ch === GEN_OPEN) open = text.length;
      else if (ch === GEN_CLOSE) {
        if (open < 0) throw new ChatTemplateError(`${this.options.where}: unbalanced {% endgeneration %}`);
        blocks.push([open, text.length]);
        open = -1;
      } else text += ch;
    }
    const assistants = messages.flatMap((m, i) => (m.role === 'assistant' ? [i] : []));
    const byContent = this.blocksByContent(messages, assistants, text, blocks);
    if (typeof byContent !== 'string') return { text, spans: blocks, ...byContent };
    // a template that rewrites the content (Qwen3 moves <think> into reasoning) cannot be read
    // by content; with one block per assistant message, block k is message k's
    if (blocks.length !== assistants.length) throw new ChatTemplateError(`${this.options.where}: ${byContent}`);
    const placements: ContentPlacement[] = [];
    for (const [k, [s, e]] of blocks.entries()) {
      const p = place(text, messages[assistants[k]].content, s, e);
      if (p) placements.push({ message: assistants[k], ...p });
    }
    return { text, spans: blocks, spanMessages: assistants, placements };
  }

  /** Each block's assistant message, found by the content it holds; or why that fails. */
  private blocksByContent(
    messages: readonly ChatMessage[],
    assistants: number[],
    text: string,
    blocks: Span[],
  ): { spanMessages: number[]; placements: ContentPlacement[] } | string {
    const counts = `${blocks.length} {% generation %} block(s) for ${assistants.length} assistant message(s)`;
    const placements: ContentPlacement[] = [];
    const spanMessages: number[] = [];
    let next = 0;
    for (const [s, e] of blocks) {
      const mi = assistants[next];
      const p = mi === undefined ? undefined : place(text, messages[mi].content, s, e);
      if (p) {
        placements.push({ message: mi, ...p });
        spanMessages.push(mi);
        next++;
      } else if (next > 0) spanMessages.push(assistants[next - 1]);
      else
        return `${counts}: block ${JSON.stringify(text.slice(s, e).slice(0, 40))} holds no assistant message's content and follows none, so it belongs to no assistant turn`;
    }
    if (next < assistants.length)
      return `${counts}: none holds the content of messages[${assistants[next]}] (the template renders no block for it, or rewrites its content), so its trained tokens cannot be located`;
    return { spanMessages, placements };
  }

  /**
   * Whether the placement of an empty assistant reply (fromPrefixes' `relocateEmpty`) gives this
   * template other trained tokens than before it was added: true where the template writes its own
   * text between the generation prompt and the turn's end marker (Qwen3's empty <think> block).
   * Caches are keyed by it for such templates only (tokenize.ts PREFIX_TURNS_VERSION); a template
   * that cannot render the probes counts as changed.
   */
  emptyReplyPlacementMatters(): boolean {
    // asked by every tokenizationKey (fingerprints, stage checks): rendered once per template
    this.emptyReplyMatters ??= this.probeEmptyReply();
    return this.emptyReplyMatters;
  }

  private emptyReplyMatters?: boolean;

  private probeEmptyReply(): boolean {
    if (this.hasGenerationBlocks) return false;
    const probes: ChatMessage[][] = [
      [
        { role: 'user', content: 'x' },
        { role: 'assistant', content: '' },
      ],
      [
        { role: 'user', content: 'x' },
        { role: 'assistant', content: '' },
        { role: 'user', content: 'y' },
        { role: 'assistant', content: 'z' },
      ],
    ];
    try {
      return probes.some((m) => {
        const raw = this.renderRaw(m, false);
        return (
          JSON.stringify(this.fromPrefixes(m, raw).spans) !== JSON.stringify(this.fromPrefixes(m, raw, false).spans)
        );
      });
    } catch {
      return true;
    }
  }

  private fromPrefixes(messages: readonly ChatMessage[], text: string, relocateEmpty = true): RenderedChat {
    const spans: Span[] = [];
    const spanMessages: number[] = [];
    const placements: ContentPlacement[] = [];
    const assistants = messages.flatMap((m, i) => (m.role === 'assistant' ? [i] : []));
    // what the model was given before each assistant turn: the conversation so far + the generation prompt
    const prefixes = assistants.map((i) => this.renderRaw(messages.slice(0, i), true));
    for (const [k, i] of assistants.entries()) {
      const prefix = prefixes[k];
      if (!text.startsWith(prefix))
        throw new ChatTemplateError(
          `${this.options.where}: chat_template does not render messages[0..${i}) with the generation prompt as a prefix of the whole conversation, so the assistant turn cannot be located; add {% generation %} blocks to the template`,
        );
      // a turn's content lies before the next assistant turn's generation prompt ends
      const next = k + 1 < assistants.length ? prefixes[k + 1].length : text.length;
      const p = place(text, messages[i].content, prefix.length, next);
      if (!p)
        throw new ChatTemplateError(
          `${this.options.where}: the content of messages[${i}] does not appear in the rendered conversation (the template rewrites it), so its tokens cannot be located`,
        );
      // a reply of whitespace only that a template strips ("\n" under Llama 3's or Qwen3's) was
      // "found" in the next turn's header or a <think> block, and those tokens were trained: only
      // right after the generation prompt is such a reply where the template put it
      const content = messages[i].content;
      if (content !== '' && content.trim() === '' && p.start !== prefix.length)
        throw new ChatTemplateError(
          `${this.options.where}: messages[${i}] is whitespace only (${JSON.stringify(content)}) and the chat template drops it, so its turn cannot be located; give the reply its content, or leave the record out`,
        );
      // an empty reply has no text to find: the template may still write its own part of the
      // turn before the end marker (Qwen3's empty <think> block, Llama-2's spaces), which a
      // non-empty reply's span covers; the reply then sits right before the turn's first special
      // token, not at the generation prompt's end (where nothing, not even the end marker, was trained)
      if (relocateEmpty && p.start === p.end && !this.specials.some((s) => text.startsWith(s, p.end))) {
        const at = this.specials
          .map((s) => text.indexOf(s, p.end))
          .filter((j) => j >= 0 && j < next)
          .reduce((a, b) => Math.min(a, b), Number.POSITIVE_INFINITY);
        if (Number.isFinite(at)) {
          p.start = at;
          p.end = at;
        }
      }
      placements.push({ message: i, ...p });
      let end = p.end;
      const special = this.specials.find((s) => text.startsWith(s, end));
      if (special) end += special.length;
      spans.push([prefix.length, end]);
      spanMessages.push(i);
    }
    return { text, spans, spanMessages, placements, prompts: new Map(assistants.map((i, k) => [i, prefixes[k]])) };
  }
}

/**
 * Finds a message's content in text[from, to): verbatim, or as a template's `| trim` leaves
 * it (Python's whitespace). The earliest occurrence wins (a turn's own header comes before its content).
 */
function place(text: string, content: string, from: number, to: number): Omit<ContentPlacement, 'message'> | undefined {
  const lead = content.length - whitespace(content, true, false).length;
  const candidates: Array<[string, number]> = [
    [content, 0],
    [whitespace(content), lead],
    [whitespace(content, true, false), lead],
    [whitespace(content, false, true), 0],
  ];
  let best: Omit<ContentPlacement, 'message'> | undefined;
  for (const [c, contentStart] of candidates) {
    if (c.length === 0) continue;
    const at = text.indexOf(c, from);
    if (at < 0 || at + c.length > to) continue;
    if (!best || at < best.start || (at === best.start && at + c.length > best.end))
      best = { start: at, end: at + c.length, contentStart };
  }
  if (!best && whitespace(content) === '') return { start: from, end: from, contentStart: 0 };
  return best;
}

/** Items a chat template's range() may make: loops over turns or characters need far fewer. */
export const MAX_TEMPLATE_RANGE = 1_000_000;

/** The name the template's range() calls are given (boundRangeCalls), bound to `boundedRange`. */
const BOUNDED_RANGE = '__influence_lens_range';

/**
 * Points every call of `range(…)` in a parsed template at `boundedRange`: a template that loops
 * `range(100000000)` ran the process out of memory after 40 s (the template is the model's code,
 * run on every record). The parsed tree is rewritten, not the text, so no string in the template
 * changes; the library declares its own `range` before the caller's variables and refuses to
 * have it redeclared, hence another name.
 */
function boundRangeCalls(node: unknown, seen = new Set<unknown>()): void {
  if (!node || typeof node !== 'object' || seen.has(node)) return;
  seen.add(node);
  const n = node as { type?: string; callee?: { type?: string; value?: unknown } };
  if (n.type === 'CallExpression' && n.callee?.type === 'Identifier' && n.callee.value === 'range')
    n.callee.value = BOUNDED_RANGE;
  for (const v of Object.values(node)) boundRangeCalls(v, seen);
}

/** Jinja's range(start, stop, step), refusing more than MAX_TEMPLATE_RANGE items. */
function boundedRange(...args: number[]): number[] {
  const [start, stop, step = 1] = args;
  const [from, to] = stop === undefined ? [0, start] : [start, stop];
  if (step === 0) throw new Error('range() step must not be zero');
  const n = Math.max(0, Math.ceil((to - from) / step));
  if (!Number.isFinite(n) || n > MAX_TEMPLATE_RANGE)
    throw new Error(
      `range(${args.join(', ')}) would make ${n} items, more than the ${MAX_TEMPLATE_RANGE} a chat template is allowed`,
    );
  const out: number[] = [];
  for (let i = 0; i < n; i++) out.push(from + i * step);
  return out;
}
