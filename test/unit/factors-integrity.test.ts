// A factors folder is read only as the fit wrote it: the tensor table is checksummed with the data
// (a header edit that swapped two modules' names or relabelled a float as an integer passed the
// data checksum and changed scores silently), our files are not read without the arguments that
// say which model and data they belong to, and the arguments' format and module list are checked
// (found by fuzzing the real CLI).
import assert from 'node:assert/strict';
import { cpSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { test } from 'node:test';
import { loadFactors, saveFactors } from '../../src/server/attribution/ekfac/factors-io';
import { runFitJob } from '../../src/server/attribution/fit-job';
import { readSafetensorsHeader, readTensorF64, writeSafetensors } from '../../src/server/model/safetensors';
import { writeJsonl } from './helpers/corpus';
import { useTempHome } from './helpers/env';

const home = useTempHome();
const LLAMA = 'test/fixtures/models/llama';

/** Rewrites a safetensors file's header with `edit` (the data bytes unchanged). */
// biome-ignore lint/suspicious/noExplicitAny: a parsed header, edited freely
function editHeader(file: string, edit: (h: Record<string, any>) => void): void {
  const b = readFileSync(file);
  const n = Number(b.readBigUInt64LE(0));
  const h = JSON.parse(b.subarray(8, 8 + n).toString('utf8'));
  edit(h);
  const json = Buffer.from(JSON.stringify(h));
  const len = Buffer.alloc(8);
  len.writeBigUInt64LE(BigInt(json.length));
  writeFileSync(file, Buffer.concat([len, json, b.subarray(8 + n)]));
}

test('factor files: header edits, a missing or edited arguments file and files of another tool are refused', async () => {
  const data = writeJsonl(join(home, 'd.jsonl'), [
    { text: 'Paris is the capital of France.' },
    { text: 'Rome is the capital of Italy.' },
  ]);
  const fitted = join(home, 'fitted');
  await runFitJob({ modelDir: LLAMA, dataPath: data, out: fitted, modules: 'all', labels: 'empirical', seed: 0 });
  assert.ok(loadFactors(fitted));
  let n = 0;
  const copy = () => {
    const d = join(home, `copy-${n++}`);
    cpSync(fitted, d, { recursive: true });
    return d;
  };
  const lambda = (d: string) => join(d, 'lambda_matrix.safetensors');
  const [q, k] = ['model.layers.0.self_attn.q_proj', 'model.layers.0.self_attn.k_proj'];

  // two modules' names swapped: every byte of data intact
  let d = copy();
  editHeader(lambda(d), (h) => {
    [h[q], h[k]] = [h[k], h[q]];
  });
  assert.throws(() => loadFactors(d), /lambda_matrix\.safetensors: the file does not match its checksum/);
  // a float relabelled as an integer, and the table checksum removed with it
  d = copy();
  editHeader(lambda(d), (h) => {
    h[q].dtype = h[q].dtype === 'F64' ? 'I64' : 'I32';
    delete h.__metadata__.header_sha256;
  });
  assert.throws(
    () => loadFactors(d),
    /lambda_matrix\.safetensors: written by influence-lens's fit but without its tensor table checksum/,
  );
  // the data checksum removed
  d = copy();
  editHeader(lambda(d), (h) => {
    delete h.__metadata__.data_sha256;
  });
  assert.throws(() => loadFactors(d), /without its data checksum/);

  // our arguments file deleted: which model the files belong to can no longer be checked
  d = copy();
  rmSync(join(d, 'influence_lens_arguments.json'));
  assert.throws(
    () => loadFactors(d),
    /were written by influence-lens's fit, but its influence_lens_arguments\.json is missing/,
  );
  // a later format, a module list that is not the files'
  d = copy();
  const args = join(d, 'influence_lens_arguments.json');
  const a = JSON.parse(readFileSync(args, 'utf8'));
  writeFileSync(args, JSON.stringify({ ...a, format: 2 }));
  assert.throws(() => loadFactors(d), /says "format": 2; this version reads format 1/);
  writeFileSync(args, JSON.stringify({ ...a, modules: a.modules.slice(1) }));
  assert.throws(() => loadFactors(d), /names \d+ modules but the factor files hold \d+/);

  // an eigenvector entry of 1e30 written with valid checksums (NaN scores), or a basis scaled by 2
  for (const [what, edit] of [
    [
      '1e30',
      (q: Float32Array | Float64Array) => {
        q[5] = 1e30;
      },
    ],
    [
      'scaled',
      (q: Float32Array | Float64Array) => {
        for (let i = 0; i < q.length; i++) q[i] *= 2;
      },
    ],
  ] as const) {
    const f = loadFactors(fitted);
    edit(f.modules[q].eigen!.qS);
    const bad = join(home, `eigvec-${what}`);
    saveFactors(bad, f);
    assert.throws(
      () => loadFactors(bad),
      /gradient_eigenvectors\.safetensors: the eigenvectors of module .*q_proj are not orthonormal/,
      what,
    );
  }

  // kronfluence's own files (no checksums): a float relabelled as an integer is refused by its type
  const kron = join(home, 'kron');
  cpSync('test/fixtures/kronfluence/llama/factors_ekfac', kron, { recursive: true });
  assert.ok(loadFactors(kron));
  editHeader(lambda(kron), (h) => {
    const name = Object.keys(h).find((x) => x !== '__metadata__')!;
    h[name].dtype = h[name].dtype === 'F64' ? 'I64' : 'I32';
  });
  assert.throws(() => loadFactors(kron), /is stored as I(64|32); factors are floats/);
  // a kronfluence count file relabelled I64 → F64 (its counts read as denormals)
  const counts = join(home, 'kron-counts');
  cpSync('test/fixtures/kronfluence/llama/factors_ekfac', counts, { recursive: true });
  editHeader(join(counts, 'num_lambda_processed.safetensors'), (h) => {
    for (const k of Object.keys(h)) if (k !== '__metadata__') h[k].dtype = 'F64';
  });
  assert.throws(
    () => loadFactors(counts),
    /num_lambda_processed\.safetensors: tensor .* is stored as F64; kronfluence's token counts are integers/,
  );

  // kronfluence's low-precision presets store the bases in bf16 (norms off 1 by up to ~2e-3): read
  const bf16 = join(home, 'kron-bf16');
  cpSync('test/fixtures/kronfluence/llama/factors_ekfac', bf16, { recursive: true });
  for (const f of ['activation_eigenvectors', 'gradient_eigenvectors']) {
    const file = join(bf16, `${f}.safetensors`);
    const h = readSafetensorsHeader(file);
    const tensors: Parameters<typeof writeSafetensors>[1] = {};
    for (const [name, t] of h.tensors) tensors[name] = { dtype: 'BF16', shape: t.shape, data: readTensorF64(h, name) };
    writeSafetensors(file, tensors, h.metadata);
  }
  assert.ok(Object.keys(loadFactors(bf16).modules).length > 0, 'bf16 bases load');

  // a kronfluence file copied in beside our arguments file
  d = copy();
  cpSync('test/fixtures/kronfluence/llama/factors_ekfac/lambda_matrix.safetensors', lambda(d));
  assert.throws(() => loadFactors(d), /not written by influence-lens's fit \(it says no fit\)/);
});
