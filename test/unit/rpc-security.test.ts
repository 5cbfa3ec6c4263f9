// Who may open a WebSocket to the server: the token, Origin and Host checks happen on the HTTP
// upgrade, before any socket opens (CVE-2025-52882 is exactly a missing check of this kind).
import assert from 'node:assert/strict';
import { request } from 'node:http';
import { after, before, describe, test } from 'node:test';
import WebSocket from 'ws';
import { RpcClient } from '../../src/transport/client';
import { hostAllowed, parseHostHeader, tokensEqual } from '../../src/transport/security';
import { type RunningServer, startServer } from '../../src/transport/server';

let server: RunningServer;
let opened = 0;

before(async () => {
  server = await startServer({
    handlers: {
      echo: async (p) => {
        opened++;
        return p;
      },
    },
    discoveryFile: false,
    token: 'sekrit-token-0123456789abcdef',
  });
});
after(() => server.close());

/** An upgrade request with exactly these headers; resolves with the HTTP status (101 = accepted). */
function upgrade(headers: Record<string, string | undefined>): Promise<{ status: number; body: string }> {
  return new Promise((resolve, reject) => {
    const h: Record<string, string> = {
      Connection: 'Upgrade',
      Upgrade: 'websocket',
      'Sec-WebSocket-Version': '13',
      'Sec-WebSocket-Key': Buffer.from('0123456789abcdef').toString('base64'),
    };
    for (const [k, v] of Object.entries(headers)) if (v !== undefined) h[k] = v;
    const req = request({ host: '127.0.0.1', port: server.port, path: '/', headers: h, setHost: false });
    req.on('upgrade', (_res, socket) => {
      socket.destroy();
      resolve({ status: 101, body: '' });
    });
    req.on('response', (res) => {
      let body = '';
      res.setEncoding('utf8');
      res.on('data', (c) => (body += c));
      res.on('end', () => resolve({ status: res.statusCode ?? 0, body }));
    });
    req.on('error', reject);
    req.end();
  });
}

const good = () => ({ Host: `127.0.0.1:${server.port}`, Authorization: `Bearer ${server.token}` });

describe('rpc security: the upgrade request', () => {
  test('the right token, no Origin and our Host is accepted', async () => {
    assert.equal((await upgrade(good())).status, 101);
    assert.equal((await upgrade({ ...good(), Host: `localhost:${server.port}` })).status, 101);
    assert.equal((await upgrade({ ...good(), Authorization: `bearer   ${server.token}` })).status, 101);
  });

  test('no token or a wrong one: 401 with a reason, before the socket opens', async () => {
    const none = await upgrade({ ...good(), Authorization: undefined });
    assert.equal(none.status, 401);
    assert.match(none.body, /missing "Authorization: Bearer <token>"/);
    const wrong = await upgrade({ ...good(), Authorization: 'Bearer sekrit-token-0123456789abcdeX' });
    assert.equal(wrong.status, 401);
    assert.match(wrong.body, /wrong token/);
    assert.equal((await upgrade({ ...good(), Authorization: `Bearer ${server.token}x` })).status, 401);
    assert.equal((await upgrade({ ...good(), Authorization: 'Bearer ' })).status, 401);
    assert.equal((await upgrade({ ...good(), Authorization: `Basic ${server.token}` })).status, 401);
    assert.equal((await upgrade({ ...good(), Authorization: server.token })).status, 401);
  });

  test('any Origin header (a web page) is refused with 403, even with the token', async () => {
    for (const origin of ['http://evil.example', 'http://127.0.0.1:3000', 'null', 'vscode-webview://abc']) {
      const r = await upgrade({ ...good(), Origin: origin });
      assert.equal(r.status, 403, origin);
      assert.match(r.body, /web pages are refused/);
    }
  });

  test('a Host that is not this server is refused with 403 (DNS rebinding)', async () => {
    const p = server.port;
    for (const host of [
      `evil.example:${p}`,
      `127.0.0.1.nip.io:${p}`,
      `127.0.0.1:${p + 1}`,
      '127.0.0.1',
      `10.0.0.1:${p}`,
      `[::1]:${p}`,
      `localhost.evil:${p}`,
      '',
      undefined,
    ]) {
      const r = await upgrade({ ...good(), Host: host });
      assert.equal(r.status, 403, `Host: ${host}`);
      assert.match(r.body, /does not name this server/);
    }
  });

  test('the client helper reports refusals with the server reason; nothing reached a handler', async () => {
    await assert.rejects(
      RpcClient.connect({ url: server.url, token: 'wrong-token-0123456789abcdef' }),
      /refused the connection \(401 Unauthorized\): wrong token/,
    );
    const ws = new WebSocket(server.url, {
      headers: { Authorization: `Bearer ${server.token}`, Origin: 'https://a.b' },
    });
    const status = await new Promise<number>((resolve) => {
      ws.on('unexpected-response', (_req, res) => resolve(res.statusCode ?? 0));
      ws.on('open', () => resolve(101));
      ws.on('error', () => {});
    });
    assert.equal(status, 403);
    assert.equal(opened, 0);
    const c = await RpcClient.connect({ url: server.url, token: server.token });
    assert.deepEqual(await c.request('echo', { x: 1 }), { x: 1 });
    await c.close();
  });

  test('binds 127.0.0.1 by default', () => {
    assert.equal(server.host, '127.0.0.1');
    assert.match(server.url, /^ws:\/\/127\.0\.0\.1:\d+\/$/);
  });
});

describe('rpc security: helpers', () => {
  test('tokensEqual is exact', () => {
    assert.ok(tokensEqual('abc', 'abc'));
    assert.ok(!tokensEqual('abc', 'abd'));
    assert.ok(!tokensEqual('abc', 'abcd'));
    assert.ok(!tokensEqual('', 'abc'));
  });

  test('Host rules', () => {
    assert.deepEqual(parseHostHeader('[::1]:80'), { name: '::1', port: 80 });
    assert.deepEqual(parseHostHeader('LocalHost'), { name: 'localhost', port: undefined });
    assert.equal(parseHostHeader('a:b:c'), undefined);
    const lo = { host: '127.0.0.1', port: 5000 };
    assert.ok(hostAllowed('127.0.0.1:5000', lo));
    assert.ok(hostAllowed('localhost:5000', lo));
    assert.ok(!hostAllowed('127.0.0.2:5000', lo));
    assert.ok(!hostAllowed('example.com:5000', lo));
    const v6 = { host: '::1', port: 5000 };
    assert.ok(hostAllowed('[::1]:5000', v6));
    assert.ok(hostAllowed('localhost:5000', v6));
    assert.ok(!hostAllowed('127.0.0.1:5000', v6));
    // bound to every interface: any IP literal or localhost, still no names
    const any = { host: '0.0.0.0', port: 5000 };
    assert.ok(hostAllowed('192.168.1.20:5000', any));
    assert.ok(hostAllowed('localhost:5000', any));
    assert.ok(!hostAllowed('rebind.example:5000', any));
    assert.ok(!hostAllowed('192.168.1.20:5001', any));
    assert.ok(!hostAllowed(undefined, any));
  });
});
