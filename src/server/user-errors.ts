// The errors a person can act on (a bad file, flag, setting or request), listed in one place.
// The CLI prints these as one line and anything else (a bug) with its stack; each class keeps
// living next to the code that throws it.
import { UnfinishedFitError } from './attribution/ekfac/factors-io';
import { ExplainError } from './attribution/explain';
import { FitJobError } from './attribution/fit-job';
import { StageError } from './attribution/stage';
import { CliError } from './cli/util';
import { DataError } from './data/errors';
import { GradientStoreError } from './index/gradient-store';
import { ConfigError as ModelConfigError } from './model/architectures/common';
import { CheckpointError } from './model/checkpoint';
import { EngineError } from './model/engine';
import { DeviceError } from './model/onnx/session';
import { SafetensorsError } from './model/safetensors';
import { TokenizerError } from './model/tokenizer';
import { ConfigFileError } from './service/config';
import { DeviceUnavailableError } from './service/device';
import { ServiceError } from './service/influence-service';

export const USER_ERRORS: ReadonlyArray<new (...args: never[]) => Error> = [
  CliError,
  ConfigFileError,
  ServiceError,
  DeviceUnavailableError,
  DeviceError,
  DataError,
  CheckpointError,
  SafetensorsError,
  TokenizerError,
  ModelConfigError,
  EngineError,
  StageError,
  FitJobError,
  UnfinishedFitError,
  ExplainError,
  GradientStoreError,
];

/** Whether `e` is a user-facing error (print its message), not a bug (print its stack). */
export function isUserError(e: unknown): boolean {
  return USER_ERRORS.some((C) => e instanceof C);
}
