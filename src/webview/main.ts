// The results panel: supporting and opposing training examples with score, percentile and the
// sign in words, a training-side heatmap on each example and a completion-side heatmap on the
// query, per-layer bars, the score histogram, a method switcher with agreement badges, and flag
// buttons. Plain DOM + `--vscode-*` theme variables + codicons; no inline scripts or style
// attributes (the panel's CSP allows only this nonce'd bundle), styles set through the CSSOM.
import '@vscode/codicons/dist/codicon.css';
import './styles.css';
import {
  bucketBackground,
  bucketClass,
  bucketOf,
  describeAttribution,
  formatPercentile,
  formatScore,
  formatValue,
  signGlyph,
  symmetricScale,
  tokenTitle,
} from '../common/display';
import { axisPosition, histogramBins, layerBars, type Segment, segments, sumPerToken } from '../common/heatmap';
import { METHOD_LABELS, METHODS, SIGNED_METHODS } from '../protocol/methods';
import type {
  ExampleId,
  ExplainedExample,
  ExplainPartial,
  ExplainResult,
  Method,
  MultiStageRegime,
} from '../protocol/types';
import { type FromWebview, type PanelState, type ToWebview, withResult } from './messages';

interface VsCodeApi {
  postMessage(m: FromWebview): void;
  getState(): PanelState | undefined;
  setState(s: PanelState): void;
}
declare function acquireVsCodeApi(): VsCodeApi;

const vscode = acquireVsCodeApi();

let state: PanelState = vscode.getState() ?? { version: 1, results: {}, methods: [], flags: {} };
let busy: { method: Method; message: string } | undefined;
let error: { method: Method; message: string } | undefined;
/** a note on the result a tab shows (a kept result shown without a server to check it) */
let notice: { method: Method; message: string } | undefined;
let partial: ExplainPartial | undefined;

const app = document.getElementById('app')!;

function save() {
  vscode.setState(state);
}

function post(m: FromWebview) {
  vscode.postMessage(m);
}

// ---- tiny DOM helpers ----

type Child = Node | string | null | undefined | false;
function h<K extends keyof HTMLElementTagNameMap>(
  tag: K,
  attrs: Record<string, string | number | boolean | undefined> = {},
  ...children: Child[]
): HTMLElementTagNameMap[K] {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === undefined || v === false) continue;
    if (k === 'class') el.className = String(v);
    else el.setAttribute(k, v === true ? '' : String(v));
  }
  for (const c of children) if (c !== null && c !== undefined && c !== false) el.append(c);
  return el;
}

function icon(name: string): HTMLElement {
  return h('span', { class: `codicon codicon-${name}`, 'aria-hidden': 'true' });
}

function svg<K extends keyof SVGElementTagNameMap>(
  tag: K,
  attrs: Record<string, string | number>,
): SVGElementTagNameMap[K] {
  const el = document.createElementNS('http://www.w3.org/2000/svg', tag);
  for (const [k, v] of Object.entries(attrs)) el.setAttribute(k, String(v));
  return el;
}

// ---- heatmaps ----

/** Text with its tokens colored by value; each token also carries a title, an underline style and a glyph. */
function heatText(text: string, segs: Segment[], signed: boolean, label: string): HTMLElement {
  const values = segs.filter((s) => s.value !== undefined).map((s) => s.value!);
  const scale = symmetricScale(values);
  const el = h('div', { class: 'heat', role: 'group', 'aria-label': label });
  if (!segs.length) el.append(visible(text, false));
  for (const s of segs) {
    if (s.value === undefined) {
      el.append(visible(s.text, false));
      continue;
    }
    const b = signed ? bucketOf(s.value, scale) : 0;
    const t = h('span', { class: `tok ${bucketClass(b)}`, title: tokenTitle(s.text, s.value, signed) });
    // a token that ends in line breaks keeps its ⏎ marks and glyph on its own line; the breaks
    // follow it (inside it, the glyph and shading sat alone on an empty line below)
    const body = s.text.replace(/\n+$/, '');
    const breaks = s.text.length - body.length;
    t.append(visible(body, true));
    for (let i = 0; i < breaks; i++) t.append(h('span', { class: 'nl', 'aria-hidden': 'true' }, '\u23ce'));
    if (Math.abs(b) >= 4) t.append(h('sup', { class: 'glyph', 'aria-hidden': 'true' }, signGlyph(b)));
    t.style.backgroundColor = bucketBackground(b);
    el.append(t, '\n'.repeat(breaks));
  }
  return el;
}

/** Bidirectional-text controls: shown, never applied (training text could reorder what is read, e.g. U+202E). */
const BIDI_CONTROLS = /[\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]/;

/**
 * Text with its newlines shown as ⏎ when inside a token (so a colored newline is seen), and each
 * bidirectional control shown as [U+XXXX] (as the editor marks them) instead of taking effect.
 */
function visible(text: string, inToken: boolean): Node {
  const marks = inToken ? /[\n\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]/ : BIDI_CONTROLS;
  if (!marks.test(text)) return document.createTextNode(text);
  const f = document.createDocumentFragment();
  let part = '';
  for (const ch of text) {
    if (!marks.test(ch)) {
      part += ch;
      continue;
    }
    if (part) f.append(part);
    part = '';
    if (ch === '\n') f.append(h('span', { class: 'nl', 'aria-hidden': 'true' }, '\u23ce'), '\n');
    else
      f.append(
        h(
          'span',
          { class: 'ctl', title: 'a bidirectional text control character, shown instead of applied' },
          `[U+${ch.codePointAt(0)!.toString(16).toUpperCase().padStart(4, '0')}]`,
        ),
      );
  }
  if (part) f.append(part);
  return f;
}

// ---- rendering ----

function current(): ExplainResult | undefined {
  const r = state.method ? state.results[state.method] : undefined;
  if (r || busy) return r;
  // the chosen method's result is not here (e.g. a page state saved while it ran): show another
  const other = Object.values(state.results).find((x) => !!x);
  if (other) state.method = other.method;
  return other;
}

function render() {
  const result = current();
  const focusedHash = (document.activeElement as HTMLElement | null)?.closest?.('li.example')?.getAttribute('data-key');
  app.replaceChildren();
  if (!result && !busy && !error && !partial) {
    app.append(
      h(
        'p',
        { class: 'empty' },
        'Select a completion in an editor and run ',
        h('strong', {}, 'Influence Lens: Explain this completion'),
        '.',
      ),
    );
    return;
  }
  if (result) app.append(queryHeader(result));
  app.append(methodSwitcher());
  app.append(legend(result));
  if (result?.multiStage) app.append(regimeNote(result.multiStage));
  app.append(statusLine());
  if (result) {
    const signed = SIGNED_METHODS.includes(result.method);
    const grid = h('div', { class: 'lists' });
    grid.append(exampleList('supporting', result, result.supporting, signed));
    if (signed) grid.append(exampleList('opposing', result, result.opposing, signed));
    app.append(grid);
    app.append(h('div', { class: 'charts' }, layerChart(result), histogram(result)));
    app.append(footer(result));
  } else if (partial) {
    app.append(partialLists(partial));
  }
  if (focusedHash)
    (app.querySelector(`li.example[data-key="${CSS.escape(focusedHash)}"]`) as HTMLElement | null)?.focus();
}

function queryHeader(r: ExplainResult): HTMLElement {
  const n = r.query.completionTokens.offsets.length;
  const shown = [...r.supporting, ...r.opposing];
  const focus = shown.find((e) => key(e) === state.focus);
  const values = focus
    ? sumPerToken([focus.completionTokenScores], n)
    : sumPerToken(
        shown.map((e) => e.completionTokenScores),
        n,
      );
  const hasValues = shown.some((e) => e.completionTokenScores?.length);
  const scores = { offsets: r.query.completionTokens.offsets, values: hasValues ? values : new Array(n).fill(0) };
  const segs = segments(r.query.completion, scores);
  // each token's −log p goes into its title too
  const heat = heatText(
    r.query.completion,
    segs,
    hasValues && SIGNED_METHODS.includes(r.method),
    'completion, colored by influence',
  );
  heat.querySelectorAll<HTMLElement>('span.tok').forEach((el, i) => {
    const seg = segs.filter((s) => s.token !== undefined)[i];
    const nll = r.query.completionTokens.values[seg.token!];
    el.title = `${el.title}\n−log p = ${nll.toPrecision(3)}`;
  });
  heat.classList.add('completion');
  const what = !hasValues
    ? 'no per-token scores for this method'
    : focus
      ? `colored by example #${focus.rank} (${focus.id.dataset}:${focus.id.line}) alone`
      : `colored by the summed influence of the ${shown.length} examples shown`;
  return h(
    'header',
    { class: 'query' },
    h('div', { class: 'label' }, 'Prompt'),
    // one child: the box's reversed column keeps the prompt's end in view (styles.css)
    h('div', { class: 'prompt', title: r.query.prompt }, h('span', {}, tail(r.query.prompt, 400))),
    h('div', { class: 'label' }, 'Completion ', h('span', { class: 'hint' }, what)),
    heat,
    h(
      'div',
      { class: 'meta' },
      `−log p(completion | prompt) = ${r.query.loss.toPrecision(3)} · ${r.scored} examples scored · ${r.model}` +
        // how the query was rendered, where it is not the text as shown: a chat
        (r.query.rendering === 'chat_template'
          ? " · a chat, rendered with the model's chat template (its last assistant turn explained)"
          : r.query.rendering === 'stand-in'
            ? ' · a chat, rendered with a stand-in format (the model has no chat template)'
            : ''),
    ),
    r.attribution ? h('div', { class: 'meta attribution' }, `Scores: ${describeAttribution(r.attribution)}`) : null,
    // what the server says about how these scores were computed (factors fitted on other data)
    ...(r.warnings ?? []).map((w) =>
      h('div', { class: 'meta result-warning', role: 'alert' }, icon('warning'), ` ${w}`),
    ),
  );
}

function tail(s: string, n: number): string {
  return s.length <= n ? s : `…${s.slice(s.length - n)}`;
}

function methodSwitcher(): HTMLElement {
  const group = h('div', { class: 'methods', role: 'radiogroup', 'aria-label': 'Attribution method' });
  const methods = METHODS.filter((m) => state.methods.includes(m) || state.results[m]);
  for (const m of methods) {
    const checked = m === state.method;
    const b = h(
      'button',
      {
        class: `method${checked ? ' checked' : ''}`,
        role: 'radio',
        'aria-checked': checked ? 'true' : 'false',
        tabindex: checked ? 0 : -1,
        'data-method': m,
        title: SIGNED_METHODS.includes(m)
          ? `${METHOD_LABELS[m]}: signed influence`
          : `${METHOD_LABELS[m]}: similarity only`,
      },
      busy?.method === m ? icon('loading codicon-modifier-spin') : null,
      METHOD_LABELS[m],
    );
    b.addEventListener('click', () => chooseMethod(m));
    b.addEventListener('keydown', (e) => {
      const i = methods.indexOf(m);
      const d =
        e.key === 'ArrowRight' || e.key === 'ArrowDown' ? 1 : e.key === 'ArrowLeft' || e.key === 'ArrowUp' ? -1 : 0;
      if (!d) return;
      e.preventDefault();
      const next = methods[(i + d + methods.length) % methods.length];
      chooseMethod(next);
      (app.querySelector(`button[data-method="${next}"]`) as HTMLElement | null)?.focus();
    });
    group.append(b);
  }
  return group;
}

function chooseMethod(m: Method) {
  if (m === state.method && state.results[m]) return;
  state.method = m;
  state.focus = undefined;
  if (!state.results[m]) busy = { method: m, message: `Running ${METHOD_LABELS[m]}…` };
  save();
  post({ type: 'method', method: m });
  render();
  (app.querySelector(`button[data-method="${m}"]`) as HTMLElement | null)?.focus();
}

function legend(r: ExplainResult | undefined): HTMLElement {
  const signed = !r || SIGNED_METHODS.includes(r.method);
  const el = h('section', { class: 'legend', 'aria-label': 'Legend' });
  if (signed) {
    el.append(
      h(
        'div',
        {},
        h('span', { class: 'swatch tok il-p5', 'aria-hidden': 'true' }, '+'),
        h('strong', {}, 'Supporting'),
        ' (score > 0): training on this example made the completion more likely.',
      ),
      h(
        'div',
        {},
        h('span', { class: 'swatch tok il-n5', 'aria-hidden': 'true' }, '\u2212'),
        h('strong', {}, 'Opposing'),
        ' (score < 0): training on this example made the completion less likely.',
      ),
      h(
        'div',
        { class: 'hint' },
        'Token shading: each token’s share of its example’s score (solid underline +, dashed −, bold and a glyph for the strongest; exact values on hover). Each text is scaled to its own strongest token.',
      ),
    );
  } else {
    el.append(
      h(
        'div',
        {},
        h('strong', {}, METHOD_LABELS[r!.method]),
        ' ranks examples by similarity to the query; it has no sign and says nothing about what training did.',
      ),
    );
  }
  el.querySelectorAll<HTMLElement>('.swatch').forEach((s) => {
    s.style.backgroundColor = bucketBackground(s.classList.contains('il-p5') ? 5 : -5);
  });
  return el;
}

/** Multi-stage only: how far the fine-tune moved from the pre-trained weights, and a warning beyond the regime. */
function regimeNote(m: MultiStageRegime): HTMLElement {
  const pct = (x: number) => `${(100 * x).toPrecision(2)}%`;
  const el = h(
    'div',
    { class: `regime${m.inRegime ? '' : ' warn'}` },
    h(
      'div',
      {},
      `Fine-tuned vs pre-trained weights: the linear layers moved by ${pct(m.distance.median)} (median), ` +
        `${pct(m.distance.max)} at most (‖W_ft − W_pt‖ / ‖W_pt‖). Multi-stage influence assumes they stay close; it was ` +
        `measured to work up to ${pct(m.threshold)}, and only from a pre-trained model that had not memorized the data traced.`,
    ),
  );
  if (m.warning) el.append(h('div', { role: 'alert' }, icon('warning'), ` ${m.warning}`));
  return el;
}

function statusLine(): HTMLElement {
  const el = h('div', { class: 'status', role: 'status', 'aria-live': 'polite' });
  if (busy) {
    el.append(icon('loading codicon-modifier-spin'), ` ${busy.message}`);
    if (partial) el.append(` — ${partial.scored} of ${partial.total} examples scored`);
  } else if (error && error.method === state.method) {
    el.classList.add('error');
    el.append(icon('error'), ` ${error.message}`);
  } else if (notice && notice.method === state.method) {
    el.classList.add('notice');
    el.append(icon('info'), ` ${notice.message}`);
  }
  return el;
}

function key(e: { id: ExampleId }): string {
  return `${e.id.dataset}:${e.id.hash}`;
}

function exampleList(
  which: 'supporting' | 'opposing',
  r: ExplainResult,
  examples: ExplainedExample[],
  signed: boolean,
): HTMLElement {
  const title = !signed ? 'Most similar' : which === 'supporting' ? 'Supporting' : 'Opposing';
  const sec = h(
    'section',
    { class: `list ${which}`, 'aria-label': `${title} examples` },
    h(
      'h2',
      {},
      icon(!signed ? 'list-ordered' : which === 'supporting' ? 'arrow-up' : 'arrow-down'),
      ` ${title} `,
      h('span', { class: 'count' }, `(${examples.length})`),
    ),
  );
  if (!examples.length) {
    sec.append(h('p', { class: 'hint' }, signed ? `No ${which} examples.` : 'No examples.'));
    return sec;
  }
  const ol = h('ol', {});
  for (const e of examples) ol.append(exampleRow(r, e, signed));
  sec.append(ol);
  return sec;
}

function exampleRow(r: ExplainResult, e: ExplainedExample, signed: boolean): HTMLElement {
  const k = key(e);
  const flagged = state.flags[e.id.hash] !== undefined;
  const li = h('li', {
    class: `example${flagged ? ' flagged' : ''}${state.focus === k ? ' focused' : ''}`,
    tabindex: 0,
    'data-key': k,
    'aria-label': `#${e.rank}, score ${formatScore(e.score)}, ${signed ? e.sign : 'similarity'}, ${e.id.dataset} line ${e.id.line}${flagged ? ', flagged' : ''}`,
  });
  const open = h(
    'button',
    { class: 'link', title: `Open ${e.id.dataset} at line ${e.id.line}` },
    icon('go-to-file'),
    ` ${e.id.dataset}:${e.id.line}`,
  );
  open.addEventListener('click', (ev) => {
    ev.stopPropagation();
    post({ type: 'open', id: e.id });
  });
  const flag = h(
    'button',
    {
      class: `flag${flagged ? ' on' : ''}`,
      'aria-pressed': flagged ? 'true' : 'false',
      title: flagged
        ? `Flagged: ${state.flags[e.id.hash].reason}. Click to unflag.`
        : 'Flag for removal (written to the dataset’s .exclude.jsonl sidecar)',
    },
    icon('flag'),
    flagged ? ' Flagged' : ' Flag',
  );
  flag.addEventListener('click', (ev) => {
    ev.stopPropagation();
    toggleFlag(e, r.method);
  });
  const bucket = signed ? bucketOf(e.score, Math.abs(e.score)) : 0;
  const score = h(
    'span',
    { class: `score tok ${bucketClass(bucket)}`, title: `score ${e.score} (${signed ? e.sign : 'similarity'})` },
    signed ? formatScore(e.score) : formatValue(e.score),
  );
  score.style.backgroundColor = bucketBackground(bucket);
  const head = h(
    'div',
    { class: 'row-head' },
    h('span', { class: 'rank' }, `#${e.rank}`),
    score,
    h(
      'span',
      { class: 'pct', title: `${e.percentile.toFixed(1)}% of the scored examples have a lower score` },
      formatPercentile(e.percentile),
    ),
    open,
    h('span', { class: 'spacer' }),
    flag,
  );
  const others = Object.entries(e.otherRanks ?? {}) as Array<[Method, number]>;
  const badges = others.length ? h('div', { class: 'badges', 'aria-label': 'ranks under the other methods' }) : null;
  // agreement is with the list the row is in: a supporting row agrees where the other method ranks
  // it among its highest; an opposing one where a signed method ranks it among its most opposing
  // (a similarity method has no opposing side)
  const opposingRow = signed && e.score < 0;
  const K = Math.max(10, opposingRow ? r.opposing.length : r.supporting.length);
  for (const [m, rank] of others) {
    // an opposing row: among the other method's K most opposing, which it scores below 0 (its
    // count of those, where the server says it: in a small pool the bottom K may be supporting)
    const negatives = r.otherOpposing?.[m] ?? r.scored;
    const agree = opposingRow ? SIGNED_METHODS.includes(m) && rank > r.scored - Math.min(K, negatives) : rank <= K;
    const why = opposingRow ? `among its ${K} most opposing` : `in its top ${K}`;
    badges!.append(
      h(
        'span',
        {
          class: `badge${agree ? ' agree' : ''}`,
          title: `${METHOD_LABELS[m]} ranks this example #${rank} of ${r.scored}${agree ? ` (agrees: ${why})` : ''}`,
        },
        `${METHOD_LABELS[m]} #${rank}`,
      ),
    );
  }
  const text = heatText(
    e.text,
    segments(e.text, e.tokenScores),
    signed && !!e.tokenScores,
    `training example ${e.id.dataset} line ${e.id.line}`,
  );
  text.classList.add('example-text');
  li.append(head);
  if (badges) li.append(badges);
  li.append(text);
  const bars = layerBars(r.modules, e.perModule);
  if (bars.length) {
    const d = h('details', { class: 'layers' }, h('summary', {}, 'Influence by layer'));
    d.append(barChart(bars));
    li.append(d);
  }
  li.addEventListener('focus', () => setFocus(k));
  li.addEventListener('click', () => setFocus(k));
  li.addEventListener('keydown', (ev) => {
    if (ev.target !== li) return;
    if (ev.key === 'Enter' || ev.key === 'o') {
      ev.preventDefault();
      post({ type: 'open', id: e.id });
    } else if (ev.key === 'f') {
      ev.preventDefault();
      toggleFlag(e, r.method);
    } else if (ev.key === 'ArrowDown' || ev.key === 'ArrowUp' || ev.key === 'j' || ev.key === 'k') {
      ev.preventDefault();
      const rows = Array.from(app.querySelectorAll<HTMLElement>('li.example'));
      const i = rows.indexOf(li);
      rows[Math.max(0, Math.min(rows.length - 1, i + (ev.key === 'ArrowDown' || ev.key === 'j' ? 1 : -1)))]?.focus();
    }
  });
  return li;
}

function setFocus(k: string) {
  if (state.focus === k) return;
  state.focus = k;
  save();
  // repaint only the query heatmap and the focus mark (keeps keyboard focus and scroll)
  const r = current();
  if (!r) return;
  app.querySelector('header.query')?.replaceWith(queryHeader(r));
  app.querySelectorAll('li.example').forEach((li) => {
    li.classList.toggle('focused', li.getAttribute('data-key') === k);
  });
}

function toggleFlag(e: ExplainedExample, method: Method) {
  const flagged = state.flags[e.id.hash] !== undefined;
  post({ type: 'flag', id: e.id, score: e.score, method, flagged: !flagged });
}

function barChart(bars: ReturnType<typeof layerBars>): HTMLElement {
  // one grid for all rows, so every bar starts at the same axis; a negative half only when needed
  const twoSided = bars.some((b) => b.value < 0);
  const el = h('div', { class: `bars${twoSided ? ' two-sided' : ''}`, role: 'list' });
  for (const b of bars) {
    const bar = h('div', { class: `bar ${b.value >= 0 ? 'il-p5' : 'il-n5'}` });
    bar.style.width = `${b.percent.toFixed(1)}%`;
    bar.style.backgroundColor = bucketBackground(b.value >= 0 ? 4 : -4);
    const neg = h('div', { class: 'half neg' });
    const pos = h('div', { class: 'half pos' });
    (b.value >= 0 ? pos : neg).append(bar);
    el.append(
      h(
        'div',
        { class: 'bar-row', role: 'listitem', title: `${b.title}: ${formatScore(b.value)}` },
        h('span', { class: 'bar-label' }, b.label),
        twoSided ? neg : null,
        pos,
        h('span', { class: 'bar-value' }, formatScore(b.value)),
      ),
    );
  }
  return el;
}

function layerChart(r: ExplainResult): HTMLElement {
  const bars = layerBars(r.modules, r.moduleTotals);
  const fig = h(
    'figure',
    { class: 'chart' },
    h('figcaption', {}, 'Influence by layer — summed over the supporting examples shown'),
  );
  fig.append(
    bars.length ? barChart(bars) : h('p', { class: 'hint' }, `${METHOD_LABELS[r.method]} has no per-layer scores.`),
  );
  return fig;
}

function histogram(r: ExplainResult): HTMLElement {
  const fig = h(
    'figure',
    { class: 'chart' },
    h(
      'figcaption',
      {},
      r.attribution?.retrieved
        ? `Scores of the ${r.scored} retrieved examples of ${r.attribution.retrieved.of} (bar height: log count)`
        : `Scores of all ${r.scored} examples (bar height: log count)`,
    ),
  );
  const bins = histogramBins(r.histogram);
  if (!bins.length) return fig;
  const W = 300;
  const H = 60;
  const s = svg('svg', {
    viewBox: `0 0 ${W} ${H + 16}`,
    class: 'hist',
    role: 'img',
    'aria-label': 'Histogram of scores',
  });
  const bw = W / bins.length;
  bins.forEach((b, i) => {
    const hh = Math.max(b.count ? 2 : 0, b.height * H);
    const rect = svg('rect', { x: i * bw + 0.5, y: H - hh, width: Math.max(1, bw - 1), height: hh, class: 'bin' });
    const t = svg('title', {});
    t.textContent = `${formatScore(b.from)} … ${formatScore(b.to)}: ${b.count} example${b.count === 1 ? '' : 's'}`;
    rect.append(t);
    s.append(rect);
  });
  const lo = r.histogram.edges[0];
  const hi = r.histogram.edges[r.histogram.edges.length - 1];
  if (lo < 0 && hi > 0) {
    const x = axisPosition(r.histogram, 0) * W;
    s.append(svg('line', { x1: x, x2: x, y1: 0, y2: H, class: 'zero' }));
  }
  // the shown examples as ticks under the axis
  for (const [list, cls] of [
    [r.supporting, 'tick-pos'],
    [r.opposing, 'tick-neg'],
  ] as const) {
    for (const e of list) {
      const x = axisPosition(r.histogram, e.score) * W;
      const l = svg('line', { x1: x, x2: x, y1: H + 2, y2: H + 8, class: cls });
      const t = svg('title', {});
      t.textContent = `#${e.rank} ${e.id.dataset}:${e.id.line} ${formatScore(e.score)}`;
      l.append(t);
      s.append(l);
    }
  }
  const lab = (x: number, anchor: string, text: string) => {
    const t = svg('text', { x, y: H + 16, 'text-anchor': anchor, class: 'axis' });
    t.textContent = text;
    s.append(t);
  };
  lab(0, 'start', formatScore(lo));
  lab(W, 'end', formatScore(hi));
  fig.append(s);
  return fig;
}

function partialLists(p: ExplainPartial): HTMLElement {
  const el = h('div', { class: 'lists provisional' });
  for (const [title, list] of [
    ['Supporting so far', p.supporting],
    ['Opposing so far', p.opposing],
  ] as const) {
    const ol = h('ol', {});
    for (const e of list)
      ol.append(
        h(
          'li',
          { class: 'example' },
          h(
            'div',
            { class: 'row-head' },
            h('span', { class: 'score' }, formatScore(e.score)),
            ` ${e.id.dataset}:${e.id.line}`,
          ),
          h('div', { class: 'heat example-text' }, e.text),
        ),
      );
    el.append(h('section', { class: 'list' }, h('h2', {}, title), ol));
  }
  return el;
}

function footer(r: ExplainResult): HTMLElement {
  const t = Object.entries(r.timings)
    .map(([k, v]) => `${k.replace(/_ms$/, '')} ${v < 1000 ? `${Math.round(v)} ms` : `${(v / 1000).toFixed(1)} s`}`)
    .join(' · ');
  return h(
    'footer',
    {},
    h('div', {}, 'Keys: ↑/↓ move between examples · Enter opens the example · F flags it · ←/→ switch method'),
    h('div', {}, `Timings: ${t}`),
  );
}

// ---- messages from the extension ----

window.addEventListener('message', (ev: MessageEvent<ToWebview>) => {
  const m = ev.data;
  switch (m.type) {
    case 'state':
      state = { ...m.state, focus: m.state.focus ?? state.focus };
      busy = undefined;
      error = undefined;
      notice = undefined;
      partial = undefined;
      break;
    case 'result': {
      state = withResult(state, m);
      busy = undefined;
      error = undefined;
      if (notice?.method === m.result.method) notice = undefined;
      partial = undefined;
      break;
    }
    case 'partial':
      partial = m.partial;
      break;
    case 'busy':
      busy = { method: m.method, message: m.message };
      if (state.method !== m.method) state.method = m.method;
      error = undefined;
      notice = undefined;
      partial = undefined;
      break;
    case 'error':
      busy = undefined;
      partial = undefined;
      error = { method: m.method, message: m.message };
      break;
    case 'notice':
      notice = { method: m.method, message: m.message };
      break;
    case 'flags':
      state.flags = m.flags;
      break;
    case 'colors':
      state.colors = m.colors;
      applyColors();
      break;
  }
  save();
  render();
});

function applyColors() {
  if (!state.colors) return;
  document.documentElement.style.setProperty('--il-supporting', state.colors.supporting);
  document.documentElement.style.setProperty('--il-opposing', state.colors.opposing);
}

applyColors();
render();
post({ type: 'ready', state: vscode.getState() });
