// The client used until the WebSocket JSON-RPC client is plugged in: every call fails with a
// message a person can act on (the CLI computes the same results meanwhile).
import type { ExplainResult } from '../../protocol/types';
import {
  ClientError,
  type ClientInfo,
  type GenerateResult,
  type InfluenceClient,
  type ScanResult,
} from './influence-client';

const MESSAGE =
  'The editor cannot reach an Influence Lens server yet: this build has no server connection. ' +
  'Meanwhile `npx influence-lens explain --json ...` computes the same result in a terminal.';

export class UnconnectedClient implements InfluenceClient {
  readonly label = 'not connected';
  async info(): Promise<ClientInfo> {
    throw new ClientError(MESSAGE, true);
  }
  async explain(): Promise<ExplainResult> {
    throw new ClientError(MESSAGE, true);
  }
  async generate(): Promise<GenerateResult> {
    throw new ClientError(MESSAGE, true);
  }
  async scanDataset(): Promise<ScanResult> {
    throw new ClientError(MESSAGE, true);
  }
  dispose(): void {}
}
