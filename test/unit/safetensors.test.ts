// safetensors reading/writing and the checkpoint loader: round trips in every dtype,
// half-precision conversions against exact values, sharded checkpoints, and the errors a
// user sees for broken files.
import assert from 'node:assert/strict';
import { mkdirSync, mkdtempSync, readFileSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { test } from 'node:test';
import { CheckpointError, openCheckpoint } from '../../src/server/model/checkpoint';
import {
  bf16ToFloat,
  floatToBf16,
  floatToHalf,
  halfToFloat,
  readSafetensorsHeader,
  readTensor,
  readTensorF32,
  readTensorF64,
  SafetensorsError,
  writeSafetensors,
} from '../../src/server/model/safetensors';

const tmp = () => mkdtempSync(join(tmpdir(), 'il-st-'));

test('safetensors: round trip of every dtype, metadata and 8-byte aligned data', () => {
  const dir = tmp();
  const p = join(dir, 'a.safetensors');
  writeSafetensors(
    p,
    {
      f64: { dtype: 'F64', shape: [2], data: [1.5, -2.25] },
      f32: { dtype: 'F32', shape: [2, 2], data: new Float32Array([1, 2, 3, 4]) },
      f16: { dtype: 'F16', shape: [3], data: [0.5, -3, 65504] },
      bf16: { dtype: 'BF16', shape: [2], data: [1.0, -0.15625] },
      i64: { dtype: 'I64', shape: [2], data: [7, -9] },
      u8: { dtype: 'U8', shape: [1], data: [200] },
    },
    { format: 'pt', note: 'é' },
  );
  const h = readSafetensorsHeader(p);
  assert.equal(h.dataStart % 8, 0);
  assert.deepEqual(h.metadata, { format: 'pt', note: 'é' });
  assert.deepEqual([...h.tensors.keys()], ['f64', 'f32', 'f16', 'bf16', 'i64', 'u8']);
  assert.deepEqual([...readTensorF64(h, 'f64')], [1.5, -2.25]);
  assert.deepEqual(readTensor(h, 'f32').shape, [2, 2]);
  assert.deepEqual([...readTensorF32(h, 'f32')], [1, 2, 3, 4]);
  assert.deepEqual([...readTensorF32(h, 'f16')], [0.5, -3, 65504]);
  assert.deepEqual([...readTensorF32(h, 'bf16')], [1, -0.15625]);
  assert.deepEqual([...(readTensor(h, 'i64').data as BigInt64Array)], [7n, -9n]);
  assert.deepEqual([...readTensorF64(h, 'i64')], [7, -9]);
  assert.deepEqual([...readTensorF32(h, 'u8')], [200]);
});

test('half and bfloat16 conversions agree with exact IEEE values', () => {
  // known bit patterns
  assert.equal(floatToHalf(1), 0x3c00);
  assert.equal(floatToHalf(-2), 0xc000);
  assert.equal(floatToHalf(65504), 0x7bff);
  assert.equal(floatToHalf(1e6), 0x7c00); // overflow → +inf
  assert.equal(floatToHalf(2 ** -24), 0x0001); // smallest subnormal
  assert.equal(halfToFloat(0x0001), 2 ** -24);
  assert.equal(halfToFloat(0x7c00), Number.POSITIVE_INFINITY);
  assert.ok(Number.isNaN(halfToFloat(0x7e00)));
  assert.equal(floatToBf16(1), 0x3f80);
  assert.equal(bf16ToFloat(0x3f80), 1);
  // round trips are exact on representable values and within half an ulp otherwise
  for (const x of [0.1, -3.3, 1234.5, 7e-5]) {
    const h = halfToFloat(floatToHalf(x));
    const ulp = 2 ** (Math.floor(Math.log2(Math.abs(x))) - 10);
    assert.ok(Math.abs(h - x) <= ulp / 2 + 1e-12, `half(${x}) = ${h}`);
    const b = bf16ToFloat(floatToBf16(x));
    assert.ok(Math.abs(b - x) <= 2 ** (Math.floor(Math.log2(Math.abs(x))) - 8), `bf16(${x}) = ${b}`);
  }
});

test('safetensors: broken files give errors that name the file and the problem', () => {
  const dir = tmp();
  const p = join(dir, 'x.safetensors');
  writeFileSync(p, Buffer.from([1, 2, 3]));
  assert.throws(
    () => readSafetensorsHeader(p),
    (e: Error) => e instanceof SafetensorsError && e.message.includes(p),
  );
  // header length larger than the file
  const big = Buffer.alloc(16);
  big.writeBigUInt64LE(1000n);
  writeFileSync(p, big);
  assert.throws(() => readSafetensorsHeader(p), /header length 1000/);
  // bad JSON
  const bad = Buffer.concat([Buffer.from([4, 0, 0, 0, 0, 0, 0, 0]), Buffer.from('{oops')]);
  writeFileSync(p, bad);
  assert.throws(() => readSafetensorsHeader(p), /not valid JSON/);
  // truncated data
  writeSafetensors(p, { w: { dtype: 'F32', shape: [4], data: [1, 2, 3, 4] } });
  const full = readFileSync(p);
  writeFileSync(p, full.subarray(0, full.length - 4));
  assert.throws(() => readSafetensorsHeader(p), /outside the file/);
  // unsupported dtype
  const hdr = JSON.stringify({ w: { dtype: 'F8_E4M3', shape: [1], data_offsets: [0, 1] } });
  const len = Buffer.alloc(8);
  len.writeBigUInt64LE(BigInt(hdr.length));
  writeFileSync(p, Buffer.concat([len, Buffer.from(hdr), Buffer.alloc(1)]));
  assert.throws(() => readSafetensorsHeader(p), /F8_E4M3.*supported: F64, F32/);
  // missing tensor and wrong value count
  writeSafetensors(p, { w: { dtype: 'F32', shape: [1], data: [1] } });
  assert.throws(() => readTensor(readSafetensorsHeader(p), 'v'), /no tensor named "v"/);
  assert.throws(() => writeSafetensors(p, { w: { dtype: 'F32', shape: [3], data: [1] } }), /1 values for shape \[3\]/);
});

test('safetensors: tensors must tile the data exactly; overlapping offsets, holes, trailing bytes and non-integer shapes are refused', () => {
  const dir = tmp();
  const p = join(dir, 'x.safetensors');
  const file = (tensors: Record<string, { dtype: string; shape: unknown[]; data_offsets: number[] }>, data: number) => {
    const hdr = JSON.stringify(tensors);
    const len = Buffer.alloc(8);
    len.writeBigUInt64LE(BigInt(hdr.length));
    writeFileSync(p, Buffer.concat([len, Buffer.from(hdr), Buffer.alloc(data)]));
  };
  const t = (b: number, e: number, shape: unknown[] = [(e - b) / 4]) => ({ dtype: 'F32', shape, data_offsets: [b, e] });
  // what the format allows: in any order in the header, zero-size tensors included
  file({ k: t(8, 16), q: t(0, 8), empty: t(16, 16, [0]) }, 16);
  assert.deepEqual([...readSafetensorsHeader(p).tensors.keys()].sort(), ['empty', 'k', 'q']);
  // k_proj reading q_proj's bytes (a damaged header): refused, not read as its writer meant
  file({ q: t(0, 8), k: t(0, 8) }, 8);
  assert.throws(() => readSafetensorsHeader(p), /tensor "(k|q)" \(bytes 0–8\) overlaps tensor "(q|k)"/);
  file({ q: t(0, 8), k: t(4, 12) }, 12);
  assert.throws(() => readSafetensorsHeader(p), /overlaps/);
  file({ q: t(0, 8), k: t(12, 20) }, 20);
  assert.throws(() => readSafetensorsHeader(p), /bytes 8–12 of the data, before tensor "k", belong to no tensor/);
  file({ q: t(0, 8) }, 12);
  assert.throws(() => readSafetensorsHeader(p), /4 bytes after the last tensor belong to no tensor/);
  file({ q: { dtype: 'F32', shape: ['2'], data_offsets: [0, 8] } }, 8);
  assert.throws(() => readSafetensorsHeader(p), /shape \["2"\]; a shape is a list of integers >= 0/);
});

function writeModel(dir: string, shards: Record<string, Record<string, number[]>>, dtype: 'F32' | 'BF16' = 'F32') {
  mkdirSync(dir, { recursive: true });
  writeFileSync(join(dir, 'config.json'), JSON.stringify({ model_type: 'llama' }));
  const map: Record<string, string> = {};
  for (const [file, tensors] of Object.entries(shards)) {
    const rec: Parameters<typeof writeSafetensors>[1] = {};
    for (const [name, data] of Object.entries(tensors)) {
      rec[name] = { dtype, shape: [data.length], data };
      map[name] = file;
    }
    writeSafetensors(join(dir, file), rec);
  }
  if (Object.keys(shards).length > 1)
    writeFileSync(join(dir, 'model.safetensors.index.json'), JSON.stringify({ metadata: {}, weight_map: map }));
}

test('checkpoint: single file and sharded index, F32 and BF16, with absolute byte offsets', () => {
  const dir = tmp();
  writeModel(join(dir, 'one'), { 'model.safetensors': { 'model.a': [1, 2], 'model.b': [3] } });
  const one = openCheckpoint(join(dir, 'one'));
  assert.equal(one.modelType, 'llama');
  assert.deepEqual([...one.weights.keys()], ['model.a', 'model.b']);
  assert.deepEqual([...one.readF32('model.b')], [3]);
  assert.equal(one.totalBytes, 12);
  // byteOffset is absolute: reading those bytes straight from the file gives the values
  const ref = one.weights.get('model.a')!;
  const raw = readFileSync(ref.file).subarray(ref.byteOffset, ref.byteOffset + ref.byteLength);
  assert.deepEqual([...new Float32Array(raw.buffer.slice(raw.byteOffset, raw.byteOffset + raw.length))], [1, 2]);

  writeModel(
    join(dir, 'sharded'),
    {
      'model-00001-of-00002.safetensors': { 'model.a': [1, 2] },
      'model-00002-of-00002.safetensors': { 'model.b': [3] },
    },
    'BF16',
  );
  const sh = openCheckpoint(join(dir, 'sharded'));
  assert.equal(sh.files.length, 2);
  assert.equal(sh.weights.get('model.b')!.dtype, 'BF16');
  assert.deepEqual([...sh.readF32('model.a')], [1, 2]);
});

test('checkpoint: missing and broken pieces give clear errors', () => {
  const dir = tmp();
  assert.throws(() => openCheckpoint(join(dir, 'nope')), /not a directory/);
  mkdirSync(join(dir, 'empty'));
  assert.throws(() => openCheckpoint(join(dir, 'empty')), /no config\.json/);
  writeFileSync(join(dir, 'empty', 'config.json'), '{"hidden_size": 4}');
  assert.throws(() => openCheckpoint(join(dir, 'empty')), /no "model_type"/);
  writeFileSync(join(dir, 'empty', 'config.json'), '{"model_type": "llama"}');
  writeFileSync(join(dir, 'empty', 'pytorch_model.bin'), 'x');
  assert.throws(
    () => openCheckpoint(join(dir, 'empty')),
    (e: Error) => e instanceof CheckpointError && /pickle weights/.test(e.message),
  );
  writeModel(join(dir, 'idx'), { 's1.safetensors': { a: [1] }, 's2.safetensors': { b: [2] } });
  const idx = JSON.parse(readFileSync(join(dir, 'idx', 'model.safetensors.index.json'), 'utf8'));
  idx.weight_map.c = 's3.safetensors';
  writeFileSync(join(dir, 'idx', 'model.safetensors.index.json'), JSON.stringify(idx));
  assert.throws(() => openCheckpoint(join(dir, 'idx')), /s3\.safetensors, which does not exist/);
  mkdirSync(join(dir, 'f64'));
  writeFileSync(join(dir, 'f64', 'config.json'), '{"model_type": "llama"}');
  writeSafetensors(join(dir, 'f64', 'model.safetensors'), { w: { dtype: 'F64', shape: [1], data: [1] } });
  assert.throws(() => openCheckpoint(join(dir, 'f64')), /"w" is F64; supported weight dtypes: F32, F16, BF16/);
});

test('integer and bool buffers (the causal masks old transformers saved with GPT-2 and Pythia) are not read, and the model computes as without them', async () => {
  const { cpSync } = await import('node:fs');
  const { Model, makeBatch } = await import('../../src/server/model/engine');
  const dir = tmp();
  for (const arch of ['gpt_neox', 'gpt2']) {
    const src = join('test/fixtures/models', arch);
    const dst = join(dir, arch);
    cpSync(src, dst, { recursive: true });
    const f = join(dst, 'model.safetensors');
    const h = readSafetensorsHeader(f);
    const tensors: Parameters<typeof writeSafetensors>[1] = {};
    for (const name of h.tensors.keys()) tensors[name] = readTensor(h, name) as (typeof tensors)[string];
    const T = 8;
    const tril = Array.from({ length: T * T }, (_, i) => (i % T <= Math.floor(i / T) ? 1 : 0));
    const layer = arch === 'gpt2' ? 'h.0.attn' : 'gpt_neox.layers.0.attention';
    const prefix = [...h.tensors.keys()][0].startsWith('transformer.') ? 'transformer.' : '';
    tensors[`${prefix}${layer}.bias`] = { dtype: arch === 'gpt2' ? 'U8' : 'BOOL', shape: [1, 1, T, T], data: tril };
    tensors[`${prefix}${layer}.masked_bias`] = { dtype: 'F32', shape: [], data: [-1e9] };
    tensors.position_counter = { dtype: 'I64', shape: [1], data: [3] };
    writeSafetensors(f, tensors, h.metadata);
    const ck = openCheckpoint(dst);
    assert.deepEqual(
      ck.ignored?.map((t) => [t.name, t.dtype]).sort((a, b) => (a[0] < b[0] ? -1 : 1)),
      [
        [`${prefix}${layer}.bias`, arch === 'gpt2' ? 'U8' : 'BOOL'],
        ['position_counter', 'I64'],
      ].sort((a, b) => (a[0] < b[0] ? -1 : 1)),
    );
    const nll = async (d: string) => {
      const g = await Model.open(d, { threads: 1 }).compile({ labels: 'data', tokenLoss: true, modules: 'all' });
      return Array.from((await g.run(makeBatch([{ ids: [1, 5, 9, 2, 7] }], 0))).token_nll.data as Float32Array);
    };
    assert.deepEqual(await nll(dst), await nll(src), arch);
  }
});

test('a weights file that is a link to nothing (an interrupted hub download) is named as such', async () => {
  const { symlinkSync } = await import('node:fs');
  const dir = tmp();
  writeFileSync(join(dir, 'config.json'), '{"model_type": "llama"}');
  symlinkSync('../../blobs/0123abcd', join(dir, 'model.safetensors'));
  assert.throws(
    () => openCheckpoint(dir),
    /model\.safetensors is a link to \.\.\/\.\.\/blobs\/0123abcd, which does not exist \(an interrupted download/,
  );
});
