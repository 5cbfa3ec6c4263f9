// Developer experiment, after corpus-sources.ts (N=10000 CKPT=1): -log p(completion | prompt) on the final
// model of each query's exact EK-FAC top 10 and of its true sources.
//   node --import tsx tools/experiments/corpus-sources-loss.ts
import { readFileSync } from 'node:fs';
import { queryGradients } from '../../src/server/attribution/influence';
import { openStage } from '../../src/server/attribution/stage';
import { loadDataset } from '../../src/server/data/dataset';
import { contextLength, tokenizeRecord } from '../../src/server/data/tokenize';
import { embeddedDefault } from '../../src/server/defaults';

const d = embeddedDefault();
const ft = openStage(d.finetuned, undefined); // gradients of the final model: no factors needed
const ds = loadDataset('.cache/experiments/corpus-sources/corpus-10000.jsonl');
const byLine = new Map(ds.examples.map((e) => [e.line, e]));
const R = JSON.parse(readFileSync('.cache/experiments/corpus-sources/ranks-10000-ckpt.json', 'utf8'));
const loss = async (line: number) => {
  const ex = byLine.get(line)!;
  const t = tokenizeRecord(ft.model.tokenizer, ex.record, `x:${line}`, contextLength(ft.model.config));
  const qg = await queryGradients(ft.model, { ids: t.ids, weights: t.weights }, { modules: 'all' });
  return qg.loss;
};
for (const q of R) {
  const top = [];
  for (const t of q.top) top.push((await loss(t.line)).toFixed(2));
  const src = [];
  for (const s of q.srcs) src.push((await loss(s.line)).toFixed(4));
  console.log(q.query, '| exact top-10 losses', top.join(' '), '| source losses', src.join(' '));
}
