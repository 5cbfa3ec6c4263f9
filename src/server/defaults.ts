// The embedded default: the small model pair and data that ship in `assets/default`, so the
// demo, `serve` and the editor work on a fresh clone with no downloads.
import { existsSync, readFileSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { defaultCacheDir } from './model/engine';
import type { ServiceConfig } from './service/influence-service';
import { DEFAULTS } from './settings';

/** The package root (the folder holding our package.json), from source or from the bundle. */
export function packageRoot(): string {
  let dir = dirname(fileURLToPath(import.meta.url));
  for (;;) {
    const pj = join(dir, 'package.json');
    if (existsSync(pj) && JSON.parse(readFileSync(pj, 'utf8')).name === 'influence-lens') return dir;
    const up = dirname(dir);
    if (up === dir) throw new Error('cannot find the influence-lens package root');
    dir = up;
  }
}

export function embeddedDefault() {
  const root = join(packageRoot(), 'assets', 'default');
  const cache = join(defaultCacheDir(), 'default');
  return {
    root,
    pretrained: join(root, 'pretrained'),
    finetuned: join(root, 'finetuned'),
    pretrainData: join(root, 'data', 'pretrain.jsonl'),
    finetuneData: join(root, 'data', 'finetune.jsonl'),
    queries: join(root, 'data', 'queries.json'),
    pretrainedFactors: join(cache, 'factors-pretrained'),
    finetunedFactors: join(cache, 'factors-finetuned'),
    cacheDir: cache,
  };
}

/** The service configuration `serve` uses when no influence-lens.json is given. */
export function defaultServiceConfig(): ServiceConfig {
  const d = embeddedDefault();
  if (!existsSync(join(d.finetuned, 'model.safetensors')))
    throw new Error(`the embedded default model is missing from ${d.root} (a partial checkout?)`);
  return {
    // the factors live in our cache: an older version's are fitted again, not refused
    finetuned: { model: d.finetuned, factors: d.finetunedFactors, fitDataset: 'finetune', factorsCache: true },
    pretrained: { model: d.pretrained, factors: d.pretrainedFactors, fitDataset: 'pretrain', factorsCache: true },
    datasets: { finetune: d.finetuneData, pretrain: d.pretrainData },
    datasetStage: { pretrain: 'pretrained' },
    modules: 'all',
    damping: { relative: 0.1 },
    device: 'cpu',
    cacheDir: d.cacheDir,
    store: { ...DEFAULTS.store },
  };
}
