// Who may open a WebSocket: checked on the HTTP upgrade request, before the socket opens.
//   1. no `Origin` header: browsers always send one on a WebSocket handshake, so a web page (or
//      a DNS-rebinding attack, CVE-2025-52882 / CVE-2018-14732 / CVE-2025-49596) is refused;
//   2. `Host` must name this server: the bound address (or `localhost` on loopback) and port;
//   3. `Authorization: Bearer <token>` with the session token, compared in constant time.
import { createHash, timingSafeEqual } from 'node:crypto';
import type { IncomingMessage } from 'node:http';
import { isIP } from 'node:net';

export interface Denial {
  status: 401 | 403;
  message: string;
}

export interface UpgradePolicy {
  token: string;
  /** the address the server is bound to, as given (e.g. 127.0.0.1, ::1, 0.0.0.0) */
  host: string;
  port: number;
}

/** Constant-time comparison that does not leak the length either (both sides are hashed). */
export function tokensEqual(given: string, expected: string): boolean {
  const a = createHash('sha256').update(given, 'utf8').digest();
  const b = createHash('sha256').update(expected, 'utf8').digest();
  return timingSafeEqual(a, b);
}

export function isLoopback(host: string): boolean {
  const h = stripBrackets(host).toLowerCase();
  return h === 'localhost' || h === '::1' || /^127\.\d+\.\d+\.\d+$/.test(h);
}

function isWildcard(host: string): boolean {
  const h = stripBrackets(host);
  return h === '0.0.0.0' || h === '::' || h === '';
}

function stripBrackets(h: string): string {
  return h.startsWith('[') && h.endsWith(']') ? h.slice(1, -1) : h;
}

/** Splits a Host header into name and port ([v6]:port, name:port, name). */
export function parseHostHeader(value: string): { name: string; port: number | undefined } | undefined {
  const m = /^(\[[0-9a-fA-F:.]+\]|[^:[\]]+)(?::(\d{1,5}))?$/.exec(value.trim());
  if (!m) return undefined;
  return { name: stripBrackets(m[1]).toLowerCase(), port: m[2] === undefined ? undefined : Number(m[2]) };
}

/**
 * Whether a `Host` header names this server. DNS rebinding needs a domain name that resolves to
 * us, so names are refused except `localhost` (when bound to loopback or all interfaces); IP
 * literals must be the bound address (any address when bound to all interfaces).
 */
export function hostAllowed(header: string | undefined, policy: Pick<UpgradePolicy, 'host' | 'port'>): boolean {
  if (!header) return false;
  const h = parseHostHeader(header);
  if (!h || (h.port ?? 80) !== policy.port) return false;
  const bound = stripBrackets(policy.host).toLowerCase();
  if (h.name === 'localhost') return isLoopback(bound) || isWildcard(bound);
  if (!isIP(h.name)) return h.name === bound; // a name is allowed only if the server was bound by that very name
  if (isWildcard(bound)) return true;
  return h.name === bound || (bound === 'localhost' && isLoopback(h.name));
}

/** Null when the upgrade may proceed; otherwise the status and a message a person can act on. */
export function checkUpgrade(req: IncomingMessage, policy: UpgradePolicy): Denial | null {
  const origin = req.headers.origin ?? req.headers['sec-websocket-origin'];
  if (origin !== undefined)
    return {
      status: 403,
      message: `connections from web pages are refused (Origin: ${String(origin).slice(0, 100)}); connect from the Influence Lens extension or a local client`,
    };
  if (!hostAllowed(req.headers.host, policy))
    return {
      status: 403,
      message: `the Host header "${String(req.headers.host ?? '').slice(0, 100)}" does not name this server; connect to ${urlHost(policy.host)}:${policy.port}`,
    };
  const auth = req.headers.authorization;
  if (!auth)
    return {
      status: 401,
      message:
        'missing "Authorization: Bearer <token>" header; the token is in the discovery file (~/.cache/influence-lens/server.json) or INFLUENCE_LENS_TOKEN',
    };
  const m = /^Bearer +(\S+) *$/i.exec(auth);
  if (!m) return { status: 401, message: 'the Authorization header must be "Bearer <token>"' };
  if (!tokensEqual(m[1], policy.token))
    return {
      status: 401,
      message: 'wrong token: this server was started with a different one (see its discovery file)',
    };
  return null;
}

/** How the host goes into a URL (IPv6 in brackets). */
export function urlHost(host: string): string {
  return host.includes(':') && !host.startsWith('[') ? `[${host}]` : host;
}
