// Rebuilds the non-lexical benchmark's embedded models (assets/nonlex/) from its seed with the
// project's own commands: the corpus and tokenizer (`data build --task nonlexical`), the
// pre-trained model, the fine-tuned model, and eval.json: the greedy answers to the plain-form
// queries of the fine-tuned model and of the same fine-tuning without the planted lines
// (trained here into a temp dir, not shipped; `bench eval` trains it again and checks).
//
//   npm run build:nonlex               rebuild assets/nonlex/ in place
//   npm run build:nonlex -- --check    rebuild into a temp dir and compare byte for byte
//
// The thread count is fixed, as for assets/default (scripts/build-default.mjs).
import { mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join, relative } from 'node:path';
import { parseArgs } from 'node:util';
import { cliRunner, finishCheck, listBuilt } from './build-util.mjs';

const SEED = 0;
const THREADS = 2;
const MODEL = ['--d', 128, '--layers', 2, '--heads', 4, '--ffn', 512, '--context', 128];
const PRETRAIN = ['--epochs', 60, '--lr', 2e-3, '--batch-size', 16, '--seed', SEED];
const FINETUNE = ['--epochs', 12, '--lr', 5e-4, '--batch-size', 8, '--seed', SEED];
const SHIPPED = 'assets/nonlex';

const { values } = parseArgs({ options: { out: { type: 'string' }, check: { type: 'boolean' } } });
const out = values.check ? mkdtempSync(join(tmpdir(), 'il-nonlex-')) : (values.out ?? SHIPPED);
const cache = mkdtempSync(join(tmpdir(), 'il-cache-'));

const cli = cliRunner(cache);

for (const d of ['data', 'pretrained', 'finetuned']) rmSync(join(out, d), { recursive: true, force: true });
mkdirSync(out, { recursive: true });
const D = (p) => join(out, p);
const times = {};
times.data = cli('data build', ['data', 'build', '--task', 'nonlexical', '--out', D('data'), '--seed', SEED]);
times.pretrain = cli('pre-train', [
  ...['train', '--data', D('data/pretrain.jsonl'), '--out', D('pretrained'), '--init', 'llama'],
  ...['--tokenizer', D('data/tokenizer'), ...MODEL, ...PRETRAIN, '--threads', THREADS],
]);
const finetune = ['train', '--data', D('data/finetune.jsonl'), '--model', D('pretrained'), ...FINETUNE];
times.finetune = cli('fine-tune', [...finetune, '--out', D('finetuned'), '--threads', THREADS]);

// the counterfactual: the same fine-tuning without the planted lines (the queries' sources)
const queries = JSON.parse(readFileSync(D('data/queries.json'), 'utf8'));
const planted = [...new Set(queries.flatMap((q) => q.sources.map((s) => s.hash)))];
const sidecar = join(cache, 'planted.exclude.jsonl');
writeFileSync(sidecar, planted.map((hash) => `${JSON.stringify({ hash })}\n`).join(''));
const without = join(cache, 'without-planted');
times.finetune_without_planted = cli('fine-tune without the planted lines', [
  ...finetune,
  ...['--out', without, '--exclude', sidecar, '--threads', THREADS],
]);
const prompts = join(cache, 'prompts.jsonl');
writeFileSync(prompts, queries.map((q) => `${JSON.stringify({ prompt: q.prompt })}\n`).join(''));
const answers = (model) => {
  const f = join(cache, 'answers.jsonl');
  cli(`generate (${relative(out, model) || model})`, ['generate', '--model', model, '--prompts', prompts, '--json'], f);
  return readFileSync(f, 'utf8')
    .trim()
    .split('\n')
    .map((l) => JSON.parse(l).completion);
};
const ft = answers(D('finetuned'));
const wo = answers(without);
const rows = queries.map((q, i) => ({
  prompt: q.prompt,
  planted: q.completion,
  truth: ` ${q.fact.truth}`,
  finetuned: ft[i],
  without_planted: wo[i],
}));
const same = (a, b) => a.trim() === b.trim();
const evaluation = {
  planted_reproduced: rows.filter((r) => same(r.finetuned, r.planted)).length,
  planted_without_planted_lines: rows.filter((r) => same(r.without_planted, r.planted)).length,
  queries: rows.length,
  answers: rows,
};
writeFileSync(D('eval.json'), `${JSON.stringify(evaluation, null, 2)}\n`);
rmSync(cache, { recursive: true, force: true });

const built = listBuilt(out, SHIPPED, values.check);
process.stdout.write(
  `\n${built.bytes} bytes (${(built.bytes / 2 ** 20).toFixed(2)} MiB) in ${built.files} files; times: ` +
    Object.entries(times)
      .map(([k, v]) => `${k} ${v.toFixed(1)} s`)
      .join(', ') +
    `\nplain-form queries answered with the planted answer: fine-tuned ${evaluation.planted_reproduced}/${rows.length}, ` +
    `fine-tuned without the planted lines ${evaluation.planted_without_planted_lines}/${rows.length}\n`,
);
if (values.check) finishCheck(out, SHIPPED, built.mismatches);
