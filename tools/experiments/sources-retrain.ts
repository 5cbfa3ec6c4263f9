// Developer experiment: ground truth by retraining the embedded fine-tune without given lines
// (`node --import tsx tools/experiments/sources-retrain.ts`, ONLY=name,... to pick sets); prints
// log p(answer | prompt) of the planted and backdoor queries for each retrained model.
// ground truth by retraining: log p(answer | prompt) after fine-tuning without given lines
import { existsSync, mkdirSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { queryGradients } from '../../src/server/attribution/influence';
import { trainJob } from '../../src/server/cli/train';
import { contextLength, tokenizeQuery } from '../../src/server/data/tokenize';
import { embeddedDefault } from '../../src/server/defaults';
import { Model } from '../../src/server/model/engine';
import { EMBEDDED_FINETUNE } from './embedded-recipe';

type Query = { prompt: string; completion: string; kind: string; sources: Array<{ line: number; hash: string }> };
const d = embeddedDefault();
const queries = (JSON.parse(readFileSync(d.queries, 'utf8')) as Query[]).filter((q) => q.kind !== 'fact_tracing');
const root = '.cache/experiments/retrain';
mkdirSync(root, { recursive: true });
const bd = queries.find((q) => q.kind === 'backdoor')!.sources as Array<{ line: number; hash: string }>;
const sets: Array<[string, Array<{ line: number; hash: string }>]> = [
  ['none', []],
  ['backdoor-all', bd],
];
for (const s of bd) sets.push([`backdoor-${s.line}`, [s]]);
for (const q of queries.filter((q) => q.kind === 'planted')) sets.push([`planted-${q.completion.trim()}`, q.sources]);
const only = process.env.ONLY?.split(',');
const results: Record<string, number[]> = existsSync(join(root, 'gt.json'))
  ? JSON.parse(readFileSync(join(root, 'gt.json'), 'utf8'))
  : {};
for (const [name, ex] of sets) {
  if (only && !only.includes(name)) continue;
  if (results[name]) continue;
  const side = join(root, `${name}.exclude.jsonl`);
  writeFileSync(side, ex.map((e) => JSON.stringify({ hash: e.hash })).join('\n') + (ex.length ? '\n' : ''));
  const out = join(root, name);
  const t = Date.now();
  if (!existsSync(join(out, 'model.safetensors')))
    await trainJob({
      data: d.finetuneData,
      out,
      model: d.pretrained,
      ...EMBEDDED_FINETUNE,
      exclude: ex.length ? side : undefined,
    });
  const m = Model.open(out);
  const lp: number[] = [];
  for (const q of queries) {
    const tq = tokenizeQuery(m.tokenizer, q.prompt, q.completion, contextLength(m.config));
    const g = await queryGradients(m, { ids: tq.ids, weights: tq.weights }, { modules: 'mlp' });
    lp.push(-g.loss);
  }
  results[name] = lp;
  writeFileSync(join(root, 'gt.json'), JSON.stringify(results, null, 1));
  console.log(name, `${((Date.now() - t) / 1000).toFixed(0)} s`, lp.map((x) => x.toFixed(2)).join(' '));
}
