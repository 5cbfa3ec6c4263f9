// A tiny mixed training set (QA records and plain text) for tests that run the real service.
import { writeFileSync } from 'node:fs';

/** One JSON object a line, as the datasets are; returns the path. */
export function writeJsonl(path: string, rows: readonly unknown[]): string {
  writeFileSync(path, `${rows.map((r) => JSON.stringify(r)).join('\n')}\n`);
  return path;
}

export function writeTinyCorpus(path: string, n: number): object[] {
  const rows = Array.from({ length: n }, (_, i) =>
    i % 3 === 0
      ? { prompt: `Q: capital of country ${i}?\nA:`, completion: ` City${i}` }
      : { text: `Country ${i} has a capital called City${i} and a river.` },
  );
  writeJsonl(path, rows);
  return rows;
}

/** Four records about capitals (text and prompt/completion) for tests of the service's requests. */
export function writeCapitals(path: string): string {
  const rows = [
    { text: 'The capital of France is Paris.' },
    { prompt: 'Q: capital of France?\nA:', completion: ' Paris' },
    { prompt: 'Q: capital of Italy?\nA:', completion: ' Rome' },
    { text: 'Berlin is in Germany.' },
  ];
  return writeJsonl(path, rows);
}
