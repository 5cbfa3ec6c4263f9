// The extension's connection to an influence server (`influence-lens serve`): JSON-RPC over a
// WebSocket through `RpcClient`, turning the server's error codes into errors a person can act
// on. Where the server is (a private one the extension started, or a configured URL with its
// token) is a `Connector`'s business; a dropped connection is reopened on the next call.
// No `vscode` import, so the tests drive it against a real server.
import { Explain, Fit, Generate, ScanDataset } from '../../protocol/requests';
import { RpcErrorCode, type ServiceInfo, type WorkDoneProgress } from '../../protocol/rpc';
import type { ExplainParams, ExplainPartial, ExplainResult, Method } from '../../protocol/types';
import { RpcClient } from '../../transport/client';
import { RpcError } from '../../transport/errors';
import {
  type Cancellation,
  CancelledError,
  ClientError,
  type ClientInfo,
  type Fitted,
  type GenerateParams,
  type GenerateResult,
  type InfluenceClient,
  type ProgressUpdate,
  type ScanParams,
  type ScanResult,
  type StageName,
} from './influence-client';

/** Where the server is: asked again after a connection drops. */
export interface Connector {
  /** e.g. "local server (pid 1234)" or "ws://10.0.0.5:7070" */
  readonly label: string;
  endpoint(token?: Cancellation): Promise<{ url: string; token: string }>;
  /** the server refused the token (401): forget it, so the next `endpoint` asks again */
  rejected?(): void;
  dispose(): void;
}

export class ServerClient implements InfluenceClient {
  private conn: Promise<RpcClient> | undefined;

  constructor(
    private readonly connector: Connector,
    private readonly clientName = 'influence-lens-vscode',
  ) {}

  get label(): string {
    return this.connector.label;
  }

  private connect(token?: Cancellation): Promise<RpcClient> {
    if (!this.conn) {
      const opening = (async () => {
        const { url, token: secret } = await this.connector.endpoint(token);
        try {
          const c = await RpcClient.connect({ url, token: secret, client: { name: this.clientName } });
          c.onClose(() => {
            if (this.conn === opening) this.conn = undefined;
          });
          return c;
        } catch (e) {
          const m = (e as Error).message;
          if (/\(401 /.test(m)) this.connector.rejected?.();
          throw new ClientError(m, true);
        }
      })();
      this.conn = opening;
      opening.catch(() => {
        if (this.conn === opening) this.conn = undefined;
      });
    }
    return this.conn;
  }

  async info(token?: Cancellation): Promise<ClientInfo> {
    const c = await this.connect(token);
    // `status` carries the service's view now (methods appear after a fit); initialize's is older
    const s = await call(() => c.status());
    return toClientInfo(s.service ?? c.server!);
  }

  async explain(
    params: ExplainParams,
    onPartial: (p: ExplainPartial) => void,
    token: Cancellation,
    onProgress?: (p: ProgressUpdate) => void,
  ): Promise<ExplainResult> {
    const c = await this.connect(token);
    return call(() =>
      c.request(Explain, params, {
        signal: signalOf(token),
        onPartial: (v) => onPartial(v as ExplainPartial),
        onProgress: onProgress && ((p) => onProgress({ message: p.message, percentage: pct(p) })),
      }),
    );
  }

  async generate(params: GenerateParams, token: Cancellation): Promise<GenerateResult> {
    const c = await this.connect(token);
    return call(() => c.request(Generate, params, { signal: signalOf(token) }));
  }

  async scanDataset(
    params: ScanParams,
    token: Cancellation,
    onProgress?: (p: ProgressUpdate) => void,
  ): Promise<ScanResult> {
    const c = await this.connect(token);
    return call(() =>
      c.request(ScanDataset, params, {
        signal: signalOf(token),
        onProgress: onProgress && ((p) => onProgress({ message: p.message, percentage: pct(p) })),
      }),
    );
  }

  async fit(stage: StageName, token: Cancellation, onProgress?: (p: ProgressUpdate) => void): Promise<Fitted> {
    const c = await this.connect(token);
    const r = await call(() =>
      c.request(
        Fit,
        { stage },
        {
          signal: signalOf(token),
          onProgress: onProgress && ((p) => onProgress({ message: p.message, percentage: pct(p) })),
        },
      ),
    );
    return { stage, info: toClientInfo(r.info) };
  }

  dispose(): void {
    const c = this.conn;
    this.conn = undefined;
    c?.then((x) => x.close()).catch(() => undefined);
    this.connector.dispose();
  }
}

/** The server's view in the editor's terms: which stages a method still needs fitted. */
export function toClientInfo(s: ServiceInfo): ClientInfo {
  // a stage whose factors folder is another model's (or data's) is not offered a fit: "fit" would
  // refuse to replace that folder, and the method's `unavailable` reason says what to do
  const unfitted = s.stages.filter((x) => !x.factors && !x.factorsUnusable).map((x) => x.name as StageName);
  const needsFit: Partial<Record<Method, StageName[]>> = {};
  if (!s.methods.includes('ekfac') && unfitted.includes('finetuned')) needsFit.ekfac = ['finetuned'];
  // multistage needs both stages: fitting one cannot help while the other's factors are unusable
  if (
    !s.methods.includes('multistage') &&
    s.stages.length > 1 &&
    unfitted.length &&
    !s.stages.some((x) => x.factorsUnusable)
  )
    needsFit.multistage = unfitted;
  return {
    model: s.model,
    device: s.device,
    datasets: s.datasets,
    datasetPaths: s.datasetPaths,
    methods: s.methods,
    unavailable: s.unavailable,
    needsFit,
    warnings: s.warnings,
    revision: s.revision,
  };
}

/** Runs a request, turning the server's error codes into the editor's errors. */
async function call<T>(f: () => Promise<T>): Promise<T> {
  try {
    return await f();
  } catch (e) {
    if (!(e instanceof RpcError)) throw e;
    switch (e.code) {
      case RpcErrorCode.RequestCancelled:
        throw new CancelledError();
      case RpcErrorCode.ServerBusy:
        throw new ClientError(`the server is busy (${e.message}); try again in a moment`, true);
      case RpcErrorCode.ContentModified:
        throw new ClientError(`${e.message}; run it again to use the file as it is now`, true);
      case RpcErrorCode.ProtocolVersionMismatch:
        throw new ClientError(
          `this extension and the server speak different protocol versions (${e.message}): update the one that is older`,
        );
      default:
        throw new ClientError(e.message, e.code === RpcErrorCode.InternalError);
    }
  }
}

function signalOf(token: Cancellation): AbortSignal {
  const ac = new AbortController();
  if (token.isCancellationRequested) ac.abort();
  else token.onCancellationRequested(() => ac.abort());
  return ac.signal;
}

function pct(p: WorkDoneProgress): number | undefined {
  return 'percentage' in p && typeof p.percentage === 'number' ? p.percentage : undefined;
}
