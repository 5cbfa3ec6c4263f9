// Why a forward pass gave non-finite values: the weights are read (only then: a failure path) for
// NaN, Inf or values no trained network holds, so that the error names the file and tensor
// instead of leaving an empty or NaN ranking (an adversarial check found one NaN weight gave
// "−log p = NaN" and no examples, with exit status 0).
import { relative } from 'node:path';
import type { Checkpoint } from './checkpoint';

/** Above this, a weight is taken for damage: products of two such overflow float32 (3.4e38). */
const HUGE_WEIGHT = 1e15;

/** A sentence naming the weights that can make a forward pass non-finite, or undefined when none does. */
export function weightTrouble(ck: Checkpoint, limit = 3): string | undefined {
  const found: string[] = [];
  for (const [name, ref] of ck.weights) {
    if (!['F32', 'F16', 'BF16', 'F64'].includes(ref.dtype)) continue;
    const w = ck.readF32(name);
    let bad = -1;
    let huge = -1;
    for (let i = 0; i < w.length; i++) {
      const v = w[i];
      if (v - v !== 0) {
        bad = i;
        break;
      }
      if (huge < 0 && Math.abs(v) > HUGE_WEIGHT) huge = i;
    }
    const where = `${relative(process.cwd(), ref.file) || ref.file}: "${name}"`;
    if (bad >= 0) found.push(`${where} holds ${Number.isNaN(w[bad]) ? 'NaN' : w[bad]} (first at element ${bad})`);
    else if (huge >= 0)
      found.push(`${where} holds ${w[huge].toPrecision(3)} (element ${huge}), far beyond any trained weight`);
    if (found.length >= limit) break;
  }
  return found.length ? `${found.join('; ')}: the checkpoint is damaged` : undefined;
}

/** The message for a non-finite value met in a forward pass of `ck`: what it was, and the likely cause. */
export function nonFiniteMessage(ck: Checkpoint, what: string, orElse?: string): string {
  return `${what} is not a finite number: ${nonFiniteCause(ck, orElse)}`;
}

/** The likely cause of a non-finite value in a forward pass of `ck`, as a clause. */
export function nonFiniteCause(ck: Checkpoint, orElse?: string): string {
  return (
    weightTrouble(ck) ??
    `no weight of ${ck.dir} is NaN, Inf or huge, so a config.json value (an epsilon, rope_theta, a scaling factor) or the input may make the forward pass overflow${orElse ? `, ${orElse}` : ''}`
  );
}
