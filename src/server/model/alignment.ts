// A normalized string that remembers, for every character, which characters of the original
// text it came from: what Hugging Face `tokenizers` calls a NormalizedString. Token offsets are
// read from it, so they must follow the same rules as the Rust library:
//   - a character that replaces original characters takes the range of the first one it
//     consumes (NFC "e" + U+0301 → "é" covers only the "e");
//   - an inserted character takes the range of the character before it (Prepend: the range of
//     the first character; Replace: the range of the last matched character).
// Ranges are [start, end) in UTF-16 code units of the original text.
/** A tokenizer file we cannot load or cannot reproduce exactly. */
export class TokenizerError extends Error {}

export interface AlignedChar {
  /** one code point */
  ch: string;
  start: number;
  end: number;
}

type Json = Record<string, unknown>;

export class AlignedString {
  constructor(public chars: AlignedChar[]) {}

  /** the characters of `text`, each aligned to itself, shifted by `base` */
  static of(text: string, base = 0): AlignedString {
    const chars: AlignedChar[] = [];
    for (let i = 0; i < text.length; ) {
      const ch = String.fromCodePoint(text.codePointAt(i)!);
      chars.push({ ch, start: base + i, end: base + i + ch.length });
      i += ch.length;
    }
    return new AlignedString(chars);
  }

  get text(): string {
    return this.chars.map((c) => c.ch).join('');
  }

  prepend(s: string): void {
    if (this.chars.length === 0) return;
    const { start, end } = this.chars[0];
    this.chars.unshift(...Array.from(s, (ch) => ({ ch, start, end })));
  }

  /** every non-overlapping match of `pattern` replaced by `content`, as NormalizedString::replace */
  replace(pattern: string | RegExp, content: string): void {
    const text = this.text;
    // UTF-16 index → char index
    const charAt = new Int32Array(text.length + 1);
    let ci = 0;
    for (let i = 0; i < text.length; i++) {
      charAt[i] = ci;
      const c = text.charCodeAt(i);
      if (!(c >= 0xd800 && c <= 0xdbff)) ci++;
    }
    charAt[text.length] = this.chars.length;
    const matches: Array<[number, number]> = [];
    if (typeof pattern === 'string') {
      if (pattern === '') return;
      for (let i = text.indexOf(pattern); i >= 0; i = text.indexOf(pattern, i + pattern.length))
        matches.push([i, i + pattern.length]);
    } else {
      const re = new RegExp(pattern.source, pattern.flags.includes('g') ? pattern.flags : `${pattern.flags}g`);
      for (const m of text.matchAll(re)) if (m[0].length > 0) matches.push([m.index!, m.index! + m[0].length]);
    }
    if (matches.length === 0) return;
    const out: AlignedChar[] = [];
    let prev = 0;
    for (const [a, b] of matches) {
      const ca = charAt[a];
      const cb = charAt[b];
      out.push(...this.chars.slice(prev, ca));
      const last = this.chars[cb - 1];
      for (const ch of content) out.push({ ch, start: last.start, end: last.end });
      prev = cb;
    }
    out.push(...this.chars.slice(prev));
    this.chars = out;
  }

  /**
   * A Unicode normal form. Per character where normalizing each character alone gives the
   * same result (expansions: every output character covers its source character); else per
   * composition segment (a starter and the marks after it), where the first output character
   * consumes the characters that composed away.
   */
  unicode(form: 'NFC' | 'NFD' | 'NFKC' | 'NFKD'): void {
    const out: AlignedChar[] = [];
    const segments: AlignedChar[][] = [];
    for (const c of this.chars) {
      if (segments.length === 0 || !joinsPrevious(c.ch)) segments.push([c]);
      else segments[segments.length - 1].push(c);
    }
    for (const seg of segments) {
      const whole = seg
        .map((c) => c.ch)
        .join('')
        .normalize(form);
      const perChar = seg.map((c) => c.ch.normalize(form));
      if (perChar.join('') === whole) {
        seg.forEach((c, i) => {
          for (const ch of perChar[i]) out.push({ ch, start: c.start, end: c.end });
        });
        continue;
      }
      const chars = Array.from(whole);
      if (chars.length > seg.length)
        throw new TokenizerError(
          `cannot align the ${form} normalization of ${JSON.stringify(seg.map((c) => c.ch).join(''))} with the original text`,
        );
      const consumedFirst = 1 + seg.length - chars.length;
      chars.forEach((ch, i) => {
        const src = seg[i === 0 ? 0 : consumedFirst + i - 1];
        out.push({ ch, start: src.start, end: src.end });
      });
    }
    this.chars = out;
  }

  /** per-character mapping (lowercasing): each output character covers its source */
  mapChars(f: (ch: string) => string): void {
    this.chars = this.chars.flatMap((c) => Array.from(f(c.ch), (ch) => ({ ch, start: c.start, end: c.end })));
  }

  strip(left: boolean, right: boolean): void {
    let a = 0;
    let b = this.chars.length;
    if (left) while (a < b && /\s/u.test(this.chars[a].ch)) a++;
    if (right) while (b > a && /\s/u.test(this.chars[b - 1].ch)) b--;
    this.chars = this.chars.slice(a, b);
  }
}

/** a character that may compose with the one before it: a combining mark or a Hangul vowel/final jamo */
function joinsPrevious(ch: string): boolean {
  const cp = ch.codePointAt(0)!;
  return /\p{M}/u.test(ch) || (cp >= 0x1160 && cp <= 0x11ff) || (cp >= 0xd7b0 && cp <= 0xd7ff);
}

function pattern(p: unknown, where: string): string | RegExp {
  const o = (p ?? {}) as Json;
  if (typeof o.String === 'string') return o.String;
  if (typeof o.Regex === 'string') {
    try {
      return new RegExp(o.Regex, 'gu');
    } catch (e) {
      throw new TokenizerError(`${where}: regex ${JSON.stringify(o.Regex)} is not supported (${(e as Error).message})`);
    }
  }
  throw new TokenizerError(`${where}: pattern ${JSON.stringify(p)} is not supported`);
}

/**
 * Applies tokenizer.json's `normalizer` with alignment. Normalizers whose alignment we do not
 * reproduce are refused: their offsets (and so the loss masks) could silently point elsewhere.
 */
export function applyNormalizer(s: AlignedString, node: unknown, where: string): void {
  if (node === null || node === undefined) return;
  const n = node as Json;
  switch (n.type) {
    case 'Sequence':
      for (const c of (n.normalizers as unknown[]) ?? []) applyNormalizer(s, c, where);
      return;
    case 'Prepend':
      s.prepend(String(n.prepend));
      return;
    case 'Replace':
      s.replace(pattern(n.pattern, where), String(n.content ?? ''));
      return;
    case 'NFC':
    case 'NFD':
    case 'NFKC':
    case 'NFKD':
      s.unicode(n.type);
      return;
    case 'Lowercase':
      s.mapChars((c) => c.toLowerCase());
      return;
    case 'Strip':
      s.strip(n.strip_left !== false, n.strip_right !== false);
      return;
    default:
      throw new TokenizerError(
        `${where}: normalizer type ${JSON.stringify(n.type)} is not supported (supported: Sequence, Prepend, Replace, NFC, NFD, NFKC, NFKD, Lowercase, Strip)`,
      );
  }
}

/**
 * The character changes a pre-tokenizer makes (Metaspace's ▁, ByteLevel's prefix space), with
 * alignment; pure splitters (Split, Digits, Whitespace, …) change no character. `first` is
 * whether this is the text's first section (Metaspace prepend_scheme "first").
 */
export function applyPreTokenizer(s: AlignedString, node: unknown, first: boolean, where: string): void {
  if (node === null || node === undefined) return;
  const n = node as Json;
  switch (n.type) {
    case 'Sequence': {
      const parts = ((n.pretokenizers as Json[]) ?? []).filter(Boolean);
      // ByteLevel's prefix space goes on every piece an earlier splitter made; we only model one piece
      if (parts.some((c, i) => i > 0 && c.type === 'ByteLevel' && c.add_prefix_space === true))
        throw new TokenizerError(
          `${where}: ByteLevel with add_prefix_space after another pre_tokenizer is not supported`,
        );
      for (const c of parts) applyPreTokenizer(s, c, first, where);
      return;
    }
    case 'Metaspace': {
      const rep = String(n.replacement ?? '▁');
      s.replace(' ', rep);
      const scheme = (n.prepend_scheme as string | undefined) ?? (n.add_prefix_space === false ? 'never' : 'always');
      if (!s.text.startsWith(rep) && (scheme === 'always' || (scheme === 'first' && first))) s.prepend(rep);
      return;
    }
    case 'ByteLevel':
      if (n.add_prefix_space === true && !s.text.startsWith(' ')) s.prepend(' ');
      return;
    case 'Replace':
      s.replace(pattern(n.pattern, where), String(n.content ?? ''));
      return;
    case 'Split':
    case 'Digits':
    case 'Whitespace':
    case 'WhitespaceSplit':
    case 'Punctuation':
    case 'BertPreTokenizer':
    case 'UnicodeScripts':
    case 'CharDelimiterSplit':
      return;
    default:
      throw new TokenizerError(`${where}: pre_tokenizer type ${JSON.stringify(n.type)} is not supported`);
  }
}
