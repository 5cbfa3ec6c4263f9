#!/usr/bin/env node
// influence-lens: the command line. One subcommand per job; each lives in cli/<name>.ts.
import { runBench } from './cli/bench';
import { runData } from './cli/data';
import { runDemo } from './cli/demo';
import { runExplain } from './cli/explain';
import { runFit } from './cli/fit';
import { runGradients } from './cli/gradients';
import { runInspect } from './cli/inspect';
import { runScan } from './cli/scan';
import { runServe } from './cli/serve';
import { runTrain } from './cli/train';
import { CliError } from './cli/util';

const COMMANDS: Record<string, { run: (argv: string[]) => Promise<void>; help: string }> = {
  demo: {
    run: runDemo,
    help: 'demo [--query N] [--top-k K]   the whole loop on the embedded default: explain a wrong answer, fix it',
  },
  inspect: { run: runInspect, help: 'inspect <model-dir> [--base <dir>]   architecture, parameters, tracked modules' },
  gradients: {
    run: runGradients,
    help:
      'gradients --model <dir> (--text T | --prompt P --completion C) --out <file.safetensors>\n' +
      '                                 per-token module inputs a and output gradients g',
  },
  fit: {
    run: runFit,
    help:
      'fit --model <dir> --data <train.jsonl> --out <dir> [--modules mlp|all] [--labels sampled|empirical]\n' +
      '    [--max-examples N] [--partition i/n] [--batch-size N] [--seed N]   EK-FAC factors',
  },
  explain: {
    run: runExplain,
    help:
      'explain --model <dir> --factors <dir> --data <train.jsonl> --prompt P --completion C [--top-k K]\n' +
      '    [--method ekfac|multistage|gdp|cosine|repsim|bm25] [--compare m,m] [--damping X] [--rank R]\n' +
      '    [--pretrained-model <dir> --pretrained-factors <dir>] [--json]   rank training examples',
  },
  serve: {
    run: runServe,
    help: 'serve [--config influence-lens.json] [--port N] [--host 127.0.0.1] [--no-discovery] [--watch-parent PID]   the server the editor talks to',
  },
  scan: {
    run: runScan,
    help: 'scan --model <dir> --factors <dir> --data <train.jsonl> [--top-k K] [--json]   self-influence ranking',
  },
  data: {
    run: runData,
    help:
      'data build --out <dir> [--seed N] [--countries N]   country-facts corpus: pre-training text, QA fine-tuning\n' +
      '    set with planted wrong facts and a backdoor, queries with true sources, a word-level tokenizer\n' +
      '  data tokenizer --out <dir> <file.jsonl>...   a word-level tokenizer.json over JSONL files\n' +
      '  data eval --model <dir> --data <dir> [--json]   greedy accuracy of a model on a built corpus',
  },
  train: {
    run: runTrain,
    help:
      'train --data <train.jsonl> --out <dir> (--init llama --tokenizer <dir> [--d --layers --heads --ffn]\n' +
      '    | --model <dir>) [--epochs --lr --batch-size --seed --warmup --clip --exclude <sidecar.jsonl>]   AdamW',
  },
  bench: {
    run: runBench,
    help: 'bench [--quick] | bench engine|ekfac|server|eval [--quick]   every claim in one report: speed against kronfluence in the same run, latency, accuracy',
  },
};

function usage(): string {
  return `usage: influence-lens <command> [options]\n\ncommands:\n${Object.values(COMMANDS)
    .map((c) => `  ${c.help}`)
    .join('\n')}\n`;
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
    await c.run(rest);
    return 0;
  } catch (e) {
    // Known, user-facing errors print one clear line; anything else keeps its stack.
    const err = e as Error;
    const known = err instanceof CliError || err.constructor !== Error || /^[^\n]+$/.test(err.message ?? '');
    process.stderr.write(`influence-lens ${cmd}: ${known ? err.message : err.stack}\n`);
    return 1;
  }
}

main(process.argv.slice(2)).then((code) => {
  process.exitCode = code;
});
