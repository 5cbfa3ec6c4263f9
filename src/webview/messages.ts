// The messages between the results panel (webview) and the extension host. Plain data only:
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
  /** flagged examples by hash */
  flags: Record<string, FlagState>;
  /** the example whose completion-side heatmap is shown on the query (by hash) */
  focus?: string;
  /** heatmap colors from the settings (CSS) */
  colors?: { supporting: string; opposing: string };
}

export type ToWebview =
  | { type: 'state'; state: PanelState }
  | { type: 'result'; result: ExplainResult; methods: Method[]; dataset: string }
  | { type: 'partial'; partial: ExplainPartial }
  | { type: 'busy'; method: Method; message: string }
  | { type: 'error'; method: Method; message: string }
  | { type: 'flags'; flags: Record<string, FlagState> }
  | { type: 'colors'; colors: { supporting: string; opposing: string } };

export type FromWebview =
  /** the page loaded; `state` is what it restored by itself (getState), if anything */
  | { type: 'ready'; state?: PanelState }
  | { type: 'open'; id: ExampleId }
  | { type: 'flag'; id: ExampleId; score: number; method: Method; flagged: boolean }
  | { type: 'method'; method: Method };
