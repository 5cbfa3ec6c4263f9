// One error type for everything wrong with a user's training-data file, so the CLI can print
// the message alone (it already names file:line) instead of a stack trace.
export class DataError extends Error {
  override name = 'DataError';
  /** the server answers it with the InvalidData code (src/transport/errors.ts) */
  readonly code = 'data_invalid';
}
