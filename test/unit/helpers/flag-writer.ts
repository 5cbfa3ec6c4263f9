// A second process changing a flags sidecar through the extension's code, as another editor
// window would: `node --import tsx flag-writer.ts <sidecar> <add|remove|reason|hold> <prefix> <n>`.
// Prints `done <i>` after each change returns, so the parent knows what must be on disk.
import { addFlags, removeFlags, setReason, withLock } from '../../../src/extension/flags/sidecar';

const [path, mode, prefix, n] = process.argv.slice(2);
const hashOf = (prefix: string, i: number) => `${prefix}${String(i).padStart(15, '0')}`.slice(0, 16);

if (mode === 'hold') {
  // take the lock and never let go (the parent kills us with SIGKILL)
  await withLock(path, () => {
    process.stdout.write('locked\n');
    Atomics.wait(new Int32Array(new SharedArrayBuffer(4)), 0, 0);
  });
} else {
  for (let i = 0; i < Number(n); i++) {
    const hash = hashOf(prefix, i);
    if (mode === 'add') await addFlags(path, [{ hash, line: i + 1, reason: `by ${prefix}`, score: null, query: '' }]);
    else if (mode === 'remove') await removeFlags(path, [hash]);
    else if (mode === 'reason') await setReason(path, hash, `edited by ${prefix}`);
    else throw new Error(`unknown mode ${mode}`);
    process.stdout.write(`done ${i}\n`);
  }
}
