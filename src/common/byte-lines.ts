// The one way this project splits a JSONL file into lines: on its bytes, never on a decoded string
// (V8 caps strings at ~512 MiB, byte offsets keep line numbers exact, and a line that is not UTF-8
// can be kept byte for byte instead of re-encoded). The rules the server's reader
// (server/data/jsonl.ts), the cleaned export and the flags sidecar share: the file's first three
// bytes may be a BOM; a line ends at '\n', a '\r' before it is part of the ending; a line is text
// only if it is valid UTF-8, and a BOM anywhere after the file's start stays in the line's text.

export const UTF8_BOM = Buffer.from([0xef, 0xbb, 0xbf]);

// fatal: invalid UTF-8 is not text (never silently U+FFFD); ignoreBOM: a stray BOM stays in the text
const UTF8 = new TextDecoder('utf-8', { fatal: true, ignoreBOM: true });

export interface ByteLine {
  /** 1-based line number */
  line: number;
  /** the line's content in the buffer, [start, end): without '\n' or '\r\n' */
  start: number;
  end: number;
  /** the line's bytes as in the file, its ending included */
  raw: Buffer;
}

/** Whether `buf` starts with a UTF-8 byte order mark. */
export function hasBom(buf: Uint8Array): boolean {
  return buf.length >= 3 && buf[0] === 0xef && buf[1] === 0xbb && buf[2] === 0xbf;
}

/** The lines of `buf` after its BOM, if any; a last line without '\n' is a line too. */
export function* byteLines(buf: Buffer): Generator<ByteLine> {
  let start = hasBom(buf) ? 3 : 0;
  for (let line = 1; start < buf.length; line++) {
    const nl = buf.indexOf(0x0a, start);
    const next = nl < 0 ? buf.length : nl + 1;
    let end = nl < 0 ? buf.length : nl;
    if (end > start && buf[end - 1] === 0x0d) end--; // CRLF
    yield { line, start, end, raw: buf.subarray(start, next) };
    start = next;
  }
}

/** The line's content as text, or undefined when it is not valid UTF-8. */
export function lineText(buf: Buffer, l: ByteLine): string | undefined {
  try {
    return UTF8.decode(buf.subarray(l.start, l.end));
  } catch {
    return undefined;
  }
}

// what an editor shows for a line that is not UTF-8: each bad byte sequence as U+FFFD
const LOSSY_UTF8 = new TextDecoder('utf-8', { ignoreBOM: true });

/**
 * The first line of `buf` that is not valid UTF-8 and that an editor shows as `shown` (its bad
 * bytes as U+FFFD): the line an editor's text came from, which the server skips as no text at
 * all. Undefined when no such line exists (a real U+FFFD in valid UTF-8 is text like any other).
 */
export function invalidLineShownAs(buf: Buffer, shown: string): ByteLine | undefined {
  for (const l of byteLines(buf))
    if (lineText(buf, l) === undefined && LOSSY_UTF8.decode(buf.subarray(l.start, l.end)) === shown) return l;
  return undefined;
}

/** `data` as a Buffer over the same bytes (no copy). */
export function asBuffer(data: Uint8Array): Buffer {
  return Buffer.isBuffer(data) ? data : Buffer.from(data.buffer, data.byteOffset, data.byteLength);
}
