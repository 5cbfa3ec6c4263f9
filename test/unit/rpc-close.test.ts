// A server that goes away without closing the connection (kill -9, a crash: WebSocket close code
// 1006) is said in words a person can act on, not as a bare close code (an editor audit saw only
// "the connection to the influence server closed (1006)" after killing the server mid-explain).
import assert from 'node:assert/strict';
import type { AddressInfo } from 'node:net';
import { test } from 'node:test';
import { WebSocketServer } from 'ws';
import { RpcClient } from '../../src/transport/client';

test('a connection dropped without a close frame (1006) says the server process stopped or the network dropped', async () => {
  const wss = new WebSocketServer({ port: 0, host: '127.0.0.1' });
  await new Promise<void>((r) => wss.once('listening', () => r()));
  // the first request kills the socket the way a killed process does: no close frame
  wss.on('connection', (socket) => socket.once('message', () => socket.terminate()));
  try {
    const client = await RpcClient.connect({
      url: `ws://127.0.0.1:${(wss.address() as AddressInfo).port}`,
      token: 't',
      initialize: false,
    });
    await assert.rejects(
      client.request('status'),
      /the connection to the influence server broke off \(1006: its process stopped, e\.g\. killed or out of memory, or the network dropped\); the next request starts a local server again or reconnects/,
    );
    client.close();
  } finally {
    await new Promise((r) => wss.close(r));
  }
});
