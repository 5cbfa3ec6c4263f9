// The JSON schema each request's params must satisfy, keyed by method name (./requests). The
// transport validates params with these before a handler runs, so a bad request is answered
// InvalidParams naming the field; the numbers come from ./limits, the method names from the
// methods' list, so the schema cannot drift from what the service accepts.
import { LIMITS } from './limits';
import { METHODS } from './types';

const id = { type: 'string', minLength: 1, maxLength: LIMITS.idMaxChars } as const;
const stage = { enum: ['finetuned', 'pretrained'] } as const;

const messages = {
  type: 'array',
  minItems: 1,
  maxItems: LIMITS.chatMaxMessages,
  items: {
    type: 'object',
    required: ['role', 'content'],
    properties: {
      role: { type: 'string', maxLength: LIMITS.idMaxChars },
      content: { type: 'string' },
      name: { type: 'string', maxLength: LIMITS.idMaxChars },
    },
  },
} as const;

export const PARAMS_SCHEMA = {
  explain: {
    type: 'object',
    required: ['prompt', 'completion', 'dataset', 'method', 'topK'],
    additionalProperties: false,
    properties: {
      prompt: { type: 'string', maxLength: LIMITS.explainTextMaxChars },
      completion: { type: 'string', minLength: 1, maxLength: LIMITS.explainTextMaxChars },
      dataset: id,
      method: { enum: [...METHODS] },
      topK: { type: 'integer', minimum: LIMITS.topK.min, maximum: LIMITS.topK.max },
      candidates: { enum: ['all', 'retrieved'] },
      compare: { type: 'array', items: { enum: [...METHODS] }, maxItems: METHODS.length },
      // a whole chat record: the server renders it with the model's chat template
      messages,
    },
  },
  explainMany: {
    type: 'object',
    required: ['queries', 'dataset', 'method', 'topK'],
    additionalProperties: false,
    properties: {
      queries: {
        type: 'array',
        minItems: 1,
        maxItems: LIMITS.explainManyMaxQueries,
        items: {
          type: 'object',
          required: ['prompt', 'completion'],
          additionalProperties: false,
          properties: {
            prompt: { type: 'string', maxLength: LIMITS.explainTextMaxChars },
            completion: { type: 'string', minLength: 1, maxLength: LIMITS.explainTextMaxChars },
            messages,
          },
        },
      },
      dataset: id,
      method: { enum: [...METHODS] },
      topK: { type: 'integer', minimum: LIMITS.topK.min, maximum: LIMITS.topK.max },
      candidates: { enum: ['all', 'retrieved'] },
      compare: { type: 'array', items: { enum: [...METHODS] }, maxItems: METHODS.length },
    },
  },
  generate: {
    type: 'object',
    required: ['prompt'],
    additionalProperties: false,
    properties: {
      prompt: { type: 'string', maxLength: LIMITS.generate.promptMaxChars },
      maxTokens: { type: 'integer', minimum: LIMITS.generate.maxTokens.min, maximum: LIMITS.generate.maxTokens.max },
      temperature: {
        type: 'number',
        minimum: LIMITS.generate.temperature.min,
        maximum: LIMITS.generate.temperature.max,
      },
      seed: { type: 'integer', minimum: LIMITS.generate.seed.min, maximum: LIMITS.generate.seed.max },
    },
  },
  getExample: {
    type: 'object',
    required: ['dataset', 'line'],
    additionalProperties: false,
    properties: {
      dataset: id,
      line: { type: 'integer', minimum: 1 },
      hash: { type: 'string', maxLength: LIMITS.hashMaxChars },
    },
  },
  scanDataset: {
    type: 'object',
    required: ['dataset'],
    additionalProperties: false,
    properties: { dataset: id, topK: { type: 'integer', minimum: LIMITS.scanTopK.min, maximum: LIMITS.scanTopK.max } },
  },
  fit: { type: 'object', additionalProperties: false, properties: { stage } },
  index: { type: 'object', required: ['dataset'], additionalProperties: false, properties: { dataset: id } },
  reload: { type: 'object', required: ['dataset'], additionalProperties: false, properties: { dataset: id } },
} as const satisfies Record<string, object>;
