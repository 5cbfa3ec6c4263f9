// Which config.json keys a builder implements, and with which values. Every key of a
// checkpoint's config must be either one the builder declares (and its value accepted)
// or one known not to change the forward pass; anything else is refused, so a model
// whose maths we do not reproduce (soft-capping, an unknown RoPE type, quantization,
// ...) is never scored silently wrong.
import { COMMON_ROPE_TYPES, type Config, ConfigError, LONGROPE_NAMES, ROPE_TYPE_KEYS } from './common';

/** One implemented key: the values the builder reproduces exactly as transformers does. */
export interface KeyRule {
  /** the accepted values, for the error message */
  accepts: string;
  ok(value: unknown, config: Config): boolean;
}

export type ConfigKeys = Readonly<Record<string, KeyRule>>;

/** Any value: the key does not change the forward pass, or the builder reads it fully. */
export const anything: KeyRule = { accepts: 'any value', ok: () => true };

export const positiveInt: KeyRule = {
  accepts: 'a positive integer',
  ok: (v) => Number.isInteger(v) && (v as number) > 0,
};

export const finiteNumber: KeyRule = {
  accepts: 'a number',
  ok: (v) => typeof v === 'number' && Number.isFinite(v),
};

/** A number above 0 (an epsilon, a RoPE base): 0 or a negative one makes the forward pass NaN. */
export const positiveNumber: KeyRule = {
  accepts: 'a number above 0',
  ok: (v) => typeof v === 'number' && Number.isFinite(v) && v > 0,
};

export const boolean: KeyRule = { accepts: 'true or false', ok: (v) => typeof v === 'boolean' };

/** Exactly one of the given JSON values (null included when listed). */
export function oneOf(...values: unknown[]): KeyRule {
  return {
    accepts: values.map((v) => JSON.stringify(v)).join(' or '),
    ok: (v) => values.some((x) => x === v),
  };
}

export function nullOr(rule: KeyRule): KeyRule {
  return { accepts: `null or ${rule.accepts}`, ok: (v, c) => v === null || rule.ok(v, c) };
}

/**
 * A `rope_parameters` / `rope_scaling` dict of a RoPE type the builder implements (`types`), with
 * only the sub-keys that type reads. `partial_rotary_factor` is accepted only where the
 * builder rotates part of each head (GPT-NeoX, Phi-3); Llama-family builders rotate it whole.
 * longrope's short_factor and long_factor are lists of numbers above 0.
 */
export function ropeRule(partialRotary: boolean, types: readonly string[] = COMMON_ROPE_TYPES): KeyRule {
  const lists = new Set(['short_factor', 'long_factor']);
  const positive = (x: unknown) => typeof x === 'number' && Number.isFinite(x) && x > 0;
  return {
    accepts: `null or a dict with rope_type ${types.join(' / ')} and only the keys that type reads (${types
      .map((t) => `${t}: ${['rope_theta', ...ROPE_TYPE_KEYS[LONGROPE_NAMES.includes(t) ? 'longrope' : t]].join(', ')}`)
      .join('; ')})${partialRotary ? ', partial_rotary_factor' : ''}`,
    ok(v) {
      if (v === null) return true;
      if (!v || typeof v !== 'object' || Array.isArray(v)) return false;
      const d = v as Config;
      const type = String(d.rope_type ?? d.type ?? 'default');
      const reads = types.includes(type)
        ? ROPE_TYPE_KEYS[LONGROPE_NAMES.includes(type) ? 'longrope' : type]
        : undefined;
      if (!reads) return false;
      const allowed = new Set(['rope_type', 'type', 'rope_theta', ...reads]);
      for (const [k, x] of Object.entries(d)) {
        if (k === 'partial_rotary_factor') {
          if (!(partialRotary ? finiteNumber.ok(x, d) : x === 1 || x === null)) return false;
        } else if (!allowed.has(k)) return false;
        else if (lists.has(k)) {
          if (!(Array.isArray(x) && x.length > 0 && x.every(positive))) return false;
        } else if (k !== 'rope_type' && k !== 'type' && !positive(x)) return false;
      }
      // factors the type needs must be present (original_max_position_embeddings has a fallback;
      // longrope's factor and attention_factor have defaults; transformers reads both factor lists)
      const optional = new Set(['original_max_position_embeddings', 'factor', 'attention_factor']);
      return reads.every((k) => optional.has(k) || (lists.has(k) ? Array.isArray(d[k]) : typeof d[k] === 'number'));
    },
  };
}

/**
 * Keys of every transformers `PreTrainedConfig` (and of old configs that stored
 * generation settings) that do not change a causal LM's forward pass in evaluation:
 * ids, dtype, caching, labels, dropout probabilities (we compute in eval mode, as
 * influence functions require), generation defaults.
 */
const HARMLESS_KEYS = [
  'architectures',
  'model_type',
  'transformers_version',
  '_name_or_path',
  'name_or_path',
  '_commit_hash',
  'dtype',
  'torch_dtype',
  'use_bfloat16',
  'use_cache',
  // which KV cache generate() builds (Gemma's "hybrid"): not read by a forward pass
  'cache_implementation',
  'bos_token_id',
  'eos_token_id',
  'pad_token_id',
  'sep_token_id',
  'decoder_start_token_id',
  'initializer_range',
  'max_position_embeddings',
  'output_attentions',
  'output_hidden_states',
  'return_dict',
  'use_return_dict',
  'torchscript',
  'id2label',
  'label2id',
  'num_labels',
  '_num_labels',
  'output_past',
  'problem_type',
  'finetuning_task',
  'task_specific_params',
  'tokenizer_class',
  'prefix',
  'chunk_size_feed_forward',
  'is_encoder_decoder',
  'is_decoder',
  'tie_encoder_decoder',
  'attn_implementation',
  '_attn_implementation',
  '_attn_implementation_autoset',
  'attention_dropout',
  'hidden_dropout',
  'classifier_dropout',
  'attention_probs_dropout_prob',
  'hidden_dropout_prob',
  'resid_pdrop',
  'embd_pdrop',
  'attn_pdrop',
  'gradient_checkpointing',
  // generation defaults stored in old config.json files
  'max_length',
  'min_length',
  'do_sample',
  'early_stopping',
  'num_beams',
  'num_beam_groups',
  'diversity_penalty',
  'temperature',
  'top_k',
  'top_p',
  'typical_p',
  'repetition_penalty',
  'length_penalty',
  'no_repeat_ngram_size',
  'encoder_no_repeat_ngram_size',
  'bad_words_ids',
  'num_return_sequences',
  'output_scores',
  'return_dict_in_generate',
  'forced_bos_token_id',
  'forced_eos_token_id',
  'remove_invalid_values',
  'exponential_decay_length_penalty',
  'suppress_tokens',
  'begin_suppress_tokens',
];

/** Keys shared by every config whose value matters: refused unless the default. */
const GUARDED_KEYS: ConfigKeys = {
  add_cross_attention: oneOf(false),
  pruned_heads: { accepts: 'an empty object', ok: (v) => !!v && typeof v === 'object' && !Object.keys(v).length },
};

/**
 * Refuse a config with a key the builder does not implement, or a value it does not
 * reproduce: one line naming the file, the key and its value.
 */
export function checkConfigKeys(config: Config, keys: ConfigKeys, builder: string, configPath: string): void {
  for (const [key, value] of Object.entries(config)) {
    const rule = keys[key] ?? GUARDED_KEYS[key];
    if (rule) {
      if (!rule.ok(value, config))
        throw new ConfigError(
          `${configPath}: "${key}": ${show(value)} is not supported by the ${builder} builder (supported: ${rule.accepts})`,
        );
    } else if (!HARMLESS_KEYS.includes(key)) {
      throw new ConfigError(
        `${configPath}: "${key}": ${show(value)} is not implemented by the ${builder} builder, which cannot tell whether it changes the model's output; refusing rather than computing wrong numbers`,
      );
    }
  }
}

function show(v: unknown): string {
  const s = JSON.stringify(v) ?? String(v);
  return s.length > 120 ? `${s.slice(0, 117)}...` : s;
}
