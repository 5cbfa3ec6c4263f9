// model_type → graph builder. Add an architecture by writing a builder from the shared
// blocks in common.ts and listing it here.
import { type Architecture, ConfigError } from './common';
import { gptNeox } from './gpt-neox';
import { gpt2 } from './gpt2';
import { llama } from './llama';

export const ARCHITECTURES: readonly Architecture[] = [gpt2, gptNeox, llama];

export const SUPPORTED_MODEL_TYPES = ARCHITECTURES.flatMap((a) => a.modelTypes);

export function architectureFor(modelType: string, configPath = 'config.json'): Architecture {
  const a = ARCHITECTURES.find((x) => x.modelTypes.includes(modelType));
  if (!a)
    throw new ConfigError(
      `${configPath}: model_type "${modelType}" is not supported (supported: ${SUPPORTED_MODEL_TYPES.join(', ')})`,
    );
  return a;
}
