// The store scan's read-ahead: chunk c + 1 is read (off the JS thread for a file) while chunk c is
// scored. Its contract: every chunk scored once in order, and a failure on either side (a read
// or the scoring) rejects the scan without an unhandled rejection, closing the source only after
// the read still in flight has ended (its buffer and file descriptor are in use until then).
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { type ChunkRows, memoryRows, type RowSource, StoreScanner } from '../../src/server/index/store-scan';
import { Rng } from '../../src/server/util/random';

const sizes = [3, 5];
const total = 11;

function rows(seed: number) {
  const rng = new Rng(seed);
  // fp16 bits of small whole numbers (exact in fp16): 0x3c00 = 1, 0x4000 = 2, 0x4200 = 3, 0xbc00 = −1
  const bits = [0x3c00, 0x4000, 0x4200, 0xbc00];
  const value = new Map([
    [0x3c00, 1],
    [0x4000, 2],
    [0x4200, 3],
    [0xbc00, -1],
  ]);
  return sizes.map((s) => {
    const half = Uint16Array.from({ length: total * s }, () => bits[rng.int(4)]);
    const scale = Float32Array.from({ length: total }, () => 1 + rng.int(3));
    return { half, scale, dec: (i: number) => value.get(half[i])! };
  });
}

test('store scan: chunks not dividing the total, scored once each, equal the direct sums', async () => {
  const r = rows(1);
  const q = sizes.map((s, i) => Float32Array.from({ length: s }, (_, j) => i + j - 2));
  for (const perChunk of [1, 4, 11, 20]) {
    const reads: number[] = [];
    const src = memoryRows(r, sizes);
    const spy: RowSource = {
      read: src.read,
      readAhead: (first, n, slot) => {
        reads.push(first);
        return src.readAhead(first, n, slot);
      },
      close: src.close,
    };
    const { scores } = await new StoreScanner(sizes, 1).scan(spy, total, perChunk, q);
    assert.deepEqual(
      reads,
      Array.from({ length: Math.ceil(total / perChunk) }, (_, c) => c * perChunk),
    );
    for (let e = 0; e < total; e++) {
      let want = 0;
      sizes.forEach((s, i) => {
        let dot = 0;
        for (let j = 0; j < s; j++) dot += r[i].dec(e * s + j) * q[i][j];
        want += r[i].scale[e] * dot;
      });
      assert.equal(scores[e], want, `example ${e}, ${perChunk} per chunk`);
    }
  }
});

test('store scan: a failing read or scoring rejects the scan; the source closes after the read in flight ends', async () => {
  const r = rows(2);
  const base = memoryRows(r, sizes);
  const q = sizes.map((s) => new Float32Array(s).fill(1));
  const delayed = (ms: number, v: () => ChunkRows) =>
    new Promise<ChunkRows>((ok, no) =>
      setTimeout(() => {
        try {
          ok(v());
        } catch (e) {
          no(e);
        }
      }, ms),
    );

  // 1. the second chunk's read fails while the first is scored
  {
    const log: string[] = [];
    const src: RowSource = {
      read: base.read,
      readAhead: (first, n, slot) => {
        if (first === 4)
          return delayed(5, () => {
            log.push('read 4 failed');
            throw new Error('disk read failed');
          });
        return base.readAhead(first, n, slot);
      },
      close: () => log.push('close'),
    };
    await assert.rejects(new StoreScanner(sizes, 1).scan(src, total, 4, q), /disk read failed/);
    assert.deepEqual(log, ['read 4 failed', 'close']);
  }
  // 2. the scoring fails (chunk 0's rows are one number short) while chunk 1's read is in flight
  {
    const log: string[] = [];
    const src: RowSource = {
      read: base.read,
      readAhead: async (first, n, slot) => {
        if (first === 0) {
          const c = await base.readAhead(first, n, slot);
          return { half: [c.half[0].subarray(1), c.half[1]], scale: c.scale };
        }
        return delayed(30, () => {
          log.push(`read ${first} done`);
          return base.read(first, n, slot);
        });
      },
      close: () => log.push('close'),
    };
    await assert.rejects(new StoreScanner(sizes, 1).scan(src, total, 4, q));
    assert.deepEqual(log, ['read 4 done', 'close']);
  }
  // 3. a failure before the first chunk (a query of the wrong length) still closes the source
  {
    const log: string[] = [];
    const src: RowSource = { ...base, close: () => log.push('close') };
    await assert.rejects(new StoreScanner(sizes, 1).scan(src, total, 4, [new Float32Array(sizes[0] + 1), q[1]]));
    assert.deepEqual(log, ['close']);
  }
});
