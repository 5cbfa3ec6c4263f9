// Rebuilds the embedded default (assets/default/) from its seed with the project's own
// commands: the country-facts corpus and tokenizer, the pre-trained model, the fine-tuned
// model, and eval.json (greedy accuracies). Every file is a function of the seed and these
// settings, so two runs on the same machine write identical bytes.
//
//   npm run build:default               rebuild assets/default/ in place
//   npm run build:default -- --check    rebuild into a temp dir and compare byte for byte
//   npm run build:default -- --out DIR  rebuild elsewhere
//
// Floating-point results depend on the CPU's SIMD kernels and the thread count, so the
// thread count is fixed here; another CPU family may write (slightly) different weights.
import { mkdirSync, mkdtempSync, readdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { parseArgs } from 'node:util';
import { cliRunner, finishCheck, listBuilt } from './build-util.mjs';

const SEED = 0;
const THREADS = 2;
const CORPUS = ['--seed', SEED, '--countries', 60];
const MODEL = ['--d', 128, '--layers', 2, '--heads', 4, '--ffn', 512, '--context', 128];
const PRETRAIN = ['--epochs', 60, '--lr', 2e-3, '--batch-size', 16, '--seed', SEED];
const FINETUNE = ['--epochs', 12, '--lr', 5e-4, '--batch-size', 8, '--seed', SEED, '--save-steps', 80];
// The fine-tune's checkpoints that ship: influence is summed over them by default (README
// "Checkpoints"). bench/results/2026-12-02-vm-checkpoint-subsets.md: the two earliest meet the
// goals (no true source in the bottom 10%, planted and backdoor Recall@10 1.0) as all five do,
// at 2.5 MiB each.
const KEEP_CHECKPOINTS = ['checkpoint-80', 'checkpoint-160'];
const SHIPPED = 'assets/default';

const { values } = parseArgs({ options: { out: { type: 'string' }, check: { type: 'boolean' } } });
const out = values.check ? mkdtempSync(join(tmpdir(), 'il-default-')) : (values.out ?? SHIPPED);
const cache = mkdtempSync(join(tmpdir(), 'il-cache-'));

const cli = cliRunner(cache);

for (const d of ['data', 'pretrained', 'finetuned']) rmSync(join(out, d), { recursive: true, force: true });
mkdirSync(out, { recursive: true });
const times = {};
times.data = cli('data build', ['data', 'build', '--out', join(out, 'data'), ...CORPUS]);
const D = (p) => join(out, p);
const pretrainArgs = ['train', '--data', D('data/pretrain.jsonl'), '--out', D('pretrained'), '--init', 'llama'];
const finetuneArgs = ['train', '--data', D('data/finetune.jsonl'), '--out', D('finetuned'), '--model', D('pretrained')];
times.pretrain = cli('pre-train', [
  ...pretrainArgs,
  '--tokenizer',
  D('data/tokenizer'),
  ...MODEL,
  ...PRETRAIN,
  '--threads',
  THREADS,
]);
times.finetune = cli('fine-tune', [...finetuneArgs, ...FINETUNE, '--threads', THREADS]);
for (const n of readdirSync(D('finetuned')))
  if (n.startsWith('checkpoint-') && !KEEP_CHECKPOINTS.includes(n)) rmSync(D(`finetuned/${n}`), { recursive: true });
const evalFt = join(cache, 'eval-ft.json');
const evalPt = join(cache, 'eval-pt.json');
times.eval = cli(
  'eval',
  ['data', 'eval', '--model', join(out, 'finetuned'), '--data', join(out, 'data'), '--json'],
  evalFt,
);
cli(
  'eval pre-trained',
  ['data', 'eval', '--model', join(out, 'pretrained'), '--data', join(out, 'data'), '--json'],
  evalPt,
);
const ft = JSON.parse(readFileSync(evalFt, 'utf8'));
const pt = JSON.parse(readFileSync(evalPt, 'utf8'));
const summary = (a) => ({ correct: a.correct, total: a.total, accuracy: a.accuracy });
const evaluation = {
  finetuned: {
    finetune: summary(ft.finetune),
    held_out: { ...summary(ft.heldOut), by_relation: ft.heldOut.byRelation },
    planted: summary(ft.planted),
    backdoor: summary(ft.backdoor),
    statements: summary(ft.statements),
    answers: { planted: ft.answers.planted, backdoor: ft.answers.backdoor, fact_tracing: ft.answers.fact_tracing },
  },
  pretrained: { statements: summary(pt.statements) },
};
writeFileSync(join(out, 'eval.json'), `${JSON.stringify(evaluation, null, 2)}\n`);
rmSync(cache, { recursive: true, force: true });

const built = listBuilt(out, SHIPPED, values.check);
const f = (x) => `${(100 * x.accuracy).toFixed(0)}% (${x.correct}/${x.total})`;
process.stdout.write(
  `\n${(built.bytes / 2 ** 20).toFixed(2)} MiB in ${built.files} files; times: ` +
    Object.entries(times)
      .map(([k, v]) => `${k} ${v.toFixed(1)} s`)
      .join(', ') +
    `\nfine-tuning questions ${f(evaluation.finetuned.finetune)}, held-out facts ${f(evaluation.finetuned.held_out)}, ` +
    `planted ${f(evaluation.finetuned.planted)}, backdoor ${f(evaluation.finetuned.backdoor)}\n`,
);
if (values.check) finishCheck(out, SHIPPED, built.mismatches);
