// model_type → graph builder. Add an architecture by writing a builder from the shared
// blocks in common.ts, declaring the config keys it implements, and listing it here.
import { type Architecture, type Config, ConfigError } from './common';
import { checkConfigKeys } from './config-keys';
import { gemma3 } from './gemma3';
import { gptNeox } from './gpt-neox';
import { gpt2 } from './gpt2';
import { llama, mistral, phi3, qwen2, qwen3 } from './llama';

export const ARCHITECTURES: readonly Architecture[] = [gpt2, gptNeox, llama, mistral, qwen2, qwen3, phi3, gemma3];

export const SUPPORTED_MODEL_TYPES = ARCHITECTURES.flatMap((a) => a.modelTypes);

/** The builder for a config, after checking that it implements every key the config has. */
export function architectureFor(config: Config, configPath = 'config.json'): Architecture {
  const modelType = String(config.model_type);
  const a = ARCHITECTURES.find((x) => x.modelTypes.includes(modelType));
  if (!a)
    throw new ConfigError(
      `${configPath}: model_type "${modelType}" is not supported (supported: ${SUPPORTED_MODEL_TYPES.join(', ')})`,
    );
  checkConfigKeys(config, a.configKeys, modelType, configPath);
  return a;
}
