// A training-data file loaded, validated and rendered: what the indexer iterates over.

import { closeSync, readSync } from 'node:fs';
import { openRegularFile } from '../../common/read-file';
import type { ChatTemplate } from '../../common/records/chat-template';
import type { TokenizerHandle } from '../model/tokenizer';
import { DataError } from './errors';
import { ACCEPTED_SHAPES, formatRecord, type RecordKind, renderForModel, type Span } from './format';
import { readJsonl, SKIP_HINT, type SkippedLine } from './jsonl';
import { checkTrainable } from './tokenize';

export interface Example {
  /** 0-based position among the loaded examples (not the line number). */
  index: number;
  /** 1-based line in the file. */
  line: number;
  /** Content hash of the record (see ids.ts): stable across reordering of the file. */
  hash: string;
  kind: RecordKind;
  text: string;
  spans: Span[];
  /** The parsed JSON record as it appeared, extra fields included. */
  record: unknown;
}

export interface Dataset {
  path: string;
  examples: Example[];
  /** Lines skipped under skipMalformed: bad JSON and records of an unaccepted shape. */
  skipped: SkippedLine[];
  /** How many examples repeat the hash of an earlier one. Duplicates are kept: they were trained on twice. */
  duplicates: number;
  /** sha256 of the file's bytes as read, when asked for (`sha256: true`) */
  sha256?: string;
}

export interface LoadDatasetOptions {
  skipMalformed?: boolean;
  /** Keep only the first N valid examples. */
  maxExamples?: number;
  /** Also digest the file's bytes as read (Dataset.sha256). */
  sha256?: boolean;
  /**
   * The model's chat template: chat records are also rendered with it, so that a record it
   * cannot render is a bad line like any other (reported, or skipped under skipMalformed)
   * instead of stopping every later use of the dataset.
   */
  chatTemplate?: ChatTemplate;
  /**
   * The tokenizer (with its training convention) and the model's context the records will be
   * tokenized with, in place of `chatTemplate`: besides a chat its template fails on, a record its
   * trainer refuses (the "trl" trainer's refusals, `checkTrainable`) is a bad line. Under the
   * default trainer this costs what `chatTemplate` does; under "trl" with a LlamaTokenizer file it
   * encodes each record (ids only), which its tokenization then does not repeat.
   */
  trainedBy?: { tokenizer: TokenizerHandle; maxLength: number };
}

export function loadDataset(path: string, options: LoadDatasetOptions = {}): Dataset {
  const { skipMalformed = false, maxExamples } = options;
  if (maxExamples !== undefined && !(Number.isInteger(maxExamples) && maxExamples > 0)) {
    throw new DataError(`maxExamples must be a positive integer, got ${maxExamples}`);
  }
  // JSON errors are collected rather than thrown so that, without skipping, the error we report
  // is the first one in the file whether it is bad JSON or a bad shape. Each row yields one
  // example or an error, so reading can stop after maxExamples rows; when skipping, a row may be
  // dropped for its shape, so we must read on.
  const limit = skipMalformed ? undefined : maxExamples;
  const { rows, skipped, sha256 } = readJsonl(path, { skipMalformed: true, limit, sha256: options.sha256 });
  const examples: Example[] = [];
  const seen = new Set<string>();
  let duplicates = 0;
  for (const { line, value, hash } of rows) {
    if (maxExamples !== undefined && examples.length >= maxExamples) break;
    let formatted: ReturnType<typeof formatRecord>;
    try {
      formatted = formatRecord(value, `${path}:${line}`);
      if (options.trainedBy)
        checkTrainable(
          options.trainedBy.tokenizer,
          value,
          formatted.kind,
          `${path}:${line}`,
          options.trainedBy.maxLength,
        );
      else if (options.chatTemplate && formatted.kind === 'messages')
        renderForModel(value, `${path}:${line}`, options.chatTemplate);
    } catch (e) {
      // a record too big or odd to render (RangeError) is a bad line like any other
      if (!(e instanceof DataError) && !(e instanceof RangeError)) throw e;
      const message =
        e instanceof DataError ? e.message.slice(`${path}:${line}: `.length) : `cannot read: ${(e as Error).message}`;
      skipped.push({ line, message });
      continue;
    }
    if (seen.has(hash)) duplicates++;
    else seen.add(hash);
    examples.push({ index: examples.length, line, hash, ...formatted, record: value });
  }
  // Report in file order, leaving out lines past the last kept example when maxExamples cut the file.
  const last = examples.length === maxExamples ? examples[examples.length - 1].line : Number.POSITIVE_INFINITY;
  const reported = skipped.filter((s) => s.line < last).sort((a, b) => a.line - b.line);
  if (!skipMalformed && reported.length > 0) {
    // a whole file in another format (a JSON array, CSV) fails on its first line: say what is expected
    const head = readHead(path);
    if (reported[0].line === head.line && !head.text.startsWith('{'))
      throw new DataError(
        `${path}: not JSON Lines (line ${head.line}: ${reported[0].message.replace(/; accepted shapes:.*$/, '')}); write one JSON object per line: ${ACCEPTED_SHAPES}` +
          (head.text.startsWith('[') ? ` (a JSON array converts with: jq -c '.[]' ${path} > data.jsonl)` : '') +
          (examples.length ? ` ${SKIP_HINT}` : ''),
      );
    throw new DataError(`${path}:${reported[0].line}: ${reported[0].message} ${SKIP_HINT}`);
  }
  if (examples.length === 0) {
    // every line skipped: their reasons are all there is to go on (the first few)
    const first = reported
      .slice(0, 3)
      .map((r) => `line ${r.line}: ${r.message.replace(/; accepted shapes:.*$/, '')}`)
      .join('; ');
    const why =
      reported.length > 0
        ? ` (${reported.length} malformed line(s) skipped: ${first}${reported.length > 3 ? '; …' : ''})`
        : '';
    throw new DataError(`${path}: no training examples${why}; ${ACCEPTED_SHAPES}`);
  }
  return { path, examples, skipped: reported, duplicates, ...(sha256 ? { sha256 } : {}) };
}

/** The file's first non-blank characters (after a byte order mark) and the line they are on. */
function readHead(path: string): { text: string; line: number } {
  let fd: number;
  try {
    fd = openRegularFile(path, (what) => new DataError(`${path}: is ${what}, expected a .jsonl file`));
  } catch (e) {
    if (e instanceof DataError) throw e;
    const code = (e as NodeJS.ErrnoException).code;
    if (code === 'ENOENT') throw new DataError(`${path}: no such file`);
    throw new DataError(`${path}: cannot read: ${(e as Error).message}`);
  }
  try {
    const buf = Buffer.alloc(4096);
    const n = readSync(fd, buf, 0, buf.length, 0);
    const all = buf
      .subarray(0, n)
      .toString('utf8')
      .replace(/^\uFEFF/, '');
    const text = all.trimStart();
    return { text, line: 1 + (all.slice(0, all.length - text.length).match(/\n/g)?.length ?? 0) };
  } finally {
    closeSync(fd);
  }
}
