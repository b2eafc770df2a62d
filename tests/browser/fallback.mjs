// Node and Chromium tests of the JS client's fallback transports (gateway/static/switchboard.js):
// behind an HTTP proxy that refuses WebSocket upgrades the client works over Server-Sent
// Events, and behind one that also buffers responses over long-polling; the same API,
// recovery and gaps; back to WebSocket when upgrades go through again; a restarting gateway
// (refused connections) is not taken for a network that refuses WebSockets; cross-origin
// pages get CORS answers; behind a TLS-terminating HTTP/2 proxy a page holds more than six
// streams.
//
//   node --test tests/browser/fallback.mjs      (after `cargo build -p gateway --bins`)
import { test, after } from 'node:test';
import assert from 'node:assert/strict';
import WebSocket from 'ws';
import { existsSync, readFileSync } from 'node:fs';
import { Switchboard } from '../../gateway/static/switchboard.js';
import { startGateway, startHttpProxy, startTlsH2Proxy, jwt, now, until, next } from './harness.mjs';

const SECRET = 'fallback-test-secret';
const FAST = ['--publish-rate', '100000', '--publish-burst', '100000'];
const cleanup = [];
after(async () => { for (const fn of cleanup.reverse()) await fn(); });

function client(opts) {
  const c = new Switchboard({ WebSocket, ...opts });
  cleanup.push(() => c.close());
  return c;
}

function record(c) {
  const log = { messages: [], gaps: [], opens: [], errors: [] };
  c.on('message', (m) => log.messages.push(m));
  c.on('gap', (g) => log.gaps.push(g));
  c.on('open', (o) => log.opens.push(o.transport));
  return log;
}

async function gateway(args = []) {
  const gw = await startGateway(['--anonymous', '--jwt-hs256-secret', SECRET, ...FAST, ...args]);
  cleanup.push(() => gw.stop());
  return gw;
}

async function proxy(gw, opts) {
  const p = await startHttpProxy(gw.client, opts);
  cleanup.push(() => p.close());
  return p;
}

async function publishN(pub, channel, n, tag) {
  const seqs = [];
  for (let i = 0; i < n; i++) seqs.push((await pub.publish(channel, { tag, i })).seq);
  return seqs;
}

const seqsOf = (log, channel) => log.messages.filter((m) => m.channel === channel).map((m) => m.seq);
const token = (sub, ttl = 600) => jwt(SECRET, { sub, exp: now() + ttl });

/** The whole life of a fallback session: subscribe, receive, publish, a cut, a restart. */
async function fallbackSession(kind, proxyOpts) {
  const gw = await gateway();
  const p = await proxy(gw, proxyOpts);
  const sub = client({ url: p.url, getToken: () => token('alice') });
  const log = record(sub);
  const pub = client({ url: gw.url, user: 'pub' });
  const ack = await sub.subscribe('room:1');
  assert.equal(sub.transport, kind, `connected over ${sub.transport}, opens: ${log.opens}`);
  assert.equal(sub.welcome.user, 'alice', 'authenticated with the token');
  assert.ok(ack.position?.epoch, `the ack has a position: ${JSON.stringify(ack)}`);
  assert.ok(p.upgrades >= 1, 'the upgrade went to the proxy first');

  // Live messages, in order, once.
  const live = await publishN(pub, 'room:1', 20, 'live');
  await until(() => seqsOf(log, 'room:1').length >= 20, 10_000, `the live messages over ${kind}`);
  assert.deepEqual(seqsOf(log, 'room:1'), live);

  // Commands over HTTP: publish (seen by a WebSocket subscriber), history, presence, ping.
  const watcher = client({ url: gw.url, user: 'watcher' });
  const seen = [];
  watcher.on('message', (m) => seen.push(m));
  await watcher.subscribe('room:2');
  const mine = await sub.publish('room:2', { from: 'alice' });
  assert.ok(mine.seq > 0, `publish acked: ${JSON.stringify(mine)}`);
  await until(() => seen.some((m) => m.seq === mine.seq && m.data.from === 'alice'), 5000, 'the publish seen over WebSocket');
  const hist = await sub.history('room:1', { limit: 5 });
  assert.deepEqual(hist.messages.map((m) => m.seq), live.slice(-5));
  assert.ok((await sub.ping()) >= 0);
  const forbidden = await sub.publish('bad channel!', 1).then(() => null, (e) => e.code);
  assert.equal(forbidden, 'bad_channel', 'errors keep their protocol code');

  // A cut connection: the client resumes through history, exactly the missed messages.
  p.down = true;
  p.cut();
  await until(() => sub.state !== 'open', 10_000, 'the client to see the cut');
  const away = await publishN(pub, 'room:1', 30, 'away');
  p.down = false;
  await until(() => seqsOf(log, 'room:1').length >= 50, 20_000, `the recovery over ${kind}`);
  assert.deepEqual(seqsOf(log, 'room:1'), [...live, ...away], 'nothing lost or shown twice');
  assert.deepEqual(log.gaps, [], 'no gap after a recoverable cut');
  assert.equal(sub.transport, kind);

  // A gateway restart (standalone: its history is gone): the client reconnects over the same
  // fallback, is told what it could not recover (a gap), and goes on.
  await gw.stop();
  const gw2 = await gateway();
  p.target = gw2.client;
  const gap = await next(sub, 'gap', (g) => g.channel === 'room:1', 30_000);
  assert.equal(gap.reason, 'epoch_changed', `gap: ${JSON.stringify(gap)}`);
  assert.equal(sub.transport, kind);
  const pub2 = client({ url: gw2.url, user: 'pub' });
  const after = await publishN(pub2, 'room:1', 5, 'after');
  await until(() => seqsOf(log, 'room:1').length >= 55, 10_000, 'messages after the restart');
  assert.deepEqual(seqsOf(log, 'room:1').slice(50), after);
  assert.ok(log.opens.length >= 3 && log.opens.every((t) => t === 'websocket' || t === kind), `opens: ${log.opens}`);
  return { sub, log, p };
}

test('behind a proxy that refuses upgrades (403): Server-Sent Events, with recovery and gaps', async () => {
  const { p } = await fallbackSession('sse', { upgrade: 'refuse' });
  assert.ok((p.requests.get('/sse') || 0) >= 3, 'streams went through the proxy');
});

test('behind a proxy that drops upgrades: Server-Sent Events', async () => {
  const gw = await gateway();
  const p = await proxy(gw, { upgrade: 'drop' });
  const c = client({ url: p.url, user: 'dana' });
  await c.subscribe('x');
  assert.equal(c.transport, 'sse');
});

test('behind a proxy that refuses upgrades and buffers responses: long-polling, with recovery and gaps', async () => {
  const { p } = await fallbackSession('poll', { upgrade: 'refuse', buffer: true });
  assert.ok((p.requests.get('/poll') || 0) >= 3, 'polls went through the proxy');
});

test('an SSE stream subscribes and unsubscribes later, also when the stream is on another gateway', async () => {
  const gw = await gateway();
  const p = await proxy(gw, { upgrade: 'refuse' });
  const c = client({ url: p.url, getToken: () => token('erin') });
  const log = record(c);
  const pub = client({ url: gw.url, user: 'pub' });
  await c.subscribe('a');
  await c.subscribe('b'); // on the open stream: POST /command?stream=
  const [a1] = await publishN(pub, 'a', 1, 'a');
  const [b1] = await publishN(pub, 'b', 1, 'b');
  await until(() => log.messages.length >= 2, 5000, 'a and b');
  await c.unsubscribe('a');
  const [b2] = await publishN(pub, 'b', 1, 'b');
  await publishN(pub, 'a', 1, 'a');
  await until(() => seqsOf(log, 'b').length >= 2, 5000, 'b after unsubscribing a');
  // What a load balancer without affinity does: the stream's gateway does not know it. The
  // link opens a new stream with the new channel list (resuming the others).
  const stream = c._ws.streamId;
  c._ws.streamId = 'elsewhere.1';
  await c.subscribe('c,d'); // a comma in a name: escaped in the stream's channel list
  assert.notEqual(c._ws.streamId, stream, 'a new stream');
  const [c1] = await publishN(pub, 'c,d', 1, 'c');
  const [b3] = await publishN(pub, 'b', 1, 'b');
  await until(() => seqsOf(log, 'c,d').length >= 1 && seqsOf(log, 'b').length >= 3, 5000, 'c,d and b on the new stream');
  assert.deepEqual(seqsOf(log, 'a'), [a1]);
  assert.deepEqual(seqsOf(log, 'b'), [b1, b2, b3]);
  assert.deepEqual(seqsOf(log, 'c,d'), [c1]);
  assert.deepEqual(log.gaps, []);
  // A refresh on a stream of another gateway: a new stream with the new token.
  c._ws.streamId = 'elsewhere.2';
  const exp = now() + 900;
  const ack = await c.refresh(jwt(SECRET, { sub: 'erin', exp }));
  assert.equal(ack.expires_at, exp);
  assert.equal(c.welcome.expires_at, exp);
});

test('a fallback session goes back to WebSocket when upgrades go through again, losing nothing', async () => {
  const gw = await gateway();
  const p = await proxy(gw, { upgrade: 'refuse' });
  // The retry period is the feature under test here, shortened from a minute.
  const c = client({ url: p.url, user: 'fay', upgradeRetryMs: 500 });
  const log = record(c);
  const pub = client({ url: gw.url, user: 'pub' });
  await c.subscribe('r');
  assert.equal(c.transport, 'sse');
  const first = await publishN(pub, 'r', 10, 'first');
  await until(() => seqsOf(log, 'r').length >= 10, 5000, 'messages over SSE');
  p.upgrade = 'pass';
  await until(() => c.transport === 'websocket' && c.state === 'open', 10_000, 'the move back to WebSocket');
  const second = await publishN(pub, 'r', 10, 'second');
  await until(() => seqsOf(log, 'r').length >= 20, 5000, 'messages over WebSocket');
  assert.deepEqual(seqsOf(log, 'r'), [...first, ...second]);
  assert.deepEqual(log.gaps, []);
});

test('with a token (no anonymous welcome to the probe) the move back to WebSocket happens too', async () => {
  const gw = await gateway();
  const p = await proxy(gw, { upgrade: 'refuse' });
  const c = client({ url: p.url, getToken: () => token('gil'), upgradeRetryMs: 500 });
  await c.subscribe('r');
  assert.equal(c.transport, 'sse');
  p.upgrade = 'pass';
  await until(() => c.transport === 'websocket' && c.state === 'open', 10_000, 'the move back to WebSocket');
  assert.equal(c.welcome.user, 'gil');
});

test('a full gateway (503) is busy, not a network that refuses WebSockets: no fallback', async () => {
  const gw = await gateway(['--max-connections', '1']);
  const p = await proxy(gw, { upgrade: 'pass' });
  const hog = client({ url: gw.url, user: 'hog' });
  await hog.subscribe('x');
  const c = client({ url: p.url, user: 'ida' });
  const log = record(c);
  const closes = [];
  c.on('close', (e) => closes.push(e.code));
  c.subscribe('x').catch(() => {});
  // WebSocket refused (503), then SSE refused 503: busy (1013), back off, WebSocket again.
  await until(() => closes.includes(1013), 10_000, 'the SSE attempt answered busy');
  assert.ok(!(p.requests.get('/command') || 0), 'no long-polling attempted');
  hog.close();
  await until(() => c.state === 'open', 20_000, 'connected once the slot is free');
  assert.equal(c.transport, 'websocket');
  assert.deepEqual(log.opens, ['websocket']);
});

test('a restarting gateway (connections refused) is not taken for a network that refuses WebSockets', async () => {
  const gw = await gateway();
  const p = await proxy(gw, { upgrade: 'pass' });
  const c = client({ url: p.url, user: 'gus' });
  const log = record(c);
  const pub = client({ url: gw.url, user: 'pub' });
  await c.subscribe('r');
  assert.equal(c.transport, 'websocket');
  p.down = true;
  p.cut();
  await until(() => c.state !== 'open', 5000, 'the cut');
  const failed = [];
  c.on('close', (e) => failed.push(e.opened));
  const away = await publishN(pub, 'r', 5, 'away');
  // Every transport fails while it is down (WebSocket, SSE, long-polling: three attempts that
  // did not open); then the client backs off and tries WebSocket again.
  await until(() => failed.filter((o) => !o).length >= 3 && c.transport === 'websocket' && c._timer && !c._ws,
    10_000, 'a backoff after every transport failed');
  assert.equal(log.opens.length, 1, 'nothing opened while the gateway was unreachable');
  p.down = false;
  await until(() => c.state === 'open' && c.reconnects >= 1, 20_000, 'the reconnect');
  assert.deepEqual(log.opens, ['websocket', 'websocket'], 'reconnected over WebSocket');
  await until(() => seqsOf(log, 'r').length >= 5, 5000, 'the recovery');
  assert.deepEqual(seqsOf(log, 'r'), away);
});

test('CORS: preflight and answers for an admitted origin, 403 for another', async () => {
  const gw = await gateway(['--allowed-origins', 'http://app.example']);
  const base = gw.http;
  const pre = await fetch(`${base}command`, {
    method: 'OPTIONS',
    headers: { Origin: 'http://app.example', 'Access-Control-Request-Method': 'POST', 'Access-Control-Request-Headers': 'authorization, content-type' },
  });
  assert.equal(pre.status, 204);
  assert.equal(pre.headers.get('access-control-allow-origin'), 'http://app.example');
  assert.match(pre.headers.get('access-control-allow-headers'), /authorization/);
  assert.match(pre.headers.get('access-control-allow-methods'), /POST/);
  assert.equal(pre.headers.get('access-control-allow-credentials'), 'true');
  const res = await fetch(`${base}command`, {
    method: 'POST',
    headers: { Origin: 'http://app.example', Authorization: `Bearer ${token('hal')}`, 'Content-Type': 'application/json' },
    body: JSON.stringify({ op: 'ping', ref: '1' }),
  });
  assert.equal(res.status, 200);
  assert.equal(res.headers.get('access-control-allow-origin'), 'http://app.example');
  assert.equal((await res.json()).type, 'pong');
  const other = await fetch(`${base}command`, { method: 'OPTIONS', headers: { Origin: 'http://evil.example', 'Access-Control-Request-Method': 'POST' } });
  assert.equal(other.status, 403);
  assert.equal(other.headers.get('access-control-allow-origin'), null);
  const refused = await fetch(`${base}poll?channels=a`, { headers: { Origin: 'http://evil.example', Authorization: `Bearer ${token('hal')}` } });
  assert.equal(refused.status, 403);
  assert.equal(refused.headers.get('access-control-allow-origin'), null);
});

/** A Chromium page served through `pageProxy`, whose client connects to `url`. */
async function chromiumPage(browser, pageProxy, url) {
  const page = await browser.newPage();
  const errors = [];
  page.on('pageerror', (err) => errors.push(err.message));
  await page.exposeFunction('token', () => token('ivy'));
  await page.goto(`${pageProxy.http}switchboard.js`);
  // This file's client (the binary embeds the copy it was built with).
  const src = readFileSync(new URL('../../gateway/static/switchboard.js', import.meta.url), 'utf8');
  await page.evaluate(async ({ src, url }) => {
    const { Switchboard } = await import(URL.createObjectURL(new Blob([src], { type: 'text/javascript' })));
    const c = new Switchboard({ url, getToken: () => window.token() });
    window.rec = { seqs: [], gaps: [], opens: [] };
    c.on('message', (m) => m.channel === 'web' && window.rec.seqs.push(m.seq));
    c.on('gap', (g) => window.rec.gaps.push(g.reason));
    c.on('open', (o) => window.rec.opens.push(o.transport));
    window.client = c;
    await c.subscribe('web');
  }, { src, url });
  const rec = () => page.evaluate(() => ({ ...window.rec, transport: window.client.transport, state: window.client.state }));
  return { page, errors, rec };
}

test('in Chromium: over SSE behind a proxy that refuses upgrades (cross-origin), over long-polling behind one that also buffers', async () => {
  const { chromium } = await import('playwright-core');
  const executablePath = process.env.CHROMIUM || '/usr/bin/chromium';
  assert.ok(existsSync(executablePath), `no browser at ${executablePath} (the test command installs chromium)`);
  const browser = await chromium.launch({
    executablePath, headless: true, timeout: 30_000,
    args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run'],
  });
  cleanup.push(() => browser.close());
  for (const [kind, opts, crossOrigin] of [['sse', { upgrade: 'refuse' }, true], ['poll', { upgrade: 'refuse', buffer: true }, false]]) {
    const gw = await gateway();
    const pub = client({ url: gw.url, user: 'pub' });
    const p = await proxy(gw, opts);
    // Cross-origin: the page comes from another proxy (another origin) than the gateway's.
    const pageProxy = crossOrigin ? await proxy(gw, { upgrade: 'pass' }) : p;
    const { page, errors, rec } = await chromiumPage(browser, pageProxy, p.url);
    assert.equal((await rec()).transport, kind);
    const got = await publishN(pub, 'web', 10, kind);
    await until(async () => (await rec()).seqs.length >= 10, 10_000, `messages in the page over ${kind}`);
    // The page publishes too.
    const ack = await page.evaluate(() => window.client.publish('web', { from: 'page' }));
    got.push(ack.seq);
    await until(async () => (await rec()).seqs.length >= 11, 10_000, 'its own publish back');
    // A cut, messages meanwhile: recovered once, in order.
    p.down = true;
    p.cut();
    await until(async () => (await rec()).state !== 'open', 10_000, 'the page to see the cut');
    got.push(...(await publishN(pub, 'web', 10, `${kind} away`)));
    p.down = false;
    await until(async () => (await rec()).seqs.length >= 21, 20_000, `the recovery in the page over ${kind}`);
    const r = await rec();
    assert.deepEqual(r.seqs, got);
    assert.deepEqual(r.gaps, []);
    assert.equal(r.transport, kind);
    // A gateway restart (standalone: its history is gone): a gap says so, then it goes on.
    await gw.stop();
    const gw2 = await gateway();
    p.target = gw2.client;
    pageProxy.target = gw2.client;
    await until(async () => (await rec()).gaps.length >= 1, 30_000, `the gap after the restart over ${kind}`);
    assert.deepEqual((await rec()).gaps, ['epoch_changed']);
    const pub2 = client({ url: gw2.url, user: 'pub' });
    const after = await publishN(pub2, 'web', 5, `${kind} after`);
    await until(async () => (await rec()).seqs.length >= 26, 10_000, `messages after the restart over ${kind}`);
    const r2 = await rec();
    assert.deepEqual(r2.seqs.slice(21), after);
    assert.equal(r2.transport, kind);
    assert.deepEqual(errors, []);
    await page.evaluate(() => window.client.close());
    await page.close();
  }
});

test('in Chromium behind a TLS-terminating HTTP/2 proxy that does not pass WebSockets: more SSE streams than six on one origin', async () => {
  const { chromium } = await import('playwright-core');
  const executablePath = process.env.CHROMIUM || '/usr/bin/chromium';
  const browser = await chromium.launch({
    executablePath, headless: true, timeout: 30_000,
    args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run', '--ignore-certificate-errors'],
  });
  cleanup.push(() => browser.close());
  const gw = await gateway();
  const tls = await startTlsH2Proxy(gw.client);
  cleanup.push(() => tls.close());
  const page = await browser.newPage();
  const errors = [];
  page.on('pageerror', (err) => errors.push(err.message));
  await page.exposeFunction('token', (i) => token(`tab${i}`));
  await page.goto(`${tls.https}switchboard.js`);
  const src = readFileSync(new URL('../../gateway/static/switchboard.js', import.meta.url), 'utf8');
  // Ten clients in one page: over HTTP/1.1 a browser holds at most six connections per
  // origin, so the last four could neither stream nor poll; over HTTP/2 they share one.
  const CLIENTS = 10;
  await page.evaluate(async ({ src, url, n }) => {
    const { Switchboard } = await import(URL.createObjectURL(new Blob([src], { type: 'text/javascript' })));
    window.tabs = [];
    await Promise.all(Array.from({ length: n }, async (_, i) => {
      const c = new Switchboard({ url, getToken: () => window.token(i) });
      const tab = { c, seqs: [] };
      c.on('message', (m) => tab.seqs.push(m.seq));
      window.tabs.push(tab);
      await c.subscribe('h2');
    }));
  }, { src, url: tls.url, n: CLIENTS });
  const state = () => page.evaluate(() => window.tabs.map((t) => ({ transport: t.c.transport, seqs: t.seqs })));
  assert.deepEqual((await state()).map((t) => t.transport), Array(CLIENTS).fill('sse'), 'every client on SSE');
  assert.ok(tls.upgrades >= 1, 'WebSocket was tried first (and refused by the proxy)');
  const pub = client({ url: gw.url, user: 'pub' });
  const sent = await publishN(pub, 'h2', 5, 'h2');
  await until(async () => (await state()).every((t) => t.seqs.length >= 5), 10_000, 'every client got every message');
  for (const t of await state()) assert.deepEqual(t.seqs, sent);
  // A publish from the page goes over HTTP/2 too.
  const ack = await page.evaluate(() => window.tabs[0].c.publish('h2', { from: 'page' }));
  await until(async () => (await state()).every((t) => t.seqs.includes(ack.seq)), 10_000, 'the page publish reached every client');
  assert.ok((tls.versions.get('2.0') || 0) >= CLIENTS + 1, `requests over HTTP/2: ${[...tls.versions]}`);
  assert.equal(tls.versions.get('1.1') || 0, 0, `no request fell back to HTTP/1.1: ${[...tls.versions]}`);
  assert.deepEqual(errors, []);
  await page.evaluate(() => window.tabs.forEach((t) => t.c.close()));
  await page.close();
});
