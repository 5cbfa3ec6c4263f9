// The messages between the results panel (webview) and the extension host, and the one rule both
// sides apply to a new result. Plain data and pure functions only:
// imported by both sides (the webview bundle and the extension bundle).
import type { ExampleId, ExplainPartial, ExplainResult, Method } from '../protocol/types';

/** What the panel shows for a flag: the example's identity and whether it is flagged. */
export interface FlagState {
  hash: string;
  reason: string;
}

/** The panel's persisted state (`vscode.setState`, and the serializer's restore argument). */
export interface PanelState {
  version: 1;
  /** results by method; the one shown is `method` */
  results: Partial<Record<Method, ExplainResult>>;
  method?: Method;
  /** methods the server can run now (the switcher's choices) */
  methods: Method[];
  /** dataset id the results are about */
  dataset?: string;
  /** what the results depend on (query, dataset file, server and model, settings), as the
   * extension digests it: results of other methods are kept only while it is the same */
  context?: string;
  /** flagged examples by hash */
  flags: Record<string, FlagState>;
  /** the example whose completion-side heatmap is shown on the query (by hash) */
  focus?: string;
  /** heatmap colors from the settings (CSS) */
  colors?: { supporting: string; opposing: string };
}

export type ToWebview =
  | { type: 'state'; state: PanelState }
  | { type: 'result'; result: ExplainResult; methods: Method[]; dataset: string; context: string }
  | { type: 'partial'; partial: ExplainPartial }
  | { type: 'busy'; method: Method; message: string }
  | { type: 'error'; method: Method; message: string }
  /** something to know about the result shown on a method's tab (a kept result not checked) */
  | { type: 'notice'; method: Method; message: string }
  | { type: 'flags'; flags: Record<string, FlagState> }
  | { type: 'colors'; colors: { supporting: string; opposing: string } };

export type FromWebview =
  /** the page loaded; `state` is what it restored by itself (getState), if anything */
  | { type: 'ready'; state?: PanelState }
  | { type: 'open'; id: ExampleId }
  | { type: 'flag'; id: ExampleId; score: number; method: Method; flagged: boolean }
  | { type: 'method'; method: Method };

/**
 * The panel's state with a new result (the one rule both sides apply): the other methods' results
 * stay only when they were computed in the same context (query, dataset file, server and model,
 * settings); otherwise they no longer apply and are dropped.
 */
export function withResult(state: PanelState, m: Extract<ToWebview, { type: 'result' }>): PanelState {
  const keep = state.context !== undefined && state.context === m.context && state.dataset === m.dataset;
  // a run's result arriving after the person chose another tab that shows a kept result (a run
  // starts on its own tab): kept, without taking the panel back to it
  const stay =
    keep && state.method !== undefined && state.method !== m.result.method && state.results[state.method] !== undefined;
  return {
    ...state,
    results: { ...(keep ? state.results : {}), [m.result.method]: m.result },
    method: stay ? state.method : m.result.method,
    methods: m.methods,
    dataset: m.dataset,
    context: m.context,
    focus: stay ? state.focus : undefined,
  };
}
