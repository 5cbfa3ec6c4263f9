// The errors a person can act on (a bad file, flag, setting or request), listed in one place.
// The CLI prints these as one line and anything else (a bug) with its stack; each class keeps
// living next to the code that throws it.
import { FactorsError, UnfinishedFitError } from './attribution/ekfac/factors-io';
import { NonFiniteError } from './attribution/ekfac/gradient';
import { ExplainError } from './attribution/explain';
import { FitJobError } from './attribution/fit-job';
import { StageError, TrainingMismatchError } from './attribution/stage';
import { CliError } from './cli/util';
import { DataError, QueryError } from './data/errors';
import { TrainingSettingError } from './data/training';
import { QueriesError } from './eval/queries';
import { GradientStoreError } from './index/gradient-store';
import { AdapterError } from './model/adapter';
import { ConfigError as ModelConfigError } from './model/architectures/common';
import { CheckpointError } from './model/checkpoint';
import { FileChangedError } from './model/content-digest';
import { EngineError } from './model/engine';
import { GenerateError } from './model/generate';
import { DeviceError } from './model/onnx/session';
import { SafetensorsError } from './model/safetensors';
import { TokenizerError } from './model/tokenizer';
import { ConfigFileError } from './service/config';
import { DeviceUnavailableError } from './service/device';
import { ServiceError } from './service/influence-service';
import { EnvSettingError } from './util/env';

export const USER_ERRORS: ReadonlyArray<new (...args: never[]) => Error> = [
  CliError,
  ConfigFileError,
  ServiceError,
  DeviceUnavailableError,
  DeviceError,
  DataError,
  QueryError,
  CheckpointError,
  AdapterError,
  SafetensorsError,
  TokenizerError,
  ModelConfigError,
  EngineError,
  StageError,
  TrainingMismatchError,
  FitJobError,
  UnfinishedFitError,
  FactorsError,
  ExplainError,
  GradientStoreError,
  QueriesError,
  TrainingSettingError,
  FileChangedError,
  EnvSettingError,
  GenerateError,
  NonFiniteError,
];

/**
 * Error classes that are not the user's to act on, each with why (a test checks that every error
 * class under src/server and src/common is in one of the two lists, so a new one is not
 * forgotten and printed as a crash).
 */
export const INTERNAL_ERRORS: Readonly<Record<string, string>> = {
  SettingError: 'the base of ExplainError, FitJobError, StageError; never thrown itself',
  FitBusyError: 'a FitJobError (user-facing through its base)',
  CheckpointsError: 'a CheckpointError (user-facing through its base)',
  ChatTemplateError: 'rethrown as a TokenizerError naming the record',
  RecordShapeError: 'rethrown as a DataError naming the file and line',
  QueueFullError: "answered as the protocol's Busy code by the dispatcher",
  HelpRequested: 'the CLI prints the help text it carries and exits 0',
  StoreFileChanged: 'the gradient store is reread or rebuilt (gradient-store.ts)',
};

/** Whether `e` is a user-facing error (print its message), not a bug (print its stack). */
export function isUserError(e: unknown): boolean {
  return USER_ERRORS.some((C) => e instanceof C);
}

/**
 * A full disk or quota is the machine's state, not a bug: one line saying where (the failing
 * call's path, else the command's --out), instead of a stack. The writers replace their outputs
 * whole, so what was there before is still there.
 */
export function diskFull(err: Error, argv: string[]): string | undefined {
  const e = err as NodeJS.ErrnoException;
  if (e?.code !== 'ENOSPC' && e?.code !== 'EDQUOT') return undefined;
  const i = argv.findIndex((a) => a === '--out' || a.startsWith('--out='));
  const out = i < 0 ? undefined : argv[i].startsWith('--out=') ? argv[i].slice(6) : argv[i + 1];
  const where = e.path ? ` writing ${e.path}` : out ? ` writing --out ${out}` : '';
  const what = e.code === 'ENOSPC' ? 'no space left on the disk' : 'the disk quota is used up';
  return `${what}${where} (${e.code}): free some space there or write elsewhere (another --out; TMPDIR for temporary files), then run it again (nothing there before was replaced)`;
}
