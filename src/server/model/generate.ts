// Text generation on the engine's forward graph (the `logits` output): greedy decoding or
// seeded sampling, many prompts batched together, stopping at end-of-text, a newline, a stop
// string or a token budget. No KV cache: each step reruns the whole (short) sequence, which is fine for
// the small models and short answers this is used for (the embedded default, the demo).

import { contextLength } from '../data/tokenize';
import { DEFAULTS } from '../settings';
import { Rng } from '../util/random';
import { EngineError, type Model, makeBatch } from './engine';
import { nonFiniteMessage } from './weight-health';

export interface GenerateOptions {
  /** new tokens at most (default 16) */
  maxNewTokens?: number;
  /** 0 (default) = greedy; otherwise sample from softmax(logits / temperature) */
  temperature?: number;
  /** seed for sampling (default 0) */
  seed?: number;
  /** stop before a token whose text contains a newline (default true) */
  stopAtNewline?: boolean;
  /** stop once the generated text contains one of these; the text ends before it */
  stop?: string[];
  /** trainable weights, for a model opened with { weights: 'inputs' } */
  params?: Map<string, Float32Array>;
  /** prompts run together per forward pass (default 64) */
  batchSize?: number;
}

export interface Generation {
  prompt: string;
  /** the generated text, without the stop token */
  text: string;
  /** generated token ids, without the stop token */
  ids: number[];
  /** natural log-probability of each generated token under the model (temperature 1) */
  logprobs: number[];
  /**
   * 'stop': a stop string ended it (the text ends before it; ids and logprobs include its tokens);
   * 'context': prompt and generation filled the model's context (`contextLength` of config.json)
   */
  stop: 'eos' | 'newline' | 'length' | 'stop' | 'context';
}

/** A prompt the model cannot continue (longer than its context): the user's input, one line. */
export class GenerateError extends Error {}

export async function generate(model: Model, prompts: string[], opts: GenerateOptions = {}): Promise<Generation[]> {
  const maxNew = opts.maxNewTokens ?? 16;
  const temperature = opts.temperature ?? 0;
  const stopAtNewline = opts.stopAtNewline ?? true;
  const batchSize = opts.batchSize ?? DEFAULTS.generateBatchSize;
  const stops = opts.stop ?? [];
  if (stops.some((x) => !x)) throw new Error('generate: a stop string is empty');
  const rng = new Rng(opts.seed ?? 0);
  const tok = model.tokenizer;
  const eos = tok.eosTokenId;
  const pad = tok.padTokenId ?? 0;
  const graph = await model.compile({ logits: true });
  const maxLen = contextLength(model.config);
  const newline = new Map<number, boolean>();
  const hasNewline = (id: number) => {
    let v = newline.get(id);
    if (v === undefined) {
      v = tok.decode([id]).includes('\n');
      newline.set(id, v);
    }
    return v;
  };

  const states = prompts.map((prompt) => ({
    prompt,
    promptIds: tok.encode(prompt).ids,
    ids: [] as number[],
    logprobs: [] as number[],
    stop: undefined as Generation['stop'] | undefined,
    text: undefined as string | undefined,
  }));
  for (const s of states) {
    if (!s.promptIds.length) throw new Error('generate: empty prompt');
    // no sliding window: a token past the context would be conditioned on a cut prompt, and its
    // logprob would not be the model's for the whole text
    if (s.promptIds.length >= maxLen)
      throw new GenerateError(
        `the prompt is ${s.promptIds.length} tokens and the model's context is ${maxLen} (config.json): nothing can be generated after it; shorten the prompt`,
      );
  }

  // one step's choices in a function of its own: no loop variable keeps a run's logits ([B·T, V])
  // alive under the next run (RunResult)
  const pick = (
    logits: Float32Array,
    group: typeof states,
    seqs: Array<{ ids: number[] }>,
    batch: { T: number; B: number },
  ) => {
    const V = logits.length / (batch.B * batch.T);
    group.forEach((s, b) => {
      const row = logits.subarray((b * batch.T + seqs[b].ids.length - 1) * V, (b * batch.T + seqs[b].ids.length) * V);
      // a NaN row's argmax is word 0 and its draw the last word: a text and exit status 0 (an
      // audit's checkpoint with one NaN weight "answered" "!!!!"), so a damaged model is refused
      const bad = row.findIndex((v) => v - v !== 0);
      if (bad >= 0)
        throw new EngineError(
          nonFiniteMessage(
            model.checkpoint,
            `the model's next-token logit of word ${bad} after ${JSON.stringify(clip(s.prompt))}${s.ids.length ? ` and ${s.ids.length} generated tokens` : ''} (${row[bad]})`,
            opts.params ? 'or the weights passed to generate hold one' : undefined,
          ),
        );
      const logp = logSoftmax(row);
      const id = temperature > 0 ? sample(row, temperature, rng) : argmax(row);
      if (id === eos) s.stop = 'eos';
      else if (stopAtNewline && hasNewline(id)) s.stop = 'newline';
      else {
        s.ids.push(id);
        s.logprobs.push(logp[id]);
        const cut = stops.length ? firstStop(continuation(tok, s.promptIds, s.ids), stops) : -1;
        if (cut >= 0) {
          s.stop = 'stop';
          s.text = continuation(tok, s.promptIds, s.ids).slice(0, cut);
        } else if (s.ids.length >= maxNew) s.stop = 'length';
        else if (s.promptIds.length + s.ids.length >= maxLen) s.stop = 'context';
      }
    });
  };
  for (let step = 0; step < maxNew; step++) {
    const active = states.filter((s) => !s.stop);
    if (!active.length) break;
    for (let i = 0; i < active.length; i += batchSize) {
      const group = active.slice(i, i + batchSize);
      const seqs = group.map((s) => ({ ids: [...s.promptIds, ...s.ids] }));
      const batch = makeBatch(seqs, pad);
      pick(
        (await graph.run(batch, { params: opts.params, outputs: ['logits'] })).logits.data as Float32Array,
        group,
        seqs,
        batch,
      );
    }
  }
  return states.map((s) => ({
    prompt: s.prompt,
    text: s.text ?? continuation(tok, s.promptIds, s.ids),
    ids: s.ids,
    logprobs: s.logprobs,
    stop: s.stop ?? 'length',
  }));
}

/** The text the new ids add to the prompt (decoded in context, so a leading space survives every decoder). */
function continuation(tok: Model['tokenizer'], promptIds: number[], ids: number[]): string {
  if (!ids.length) return '';
  const before = tok.decode(promptIds);
  const full = tok.decode([...promptIds, ...ids]);
  return full.startsWith(before) ? full.slice(before.length) : tok.decode(ids);
}

/** A prompt as an error message quotes it: its first 40 characters. */
function clip(text: string): string {
  return text.length > 40 ? `${text.slice(0, 40)}…` : text;
}

/** Where the earliest stop string starts in `text`, or -1. */
function firstStop(text: string, stops: string[]): number {
  let best = -1;
  for (const x of stops) {
    const i = text.indexOf(x);
    if (i >= 0 && (best < 0 || i < best)) best = i;
  }
  return best;
}

function argmax(x: Float32Array): number {
  let best = 0;
  for (let i = 1; i < x.length; i++) if (x[i] > x[best]) best = i;
  return best;
}

function logSoftmax(x: Float32Array | Float64Array): Float64Array {
  let max = Number.NEGATIVE_INFINITY;
  for (let i = 0; i < x.length; i++) max = Math.max(max, x[i]);
  let sum = 0;
  for (let i = 0; i < x.length; i++) sum += Math.exp(x[i] - max);
  const lse = max + Math.log(sum);
  return Float64Array.from(x, (v) => v - lse);
}

function sample(x: Float32Array, temperature: number, rng: Rng): number {
  const logp = logSoftmax(Float64Array.from(x, (v) => v / temperature));
  let u = rng.next();
  for (let i = 0; i < logp.length; i++) {
    u -= Math.exp(logp[i]);
    if (u < 0) return i;
  }
  return logp.length - 1;
}
