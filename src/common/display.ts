// Signed, diverging heatmap colors that follow the theme. Pure (no DOM, no `vscode`): used by
// the results panel and by the editor decorations, unit-tested.
//
// A value's color is one of 2·BUCKETS+1 steps: the supporting color (score > 0: training on the
// example made the completion more likely) or the opposing color (< 0), mixed into the
// background in proportion to |value| / scale (linear; the scale is the largest |value| shown
// together). Color is never the only cue: the mark also carries an underline (solid for
// supporting, dashed for opposing), bold for the strongest steps, a +/− glyph, and a title
// with the exact value.
import type { Attribution } from '../protocol/types';

export const BUCKETS = 5;

/** Values below this share of the scale get no color (bucket 0). */
export const NEGLIGIBLE = 0.04;

/** The theme colors used when the settings name none (colorblind-safe blue/orange pair). */
export const DEFAULT_SUPPORTING = 'var(--vscode-charts-blue, #3794ff)';
export const DEFAULT_OPPOSING = 'var(--vscode-charts-orange, #d18616)';

/** The largest |value| among the finite values (0 when there are none). */
export function symmetricScale(values: ArrayLike<number>): number {
  let m = 0;
  for (let i = 0; i < values.length; i++) {
    const a = Math.abs(values[i]);
    if (Number.isFinite(a) && a > m) m = a;
  }
  return m;
}

/** A value's signed step in −buckets..buckets (0: negligible, not finite, or no scale). */
export function bucketOf(value: number, scale: number, buckets = BUCKETS): number {
  if (!Number.isFinite(value) || !(scale > 0) || !Number.isFinite(scale)) return 0;
  const t = Math.min(1, Math.abs(value) / scale);
  if (t < NEGLIGIBLE) return 0;
  const b = Math.max(1, Math.min(buckets, Math.ceil(t * buckets - 1e-9)));
  return value > 0 ? b : -b;
}

/** The share (percent) of the sign's color mixed into the background at a step. */
export function mixPercent(bucket: number, buckets = BUCKETS): number {
  const b = Math.min(buckets, Math.abs(Math.trunc(bucket)));
  return b === 0 ? 0 : Math.round(14 + (56 * b) / buckets);
}

/**
 * The CSS background of a step, mixing the theme's color into transparent, e.g.
 * `color-mix(in srgb, var(--il-supporting) 48%, transparent)`; 'transparent' at step 0.
 */
export function bucketBackground(
  bucket: number,
  buckets = BUCKETS,
  colors = { supporting: 'var(--il-supporting)', opposing: 'var(--il-opposing)' },
): string {
  const p = mixPercent(bucket, buckets);
  if (p === 0) return 'transparent';
  return `color-mix(in srgb, ${bucket > 0 ? colors.supporting : colors.opposing} ${p}%, transparent)`;
}

/** '+' / '−' (U+2212) / '' for a step. */
export function signGlyph(bucket: number): string {
  return bucket > 0 ? '+' : bucket < 0 ? '\u2212' : '';
}

/** The CSS class of a step: `il-p3`, `il-n1`, `il-z`. */
export function bucketClass(bucket: number): string {
  return bucket > 0 ? `il-p${bucket}` : bucket < 0 ? `il-n${-bucket}` : 'il-z';
}

/** A score with its sign and three significant digits: +2.07e+3, −0.0421, +12.3, 0. */
export function formatScore(v: number): string {
  if (!Number.isFinite(v)) return String(v);
  if (v === 0) return '0';
  const a = Math.abs(v);
  const body = a >= 1e4 || a < 1e-3 ? a.toExponential(2) : a.toPrecision(3);
  return `${v > 0 ? '+' : '\u2212'}${body}`;
}

/** A similarity (no sign) with three significant digits: 5.40, 1.23e+4. */
export function formatValue(v: number): string {
  if (!Number.isFinite(v)) return String(v);
  if (v === 0) return '0';
  const a = Math.abs(v);
  return (v < 0 ? '\u2212' : '') + (a >= 1e4 || a < 1e-3 ? a.toExponential(2) : a.toPrecision(3));
}

/** A percentile (0..100) in words: "highest", "top 0.3%", "bottom 2%", "52nd percentile", "lowest". */
export function formatPercentile(p: number): string {
  if (!Number.isFinite(p)) return '';
  if (p >= 99.95) return 'highest';
  if (p <= 0.05) return 'lowest';
  if (p >= 90) return `top ${trim(100 - p)}%`;
  if (p <= 10) return `bottom ${trim(p)}%`;
  const n = Math.round(p);
  const suffix = n % 100 >= 11 && n % 100 <= 13 ? 'th' : (['th', 'st', 'nd', 'rd'][n % 10] ?? 'th');
  return `${n}${suffix} percentile`;
}

function trim(x: number): string {
  if (x < 0.05) return '0.1';
  // 0.96 is "1", as 1.2 is: toFixed(1) would print "1.0" beside another card's "1"
  return x < 0.95 ? x.toFixed(1) : String(Math.round(x));
}

/** The words for a sign, as the legend says them. */
export function signWords(v: number, signed = true): string {
  if (!signed) return 'similarity (no sign)';
  return v > 0 ? 'supporting' : v < 0 ? 'opposing' : 'neutral';
}

/** What a heatmap token shows on hover, e.g. `" Sydney"  +1.83e+3 (supporting)`. */
export function tokenTitle(token: string, value: number, signed = true): string {
  return `${JSON.stringify(token)}  ${formatScore(value)} (${signWords(value, signed)})`;
}

/**
 * A user's color setting as safe CSS: a hex color, rgb()/hsl(), a CSS color name, or a theme
 * color id (`charts.red` → `var(--vscode-charts-red)`); anything else gives the fallback.
 */
export function cssColor(setting: string | undefined, fallback: string): string {
  const s = (setting ?? '').trim();
  if (!s) return fallback;
  if (/^#([0-9a-fA-F]{3,4}|[0-9a-fA-F]{6}|[0-9a-fA-F]{8})$/.test(s)) return s;
  if (/^(rgb|rgba|hsl|hsla)\(\s*[0-9.,%\s/-]+\)$/.test(s)) return s;
  // a CSS color name (a misspelled one, "blu", would otherwise paint nothing)
  if (CSS_COLOR_NAMES.has(s.toLowerCase())) return s.toLowerCase();
  // a theme color id; a misspelled one falls back to the default through var()'s second argument
  if (/^[a-zA-Z][a-zA-Z0-9]*(\.[a-zA-Z0-9]+)+$/.test(s)) return `var(--vscode-${s.replace(/\./g, '-')}, ${fallback})`;
  return fallback;
}

/** The 148 named colors of CSS Color Module Level 4. */
const CSS_COLOR_NAMES = new Set(
  [
    'aliceblue antiquewhite aqua aquamarine azure beige bisque black blanchedalmond blue blueviolet',
    'brown burlywood cadetblue chartreuse chocolate coral cornflowerblue cornsilk crimson cyan',
    'darkblue darkcyan darkgoldenrod darkgray darkgreen darkgrey darkkhaki darkmagenta darkolivegreen',
    'darkorange darkorchid darkred darksalmon darkseagreen darkslateblue darkslategray darkslategrey',
    'darkturquoise darkviolet deeppink deepskyblue dimgray dimgrey dodgerblue firebrick floralwhite',
    'forestgreen fuchsia gainsboro ghostwhite gold goldenrod gray green greenyellow grey honeydew',
    'hotpink indianred indigo ivory khaki lavender lavenderblush lawngreen lemonchiffon lightblue',
    'lightcoral lightcyan lightgoldenrodyellow lightgray lightgreen lightgrey lightpink lightsalmon',
    'lightseagreen lightskyblue lightslategray lightslategrey lightsteelblue lightyellow lime',
    'limegreen linen magenta maroon mediumaquamarine mediumblue mediumorchid mediumpurple',
    'mediumseagreen mediumslateblue mediumspringgreen mediumturquoise mediumvioletred midnightblue',
    'mintcream mistyrose moccasin navajowhite navy oldlace olive olivedrab orange orangered orchid',
    'palegoldenrod palegreen paleturquoise palevioletred papayawhip peachpuff peru pink plum',
    'powderblue purple rebeccapurple red rosybrown royalblue saddlebrown salmon sandybrown seagreen',
    'seashell sienna silver skyblue slateblue slategray slategrey snow springgreen steelblue tan teal',
    'thistle tomato turquoise violet wheat white whitesmoke yellow yellowgreen',
  ]
    .join(' ')
    .split(' '),
);

/** One line: which computation and checkpoints produced the scores (the CLI prints it, the webview shows it under the query). */
export function describeAttribution(a: Attribution): string {
  const base =
    a.over === 'checkpoints'
      ? `Σ over ${a.checkpoints!.length} training checkpoint(s) (${a.checkpoints!.map((c) => `${c.name} ×${c.weight.toFixed(3)}${c.learningRate !== undefined ? ` (lr ${c.learningRate.toExponential(2)})` : ''}`).join(', ')}; ${a.weighting === 'learning-rate' ? 'learning-rate weights' : 'equal weights'})`
      : 'final model';
  // a low-rank query bounds its error, so every example that can reach the lists is rescored; the
  // store's estimate has no such bound, so an example it placed far off can be missing from them
  const pre = a.preranked
    ? a.preranked.by === 'low-rank'
      ? `; pre-ranked by a low-rank query, ${a.preranked.exact} rescored exactly (every example whose error bound reaches the shown lists, so these are the exact lists; other ranks, percentiles and the histogram are estimates)`
      : `; pre-ranked by the gradient store, ${a.preranked.exact} rescored exactly (the shown ones among them, with exact scores; which examples are shown comes from the store's estimates, which have no error bound, so one it placed far off can be missing: turn "store" off for exact lists; ranks and percentiles, the shown ones' too, and the histogram are estimates)`
    : '';
  const retrieved = a.retrieved
    ? `; only the ${a.retrieved.scored} of ${a.retrieved.of} examples BM25 and RepSim retrieved were scored (candidates "retrieved": ranks, percentiles and both lists are within them)`
    : '';
  // every line it lists named (up to 5), the first one's reason in full
  const skipped = a.skipped
    ? `; ${a.skipped.count} malformed line(s) of the dataset not scored (line${a.skipped.count > 1 ? 's' : ''} ${a.skipped.lines
        .map((x) => x.line)
        .join(', ')}${a.skipped.count > a.skipped.lines.length ? ', …' : ''}${
        a.skipped.lines[0] ? `; line ${a.skipped.lines[0].line}: ${a.skipped.lines[0].message}` : ''
      })`
    : '';
  return `${base}${a.note ? `; ${a.note}` : ''}${pre}${retrieved}${skipped}`;
}

/** A record as written, on one line: prompt + completion, the text, or a chat's turns as "role: content". */
export function recordText(record: unknown): string | undefined {
  if (!record || typeof record !== 'object') return undefined;
  const v = record as Record<string, unknown>;
  const turns = (ms: unknown[]) =>
    ms.map((m) => `${(m as { role?: string })?.role}: ${(m as { content?: string })?.content}`);
  if (typeof v.prompt === 'string') return `${v.prompt}${String(v.completion ?? '')}`;
  // TRL's conversational prompt/completion: lists of messages, read as one chat
  if (Array.isArray(v.prompt) && Array.isArray(v.completion))
    return [...turns(v.prompt), ...turns(v.completion)].join(' ');
  if (typeof v.text === 'string') return v.text;
  if (Array.isArray(v.messages)) return turns(v.messages).join(' ');
  return undefined;
}
