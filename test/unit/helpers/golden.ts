// Golden files written by test/oracle/make_fixtures.py (see test/fixtures/golden/README.md).
import assert from 'node:assert/strict';
import type { Batch } from '../../../src/server/model/engine';
import { readSafetensorsHeader, readTensor, readTensorF32 } from '../../../src/server/model/safetensors';

const FIX = 'test/fixtures';

export function loadGolden(name: string) {
  const h = readSafetensorsHeader(`${FIX}/golden/${name}.safetensors`);
  const ids = readTensor(h, 'input_ids');
  const [B, T] = ids.shape;
  const batch: Batch = {
    B,
    T,
    inputIds: ids.data as BigInt64Array,
    attentionMask: readTensor(h, 'attention_mask').data as BigInt64Array,
    targetIds: readTensor(h, 'target_ids').data as BigInt64Array,
    targetWeights: readTensorF32(h, 'target_weights'),
    lengths: [],
  };
  return { h, batch, get: (n: string) => readTensorF32(h, n), names: [...h.tensors.keys()] };
}

/** max |x − y| relative to max |y| (so tiny entries of a large tensor do not dominate) */
export function relErr(x: ArrayLike<number>, y: ArrayLike<number>): number {
  assert.equal(x.length, y.length, 'length mismatch');
  let num = 0;
  let den = 0;
  for (let i = 0; i < y.length; i++) {
    num = Math.max(num, Math.abs(x[i] - y[i]));
    den = Math.max(den, Math.abs(y[i]));
  }
  return num / Math.max(den, 1e-12);
}
