// influence-lens demo: the whole loop on the embedded default, in the terminal.
//   1. fit EK-FAC factors for the shipped pre-trained and fine-tuned models (cached);
//   2. ask a question the fine-tuned model answers with a planted wrong fact;
//   3. explain the answer: the top training examples, their sign in words, file:line, a token
//      heatmap, and which of them are the planted sources (ground truth from queries.json);
//   4. flag the examples that teach the wrong answer with a real share of the strongest score
//      (attribution/suggest.ts), fine-tune again without them (from the
//      same pre-trained checkpoint, with the shipped training arguments), ask again.
// Nothing under assets/ is modified: flags, factors and the retrained model live in the cache.
import { createHash } from 'node:crypto';
import { existsSync, mkdirSync, readFileSync } from 'node:fs';
import { join, relative } from 'node:path';
import { writeFileAtomic } from '../../common/atomic-write';

/** A path as a person would type it from here: relative inside this folder, absolute outside. */
/** the supporting examples flags are suggested from, whatever --top-k shows */
const FLAG_FROM = 10;

const shown = (p: string) => {
  const r = relative(process.cwd(), p);
  return r && !r.startsWith('..') ? r : p;
};

import type { ExplainedExample, ExplainResult } from '../../protocol/types';
import { fitCheckpoints, openCheckpointStages } from '../attribution/checkpoints';
import { Corpus, explain } from '../attribution/explain';
import { modelFingerprint } from '../attribution/fingerprint';
import { runFitJob } from '../attribution/fit-job';
import { openStage } from '../attribution/stage';
import { MIN_SHARE, suggestFlags } from '../attribution/suggest';
import { loadDataset } from '../data/dataset';
import { contextLength, tokenizationKey, tokenizeQuery } from '../data/tokenize';
import { embeddedDefault } from '../defaults';
import { openCheckpoint } from '../model/checkpoint';
import { planCheckpoints } from '../model/checkpoints';
import { Model, makeBatch } from '../model/engine';
import { generate } from '../model/generate';
import { DEFAULTS } from '../settings';
import { formatResult } from './explain';
import { readTrainingArgs, recordedTraining } from './retrain';
import { trainJob, trainOutLock } from './train';
import { CliError, int, Progress, parse } from './util';

interface Query {
  prompt: string;
  completion: string;
  kind: 'fact_tracing' | 'planted' | 'backdoor';
  sources: Array<{ dataset: string; line: number; hash: string }>;
  fact?: { country: string; relation: string; truth: string };
}

export async function runDemo(argv: string[]): Promise<void> {
  const { values: v } = parse(argv, { query: { type: 'string' }, 'top-k': { type: 'string' } });
  const d = embeddedDefault();
  const out = process.stdout;
  const color = out.isTTY === true;
  const bold = (s: string) => (color ? `\x1b[1m${s}\x1b[0m` : s);
  const say = (s = '') => out.write(`${s}\n`);
  const t0 = Date.now();
  const queries = JSON.parse(readFileSync(d.queries, 'utf8')) as Query[];
  const planted = queries.filter((q) => q.kind === 'planted');
  const pick = int(v.query, '--query', 0);
  if (!(Number.isInteger(pick) && pick >= 0 && pick < planted.length))
    throw new CliError(`--query must be 0..${planted.length - 1} (one of the planted wrong facts)`);
  const query = planted[pick];
  // checked before the fits, not after them
  const topK = int(v['top-k'], '--top-k', 10);
  if (topK < 1) throw new CliError(`--top-k must be at least 1 (got ${topK})`);

  // 1. factors for both stages (the fit job skips work already on disk)
  say(bold('1. EK-FAC factors for the shipped models'));
  for (const [name, model, data, factors] of [
    ['pre-trained', d.pretrained, d.pretrainData, d.pretrainedFactors],
    ['fine-tuned', d.finetuned, d.finetuneData, d.finetunedFactors],
  ] as const) {
    let bar: Progress | undefined;
    let stage = '';
    const r = await runFitJob({
      modelDir: model,
      dataPath: data,
      out: factors,
      modules: 'all',
      labels: 'sampled',
      seed: 0,
      // our cache: factors an older version fitted (other fingerprints) are fitted again
      replaceStale: true,
      onProgress: (s, done, total) => {
        if (s !== stage) {
          bar?.done();
          stage = s;
          bar = new Progress(`   ${name} ${s}`.padEnd(34), total);
        }
        bar!.tick(done);
      },
    });
    bar?.done();
    say(
      `   ${name}: ${r.status === 'up-to-date' ? 'cached' : `fitted in ${r.seconds.toFixed(1)} s`} (${r.examples} examples)`,
    );
  }
  // the fine-tune's shipped training checkpoints: EK-FAC is summed over them (README "Checkpoints")
  const plan = planCheckpoints(d.finetuned, openCheckpoint(d.finetuned), DEFAULTS.checkpoints);
  if (plan)
    for (const { name, result: r } of await fitCheckpoints(plan, {
      factorsDir: d.finetunedFactors,
      dataPath: d.finetuneData,
      modules: 'all',
      labels: 'sampled',
      seed: 0,
      replaceStale: true,
    }))
      say(`   fine-tuned ${name}: ${r.status === 'up-to-date' ? 'cached' : `fitted in ${r.seconds.toFixed(1)} s`}`);

  // 2. the question and the model's answer
  say();
  say(bold('2. Ask the fine-tuned model'));
  const ft = openStage(d.finetuned, d.finetunedFactors);
  const [answer] = await generate(ft.model, [query.prompt], { maxNewTokens: 8 });
  say(`   prompt:     ${JSON.stringify(query.prompt)}`);
  say(`   completion: ${JSON.stringify(answer.text)}   (the truth: ${query.fact?.truth ?? '?'})`);
  if (answer.text.trim() !== query.completion.trim())
    say(`   note: expected the planted answer ${JSON.stringify(query.completion)}; explaining that completion`);
  const completion = query.completion;

  // 3. explain it
  say();
  say(bold(`3. Which training examples made ${JSON.stringify(completion.trim())} likely? (EK-FAC)`));
  const dataset = loadDataset(d.finetuneData);
  const corpus = new Corpus('finetune', dataset, ft.model);
  const checkpoints = plan && openCheckpointStages(plan, { factorsDir: d.finetunedFactors, modules: ft.modules });
  // flags are suggested from the top FLAG_FROM whatever --top-k shows: a small --top-k flagged
  // only what it showed, and the retrained model kept giving the wrong answer
  const result = await explain({ model: ft, modules: ft.modules, checkpoints }, corpus, {
    prompt: query.prompt,
    completion,
    method: 'ekfac',
    topK: Math.max(topK, FLAG_FROM),
    compare: ['bm25', 'repsim', 'gdp'],
  });
  const top = result.supporting.slice(0, topK);
  const sources = new Set(query.sources.filter((s) => s.dataset === 'finetune').map((s) => s.hash));
  const mark = (e: ExplainedExample) =>
    sources.has(e.id.hash) ? (color ? '  \x1b[33m← planted\x1b[0m' : '  ← planted') : '';
  const display: ExplainResult = {
    ...result,
    supporting: top.map((e) => ({
      ...e,
      id: { ...e.id, dataset: shown(d.finetuneData) },
    })),
    opposing: result.opposing.slice(0, 3).map((e) => ({ ...e, id: { ...e.id, dataset: shown(d.finetuneData) } })),
  };
  out.write(
    formatResult(display, color, mark)
      .split('\n')
      .map((l) => `   ${l}`)
      .join('\n'),
  );
  const found = top.filter((e) => sources.has(e.id.hash)).length;
  say(`   planted sources in the top ${topK}: ${found} of ${sources.size}`);

  // 4. flag, retrain without the flagged examples, ask again
  say();
  say(bold('4. Flag the examples that teach the wrong answer, fine-tune again without them'));
  // only examples that teach the wrong answer with a real share of the strongest score (suggest.ts)
  const suggestions = suggestFlags(result.supporting.slice(0, FLAG_FROM), completion);
  const flagged = suggestions.map((s) => s.example);
  for (const s of suggestions)
    say(`   flag ${shown(d.finetuneData)}:${s.example.id.line}${mark(s.example)}: ${s.reason}`);
  if (!flagged.length) {
    say(
      `   nothing to flag: no supporting example that contains ${JSON.stringify(completion.trim())} scores ` +
        `${(100 * MIN_SHARE).toFixed(0)}% or more of the strongest one`,
    );
    return;
  }
  const work = join(d.cacheDir, 'demo');
  mkdirSync(work, { recursive: true });
  const sidecar = join(work, 'finetune.exclude.jsonl');
  // atomic: another demo (another --query) may read or write it at the same moment
  writeFileAtomic(
    sidecar,
    suggestions
      .map((s) =>
        JSON.stringify({
          hash: s.example.id.hash,
          line: s.example.id.line,
          reason: s.reason,
          score: s.example.score,
          query: query.prompt + completion,
        }),
      )
      .join('\n') + '\n',
  );
  say(
    `   flagged ${flagged.length} example(s) (${flagged.filter((e) => sources.has(e.id.hash)).length} of them planted) → ${shown(sidecar)}`,
  );
  const args = readTrainingArgs(d.finetuned);
  const excluded = [...new Set(flagged.map((e) => e.id.hash))].sort();
  const cleanDir = join(work, `finetuned-${retrainedModelKey(d.pretrained, d.finetuneData, args, excluded)}`);
  // a demo of the same query beside this one trains the same model into the same folder: the
  // cache is checked and the model trained under one lock, so the second finds it cached
  const release = await trainOutLock(cleanDir, (line) => say(`   ${line}`));
  try {
    if (trainedWithout(cleanDir, excluded)) say(`   retrained model: cached (${shown(cleanDir)})`);
    else {
      let bar: Progress | undefined;
      const r = await trainJob({
        data: d.finetuneData,
        out: cleanDir,
        model: d.pretrained,
        // as the shipped model was trained (the thread count included: it changes the last bits)
        ...recordedTraining(args),
        // these flags themselves, not the sidecar: a demo of another query running beside this one
        // rewrites it, and this model would be trained without that run's flags under this run's key
        excludeHashes: excluded,
        // under the lock taken above, with the cache checked under it
        outLocked: true,
        onStep: (s) => {
          bar ??= new Progress('   fine-tuning'.padEnd(34), s.total);
          bar.tick(s.step, `loss ${s.loss.toFixed(3)}`);
        },
      });
      bar?.done();
      say(`   fine-tuned again on ${r.examples} examples (${r.excluded} left out) in ${r.seconds.toFixed(1)} s`);
    }
  } finally {
    release();
  }
  const clean = Model.open(cleanDir);
  const [after] = await generate(clean, [query.prompt], { maxNewTokens: 8 });
  const before = await completionLogProb(ft.model, query.prompt, completion);
  const now = await completionLogProb(clean, query.prompt, completion);
  say();
  say(bold('5. Ask again'));
  say(
    `   completion: ${JSON.stringify(after.text)}   (before: ${JSON.stringify(answer.text)}; the truth: ${query.fact?.truth ?? '?'})`,
  );
  say(
    `   log p(${JSON.stringify(completion)} | prompt): ${before.toFixed(3)} → ${now.toFixed(3)} (change ${now - before >= 0 ? '+' : ''}${(now - before).toFixed(3)})`,
  );
  say();
  say(
    `done in ${((Date.now() - t0) / 1000).toFixed(1)} s. Next: open this folder in VS Code and run "Influence Lens: Explain this completion".`,
  );
}

/**
 * The name of the demo's retrained model in the cache: everything that determines its weights and
 * what it reads its prompts with. The starting model's weights and config (its fingerprint), its
 * tokenizer and chat template (the trainer tokenizes the data with them and copies them into the
 * model: a tokenizer.json changed under the same weights trained other weights, and a cached model
 * kept the old tokenizer), the training arguments, the examples left out and the data's bytes.
 */
export function retrainedModelKey(pretrained: string, data: string, args: unknown, excluded: string[]): string {
  const start = Model.open(pretrained);
  return createHash('sha256')
    .update(JSON.stringify([modelFingerprint(start.checkpoint), tokenizationKey(start.tokenizer), args, excluded]))
    .update(readFileSync(data))
    .digest('hex')
    .slice(0, 16);
}

/**
 * Whether `dir` holds a model retrained without exactly these examples (its training_args.json
 * says which it left out): a cache that an earlier version's concurrent demos filled with a model
 * trained without another query's flags is trained again, not reused.
 */
function trainedWithout(dir: string, excluded: string[]): boolean {
  if (!existsSync(join(dir, 'model.safetensors'))) return false;
  try {
    const args = JSON.parse(readFileSync(join(dir, 'training_args.json'), 'utf8')) as { excluded_hashes?: unknown };
    return JSON.stringify(args.excluded_hashes) === JSON.stringify(excluded);
  } catch {
    return false;
  }
}

/** log p(completion | prompt) under a model (sum over the completion's tokens). */
async function completionLogProb(model: Model, prompt: string, completion: string): Promise<number> {
  const q = tokenizeQuery(model.tokenizer, prompt, completion, contextLength(model.config));
  const graph = await model.compile({ tokenLoss: true });
  const r = await graph.run(makeBatch([{ ids: q.ids, weights: q.weights }], model.tokenizer.padTokenId ?? 0));
  return -(r.loss.data as Float32Array)[0];
}
