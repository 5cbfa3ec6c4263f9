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
