// OpenBLAS before 0.3.22 runs AMD's AVX-512 cores (Zen 4, Zen 5) on its AVX2 kernels; the loader
// asks for its SkylakeX kernels there (linalg/native.ts `openblasCoreFor`), only on an AMD CPU that
// lists every AVX-512 subset they use, and never over the user's own OPENBLAS_CORETYPE.
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { nativeLapack, openblasCoreFor } from '../../src/server/linalg/native';

const cpu = (vendor: string, flags: string) =>
  `processor\t: 0\nvendor_id\t: ${vendor}\nmodel name\t: Some CPU\nflags\t\t: fpu sse2 avx2 ${flags}\n\nprocessor\t: 1\nvendor_id\t: ${vendor}\n`;
const AVX512 = 'avx512f avx512dq avx512cd avx512bw avx512vl avx512_bf16';

test('openblasCoreFor: SkylakeX kernels only for AMD CPUs with AVX-512, never over OPENBLAS_CORETYPE', () => {
  assert.equal(openblasCoreFor(cpu('AuthenticAMD', AVX512), {}), 'SkylakeX');
  // the user's choice, even an empty one, stands
  assert.equal(openblasCoreFor(cpu('AuthenticAMD', AVX512), { OPENBLAS_CORETYPE: 'Haswell' }), undefined);
  assert.equal(openblasCoreFor(cpu('AuthenticAMD', AVX512), { OPENBLAS_CORETYPE: '' }), undefined);
  // Zen 2/3: no AVX-512
  assert.equal(openblasCoreFor(cpu('AuthenticAMD', ''), {}), undefined);
  // a subset missing (as when the kernel does not save the AVX-512 state: the flags are cleared)
  assert.equal(openblasCoreFor(cpu('AuthenticAMD', 'avx512f avx512cd avx512bw avx512dq'), {}), undefined);
  // Intel: OpenBLAS 0.3.21 already knows its AVX-512 cores
  assert.equal(openblasCoreFor(cpu('GenuineIntel', AVX512), {}), undefined);
  assert.equal(openblasCoreFor('', {}), undefined);
});

test('the loaded OpenBLAS runs the kernels asked for on this machine', (t) => {
  const lib = nativeLapack();
  if (!lib?.core) return t.skip('no OpenBLAS loaded');
  const asked = process.env.OPENBLAS_CORETYPE;
  if (!asked) return t.skip('OpenBLAS chose its own kernels here');
  // what was asked for (by the user, or by the loader on an AMD AVX-512 CPU) is what runs
  assert.equal(lib.core.toLowerCase(), asked.toLowerCase());
});
