// Is a pre-train/fine-tune pair in the regime multi-stage influence assumes? The multi-stage
// influence function ("Multi-Stage Influence Function", Chen, Si, Li, Chelba, Kumar, Boning and
// Hsieh 2020; with EK-FAC: "Scalable Multi-Stage Influence Function for Large Language Models via
// Eigenvalue-Corrected Kronecker-Factored Parameterization", Bao, Zhang, Du, Zhao, Zong, Peng and
// Yin 2025) ties the fine-tuned parameters to the pre-trained ones and expands around θ_pt, so
// it only holds while the fine-tune stays near them. The measure is each tracked linear module's
// relative distance ‖W_ft − W_pt‖_F / ‖W_pt‖_F; the threshold is in settings.ts, with why.

import { createHash } from 'node:crypto';
import { existsSync, mkdirSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import { writeFileAtomic } from '../../common/atomic-write';
import type { MultiStageRegime } from '../../protocol/types';
import { defaultCacheDir, type Model, type ModuleSelection } from '../model/engine';
import { DEFAULTS } from '../settings';
import { modelFingerprint } from './fingerprint';
import { ExplainError } from './setup';

/**
 * ‖W_ft − W_pt‖_F / ‖W_pt‖_F per tracked linear module (weights only, not biases), in module
 * order. Reads one module's weights at a time. Remembered under the cache directory by both
 * models' content fingerprints, so a large pair is read once, not on every explain.
 */
/**
 * Multistage meets the fine-tuned model's preconditioned query with the pre-trained model's
 * candidate gradients, module by module: both models must track the same linear modules, of the
 * same shapes. A LoRA adapter's modules (its A and B matrices) are not its base's linear modules.
 */
export function checkSameModules(finetuned: Model, pretrained: Model, modules: ModuleSelection): void {
  const pt = pretrained.modules(modules);
  const ft = finetuned.modules(modules);
  const where = `${finetuned.checkpoint.dir} and ${pretrained.checkpoint.dir}`;
  if (!!finetuned.checkpoint.adapter !== !!pretrained.checkpoint.adapter)
    throw new ExplainError(
      `multistage needs the same linear modules in both models, but ${finetuned.checkpoint.adapter ? finetuned.checkpoint.dir : pretrained.checkpoint.dir} is a LoRA adapter (its tracked modules are its lora_A/lora_B matrices) and the other is not: multistage over an adapter is not supported; use ekfac or gdp on the adapter`,
      'pretrained',
    );
  const byName = new Map(ft.map((m) => [m.name, m]));
  for (const m of pt) {
    const f = byName.get(m.name);
    if (!f || f.dIn !== m.dIn || f.dOut !== m.dOut || f.hasBias !== m.hasBias)
      throw new ExplainError(
        `multistage needs the same linear modules in both models: ${finetuned.checkpoint.dir} ${f ? `has ${m.name} as ${f.dOut}×${f.dIn}${f.hasBias ? ' with a bias' : ''}` : `lacks ${m.name}`}, ${pretrained.checkpoint.dir} has it as ${m.dOut}×${m.dIn}${m.hasBias ? ' with a bias' : ''}`,
        'pretrained',
      );
  }
  const extra = ft.filter((m) => !pt.some((x) => x.name === m.name));
  if (extra.length)
    throw new ExplainError(
      `multistage needs the same linear modules in both models: ${finetuned.checkpoint.dir} has ${extra.length} the pre-trained ${pretrained.checkpoint.dir} lacks (e.g. ${extra[0].name}); ${where} are not one architecture`,
      'pretrained',
    );
}

export function relativeWeightDistance(
  finetuned: Model,
  pretrained: Model,
  modules: ModuleSelection,
  cacheDir = finetuned.options.cacheDir ?? defaultCacheDir(),
): Map<string, number> {
  checkSameModules(finetuned, pretrained, modules);
  const pt = pretrained.modules(modules);
  const ft = new Map(finetuned.modules(modules).map((m) => [m.name, m]));
  const key = createHash('sha256')
    .update(
      JSON.stringify([
        modelFingerprint(finetuned.checkpoint, cacheDir),
        modelFingerprint(pretrained.checkpoint, cacheDir),
        pt.map((m) => m.name),
      ]),
    )
    .digest('hex')
    .slice(0, 32);
  const memo = join(cacheDir, 'weight-distance', `${key}.json`);
  if (existsSync(memo)) {
    try {
      const saved = JSON.parse(readFileSync(memo, 'utf8')) as Record<string, number>;
      if (pt.every((m) => Number.isFinite(saved[m.name]))) return new Map(pt.map((m) => [m.name, saved[m.name]]));
    } catch {
      // an unreadable memo is recomputed and replaced
    }
  }
  const out = new Map<string, number>();
  for (const m of pt) {
    const f = ft.get(m.name);
    if (!f || f.dIn !== m.dIn || f.dOut !== m.dOut)
      throw new ExplainError(
        `multistage needs the same linear modules in both models: ${finetuned.checkpoint.dir} ${f ? `has ${m.name} as ${f.dOut}×${f.dIn}` : `lacks ${m.name}`}, ${pretrained.checkpoint.dir} has it as ${m.dOut}×${m.dIn}`,
        'pretrained',
      );
    const a = finetuned.checkpoint.readF32(f.weightName);
    const b = pretrained.checkpoint.readF32(m.weightName);
    let diff = 0;
    let base = 0;
    for (let i = 0; i < b.length; i++) {
      diff += (a[i] - b[i]) ** 2;
      base += b[i] * b[i];
    }
    if (!(base > 0))
      throw new ExplainError(`${pretrained.checkpoint.dir}: ${m.weightName} is all zeros or not finite`, 'pretrained');
    out.set(m.name, Math.sqrt(diff / base));
  }
  try {
    mkdirSync(join(cacheDir, 'weight-distance'), { recursive: true });
    writeFileAtomic(memo, JSON.stringify(Object.fromEntries(out)));
  } catch {
    // a read-only cache only costs the next explain a recomputation
  }
  return out;
}

/** The regime summary reported with every multistage result. */
export function multiStageRegime(
  distances: Map<string, number>,
  threshold: number = DEFAULTS.multiStage.maxRelativeDistance,
): MultiStageRegime {
  const values = [...distances.values()].sort((a, b) => a - b);
  if (!values.length) throw new Error('multiStageRegime: no modules');
  const n = values.length;
  const median = n % 2 ? values[(n - 1) / 2] : (values[n / 2 - 1] + values[n / 2]) / 2;
  const max = values[n - 1];
  const inRegime = max <= threshold;
  const r: MultiStageRegime = {
    distance: { median, max, perModule: Object.fromEntries(distances) },
    threshold,
    inRegime,
  };
  if (!inRegime) {
    const far = [...distances].sort((a, b) => b[1] - a[1])[0][0];
    r.warning =
      `the fine-tuned weights moved up to ${pct(max)} from the pre-trained ones (${far}; median ${pct(median)}), ` +
      `beyond the ${pct(threshold)} up to which multi-stage influence was measured to trace pre-training ` +
      'sources well (it assumes a fine-tune near its pre-trained weights): compare with single-stage EK-FAC';
  }
  return r;
}

function pct(x: number): string {
  return `${(100 * x).toPrecision(2)}%`;
}
