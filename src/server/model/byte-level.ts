// GPT-2's byte-level alphabet: every byte 0–255 gets a printable unicode character (the bytes
// that are printable Latin-1 keep their own; the rest map to U+0100 upward in byte order), so a
// byte-level BPE vocabulary spells any byte string as text. Hugging Face's ByteLevel
// pre-tokenizer and decoder use this table; the tokenizer's offsets and the embedded corpus's
// word tokenizer both need it.

/** `BYTE_LEVEL_CHARS[b]` is the character that stands for byte `b`. */
export const BYTE_LEVEL_CHARS: readonly string[] = (() => {
  const bs: number[] = [];
  for (let b = 33; b <= 126; b++) bs.push(b);
  for (let b = 161; b <= 172; b++) bs.push(b);
  for (let b = 174; b <= 255; b++) bs.push(b);
  const cs = [...bs];
  let n = 0;
  for (let b = 0; b < 256; b++)
    if (!bs.includes(b)) {
      bs.push(b);
      cs.push(256 + n++);
    }
  const out = new Array<string>(256);
  bs.forEach((b, i) => {
    out[b] = String.fromCodePoint(cs[i]);
  });
  return out;
})();
