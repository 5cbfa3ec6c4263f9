// Bad input over a real WebSocket: oversize frames, and a bounded fuzz loop of thousands of
// random / malformed / huge / binary frames mixed with valid requests. The server must answer
// every valid request correctly, never crash, leak no request state, and serve afterwards.
import assert from 'node:assert/strict';
import { after, before, describe, test } from 'node:test';
import WebSocket from 'ws';
import { PROTOCOL_VERSION, RpcErrorCode } from '../../src/protocol/rpc';
import { RpcClient } from '../../src/transport/client';
import type { RpcError } from '../../src/transport/errors';
import { type RunningServer, startServer } from '../../src/transport/server';

const MAX_FRAME = 64 * 1024;
let server: RunningServer;

before(async () => {
  server = await startServer({
    handlers: {
      echo: async (p) => p,
      sleep: {
        heavy: true,
        params: { type: 'object', properties: { ms: { type: 'integer', minimum: 0, maximum: 50 } } },
        handler: (p: { ms?: number }, ctx) =>
          new Promise((resolve, reject) => {
            const t = setTimeout(() => resolve('ok'), p.ms ?? 0);
            ctx.signal.addEventListener('abort', () => {
              clearTimeout(t);
              reject(ctx.signal.reason);
            });
          }),
      },
    },
    discoveryFile: false,
    token: 'fuzz-token-0123456789abcdef',
    limits: { maxFrameBytes: MAX_FRAME, maxConcurrent: 2, maxQueued: 64 },
  });
});
after(() => server.close());

/** mulberry32: a small seeded PRNG so a failure can be replayed. */
function rng(seed: number) {
  let a = seed >>> 0;
  const next = () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
  const int = (n: number) => Math.floor(next() * n);
  const pick = <T>(xs: readonly T[]): T => xs[int(xs.length)];
  const bytes = (n: number) => Buffer.from(Array.from({ length: n }, () => int(256)));
  const ascii = (n: number) => String.fromCharCode(...Array.from({ length: n }, () => 32 + int(95)));
  return { next, int, pick, bytes, ascii };
}

type Frame = { data: string | Buffer; binary?: boolean; expect?: { id: number; result: unknown } };

function generator(seed: number) {
  const r = rng(seed);
  let nextId = 1_000_000;
  const anyValue = (depth = 0): unknown => {
    switch (r.int(depth > 3 ? 5 : 8)) {
      case 0:
        return null;
      case 1:
        return r.next() * 1e6 - 5e5;
      case 2:
        return r.ascii(r.int(20));
      case 3:
        return r.int(2) === 0;
      case 4:
        return r.pick([0, -1, 2 ** 53, 1e308, -0, 0.5]);
      case 5:
        return Array.from({ length: r.int(4) }, () => anyValue(depth + 1));
      default:
        return Object.fromEntries(
          Array.from({ length: r.int(4) }, () => [
            r.pick(['jsonrpc', 'id', 'method', 'params', 'result', 'error', '__proto__', r.ascii(5)]),
            anyValue(depth + 1),
          ]),
        );
    }
  };
  const valid = (): Frame => {
    const id = nextId++;
    const params = { n: id, s: r.ascii(r.int(50)), nested: { a: [1, 2, { b: null }] } };
    return { data: JSON.stringify({ jsonrpc: '2.0', id, method: 'echo', params }), expect: { id, result: params } };
  };
  return (): Frame => {
    const k = r.int(100);
    if (k < 15) return valid();
    if (k < 18) return { data: r.bytes(1 + r.int(300)), binary: false }; // invalid UTF-8 text: closes with 1007
    if (k < 20) return { data: 'x'.repeat(MAX_FRAME + 1 + r.int(2 * 1024 * 1024)) }; // oversize: closes with 1009
    if (k < 25) return { data: r.bytes(r.int(2000)), binary: true };
    if (k < 35) return { data: r.ascii(r.int(200)) };
    if (k < 55) return { data: JSON.stringify(anyValue()) };
    if (k < 70) {
      // a valid message with a few characters flipped, dropped or inserted
      const s = valid().data as string;
      const chars = s.split('');
      for (let i = 0, n = 1 + r.int(4); i < n; i++) {
        const at = r.int(chars.length);
        const op = r.int(3);
        if (op === 0) chars[at] = r.ascii(1);
        else if (op === 1) chars.splice(at, 1);
        else chars.splice(at, 0, r.pick(['{', '}', '[', ']', '"', ',', ':', '\\', '\u0000', 'é']));
      }
      return { data: chars.join('') };
    }
    if (k < 80) {
      const msg: Record<string, unknown> = { jsonrpc: r.pick(['2.0', '2.0', '1.0', 2, undefined]) };
      if (r.int(4)) msg.id = r.pick([nextId++, `s${nextId++}`, null, {}, [], 1.5, -1]);
      if (r.int(5))
        msg.method = r.pick([
          'echo',
          'sleep',
          'status',
          'initialize',
          'nope',
          '',
          7,
          '$/cancelRequest',
          'rpc.x',
          'x'.repeat(300),
        ]);
      if (r.int(2)) msg.params = anyValue();
      return { data: JSON.stringify(msg) };
    }
    if (k < 84) {
      const depth = 1000 + r.int(20000);
      return {
        data: r.int(2) ? '['.repeat(depth) + ']'.repeat(depth) : `${'{"a":'.repeat(depth)}1${'}'.repeat(depth)}`,
      };
    }
    if (k < 88) {
      const cancel: Record<string, unknown> = { jsonrpc: '2.0', method: '$/cancelRequest' };
      const params = r.pick([
        { id: r.int(50) },
        { id: nextId - 1 },
        undefined,
        null,
        [],
        {},
        { id: {} },
        { id: null },
        5,
      ]);
      if (params !== undefined) cancel.params = params;
      return { data: JSON.stringify(cancel) };
    }
    if (k < 92)
      return { data: JSON.stringify({ jsonrpc: '2.0', id: nextId++, method: 'sleep', params: { ms: r.int(3) } }) };
    if (k < 95) {
      const pad = 'p'.repeat(MAX_FRAME - 200 - r.int(1000));
      const id = nextId++;
      return {
        data: JSON.stringify({ jsonrpc: '2.0', id, method: 'echo', params: { pad } }),
        expect: { id, result: { pad } },
      };
    }
    return { data: '' };
  };
}

interface Conn {
  ws: WebSocket;
  closed: boolean;
  closeCode?: number;
  closeReason?: string;
  responses: Map<unknown, Record<string, unknown>>;
  waiters: Array<() => void>;
}

async function open(): Promise<Conn> {
  const ws = new WebSocket(server.url, { headers: { Authorization: `Bearer ${server.token}` } });
  const c: Conn = { ws, closed: false, responses: new Map(), waiters: [] };
  ws.on('message', (d, isBinary) => {
    assert.equal(isBinary, false, 'the server only sends text frames');
    const m = JSON.parse(d.toString());
    assert.equal(m.jsonrpc, '2.0');
    assert.ok('id' in m, `a message without id: ${d.toString().slice(0, 200)}`);
    if (m.error) {
      assert.equal(typeof m.error.code, 'number');
      assert.equal(typeof m.error.message, 'string');
      assert.ok(m.error.message.length > 0);
    } else assert.ok('result' in m);
    c.responses.set(m.id, m);
    for (const w of c.waiters.splice(0)) w();
  });
  ws.on('error', () => {});
  ws.on('close', (code, reason) => {
    c.closed = true;
    c.closeCode = code;
    c.closeReason = reason.toString();
    for (const w of c.waiters.splice(0)) w();
  });
  await new Promise((res, rej) => ws.once('open', res).once('error', rej));
  return c;
}

async function response(c: Conn, id: unknown, ms = 5000): Promise<Record<string, unknown> | undefined> {
  const end = Date.now() + ms;
  while (!c.responses.has(id)) {
    if (c.closed) return undefined;
    if (Date.now() > end) assert.fail(`no response to ${id} within ${ms} ms`);
    await new Promise<void>((r) => {
      c.waiters.push(r);
      setTimeout(r, 50);
    });
  }
  return c.responses.get(id);
}

describe('rpc fuzz', () => {
  test('params nested 100k deep are InvalidParams (not an internal error); the server keeps serving', async () => {
    const big = await startServer({
      handlers: {
        echo: async (p) => p,
        typed: { params: { type: 'object', properties: { n: { type: 'integer' } } }, handler: async () => 'ok' },
      },
      discoveryFile: false,
      token: 'deep-token-0123456789abcdef',
    });
    try {
      const c = await RpcClient.connect({ url: big.url, token: big.token });
      const deep = (n: number) => `${'['.repeat(n)}${']'.repeat(n)}`;
      const ws = new WebSocket(big.url, { headers: { Authorization: `Bearer ${big.token}` } });
      const answers = new Map<number, { error?: { code: number; message: string } }>();
      ws.on('message', (d) => {
        const m = JSON.parse(d.toString());
        answers.set(m.id, m);
      });
      await new Promise((res, rej) => ws.once('open', res).once('error', rej));
      ws.send(
        JSON.stringify({ jsonrpc: '2.0', id: 0, method: 'initialize', params: { protocolVersion: PROTOCOL_VERSION } }),
      );
      ws.send(`{"jsonrpc":"2.0","id":1,"method":"echo","params":{"x":${deep(100_000)}}}`);
      ws.send(`{"jsonrpc":"2.0","id":2,"method":"typed","params":{"n":${deep(100_000)}}}`);
      ws.send(`{"jsonrpc":"2.0","id":3,"method":"echo","params":{"x":${deep(30)}}}`);
      const end = Date.now() + 10_000;
      while (answers.size < 4 && Date.now() < end) await new Promise((r) => setTimeout(r, 20));
      for (const id of [1, 2]) {
        assert.equal(answers.get(id)?.error?.code, RpcErrorCode.InvalidParams, JSON.stringify(answers.get(id)));
        assert.match(answers.get(id)!.error!.message, /nested more than \d+ levels deep/);
      }
      assert.equal(answers.get(3)?.error, undefined, 'modest nesting is fine');
      assert.deepEqual(await c.request('echo', { still: 'here' }), { still: 'here' });
      ws.close();
      await c.close();
    } finally {
      await big.close();
    }
  });

  test('an oversize frame closes that connection with 1009 and a reason; the server keeps serving', async () => {
    // (a client that knows the limit from initialize refuses such a request itself; this one does not)
    const c = await RpcClient.connect({ url: server.url, token: server.token, initialize: false });
    const closed = new Promise<{ code: number; reason: string }>((r) => c.onClose(r));
    await assert.rejects(
      c.request('echo', { big: 'x'.repeat(MAX_FRAME + 10) }),
      /closed \(1009: message too big: this server reads frames up to 65536 bytes \(maxFrameBytes\)\)/,
    );
    assert.deepEqual(await closed, {
      code: 1009,
      reason: 'message too big: this server reads frames up to 65536 bytes (maxFrameBytes)',
    });
    const d = await RpcClient.connect({ url: server.url, token: server.token });
    assert.equal(d.server?.capabilities.limits.maxFrameBytes, MAX_FRAME);
    const justUnder = 'y'.repeat(MAX_FRAME - 100);
    assert.deepEqual(await d.request('echo', { s: justUnder }), { s: justUnder });
    await assert.rejects(
      d.request('echo', { big: 'x'.repeat(MAX_FRAME) }),
      (e: RpcError) =>
        e.code === RpcErrorCode.InvalidParams &&
        /more than the server accepts \(maxFrameBytes = 65536\)/.test(e.message),
    );
    assert.equal(d.closed, false);
    await d.close();
  });

  test('3000 random frames: valid requests answered, bad ones answered or dropped, no crash, no leak', async (t) => {
    const seed = Number(process.env.RPC_FUZZ_SEED ?? 20251106);
    const next = generator(seed);
    const closes = new Map<number, number>();
    let conn = await open();
    let initialized = false;
    let answered = 0;
    let expected = 0;
    let marker = 0;
    const frames = 3000;
    const reopen = async () => {
      if (conn.closeCode !== undefined) closes.set(conn.closeCode, (closes.get(conn.closeCode) ?? 0) + 1);
      conn = await open();
      initialized = false;
    };
    for (let i = 0; i < frames; i++) {
      if (conn.closed) await reopen();
      // most connections initialize first; some stay uninitialized to fuzz that path too
      if (!initialized && i % 7 !== 0) {
        conn.ws.send(
          JSON.stringify({
            jsonrpc: '2.0',
            id: 'init',
            method: 'initialize',
            params: { protocolVersion: PROTOCOL_VERSION },
          }),
        );
        const r = await response(conn, 'init');
        if (!r) continue;
        assert.ok(r.result, JSON.stringify(r));
        initialized = true;
      }
      const f = next();
      conn.ws.send(f.data, { binary: !!f.binary });
      if (f.expect && initialized) {
        expected++;
        const r = await response(conn, f.expect.id);
        if (r) {
          assert.deepEqual(r.result, f.expect.result, `frame ${i}`);
          answered++;
        }
      }
      if (i % 100 === 99 && !conn.closed) {
        // a checkpoint: the connection is still being served, in order
        const id = `marker-${marker++}`;
        conn.ws.send(JSON.stringify({ jsonrpc: '2.0', id, method: 'echo', params: { i } }));
        const r = await response(conn, id);
        if (r && initialized) assert.deepEqual(r.result, { i });
        if (r && !initialized) assert.equal((r.error as { code: number }).code, RpcErrorCode.ServerNotInitialized);
      }
    }
    conn.ws.close();
    t.diagnostic(
      `seed ${seed}: ${answered}/${expected} valid requests answered; closes ${JSON.stringify(Object.fromEntries(closes))}`,
    );
    // the generator reached the interesting paths
    assert.ok((closes.get(1009) ?? 0) > 5, `1009 closes: ${closes.get(1009)}`);
    assert.ok((closes.get(1007) ?? 0) > 5, `1007 closes: ${closes.get(1007)}`);
    assert.ok(answered > 200 && answered >= expected - (closes.get(1009) ?? 0) - (closes.get(1007) ?? 0) - 5);
    // and the server is fine: it answers, and nothing is left running or queued
    const c = await RpcClient.connect({ url: server.url, token: server.token });
    assert.deepEqual(await c.request('echo', { after: 'fuzz' }), { after: 'fuzz' });
    assert.equal(await c.request('sleep', { ms: 1 }), 'ok');
    const end = Date.now() + 3000;
    let st = await c.status();
    while ((st.connections !== 1 || st.requests.length || st.heavy.running || st.heavy.queued) && Date.now() < end) {
      await new Promise((r) => setTimeout(r, 20));
      st = await c.status();
    }
    assert.equal(st.connections, 1);
    assert.deepEqual(st.requests, []);
    assert.equal(st.heavy.running, 0);
    assert.equal(st.heavy.queued, 0);
    await c.close();
  });
});
