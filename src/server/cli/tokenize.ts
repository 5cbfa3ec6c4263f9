// influence-lens tokenize --model <dir> [--base <dir>] --data <file.jsonl> [--out <file.jsonl>]: exactly which
// tokens of each record the loss scores. One JSON object per record:
//   {"line", "text", "rendering", "input_ids", "target_weights", "offsets"[, "truncated"[, "truncated_lower_bound"]]}
// `text` is the rendered record (chat template applied), `offsets` are UTF-16 [start, end) per
// token into `text`, `target_weights[t]` is 1 iff position t's prediction of token t+1 is in the
// loss (as `gradients` writes it). Same loading, rendering and masking code as `fit` and `explain`.
import { closeSync, existsSync, openSync, readSync, statSync } from 'node:fs';
import { join, resolve } from 'node:path';
import { cleanStaleTempsOf, restoreReplacedPath, writeFileAtomic } from '../../common/atomic-write';
import { loadDataset } from '../data/dataset';
import { contextLength, type TokenizedText, tokenizeExamples } from '../data/tokenize';
import type { TrainingConvention } from '../data/training';
import { isAdapterDir } from '../model/adapter';
import { openCheckpoint, readConfig } from '../model/checkpoint';
import { loadTokenizer, withTraining } from '../model/tokenizer';
import { checkOutFile } from './out-paths';
import { CliError, parse, trainingFlag } from './util';

export interface TokenizedLine {
  line: number;
  text: string;
  rendering: TokenizedText['rendering'];
  input_ids: number[];
  target_weights: number[];
  offsets: Array<[number, number]>;
  truncated?: number;
  truncated_lower_bound?: true;
}

/** The records of `data` as the model at `modelDir` is trained and scored on them. */
export function tokenizeFile(
  modelDir: string,
  data: string,
  base?: string,
  skipMalformed = false,
  training?: TrainingConvention,
): { lines: TokenizedLine[]; warnings: string[] } {
  // A LoRA adapter folder (or an explicit base) resolves like fit/explain do: config.json from
  // the base model, tokenizer.json from the adapter folder when it has one, else from the base.
  restoreReplacedPath(resolve(modelDir)); // a save killed between its two renames, as openCheckpoint
  const ck = base || isAdapterDir(modelDir) ? openCheckpoint(modelDir, { base }) : null;
  const tokDir = ck ? ck.tokenizerDir : modelDir;
  let config: Record<string, unknown> = ck ? ck.config : {};
  if (!ck) {
    // the folder checks every other command makes (a missing folder, a hub-cache folder instead of
    // its snapshot), where a tokenizer folder without config.json is also accepted here
    if (!existsSync(modelDir) || !statSync(modelDir).isDirectory())
      throw new CliError(`${modelDir}: not a directory (expected a Hugging Face model directory)`);
    if (existsSync(join(modelDir, 'config.json')) || existsSync(join(modelDir, 'snapshots')))
      config = readConfig(modelDir);
  }
  // transformers 5 picks the tokenizer class by the model type too (tokenizer.ts transformersV5Pipeline)
  const modelType = typeof config.model_type === 'string' ? config.model_type : undefined;
  const loaded = loadTokenizer(tokDir, { modelType });
  const tok = training ? withTraining(loaded, training, join(tokDir, 'tokenizer.json')) : loaded;
  const maxLength = contextLength(config);
  const ds = loadDataset(data, { skipMalformed, trainedBy: { tokenizer: tok, maxLength } });
  const { tokens, truncated } = tokenizeExamples(tok, ds.examples, maxLength, data);
  const warnings: string[] = ds.skipped.map((x) => `${data}:${x.line}: ${x.message} (skipped)`);
  if (ck?.baseNote) warnings.unshift(ck.baseNote);
  const standIn = tokens.filter((t) => t.rendering === 'stand-in').length;
  if (standIn)
    warnings.push(
      `${modelDir} has no chat_template: ${standIn} "messages" record(s) rendered with the stand-in "<|role|>\\n" + content + "\\n", which no real chat model was trained on`,
    );
  if (truncated) {
    // the training convention may cut shorter than the context (TRL's max_length 1024)
    const cut = tok.training.maxLength;
    warnings.push(
      cut !== undefined && cut < maxLength
        ? `${truncated} record(s) longer than the training convention's maxLength (${cut} tokens; the context is ${maxLength}) were cut at the end`
        : `${truncated} record(s) longer than the context (${maxLength} tokens) were cut at the end`,
    );
  }
  const lines = tokens.map((t, i): TokenizedLine => {
    const out: TokenizedLine = {
      line: ds.examples[i].line,
      text: t.text,
      rendering: t.rendering,
      input_ids: t.ids,
      target_weights: t.weights,
      offsets: t.offsets,
    };
    if (t.truncated) out.truncated = t.truncated;
    // a record far longer than the context is tokenized from a prefix: the count cut is a lower bound
    if (t.truncatedAtLeast) out.truncated_lower_bound = true;
    return out;
  });
  return { lines, warnings };
}

export async function runTokenize(argv: string[]): Promise<void> {
  const { values: v } = parse(argv, {
    model: { type: 'string' },
    base: { type: 'string' },
    data: { type: 'string' },
    out: { type: 'string' },
    'skip-malformed': { type: 'boolean' },
    training: { type: 'string' },
  });
  if (!v.model) throw new CliError('--model <dir> is required (a directory with tokenizer.json)');
  if (!v.data) throw new CliError('--data <file.jsonl> is required');
  // never over the data, a flags file or anything but tokens written before (checked before the work)
  if (v.out)
    checkOutFile(v.out, {
      inputs: [v.data],
      what: 'a tokens file written by influence-lens tokenize',
      ours: isTokensFile,
    });
  const { lines, warnings } = tokenizeFile(v.model, v.data, v.base, v['skip-malformed'], trainingFlag(v.training));
  for (const w of warnings) process.stderr.write(`warning: ${w}\n`);
  const body = lines.map((l) => JSON.stringify(l)).join('\n') + (lines.length ? '\n' : '');
  if (v.out) {
    // whole or not at all: a run killed mid-write leaves the earlier file
    writeFileAtomic(v.out, body);
    cleanStaleTempsOf(v.out); // what a run killed mid-write left beside it
    process.stderr.write(`wrote ${v.out}: ${lines.length} record(s)\n`);
  } else process.stdout.write(body);
}

/** Whether `path` is empty or JSON lines whose first is a record `tokenize` writes. */
function isTokensFile(path: string): boolean {
  const fd = openSync(path, 'r');
  try {
    // its first line, however long (a record's ids and offsets)
    const parts: Buffer[] = [];
    for (let at = 0; ; ) {
      const chunk = Buffer.alloc(1 << 20);
      const n = readSync(fd, chunk, 0, chunk.length, at);
      const nl = chunk.subarray(0, n).indexOf(0x0a);
      parts.push(chunk.subarray(0, nl < 0 ? n : nl));
      at += n;
      if (n === 0 || nl >= 0) break;
    }
    const first = Buffer.concat(parts).toString('utf8');
    // empty: tokenize of a file with no records
    if (!first) return statSync(path).size === 0;
    const r = JSON.parse(first) as Record<string, unknown>;
    return typeof r === 'object' && r !== null && Array.isArray(r.input_ids) && Array.isArray(r.target_weights);
  } catch {
    return false;
  } finally {
    closeSync(fd);
  }
}
