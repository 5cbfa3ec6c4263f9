// Token heatmaps in the terminal: signed values as background colors (green = supporting,
// red = opposing, intensity = |value| relative to the example's largest), and, because color
// alone is not enough (and absent when not a TTY), the strongest tokens bracketed with a sign.
import type { TokenScores } from '../../protocol/types';

export function heatmap(text: string, ts: TokenScores, color: boolean, marks = 3): string {
  const max = Math.max(1e-30, ...ts.values.map(Math.abs));
  const strongest = new Set(
    ts.values
      .map((v, i) => [Math.abs(v), i] as const)
      .filter(([a]) => a > 0)
      .sort((a, b) => b[0] - a[0])
      .slice(0, marks)
      .map(([, i]) => i),
  );
  let out = '';
  let at = 0;
  ts.offsets.forEach(([s, e], i) => {
    if (s < at) return; // overlapping offsets (rare byte-level merges): keep the first
    out += text.slice(at, s);
    const piece = text.slice(s, e);
    const v = ts.values[i];
    let shown = piece;
    if (strongest.has(i) && piece.trim()) shown = `[${v > 0 ? '+' : '−'}${piece}]`;
    if (color && v !== 0) {
      const level = Math.min(5, Math.round((Math.abs(v) / max) * 5));
      // 256-color cube: green (0,level,0) or red (level,0,0); dim levels stay readable
      const code = v > 0 ? 16 + 6 * level : 16 + 36 * level;
      shown = level > 0 ? `\x1b[48;5;${code}m\x1b[97m${shown}\x1b[0m` : shown;
    }
    out += shown;
    at = e;
  });
  return out + text.slice(at);
}

/** One line, at most `width` characters, newlines shown as ⏎. */
export function oneLine(s: string, width: number): string {
  const flat = s.replace(/\n/g, '⏎ ');
  return flat.length > width ? `${flat.slice(0, width - 1)}…` : flat;
}
