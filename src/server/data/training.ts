// How the model was trained on its records, where trainers differ: the part of a record the loss
// scored and how long a record could be. Influence is the training loss's gradient, so it must be
// taken on the tokens the trainer trained on. The default is what the rest of this folder
// describes (the tokenizer's own specials, assistant turns of a chat, the model's context); "trl"
// is what TRL's SFTTrainer does by default:
//  - it appends the tokenizer's eos_token to a "text" or "completion" record that does not end
//    with it (its add_eos), and trains on it;
//  - on a "messages" record it trains on every token (assistant_only_loss=False); "trl-assistant"
//    is the same with assistant_only_loss=True;
//  - it cuts records at max_length = 1024 tokens;
//  - and its own rules where it differs from transformers' masks ("trainer": "trl", tokenize.ts
//    `tokenizeTrained`): a prompt/completion's loss starts where the tokenized prompt and the
//    tokenized prompt + completion first differ (common_prefix_length), which can be a token
//    wholly in the prompt ("▁Spr" + "ee" tokenizes as "▁Sp" "ree"); a conversation is rendered with
//    the tokenizer's chat template only (TRL fails without one); a record whose ids transformers 4
//    and 5 disagree on (TRL 1.16 runs on both) is refused, since which ones were trained is unknown.

export interface TrainingConvention {
  /** the name it was given (a preset's, or "custom") */
  name: string;
  /** append the tokenizer's eos_token string to "text" and "completion" records */
  appendEos: boolean;
  /** the tokens of a "messages" record the loss scored */
  chatLoss: 'assistant' | 'all';
  /** records were cut to this many tokens in training (at most the model's context) */
  maxLength?: number;
  /**
   * whose rules decide the rest: "default" — a prompt/completion is trained on every token holding
   * a completion character (as transformers' assistant masks read spans), a chat without a
   * template gets the stand-in; "trl" — TRL's SFTTrainer's (see above)
   */
  trainer: 'default' | 'trl';
}

export const TRAINING_PRESETS: Record<string, TrainingConvention> = {
  default: { name: 'default', appendEos: false, chatLoss: 'assistant', trainer: 'default' },
  trl: { name: 'trl', appendEos: true, chatLoss: 'all', maxLength: 1024, trainer: 'trl' },
  'trl-assistant': { name: 'trl-assistant', appendEos: true, chatLoss: 'assistant', maxLength: 1024, trainer: 'trl' },
};

export const DEFAULT_TRAINING = TRAINING_PRESETS.default;

export class TrainingSettingError extends Error {
  override name = 'TrainingSettingError';
}

/**
 * A preset's name, or an object of fields over the default
 * (`{"trainer": "trl", "appendEos": true, "chatLoss": "all", "maxLength": 2048}`), as in
 * influence-lens.json and `--training`.
 */
export function parseTraining(value: unknown): TrainingConvention {
  if (typeof value === 'string') {
    const p = Object.hasOwn(TRAINING_PRESETS, value) ? TRAINING_PRESETS[value] : undefined;
    if (!p)
      throw new TrainingSettingError(
        `unknown training convention "${value}"; one of ${Object.keys(TRAINING_PRESETS).join(', ')}, or an object {"appendEos", "chatLoss", "maxLength", "trainer"}`,
      );
    return p;
  }
  if (typeof value !== 'object' || value === null || Array.isArray(value))
    throw new TrainingSettingError('the training convention must be a preset name or an object');
  const v = value as Record<string, unknown>;
  const unknown = Object.keys(v).filter((k) => !['appendEos', 'chatLoss', 'maxLength', 'trainer'].includes(k));
  if (unknown.length)
    throw new TrainingSettingError(
      `unknown training field(s) ${unknown.map((k) => `"${k}"`).join(', ')}; known: "appendEos", "chatLoss", "maxLength", "trainer"`,
    );
  const out: TrainingConvention = { ...DEFAULT_TRAINING, name: 'custom' };
  if (v.appendEos !== undefined) {
    if (typeof v.appendEos !== 'boolean') throw new TrainingSettingError('"appendEos" must be true or false');
    out.appendEos = v.appendEos;
  }
  if (v.chatLoss !== undefined) {
    if (v.chatLoss !== 'assistant' && v.chatLoss !== 'all')
      throw new TrainingSettingError('"chatLoss" must be "assistant" or "all"');
    out.chatLoss = v.chatLoss;
  }
  if (v.maxLength !== undefined) {
    if (!Number.isInteger(v.maxLength) || (v.maxLength as number) < 2)
      throw new TrainingSettingError('"maxLength" must be an integer of at least 2 (tokens)');
    out.maxLength = v.maxLength as number;
  }
  if (v.trainer !== undefined) {
    if (v.trainer !== 'default' && v.trainer !== 'trl')
      throw new TrainingSettingError('"trainer" must be "default" or "trl"');
    out.trainer = v.trainer;
  }
  return out;
}

/** What decides tokens, for cache keys: the fields, not the name (the default trainer's keys as before it was a field). */
export function trainingKey(t: TrainingConvention): Record<string, unknown> {
  return {
    appendEos: t.appendEos,
    chatLoss: t.chatLoss,
    maxLength: t.maxLength ?? null,
    ...(t.trainer === 'default' ? {} : { trainer: t.trainer }),
  };
}

/**
 * Whether two conventions tokenize alike (their fields, not their names): what was computed under
 * one (EK-FAC factors) must not be used with records tokenized under the other.
 */
export function sameTraining(a: TrainingConvention, b: TrainingConvention): boolean {
  return JSON.stringify(trainingKey(a)) === JSON.stringify(trainingKey(b));
}

/** The `--training` value that asks for `t`: a preset's name where one has its fields, else its fields as JSON. */
export function trainingFlagValue(t: TrainingConvention): string {
  const preset = Object.values(TRAINING_PRESETS).find((p) => sameTraining(p, t));
  if (preset) return preset.name;
  // the fields that differ from the default's, as parseTraining reads them
  const d = trainingKey(DEFAULT_TRAINING);
  const fields = Object.entries(trainingKey(t)).filter(([k, v]) => JSON.stringify(v) !== JSON.stringify(d[k]));
  return JSON.stringify(Object.fromEntries(fields));
}

/** The command-line argument that asks for `t`: `--training trl`, `--training '{"maxLength":2048}'`. */
export function trainingArgument(t: TrainingConvention, flag = '--training'): string {
  const v = trainingFlagValue(t);
  return `${flag} ${/^[\w.-]+$/.test(v) ? v : `'${v.replaceAll("'", "'\\''")}'`}`;
}

/**
 * A convention as stored beside what was computed under it (EK-FAC factors' arguments: its name
 * and fields), read back; a stored value that is not one is refused (TrainingSettingError).
 */
export function readStoredTraining(v: unknown): TrainingConvention {
  if (typeof v !== 'object' || v === null || Array.isArray(v))
    throw new TrainingSettingError('the stored training convention is not an object');
  const { name, maxLength, ...fields } = v as Record<string, unknown>;
  const t = parseTraining({ ...fields, ...(maxLength === null || maxLength === undefined ? {} : { maxLength }) });
  // a preset's name is kept only while that preset still has these fields (a message must never
  // call two different conventions by one name)
  const preset = typeof name === 'string' && Object.hasOwn(TRAINING_PRESETS, name) ? TRAINING_PRESETS[name] : undefined;
  const named = typeof name === 'string' && name !== '' && (!preset || sameTraining(preset, t));
  return { ...t, name: named ? (name as string) : 'custom' };
}

/** One line for provenance and messages: "trl (EOS appended, every chat token, max 1024 tokens)". */
export function describeTraining(t: TrainingConvention): string {
  const parts = [
    t.appendEos ? 'EOS appended to text/completion' : "the tokenizer's own EOS only",
    t.chatLoss === 'all' ? 'every token of a chat' : 'assistant turns of a chat',
    t.maxLength ? `cut at ${t.maxLength} tokens` : "cut at the model's context",
    ...(t.trainer === 'trl' ? ["TRL's prompt/completion boundary"] : []),
  ];
  return `${t.name} (${parts.join(', ')})`;
}
