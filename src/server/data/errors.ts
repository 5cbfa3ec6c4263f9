// One error type for everything wrong with a user's training-data file, so the CLI can print
// the message alone (it already names file:line) instead of a stack trace.
export class DataError extends Error {
  override name = 'DataError';
  /** the server answers it with the InvalidData code (src/transport/errors.ts) */
  readonly code = 'data_invalid';
}

/**
 * A query that cannot be explained (its prompt, completion or messages, as a request gave them):
 * the request's fault, not a dataset file's, so the server answers InvalidParams.
 */
export class QueryError extends Error {
  override name = 'QueryError';
  readonly code = 'invalid_params';
}
