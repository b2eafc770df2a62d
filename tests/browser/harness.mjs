// Helpers of the Node tests of the JS client: the real gateway binary as a child process,
// a TCP proxy that can cut every connection, HS256 JWTs, and small waiting helpers.
import { spawn } from 'node:child_process';
import { createHmac } from 'node:crypto';
import { createInterface } from 'node:readline';
import http from 'node:http';
import net from 'node:net';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

export const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../..');
export const GATEWAY_BIN = process.env.GATEWAY_BIN || path.join(ROOT, 'target/debug/gateway');

/**
 * Starts `gateway` with `args` (after the loopback listen/grpc/admin defaults); resolves
 * once it printed its `LISTENING client=… grpc=… admin=…` line.
 * @returns {Promise<{client: string, admin: string, url: string, http: string, proc, stop: () => Promise<void>}>}
 */
export function startGateway(args = [], { bin = GATEWAY_BIN, env = {} } = {}) {
  const proc = spawn(bin, ['--listen', '127.0.0.1:0', '--grpc-addr', '127.0.0.1:0', '--admin-addr', '127.0.0.1:0', ...args], {
    env: { ...process.env, SWITCHBOARD_LOG: process.env.SWITCHBOARD_LOG || 'warn', ...env },
    stdio: ['ignore', 'pipe', 'inherit'],
  });
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`${bin}: no LISTENING line within 20 s`)), 20_000);
    proc.once('error', (err) => { clearTimeout(timer); reject(err); });
    proc.once('exit', (code) => { clearTimeout(timer); reject(new Error(`${bin} exited with ${code} before listening`)); });
    const lines = createInterface({ input: proc.stdout });
    lines.once('line', (line) => {
      clearTimeout(timer);
      proc.removeAllListeners('exit');
      const field = (k) => line.split(/\s+/).find((kv) => kv.startsWith(`${k}=`))?.slice(k.length + 1);
      const client = field('client');
      if (!client) return reject(new Error(`unexpected first line: ${line}`));
      lines.on('line', () => {}); // keep draining stdout
      const stop = () => new Promise((done) => {
        if (proc.exitCode !== null || proc.signalCode !== null) return done();
        proc.once('exit', () => done());
        proc.kill('SIGKILL');
      });
      resolve({ client, admin: field('admin'), url: `ws://${client}/ws`, http: `http://${client}/`, proc, stop });
    });
  });
}

/**
 * A TCP proxy to `target` ("host:port"): `cut()` destroys every proxied connection (both
 * ends at once, like a network failure); while `down` is true new connections are refused.
 */
export function startProxy(target) {
  const [host, port] = [target.slice(0, target.lastIndexOf(':')), Number(target.slice(target.lastIndexOf(':') + 1))];
  const pairs = new Set();
  const proxy = {
    down: false,
    connections: 0,
    cut() {
      for (const pair of pairs) for (const s of pair) s.destroy();
      pairs.clear();
    },
    close() {
      proxy.cut();
      return new Promise((done) => server.close(() => done()));
    },
  };
  const server = net.createServer((downstream) => {
    if (proxy.down) return downstream.destroy();
    proxy.connections++;
    const upstream = net.connect(port, host);
    const pair = [downstream, upstream];
    pairs.add(pair);
    const end = () => { pairs.delete(pair); downstream.destroy(); upstream.destroy(); };
    downstream.on('error', end).on('close', end);
    upstream.on('error', end).on('close', end);
    downstream.pipe(upstream);
    upstream.pipe(downstream);
  });
  return new Promise((resolve) => server.listen(0, '127.0.0.1', () => {
    proxy.address = `127.0.0.1:${server.address().port}`;
    proxy.url = `ws://${proxy.address}/ws`;
    resolve(proxy);
  }));
}

const b64url = (v) => Buffer.from(typeof v === 'string' ? v : JSON.stringify(v)).toString('base64url');

/** An HS256 JWT of `claims` (add `exp` yourself; `now()` gives unix seconds). */
export function jwt(secret, claims) {
  const body = `${b64url({ alg: 'HS256', typ: 'JWT' })}.${b64url(claims)}`;
  return `${body}.${createHmac('sha256', secret).update(body).digest('base64url')}`;
}

export const now = () => Math.floor(Date.now() / 1000);
export const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

/** Polls `pred` every 20 ms until it is truthy (returns its value) or `ms` pass (throws). */
export async function until(pred, ms = 10_000, what = 'condition') {
  const deadline = Date.now() + ms;
  for (;;) {
    const v = await pred();
    if (v) return v;
    if (Date.now() > deadline) throw new Error(`timed out after ${ms} ms waiting for ${what}`);
    await sleep(20);
  }
}

/** Resolves with the next `event` of `client` (optionally one matching `pred`). */
export function next(client, event, pred = () => true, ms = 10_000) {
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => { client.off(event, fn); reject(new Error(`no '${event}' within ${ms} ms`)); }, ms);
    const fn = (payload) => {
      if (!pred(payload)) return;
      clearTimeout(timer);
      client.off(event, fn);
      resolve(payload);
    };
    client.on(event, fn);
  });
}

/**
 * An HTTP proxy to `target` ("host:port", settable later: `proxy.target = …`) that behaves
 * like the proxies of networks that refuse WebSockets:
 * - `upgrade`: 'pass' forwards upgrades, 'refuse' answers them 403, 'drop' closes the connection;
 * - `buffer`: holds every response until it ended, then sends it whole (an SSE stream never gets
 *   through; a long-poll answer does).
 * `cut()` destroys every connection; while `down` is true new connections are refused.
 * Counts what it saw: `upgrades` (refused or passed) and `requests` by path.
 */
export function startHttpProxy(target, { upgrade = 'refuse', buffer = false } = {}) {
  const sockets = new Set();
  const track = (s) => { sockets.add(s); s.on('close', () => sockets.delete(s)); };
  const split = () => {
    const t = proxy.target;
    return [t.slice(0, t.lastIndexOf(':')), Number(t.slice(t.lastIndexOf(':') + 1))];
  };
  const proxy = {
    target,
    upgrade,
    buffer,
    down: false,
    upgrades: 0,
    requests: new Map(),
    cut() { for (const s of sockets) s.destroy(); sockets.clear(); },
    close() { proxy.cut(); return new Promise((done) => server.close(() => done())); },
  };
  const server = http.createServer((req, res) => {
    const path = req.url.split('?')[0];
    proxy.requests.set(path, (proxy.requests.get(path) || 0) + 1);
    const [host, port] = split();
    const up = http.request({ host, port, method: req.method, path: req.url, headers: req.headers, agent: false }, (ures) => {
      track(ures.socket);
      if (proxy.buffer) {
        const chunks = [];
        ures.on('data', (c) => chunks.push(c));
        ures.on('end', () => {
          const body = Buffer.concat(chunks);
          const headers = { ...ures.headers, 'content-length': String(body.length) };
          delete headers['transfer-encoding'];
          res.writeHead(ures.statusCode, headers);
          res.end(body);
        });
      } else {
        res.writeHead(ures.statusCode, ures.headers);
        res.flushHeaders();
        ures.pipe(res);
      }
      ures.on('error', () => res.destroy());
    });
    up.on('error', () => { if (!res.headersSent) res.writeHead(502).end('bad gateway\n'); else res.destroy(); });
    req.pipe(up);
    res.on('close', () => up.destroy());
  });
  server.on('connection', (s) => { if (proxy.down) return s.destroy(); track(s); });
  server.on('upgrade', (req, socket, head) => {
    proxy.upgrades++;
    if (proxy.upgrade === 'drop') return socket.destroy();
    if (proxy.upgrade === 'refuse') {
      return socket.end('HTTP/1.1 403 Forbidden\r\ncontent-type: text/plain\r\ncontent-length: 22\r\nconnection: close\r\n\r\nwebsockets not allowed');
    }
    const [host, port] = split();
    const up = net.connect(port, host, () => {
      let raw = `${req.method} ${req.url} HTTP/1.1\r\n`;
      for (let i = 0; i < req.rawHeaders.length; i += 2) raw += `${req.rawHeaders[i]}: ${req.rawHeaders[i + 1]}\r\n`;
      up.write(`${raw}\r\n`);
      if (head?.length) up.write(head);
      socket.pipe(up);
      up.pipe(socket);
    });
    track(up);
    const end = () => { socket.destroy(); up.destroy(); };
    up.on('error', end).on('close', end);
    socket.on('error', end).on('close', end);
  });
  return new Promise((resolve) => server.listen(0, '127.0.0.1', () => {
    proxy.address = `127.0.0.1:${server.address().port}`;
    proxy.url = `ws://${proxy.address}/ws`;
    proxy.http = `http://${proxy.address}/`;
    resolve(proxy);
  }));
}

/**
 * A TLS-terminating HTTP/2 proxy to `target` ("host:port"), as browsers reach a gateway
 * behind a load balancer: HTTP/2 over TLS (HTTP/1.1 too, by ALPN) towards the client, plain
 * HTTP/1.1 towards the gateway, one upstream request per stream, responses streamed. It does
 * not pass WebSocket upgrades (many such proxies do not). A self-signed certificate for
 * 127.0.0.1 is made with `openssl` in a temporary directory. Counts requests by HTTP version.
 */
export async function startTlsH2Proxy(target) {
  const { execFileSync } = await import('node:child_process');
  const { mkdtempSync, readFileSync, rmSync } = await import('node:fs');
  const { tmpdir } = await import('node:os');
  const http2 = await import('node:http2');
  const dir = mkdtempSync(path.join(tmpdir(), 'sb-tls-'));
  execFileSync('openssl', ['req', '-x509', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:prime256v1', '-nodes',
    '-keyout', `${dir}/key.pem`, '-out', `${dir}/cert.pem`, '-days', '1', '-subj', '/CN=127.0.0.1',
    '-addext', 'subjectAltName=IP:127.0.0.1'], { stdio: 'ignore' });
  const key = readFileSync(`${dir}/key.pem`);
  const cert = readFileSync(`${dir}/cert.pem`);
  rmSync(dir, { recursive: true, force: true });
  const [host, port] = [target.slice(0, target.lastIndexOf(':')), Number(target.slice(target.lastIndexOf(':') + 1))];
  const proxy = { versions: new Map(), upgrades: 0 };
  const sessions = new Set();
  const server = http2.createSecureServer({ key, cert, allowHTTP1: true }, (req, res) => {
    proxy.versions.set(req.httpVersion, (proxy.versions.get(req.httpVersion) || 0) + 1);
    const headers = {};
    for (const [k, v] of Object.entries(req.headers)) {
      if (!k.startsWith(':') && !['connection', 'keep-alive', 'transfer-encoding', 'upgrade', 'http2-settings'].includes(k)) headers[k] = v;
    }
    headers.host = target;
    const up = http.request({ host, port, method: req.method, path: req.url, headers, agent: false }, (ures) => {
      const out = {};
      for (const [k, v] of Object.entries(ures.headers)) {
        if (!['connection', 'keep-alive', 'transfer-encoding'].includes(k)) out[k] = v;
      }
      res.writeHead(ures.statusCode, out);
      if (res.flushHeaders) res.flushHeaders();
      ures.pipe(res);
      ures.on('error', () => res.destroy());
    });
    up.on('error', () => { if (!res.headersSent) res.writeHead(502).end('bad gateway\n'); else res.destroy(); });
    req.pipe(up);
    res.on('close', () => up.destroy());
  });
  server.on('session', (s) => { sessions.add(s); s.on('close', () => sessions.delete(s)); });
  server.on('upgrade', (req, socket) => { proxy.upgrades++; socket.destroy(); });
  proxy.close = () => new Promise((done) => {
    for (const s of sessions) s.destroy();
    server.close(() => done());
  });
  return new Promise((resolve) => server.listen(0, '127.0.0.1', () => {
    proxy.address = `127.0.0.1:${server.address().port}`;
    proxy.url = `wss://${proxy.address}/ws`;
    proxy.https = `https://${proxy.address}/`;
    resolve(proxy);
  }));
}
