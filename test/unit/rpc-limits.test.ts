// What one client can make the server spend: memory for responses it never reads (capped per
// connection; past the cap it is dropped with 1008), and log lines (refused upgrades and a gone
// client's lost responses are aggregated, never one line each).
import assert from 'node:assert/strict';
import { describe, test } from 'node:test';
import WebSocket from 'ws';
import { CloseCode, PROTOCOL_VERSION } from '../../src/protocol/rpc';
import { LogLimiter } from '../../src/transport/log-limiter';
import { type RunningServer, startServer } from '../../src/transport/server';

const TOKEN = 'limits-token-0123456789abcdef';
const CHUNK = 'x'.repeat(256 * 1024);

async function bigServer(maxBufferedBytes: number, lines: string[]): Promise<RunningServer> {
  return startServer({
    handlers: { big: async () => CHUNK, echo: async (p) => p },
    discoveryFile: false,
    token: TOKEN,
    limits: { maxBufferedBytes, maxInFlightPerConnection: 10_000 },
    log: (level, m) => lines.push(`[${level}] ${m}`),
  });
}

/** An authorised raw socket, initialized, whose reading can be stopped. */
async function open(server: RunningServer) {
  const ws = new WebSocket(server.url, { headers: { Authorization: `Bearer ${TOKEN}` } });
  ws.on('error', () => {});
  await new Promise((r, j) => ws.once('open', r).once('error', j));
  const initialized = new Promise((r) => ws.once('message', r));
  ws.send(
    JSON.stringify({ jsonrpc: '2.0', id: 0, method: 'initialize', params: { protocolVersion: PROTOCOL_VERSION } }),
  );
  await initialized;
  return ws;
}

async function until(cond: () => boolean, what: string, ms = 10_000) {
  const end = Date.now() + ms;
  while (!cond()) {
    if (Date.now() > end) assert.fail(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 20));
  }
}

describe('rpc server: resource limits', () => {
  test('a client that never reads is dropped with 1008 once it leaves the cap unread; others are served', async () => {
    const lines: string[] = [];
    const server = await bigServer(4 * 2 ** 20, lines);
    try {
      const ws = await open(server);
      let closeCode: number | undefined;
      ws.on('close', (code) => {
        closeCode = code;
      });
      // stop reading: the kernel buffers fill, then the server's send buffer would grow
      (ws as unknown as { _socket: { pause(): void } })._socket.pause();
      // 400 × 256 KiB = 100 MiB of answers it will never read
      for (let i = 1; i <= 400; i++) ws.send(JSON.stringify({ jsonrpc: '2.0', id: i, method: 'big' }));
      await until(() => server.stats().connections === 0, 'the server to drop the client');
      const dropped = lines.find((l) => /left [\d.]+ MiB unread \(limit 4\.0 MiB\): dropping it/.test(l));
      assert.ok(dropped, lines.join('\n'));
      assert.ok(Number(/left ([\d.]+) MiB/.exec(dropped)![1]) < 8, 'the buffer stopped near the cap');
      (ws as unknown as { _socket: { resume(): void } })._socket.resume();
      await until(() => closeCode !== undefined, 'the client to see the close');
      assert.ok(closeCode === CloseCode.PolicyViolation || closeCode === 1006, `close code ${closeCode}`);
      // the server keeps serving others
      const other = await open(server);
      const answer = new Promise<string>((r) => other.once('message', (d) => r(d.toString())));
      other.send(JSON.stringify({ jsonrpc: '2.0', id: 1, method: 'echo', params: { ok: 1 } }));
      assert.deepEqual(JSON.parse(await answer).result, { ok: 1 });
      other.close();
    } finally {
      await server.close();
    }
  });

  test('a client that stops reading, then disconnects with thousands of answers unread, costs a few log lines', async () => {
    const lines: string[] = [];
    const server = await startServer({
      handlers: { small: async () => 'y'.repeat(16_384) },
      discoveryFile: false,
      token: TOKEN,
      limits: { maxInFlightPerConnection: 10_000 },
      log: (level, m) => lines.push(`[${level}] ${m}`),
    });
    try {
      const ws = await open(server);
      (ws as unknown as { _socket: { pause(): void } })._socket.pause();
      for (let i = 1; i <= 3000; i++) ws.send(JSON.stringify({ jsonrpc: '2.0', id: i, method: 'small' }));
      await new Promise((r) => setTimeout(r, 1500)); // the answers pile up unread (48 MiB)
      ws.terminate();
      await until(() => server.stats().connections === 0, 'the connection to close');
      await new Promise((r) => setTimeout(r, 300));
      assert.ok(lines.length <= 6, `${lines.length} log lines:\n${lines.slice(0, 20).join('\n')}`);
    } finally {
      await server.close();
    }
  });

  test('refused upgrades are logged a few times per window, then summarised', async () => {
    const lines: string[] = [];
    const server = await startServer({
      handlers: {},
      discoveryFile: false,
      token: TOKEN,
      log: (level, m) => lines.push(`[${level}] ${m}`),
    });
    try {
      const tries = Array.from(
        { length: 200 },
        () =>
          new Promise<void>((resolve) => {
            const ws = new WebSocket(server.url, { headers: { Authorization: 'Bearer wrong-token-0123456789' } });
            ws.on('error', () => resolve());
            ws.on('unexpected-response', () => resolve());
          }),
      );
      await Promise.all(tries);
      const refused = lines.filter((l) => /refused a connection/.test(l));
      assert.ok(refused.length <= 5, `${refused.length} refusal lines`);
      await server.close();
      assert.ok(
        lines.some((l) => /refused a connection.*401.*\(and \d+ more like it in the last \d+ s\)/.test(l)),
        lines.join('\n'),
      );
    } finally {
      await server.close();
    }
  });
});

describe('LogLimiter', () => {
  test('writes a burst per key and window, then one summary with the count', () => {
    const out: string[] = [];
    const l = new LogLimiter((_lvl, m) => out.push(m), { burst: 2, windowMs: 60_000 });
    for (let i = 0; i < 10; i++) l.limited('warn', 'a', `a ${i}`);
    l.limited('warn', 'b', 'b 0');
    l.flush();
    assert.deepEqual(out, ['a 0', 'a 1', 'b 0', 'a 9 (and 8 more like it in the last 1 s)']);
  });
});
