// Recent explanations, kept compactly in the workspace state, so a training-data hover can say
// how an example influenced the last queries ("supporting #1 for ' Sydney' (EK-FAC)").
import type * as vscode from 'vscode';
import type { ExplainResult, Method, Sign } from '../protocol/types';

export interface HistoryHit {
  prompt: string;
  completion: string;
  method: Method;
  dataset: string;
  line: number;
  rank: number;
  score: number;
  sign: Sign;
  percentile: number;
  at: number;
}

interface Entry {
  prompt: string;
  completion: string;
  method: Method;
  dataset: string;
  at: number;
  examples: Array<[hash: string, line: number, rank: number, score: number, sign: Sign, percentile: number]>;
}

const KEY = 'influenceLens.history';
const MAX = 20;

export class History {
  constructor(private readonly memento: vscode.Memento) {}

  add(dataset: string, r: ExplainResult): void {
    const entry: Entry = {
      prompt: r.query.prompt.slice(-2000),
      completion: r.query.completion.slice(0, 2000),
      method: r.method,
      dataset,
      at: Date.now(),
      examples: [...r.supporting, ...r.opposing].map((e) => [
        e.id.hash,
        e.id.line,
        e.rank,
        e.score,
        e.sign,
        e.percentile,
      ]),
    };
    const same = (x: Entry) =>
      x.prompt === entry.prompt && x.completion === entry.completion && x.method === entry.method;
    const list = [entry, ...this.entries().filter((x) => !same(x))].slice(0, MAX);
    void this.memento.update(KEY, list);
  }

  /** How an example (by hash) ranked in recent explanations, newest first. */
  hits(hash: string): HistoryHit[] {
    const out: HistoryHit[] = [];
    for (const e of this.entries())
      for (const [h, line, rank, score, sign, percentile] of e.examples)
        if (h === hash)
          out.push({
            prompt: e.prompt,
            completion: e.completion,
            method: e.method,
            dataset: e.dataset,
            line,
            rank,
            score,
            sign,
            percentile,
            at: e.at,
          });
    return out;
  }

  private entries(): Entry[] {
    return this.memento.get<Entry[]>(KEY, []);
  }
}
