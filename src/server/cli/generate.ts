// influence-lens generate: a model's own completions, greedy or sampled, for one prompt or a
// JSONL file of prompts (one {"prompt": ...} per line), as text or as JSON lines.
//   generate --model <dir> [--base <dir>] (--prompt P | --prompts <file.jsonl>) [--max-tokens N]
//     [--temperature T] [--seed N] [--stop S]... [--multiline] [--json]
// (--base: the base model folder of a LoRA adapter, as for the other commands)
import { readFileNoWait } from '../../common/read-file';
import { contextLength } from '../data/tokenize';
import { Model } from '../model/engine';
import { GenerateError, generate } from '../model/generate';
import { CliError, int, parse, seedFlag, threadsFlag } from './util';

export async function runGenerate(argv: string[]): Promise<void> {
  const { values: v } = parse(argv, {
    model: { type: 'string' },
    base: { type: 'string' },
    prompt: { type: 'string' },
    prompts: { type: 'string' },
    'max-tokens': { type: 'string' },
    temperature: { type: 'string' },
    seed: { type: 'string' },
    stop: { type: 'string', multiple: true },
    multiline: { type: 'boolean' },
    json: { type: 'boolean' },
    threads: { type: 'string' },
  });
  if (!v.model) throw new CliError('--model <dir> is required');
  if ((v.prompt === undefined) === (v.prompts === undefined))
    throw new CliError('give exactly one of --prompt <text> or --prompts <file.jsonl>');
  const prompts = v.prompt !== undefined ? [v.prompt] : readPrompts(v.prompts!);
  if (prompts.some((p) => !p)) throw new CliError('a prompt is empty');
  const maxNewTokens = int(v['max-tokens'], '--max-tokens', 16);
  if (maxNewTokens < 1) throw new CliError(`--max-tokens must be at least 1 (got ${maxNewTokens})`);
  // an empty value is not 0 (greedy): Number("") is
  const temperature = v.temperature === undefined ? 0 : v.temperature.trim() ? Number(v.temperature) : Number.NaN;
  if (!(Number.isFinite(temperature) && temperature >= 0))
    throw new CliError(`--temperature must be a number >= 0 (0 = greedy; got "${v.temperature}")`);
  const stop = v.stop ?? [];
  if (stop.some((s) => !s)) throw new CliError('--stop must not be empty');
  // checked before the model is opened (its first use reads every weight file)
  const seed = seedFlag(v.seed, 0, '--seed', temperature === 0 ? '--temperature 0 decodes greedily' : undefined);
  const model = Model.open(v.model, { base: v.base, threads: threadsFlag(v.threads) });
  const gens = await generate(model, prompts, {
    maxNewTokens,
    temperature,
    seed,
    stop,
    stopAtNewline: v.multiline !== true,
  }).catch((e) => {
    throw e instanceof GenerateError ? new CliError(e.message) : e;
  });
  const full = gens.filter((g) => g.stop === 'context').length;
  if (full)
    process.stderr.write(
      `note: ${full === 1 && gens.length === 1 ? 'the generation' : `${full} generation(s)`} stopped at the model's context (${contextLength(model.config)} tokens with the prompt) before --max-tokens ${maxNewTokens}\n`,
    );
  for (const g of gens) {
    if (v.json) {
      const logprob = g.logprobs.reduce((a, b) => a + b, 0);
      process.stdout.write(
        `${JSON.stringify({ prompt: g.prompt, completion: g.text, stop: g.stop, tokens: g.ids.length, logprob })}\n`,
      );
    } else if (prompts.length === 1) process.stdout.write(`${g.text}\n`);
    else process.stdout.write(`${JSON.stringify(g.prompt)} →${JSON.stringify(g.text)}\n`);
  }
}

/** One {"prompt": string} per non-empty line; anything else is refused with its line number. */
function readPrompts(file: string): string[] {
  let text: string;
  try {
    text = readFileNoWait(file, 'utf8');
  } catch (e) {
    throw new CliError(`cannot read --prompts ${file}: ${(e as Error).message}`);
  }
  const out: string[] = [];
  text.split('\n').forEach((line, i) => {
    if (!line.trim()) return;
    let rec: unknown;
    try {
      rec = JSON.parse(line);
    } catch (e) {
      throw new CliError(`${file}:${i + 1}: not JSON (${(e as Error).message})`);
    }
    const p = (rec as { prompt?: unknown } | null)?.prompt;
    if (typeof p !== 'string') throw new CliError(`${file}:${i + 1}: expected {"prompt": "<text>"}`);
    out.push(p);
  });
  if (!out.length) throw new CliError(`${file}: no prompts`);
  return out;
}
