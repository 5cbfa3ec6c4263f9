// Rewrites one file (or folder) over and over through the atomic-write helper until killed:
// `node --import tsx atomic-writer.ts <file|dir> <path> <bytes>`. Each version is one byte value
// repeated, so a torn file is easy to see. Prints `wrote <n>` after each complete write.
import { writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { replaceDirAtomic, writeFileAtomic } from '../../../src/common/atomic-write';

const [kind, path, bytes] = process.argv.slice(2);
for (let n = 1; ; n++) {
  const data = Buffer.alloc(Number(bytes), 65 + (n % 26));
  if (kind === 'file') writeFileAtomic(path, data);
  else
    replaceDirAtomic(path, (tmp) => {
      writeFileSync(join(tmp, 'a.bin'), data);
      writeFileSync(join(tmp, 'b.bin'), data);
    });
  process.stdout.write(`wrote ${n}\n`);
}
