// The messages between WorkerService (main thread) and its service worker threads.
import type { InfluenceService } from './influence-service';

export type ServiceInfoSnapshot = ReturnType<InfluenceService['info']>;

export interface SerializedError {
  name: string;
  message: string;
  /** ServiceError's code ('invalid_params', 'not_ready', 'data_changed', 'cancelled') */
  code?: string;
  stack?: string;
  serviceError: boolean;
  /** one of the errors a person acts on (src/server/user-errors.ts): a bad file, setting or request */
  userError?: boolean;
}

export type ToWorker =
  /** `flag`: a SharedArrayBuffer of one Int32; the main thread sets it to 1 to cancel the call */
  | { type: 'call'; id: number; method: string; args: unknown[]; flag: SharedArrayBuffer }
  | { type: 'cancel'; id: number };

export type FromWorker =
  | { type: 'ready'; info: ServiceInfoSnapshot }
  | { type: 'failed'; error: SerializedError }
  | { type: 'progress'; id: number; message: string; done: number; total: number }
  | { type: 'partial'; id: number; value: unknown }
  | { type: 'result'; id: number; value: unknown; info: ServiceInfoSnapshot }
  | { type: 'error'; id: number; error: SerializedError; info?: ServiceInfoSnapshot };
