#!/usr/bin/env node
// influence-lens: the command line. One subcommand per job; each lives in cli/<name>.ts.

import { runBudgetBytes, sequenceLimitBytes } from './attribution/chunking';
import { rowsBudgetBytes } from './attribution/ekfac/lambda-rows';
import { rowsSpillDir } from './attribution/ekfac/row-store';
import { runData } from './cli/data';
import { runDemo } from './cli/demo';
import { runExplain } from './cli/explain';
import { runExport } from './cli/export';
import { runFit } from './cli/fit';
import { runGenerate } from './cli/generate';
import { runGradients } from './cli/gradients';
import { runInspect } from './cli/inspect';
import { runRetrain } from './cli/retrain';
import { runScan } from './cli/scan';
import { runServe } from './cli/serve';
import { runTokenize } from './cli/tokenize';
import { runTrain } from './cli/train';
import { HelpRequested, withFlagHint } from './cli/util';
import { eighParallelCap } from './linalg/eigh';
import { lapackAllowed } from './linalg/native';
import { arenaPolicy } from './model/onnx/session';
import { diskFull, isUserError } from './user-errors';
import { mallocMode } from './util/malloc';

const COMMANDS: Record<string, { run: (argv: string[]) => Promise<void>; help: string }> = {
  demo: {
    run: runDemo,
    help: 'demo [--query N] [--top-k K]   the whole loop on the embedded default: explain a wrong answer, fix it',
  },
  inspect: {
    run: runInspect,
    help: 'inspect <model-dir> [--base <dir>] [--json]   architecture, parameters, tracked modules',
  },
  gradients: {
    run: runGradients,
    help:
      'gradients --model <dir> [--base <dir>] (--text T | --prompt P --completion C) --out <file.safetensors>\n' +
      '    [--modules mlp|all] [--labels data|sampled] [--seed N] [--training default|trl|trl-assistant|<json>]\n' +
      '                                 per-token module inputs a and output gradients g',
  },
  tokenize: {
    run: runTokenize,
    help:
      'tokenize --model <dir> [--base <dir>] --data <file.jsonl> [--out <file.jsonl>] [--skip-malformed]\n' +
      '    [--training default|trl|trl-assistant|<json>]\n' +
      '                                 per record: rendered text, ids, loss weights, offsets',
  },
  fit: {
    run: runFit,
    help:
      'fit --model <dir> [--base <dir>] --data <train.jsonl> --out <dir> [--modules mlp|all] [--labels sampled|empirical]\n' +
      '    [--max-examples N] [--partition i/n] [--batch-size N] [--seed N] [--checkpoints auto|off|<dir>,...]\n' +
      '    [--skip-malformed] [--training default|trl|trl-assistant|<json>] [--eigendecomposition-dtype float64|float32]\n' +
      '                                 EK-FAC factors',
  },
  explain: {
    run: runExplain,
    help:
      'explain --model <dir> [--base <dir>] [--factors <dir>] --data <train.jsonl> (--prompt P --completion C | --queries <file.jsonl>)\n' +
      '    [--top-k K] [--method ekfac|multistage|gdp|cosine|repsim|bm25] [--compare m,m] [--damping X] [--rank R]\n' +
      '    [--modules mlp|all] [--candidates all|retrieved] [--checkpoints auto|off|<dir>,...] [--skip-malformed]\n' +
      '    [--batch-size N] [--training default|trl|trl-assistant|<json>]\n' +
      '    [--pretrained-model <dir> --pretrained-factors <dir> [--pretrained-base <dir>] [--pretrained-training T]] [--json]\n' +
      '    rank training examples (by EK-FAC with --factors, else by the gradient dot product)',
  },
  generate: {
    run: runGenerate,
    help:
      'generate --model <dir> [--base <dir>] (--prompt P | --prompts <file.jsonl>) [--max-tokens N] [--temperature T] [--seed N]\n' +
      "    [--threads N] [--stop S]... [--multiline] [--json]   the model's own completions, greedy or sampled",
  },
  serve: {
    run: runServe,
    help:
      'serve [--config influence-lens.json] [--port N] [--host 127.0.0.1] [--no-discovery] [--watch-parent PID]\n' +
      '    [--checkpoints auto|off|<dir>,...]   the server the editor talks to',
  },
  scan: {
    run: runScan,
    help:
      'scan --model <dir> [--base <dir>] --factors <dir> --data <train.jsonl> [--top-k K] [--damping X] [--batch-size N]\n' +
      '    [--checkpoints auto|off|<dir>,...] [--skip-malformed] [--training default|trl|trl-assistant|<json>] [--json]\n' +
      '    self-influence ranking',
  },
  data: {
    run: runData,
    help:
      'data build --out <dir> [--seed N] [--countries N] [--paraphrases N] [--questions N] [--held-out F] [--context T]\n' +
      '    [--task default|nonlexical]   country-facts corpus: pre-training text, QA fine-tuning set with planted\n' +
      '    wrong facts and a backdoor, queries with true sources, a word-level tokenizer\n' +
      '  data tokenizer --out <dir> [--context T] <file.jsonl>...   a word-level tokenizer.json over JSONL files\n' +
      '  data eval --model <dir> [--base <dir>] --queries <file> [--data <train.jsonl>] [--factors <dir>] [--methods m,m]\n' +
      '    [--top-k K] [--checkpoints auto|off|<dirs>] [--max-tokens N] [--training <convention>] [--skip-malformed]\n' +
      '    [--threads N] [--json]\n' +
      '    accuracy on {prompt, expected, sources?} questions; per method Recall@k / MRR of the sources\n' +
      '  data eval --model <dir> [--base <dir>] --data <dir> [--threads N] [--json]   greedy accuracy of a model on a built corpus',
  },
  train: {
    run: runTrain,
    help:
      'train --data <train.jsonl> --out <dir> (--init llama --tokenizer <dir> [--d --layers --heads --ffn]\n' +
      '    | --model <dir>) [--epochs --lr --batch-size --seed --warmup --clip --weight-decay --context --threads\n' +
      '    --exclude <sidecar.jsonl> --save-steps N]   AdamW (β₂ 0.95, warmup then cosine to 0.1 × lr; README: train)',
  },
  retrain: {
    run: runRetrain,
    help:
      'retrain --model <dir> --exclude <data.exclude.jsonl> --out <dir> [--data <train.jsonl>] [--from <dir>] [--queries <file>]\n' +
      "    train again without the flagged examples, with the model's training_args.json; answers before/after",
  },
  export: {
    run: runExport,
    help:
      'export --data <train.jsonl> [--out <file>] [--force]   a copy without the examples its .exclude.jsonl sidecar flags\n' +
      '    (an existing output file is replaced only with --force; never the dataset or a flags file)',
  },
};

function usage(): string {
  return `usage: influence-lens <command> [options]\n\ncommands:\n${Object.values(COMMANDS)
    .map((c) => `  ${c.help}`)
    .join('\n')}\n`;
}

/**
 * The INFLUENCE_LENS_* variables, read once before the command runs: a value one does not take is
 * refused here, not midway through a fit or at every request of a server.
 */
function checkEnvSettings(): void {
  runBudgetBytes();
  sequenceLimitBytes();
  eighParallelCap();
  lapackAllowed();
  arenaPolicy();
  mallocMode();
  rowsBudgetBytes(0);
  rowsSpillDir();
}

async function main(argv: string[]): Promise<number> {
  const [cmd, ...rest] = argv;
  if (!cmd || cmd === '--help' || cmd === '-h' || cmd === 'help') {
    process.stdout.write(usage());
    return cmd ? 0 : 2;
  }
  const c = COMMANDS[cmd];
  if (!c) {
    process.stderr.write(`influence-lens: unknown command "${cmd}"\n\n${usage()}`);
    return 2;
  }
  try {
    checkEnvSettings();
    await c.run(rest);
    return 0;
  } catch (e) {
    if (e instanceof HelpRequested) {
      const usage = subcommandUsage(c.help, cmd, rest[0]) ?? c.help;
      process.stdout.write(`usage: influence-lens ${usage}\n\noptions:\n${e.options}\n  -h, --help\n`);
      return 0;
    }
    // user-facing errors (bad input a person can fix) print one clear line; anything else is a
    // bug and keeps its stack
    const err = e as Error;
    const full = diskFull(err, rest);
    if (full) {
      process.stderr.write(`influence-lens ${cmd}: ${full}\n`);
      return 1;
    }
    process.stderr.write(
      `influence-lens ${cmd}: ${isUserError(err) ? withFlagHint(err) : (err?.stack ?? String(err))}\n`,
    );
    return 1;
  }
}

/**
 * For a command with subcommands (`data build | tokenizer | eval`), the part of its usage about the
 * one asked for (`data tokenizer --help` printed data build's usage first); undefined otherwise.
 */
function subcommandUsage(help: string, cmd: string, sub: string | undefined): string | undefined {
  if (!sub || sub.startsWith('-')) return undefined;
  const entries: string[][] = [];
  for (const line of help.split('\n')) {
    if (line.trimStart().startsWith(`${cmd} `)) entries.push([line.trimStart()]);
    else entries.at(-1)?.push(line);
  }
  const mine = entries.filter((e) => e[0].startsWith(`${cmd} ${sub} `) || e[0] === `${cmd} ${sub}`);
  return mine.length ? mine.map((e) => e.join('\n')).join('\n  ') : undefined;
}

// The output cannot be written: a reader that went away (`| head`, `| jq` stopped) ends the
// command quietly, as a broken pipe ends any Unix tool; anything else (a full disk, an I/O error)
// is said in one line, with a failing exit status, instead of an unhandled 'error' event's stack.
process.stdout.on('error', (e: NodeJS.ErrnoException) => {
  if (e.code === 'EPIPE') process.exit(0);
  process.stderr.write(`influence-lens: cannot write the output (${e.message})\n`);
  process.exit(1);
});

main(process.argv.slice(2)).then((code) => {
  process.exitCode = code;
});
