// Token heatmaps and charts as plain data (no DOM): which characters form which token, how long
// each bar is. Pure, unit-tested; `main.ts` turns the results into elements.
import type { TokenScores } from '../protocol/types';

export interface Segment {
  text: string;
  /** the token's value; absent for text between tokens */
  value?: number;
  /** the token's index in the scores */
  token?: number;
}

/**
 * Cuts `text` into token segments (with their values) and the text between them. Offsets are
 * [start, end) in UTF-16 units; tokens are taken in order of their start, empty or out-of-range
 * ones are skipped, and a token overlapping the previous one is cut to start where it ends.
 */
export function segments(text: string, scores: TokenScores | undefined): Segment[] {
  if (!scores?.offsets.length) return text ? [{ text }] : [];
  const order = scores.offsets
    .map(([s, e], i) => ({ s: Math.max(0, s), e: Math.min(text.length, e), i }))
    .filter((t) => t.e > t.s)
    .sort((a, b) => a.s - b.s || a.i - b.i);
  const out: Segment[] = [];
  let at = 0;
  for (const t of order) {
    const s = Math.max(t.s, at);
    if (t.e <= s) continue;
    if (s > at) out.push({ text: text.slice(at, s) });
    out.push({ text: text.slice(s, t.e), value: scores.values[t.i] ?? 0, token: t.i });
    at = t.e;
  }
  if (at < text.length) out.push({ text: text.slice(at) });
  return out;
}

/** Completion-side values of several examples summed per completion token (the query heatmap). */
export function sumPerToken(rows: Array<number[] | undefined>, n: number): number[] {
  const out = new Array<number>(n).fill(0);
  for (const r of rows) if (r) for (let k = 0; k < n && k < r.length; k++) out[k] += Number.isFinite(r[k]) ? r[k] : 0;
  return out;
}

/** A short label for a module name: `model.layers.1.mlp.up_proj` → `L1 mlp.up_proj`. */
export function shortModule(name: string): string {
  const m = /(?:^|\.)(?:layers|h|layer|blocks)\.(\d+)\.(.+)$/.exec(name);
  return m ? `L${m[1]} ${m[2]}` : name;
}

export interface Bar {
  label: string;
  title: string;
  value: number;
  /** 0..100: the bar's length as a share of half the chart (bars grow from the center) */
  percent: number;
}

/** Signed bars for per-module scores, in model order, scaled to the largest |value|. */
export function layerBars(modules: string[], values: Record<string, number> | undefined): Bar[] {
  if (!values) return [];
  const names = modules.filter((m) => m in values);
  let max = 0;
  for (const m of names) max = Math.max(max, Math.abs(values[m]) || 0);
  return names.map((m) => ({
    label: shortModule(m),
    title: m,
    value: values[m],
    percent: max > 0 && Number.isFinite(values[m]) ? (100 * Math.abs(values[m])) / max : 0,
  }));
}

export interface HistogramBin {
  from: number;
  to: number;
  count: number;
  /** 0..1: log-scaled height (one example stays visible next to thousands) */
  height: number;
}

export function histogramBins(h: { edges: number[]; counts: number[] } | undefined): HistogramBin[] {
  if (!h || h.edges.length !== h.counts.length + 1) return [];
  const max = Math.max(0, ...h.counts);
  return h.counts.map((c, i) => ({
    from: h.edges[i],
    to: h.edges[i + 1],
    count: c,
    height: max > 0 && c > 0 ? Math.log1p(c) / Math.log1p(max) : 0,
  }));
}

/** Where a value falls on the histogram's axis, 0..1 (clamped). */
export function axisPosition(h: { edges: number[] }, v: number): number {
  const lo = h.edges[0];
  const hi = h.edges[h.edges.length - 1];
  if (!(hi > lo)) return 0.5;
  return Math.min(1, Math.max(0, (v - lo) / (hi - lo)));
}
