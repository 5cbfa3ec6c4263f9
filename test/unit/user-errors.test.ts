// A full disk is said in one line naming where, not printed as a crash (a fault audit on a 2 MB
// tmpfs saw `Error: ENOSPC: no space left on device, write` and seven stack frames).
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { diskFull } from '../../src/server/user-errors';

const errno = (code: string, path?: string) =>
  Object.assign(new Error(`${code}: no space left on device, write`), { code, ...(path ? { path } : {}) });

test("ENOSPC and EDQUOT name the failing path, else the command's --out; other errors are not disk-full", () => {
  assert.equal(
    diskFull(errno('ENOSPC', '/mnt/small/out.tmp-1-1x1/model.safetensors'), ['--out', '/mnt/small/out']),
    'no space left on the disk writing /mnt/small/out.tmp-1-1x1/model.safetensors (ENOSPC): free some space there or write elsewhere (another --out; TMPDIR for temporary files), then run it again (nothing there before was replaced)',
  );
  assert.match(
    diskFull(errno('ENOSPC'), ['--data', 'd.jsonl', '--out', '/mnt/small/out'])!,
    /^no space left on the disk writing --out \/mnt\/small\/out \(ENOSPC\)/,
  );
  assert.match(diskFull(errno('ENOSPC'), ['--out=/mnt/x'])!, /writing --out \/mnt\/x \(ENOSPC\)/);
  assert.match(diskFull(errno('EDQUOT'), [])!, /^the disk quota is used up \(EDQUOT\)/);
  assert.equal(diskFull(errno('EACCES', '/x'), ['--out', '/x']), undefined);
  assert.equal(diskFull(new Error('plain'), []), undefined);
});
