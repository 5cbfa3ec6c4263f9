// Small helpers shared by CLI subcommands: argument parsing with clear errors, and a
// progress bar on stderr that stays quiet when stderr is not a terminal.
import { type ParseArgsConfig, parseArgs } from 'node:util';
import { closest } from '../../common/json-schema';
import { physicalPath } from '../../common/real-path';
import { type Setting, SettingError } from '../attribution/setup';
import { parseTraining, type TrainingConvention } from '../data/training';

export class CliError extends Error {
  override name = 'CliError';
}

/** How to change each engine setting from the command line (the engine's errors name the setting, not the flag). */
const FLAG_HINTS: Record<Setting, string> = {
  damping: 'set it with --damping',
  factors:
    'pass factors with --factors <dir>; make them with: influence-lens fit --model <dir> --data <train.jsonl> --out <dir>',
  pretrained: 'pass --pretrained-model <dir> and --pretrained-factors <dir>',
  modules: 'choose them with --modules mlp|all',
  partition: 'set it with --partition i/n',
  out: 'choose another --out',
};

/** An error's message, with the flag that changes the setting it is about (when it is about one). */
export function withFlagHint(e: Error): string {
  if (!(e instanceof SettingError && e.setting)) return e.message;
  const hint = FLAG_HINTS[e.setting];
  // a message that already ends in brackets takes the hint inside them, not in a second pair
  return e.message.endsWith(')') ? `${e.message.slice(0, -1)}; ${hint})` : `${e.message} (${hint})`;
}

/** Thrown by `parse` for `--help` / `-h`: the command's options, listed from the table that parses them. */
export class HelpRequested extends Error {
  override name = 'HelpRequested';
  constructor(readonly options: string) {
    super('help requested');
  }
}

/** One line per option of a parseArgs table: `--name <value>`, `-s, --flag`, repeatable ones marked. */
export function describeOptions(options: NonNullable<ParseArgsConfig['options']>): string {
  return Object.entries(options)
    .map(([name, o]) => {
      const flag = `${o.short ? `-${o.short}, ` : ''}--${name}${o.type === 'string' ? ' <value>' : ''}`;
      const notes = [o.multiple ? 'repeatable' : '', o.default !== undefined ? `default ${String(o.default)}` : '']
        .filter(Boolean)
        .join('; ');
      return `  ${flag}${notes ? `   (${notes})` : ''}`;
    })
    .join('\n');
}

export function parse<T extends NonNullable<ParseArgsConfig['options']>>(
  argv: string[],
  options: T,
  positionals = false,
) {
  if (argv.includes('--help') || argv.includes('-h')) throw new HelpRequested(describeOptions(options));
  let parsed: ReturnType<typeof parseArgs<{ options: T; allowPositionals: boolean; strict: true; tokens: true }>>;
  try {
    parsed = parseArgs({ args: argv, options, allowPositionals: positionals, strict: true, tokens: true });
  } catch (e) {
    const message = (e as Error).message;
    // a misspelt flag: name the one meant, when one is close
    const unknown = /^Unknown option '--([^']+)'/.exec(message)?.[1];
    const near = unknown && closest(unknown, Object.keys(options));
    throw new CliError(near ? `unknown option --${unknown}; did you mean --${near}? (see --help)` : message);
  }
  // a value given twice, differently (`--method ekfac ... --method bm25`): parseArgs keeps the last
  // one silently, so which one the person meant is unknown
  const first = new Map<string, string>();
  for (const t of parsed.tokens) {
    if (t.kind !== 'option' || t.value === undefined || options[t.name]?.multiple) continue;
    const had = first.get(t.name);
    if (had !== undefined && had !== t.value)
      throw new CliError(`--${t.name} is given twice ("${had}" and "${t.value}"); give it once`);
    first.set(t.name, t.value);
  }
  // paths with `..` as the system reads them (common/real-path.ts): `join(out, 'tokenizer.json')`
  // drops `par/..` as text, so a check built that way read another folder than the write replaced
  const values = parsed.values as Record<string, unknown>;
  for (const name of Object.keys(values))
    if (PATH_OPTIONS.has(name) && typeof values[name] === 'string') values[name] = systemPath(values[name] as string);
  if (positionals) parsed.positionals = parsed.positionals.map(systemPath);
  return parsed;
}

/** The options that name files or folders (every command's positionals do too). */
const PATH_OPTIONS = new Set([
  'model',
  'base',
  'data',
  'out',
  'factors',
  'queries',
  'exclude',
  'tokenizer',
  'prompts',
  'from',
  'config',
  'pretrained-model',
  'pretrained-factors',
  'pretrained-base',
]);

/** A path with a `..` component, resolved as the system resolves it; any other path as given. */
function systemPath(p: string): string {
  return p.split(/[\\/]/).includes('..') ? physicalPath(p) : p;
}

export function oneOf<T extends string>(
  value: string | undefined,
  allowed: readonly T[],
  flag: string,
  fallback: T,
): T {
  if (value === undefined) return fallback;
  if (!(allowed as readonly string[]).includes(value))
    throw new CliError(`${flag} must be one of ${allowed.join(', ')} (got "${value}")`);
  return value as T;
}

export function int(value: string | undefined, flag: string, fallback: number): number {
  if (value === undefined) return fallback;
  // digits only: Number() reads "" as 0, "0x10" as 16, "1e1" as 10 and "1.0" as 1
  const n = /^[+-]?\d+$/.test(value.trim()) ? Number(value) : Number.NaN;
  if (!Number.isInteger(n)) throw new CliError(`${flag} must be an integer (got "${value}")`);
  return n;
}

/**
 * `--seed`: the random generator (util/random.ts) keeps 32 bits of it, so a larger or negative
 * seed would silently be another one (4294967296 samples as 0 does): refused instead.
 */
export function seedFlag(
  value: string | undefined,
  fallback: number,
  flag = '--seed',
  /** why nothing is drawn at random in this run, when nothing is: a given seed is then noted as unused */
  unused?: string,
): number {
  const n = int(value, flag, fallback);
  if (n < 0 || n > 0xffffffff) throw new CliError(`${flag} must be an integer from 0 to 4294967295 (got "${value}")`);
  // a seed that changes nothing is said so, not silently ignored (the result is the same for every seed)
  if (value !== undefined && unused) process.stderr.write(`note: ${flag} ${value} changes nothing here: ${unused}\n`);
  return n;
}

/**
 * `--threads`: ONNX Runtime's intra-op threads, within the bounds of influence-lens.json's
 * "threads" (ONNX Runtime reads 0 as "all cores", fails on a negative count with a stack trace,
 * and hangs starting thousands).
 */
export function threadsFlag(value: string | undefined): number | undefined {
  if (value === undefined) return undefined;
  const n = int(value, '--threads', 1);
  if (n < 1 || n > 1024) throw new CliError(`--threads must be an integer from 1 to 1024 (got "${value}")`);
  return n;
}

export class Progress {
  private last = 0;
  private readonly start = Date.now();
  constructor(
    private readonly label: string,
    private readonly total: number,
    private readonly stream: NodeJS.WriteStream = process.stderr,
  ) {}

  tick(done: number, note = ''): void {
    if (!this.stream.isTTY) return;
    const now = Date.now();
    if (now - this.last < 100 && done < this.total) return;
    this.last = now;
    const frac = this.total ? Math.min(1, done / this.total) : 0;
    const width = 24;
    const bar = '█'.repeat(Math.round(frac * width)).padEnd(width, '░');
    const secs = ((now - this.start) / 1000).toFixed(1);
    this.stream.write(`\r${this.label} ${bar} ${done}/${this.total} ${secs}s ${note}`.padEnd(90));
  }

  done(note = ''): void {
    if (this.stream.isTTY) {
      this.tick(this.total, note);
      this.stream.write('\n');
    }
  }
}

/**
 * `--training <preset>|<json>`: how the model was trained on its records (data/training.ts):
 * default, trl, trl-assistant, or a JSON object such as '{"trainer": "trl", "appendEos": true, "chatLoss": "all", "maxLength": 2048}'.
 */
export function trainingFlag(value: string | undefined, flag = '--training'): TrainingConvention | undefined {
  if (value === undefined) return undefined;
  let parsed: unknown = value;
  if (value.trim().startsWith('{')) {
    try {
      parsed = JSON.parse(value);
    } catch (e) {
      throw new CliError(`${flag}: not a JSON object (${(e as Error).message})`);
    }
  }
  try {
    return parseTraining(parsed);
  } catch (e) {
    throw new CliError(`${flag}: ${(e as Error).message}`);
  }
}
