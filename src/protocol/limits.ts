// The limits on request params, in one place. The RPC params schemas (./params-schema), the
// editor's settings (package.json `influenceLens.topK`, checked by test/unit/protocol.test.ts)
// and the service's own checks all read these numbers, so a value one side accepts is never
// refused by another.

export const LIMITS = {
  /** dataset ids and other short names */
  idMaxChars: 200,
  /** an example's hash as the client sends it back (16 hex digits today; room to grow) */
  hashMaxChars: 64,
  /** `explain`: how many supporting and how many opposing examples */
  topK: { min: 1, max: 1000 },
  /** `explain`: prompt + completion, in UTF-16 code units */
  explainTextMaxChars: 20_000,
  /** `explain` of a whole chat record: at most this many messages (their text counts in explainTextMaxChars) */
  chatMaxMessages: 512,
  /** `explainMany`: queries in one pass */
  explainManyMaxQueries: 64,
  /** `scanDataset`: how many examples, and how many when the client does not say */
  scanTopK: { min: 1, max: 10_000, default: 50 },
  /** `generate` */
  generate: {
    promptMaxChars: 20_000,
    maxTokens: { min: 1, max: 256, default: 16 },
    temperature: { min: 0, max: 5, default: 0 },
    seedDefault: 0,
    /** the random generator keeps 32 bits of a seed: beyond them two seeds would sample alike */
    seed: { min: 0, max: 0xffffffff },
  },
} as const;
