// Node tests of gateway/static/switchboard.js: resumption, gaps, duplicates, tokens.
//
//   node --test tests/browser/resume.mjs        (after `cargo build -p gateway --bins`)
//
// Runs the real gateway binary (target/debug/gateway, or $GATEWAY_BIN) and the client in
// Node with the `ws` package; the duplicate and first-message/refresh cases use a scripted
// WebSocket server, and the refresh case also runs against the binary when it supports it.
import { test, after } from 'node:test';
import assert from 'node:assert/strict';
import WebSocket, { WebSocketServer } from 'ws';
import { existsSync, readFileSync } from 'node:fs';
import { Switchboard } from '../../gateway/static/switchboard.js';
import { startGateway, startProxy, jwt, now, sleep, until, next } from './harness.mjs';

const SECRET = 'resume-test-secret';
const FAST = ['--publish-rate', '100000', '--publish-burst', '100000'];
const cleanup = [];
after(async () => { for (const fn of cleanup.reverse()) await fn(); });

function client(opts) {
  const c = new Switchboard({ WebSocket, ...opts });
  cleanup.push(() => c.close());
  return c;
}

/** Records what the application sees: messages per channel, gaps, reconnects. */
function record(c) {
  const log = { messages: [], gaps: [], closes: 0 };
  c.on('message', (m) => log.messages.push(m));
  c.on('gap', (g) => log.gaps.push(g));
  c.on('close', () => log.closes++);
  return log;
}

async function publishN(pub, channel, n, tag, pad = '') {
  const seqs = [];
  for (let i = 0; i < n; i++) {
    const ack = await pub.publish(channel, pad ? { tag, i, pad } : { tag, i });
    seqs.push(ack.seq);
    await pub.publish('noise', i); // other channels take the seqs in between
  }
  return seqs;
}

const seqsOf = (log, channel) => log.messages.filter((m) => m.channel === channel).map((m) => m.seq);

async function gateway(args) {
  const gw = await startGateway(['--anonymous', '--jwt-hs256-secret', SECRET, ...FAST, ...args]);
  cleanup.push(() => gw.stop());
  return gw;
}

async function proxyTo(gw) {
  const p = await startProxy(gw.client);
  cleanup.push(() => p.close());
  return p;
}

/** Cuts the client's connection and keeps it down while `whileDown` runs. */
async function outage(proxy, c, whileDown) {
  proxy.down = true;
  const closed = next(c, 'close');
  proxy.cut();
  await closed;
  try { return await whileDown(); } finally { proxy.down = false; }
}

test('resume after a cut connection: exactly the missed messages, once, in order; getToken on reconnect', async () => {
  const gw = await gateway([]);
  const proxy = await proxyTo(gw);
  let tokens = 0;
  const getToken = async () => (tokens++, jwt(SECRET, { sub: 'alice', exp: now() + 600 }));
  const sub = client({ url: proxy.url, getToken });
  const log = record(sub);
  const pub = client({ url: gw.url, user: 'pub' });
  const ack = await sub.subscribe('room:1');
  assert.ok(ack.position?.epoch, `ack has a position: ${JSON.stringify(ack)}`);
  assert.equal(sub.welcome.user, 'alice', 'authenticated with the token, not anonymous');
  assert.deepEqual(sub.position('room:1'), ack.position);

  const before = await publishN(pub, 'room:1', 3, 'before');
  await until(() => seqsOf(log, 'room:1').length === 3, 5000, 'the first 3 messages');
  const tokensBefore = tokens;
  const away = await outage(proxy, sub, () => publishN(pub, 'room:1', 40, 'away'));
  const welcomed = await next(sub, 'welcome');
  assert.equal(welcomed.user, 'alice');
  // Publishes going on while the recovery runs come after it, once.
  const during = await publishN(pub, 'room:1', 20, 'during');
  const want = [...before, ...away, ...during];
  await until(() => seqsOf(log, 'room:1').length >= want.length, 10_000, `${want.length} messages`);
  await sleep(200); // nothing more may come
  assert.deepEqual(seqsOf(log, 'room:1'), want, 'every message once, in order');
  assert.deepEqual(log.gaps, []);
  assert.ok(tokens > tokensBefore, `getToken called for the reconnect (${tokensBefore} -> ${tokens})`);
  assert.equal(sub.reconnects >= 1, true);
  const last = log.messages.at(-1);
  assert.deepEqual(sub.position('room:1'), { seq: last.seq, epoch: last.epoch });

  // history(): the newest, then a page after a position.
  const h = await sub.history('room:1', { limit: 5 });
  assert.equal(h.type, 'history');
  assert.deepEqual(h.messages.map((m) => m.seq), want.slice(-5));
  const page = await sub.history('room:1', { since: { seq: before[0], epoch: last.epoch }, limit: 4 });
  assert.deepEqual(page.messages.map((m) => m.seq), want.slice(1, 5));
  assert.equal(page.more, true);
  await assert.rejects(sub.history('room:1', { limit: 0 }), (err) => err.code === 'bad_request');
});

test('a connection cut again during the recovery resumes from the last message delivered', async (t) => {
  const gw = await gateway([]);
  const proxy = await proxyTo(gw);
  const sub = client({ url: proxy.url, user: 'erin' });
  const log = record(sub);
  const pub = client({ url: gw.url, user: 'pub' });
  await sub.subscribe('big');
  const first = await publishN(pub, 'big', 1, 'first');
  await until(() => seqsOf(log, 'big').length === 1, 5000, 'the first message');
  // Cut again (from the message handler) once part of the recovery arrived.
  let partial = 0;
  let cutDone;
  const cut = new Promise((r) => { cutDone = r; });
  let atClose = 0;
  const cutter = (m) => {
    if (m.channel !== 'big' || seqsOf(log, 'big').length < 20 || partial) return;
    partial = seqsOf(log, 'big').length;
    proxy.down = true;
    proxy.cut();
    next(sub, 'close').then(() => { atClose = seqsOf(log, 'big').length; }).then(() => sleep(100)).then(() => { proxy.down = false; cutDone(); });
  };
  const away = await outage(proxy, sub, () => publishN(pub, 'big', 400, 'away', 'x'.repeat(8000)));
  sub.on('message', cutter);
  await cut;
  const want = [...first, ...away];
  await until(() => sub.reconnects >= 2 && seqsOf(log, 'big').length >= want.length, 15_000, `${want.length} messages`);
  await sleep(200);
  t.diagnostic(`cut after ${partial} messages, ${atClose} of ${want.length} delivered at the close`);
  assert.deepEqual(seqsOf(log, 'big'), want, `once, in order (cut after ${partial}, ${atClose} at the close)`);
  assert.deepEqual(log.gaps, []);
});

test('a short-lived token: refreshed, or after the 4001 close a fresh one and a resume, no gap', async () => {
  const gw = await gateway([]);
  let tokens = 0;
  const getToken = () => (tokens++, jwt(SECRET, { sub: 'frank', exp: now() + 3 }));
  const sub = client({ url: gw.url, getToken });
  const log = record(sub);
  const closes = [];
  sub.on('close', (c) => closes.push(c.code));
  const pub = client({ url: gw.url, user: 'pub' });
  await sub.subscribe('t');
  const want = [];
  for (let i = 0; i < 10; i++) { // 5 s: past the first token's expiry
    want.push(...(await publishN(pub, 't', 1, 'tick')));
    await sleep(500);
  }
  await until(() => seqsOf(log, 't').length >= want.length, 5000, `${want.length} messages`);
  assert.deepEqual(seqsOf(log, 't'), want);
  assert.deepEqual(log.gaps, []);
  assert.ok(tokens >= 2, `getToken calls: ${tokens}`);
  assert.ok(closes.every((c) => c === 4001), `closes: ${closes}`);
  assert.equal(sub.welcome.user, 'frank');
});

test('a gap event when the history window was exceeded, then the live stream goes on', async () => {
  const gw = await gateway(['--history', '*=5/1h']);
  const proxy = await proxyTo(gw);
  const sub = client({ url: proxy.url, user: 'bob' });
  const log = record(sub);
  const pub = client({ url: gw.url, user: 'pub' });
  await sub.subscribe('c');
  const first = await publishN(pub, 'c', 1, 'first');
  await until(() => seqsOf(log, 'c').length === 1, 5000, 'the first message');
  const from = sub.position('c');
  assert.equal(from.seq, first[0]);
  const gapSeen = next(sub, 'gap');
  await outage(proxy, sub, () => publishN(pub, 'c', 12, 'lost'));
  const gap = await gapSeen;
  assert.equal(gap.channel, 'c');
  assert.ok(['too_old', 'too_many'].includes(gap.reason), `reason: ${gap.reason}`);
  assert.deepEqual(gap.from, from);
  assert.ok(gap.position && gap.position.seq > from.seq, `new position ${JSON.stringify(gap.position)}`);
  assert.deepEqual(sub.position('c'), gap.position);
  const live = await publishN(pub, 'c', 3, 'live');
  await until(() => seqsOf(log, 'c').length === 4, 5000, 'the live messages');
  assert.deepEqual(seqsOf(log, 'c'), [...first, ...live], 'nothing of the lost span, the live ones once');
  assert.equal(log.gaps.length, 1);
});

test('a list of URLs: the client moves to the next gateway; another epoch is a gap', async () => {
  const [a, b] = [await gateway([]), await gateway([])];
  const [pa, pb] = [await proxyTo(a), await proxyTo(b)];
  const sub = client({ urls: [pa.url, pb.url], user: 'carol' });
  const log = record(sub);
  await sub.subscribe('x');
  const pubA = client({ url: a.url, user: 'pub' });
  await publishN(pubA, 'x', 2, 'a');
  await until(() => seqsOf(log, 'x').length === 2, 5000, 'messages from a');
  const gapSeen = next(sub, 'gap');
  pa.down = true;
  pa.cut();
  const gap = await gapSeen;
  assert.equal(gap.reason, 'epoch_changed');
  assert.equal(sub.url, pb.url);
  const pubB = client({ url: b.url, user: 'pub' });
  const onB = await publishN(pubB, 'x', 2, 'b');
  await until(() => seqsOf(log, 'x').length === 4, 5000, 'messages from b');
  assert.deepEqual(seqsOf(log, 'x').slice(2), onB);
});

/** A scripted server: `handler(ws, req)` per connection. */
async function fakeServer(handler) {
  const wss = new WebSocketServer({ host: '127.0.0.1', port: 0, handleProtocols: (set) => (set.has('switchboard.v1') ? 'switchboard.v1' : false) });
  wss.on('connection', handler);
  await new Promise((r) => wss.once('listening', r));
  cleanup.push(() => new Promise((r) => { for (const ws of wss.clients) ws.terminate(); wss.close(() => r()); }));
  return `ws://127.0.0.1:${wss.address().port}/ws`;
}

const send = (ws, v) => ws.send(JSON.stringify(v));
const onFrames = (ws, fn) => ws.on('message', (data) => fn(JSON.parse(String(data))));

test('duplicates are dropped by position; the resume uses the last delivered one', async () => {
  const subscribes = [];
  let conns = 0;
  const url = await fakeServer((ws) => {
    const n = ++conns;
    send(ws, { type: 'welcome', user: 'u', conn_id: `c${n}` });
    onFrames(ws, (f) => {
      if (f.op !== 'subscribe') return;
      subscribes.push(f);
      if (n === 1) {
        send(ws, { type: 'ack', ref: f.ref, channel: 'd', position: { seq: 10, epoch: 'e' } });
        for (const [seq, epoch] of [[9, 'e'], [11, 'e'], [12, 'e'], [12, 'e'], [11, 'e'], [13, 'e'], [1, 'f'], [1, 'f']]) {
          send(ws, { type: 'message', channel: 'd', id: `${epoch}${seq}`, seq, epoch, data: null });
        }
        setTimeout(() => ws.terminate(), 100);
      } else {
        send(ws, { type: 'ack', ref: f.ref, channel: 'd', position: { seq: 3, epoch: 'f' }, recovered: true });
        for (const seq of [1, 2, 3]) send(ws, { type: 'message', channel: 'd', id: `f${seq}`, seq, epoch: 'f', data: null });
      }
    });
  });
  const c = client({ url });
  const log = record(c);
  await c.subscribe('d');
  await until(() => log.messages.length === 6, 5000, '6 messages');
  assert.deepEqual(log.messages.map((m) => m.id), ['e11', 'e12', 'e13', 'f1', 'f2', 'f3']);
  assert.equal(subscribes.length, 2);
  assert.equal(subscribes[0].since, undefined);
  assert.deepEqual(subscribes[1].since, { seq: 1, epoch: 'f' });
  assert.deepEqual(c.position('d'), { seq: 3, epoch: 'f' });
  assert.deepEqual(log.gaps, []);
});

/** A scripted gateway whose resumptions are answered `unavailable` `failures` times. */
async function flakyHistory(failures) {
  const subscribes = [];
  let conns = 0;
  const msg = (seq) => ({ type: 'message', channel: 'h', id: `m${seq}`, seq, epoch: 'e', data: null });
  const url = await fakeServer((ws) => {
    const n = ++conns;
    send(ws, { type: 'welcome', user: 'u' });
    onFrames(ws, (f) => {
      if (f.op === 'unsubscribe') return send(ws, { type: 'ack', ref: f.ref, channel: 'h' });
      if (f.op !== 'subscribe') return;
      subscribes.push(f);
      if (n === 1) {
        send(ws, { type: 'ack', ref: f.ref, channel: 'h', position: { seq: 5, epoch: 'e' } });
        send(ws, msg(6));
        setTimeout(() => ws.terminate(), 100);
      } else if (subscribes.length - 1 <= failures) {
        send(ws, { type: 'ack', ref: f.ref, channel: 'h', position: { seq: 9, epoch: 'e' }, recovered: false, reason: 'unavailable' });
        send(ws, msg(10)); // live after the ack: held, then recovered
        send(ws, msg(11));
      } else {
        send(ws, { type: 'ack', ref: f.ref, channel: 'h', position: { seq: 11, epoch: 'e' }, recovered: true });
        for (const seq of [7, 8, 9, 10, 11, 12]) send(ws, msg(seq));
      }
    });
  });
  return { url, subscribes };
}

test('a recovery answered unavailable is tried again with the same since, live messages held', async () => {
  const { url, subscribes } = await flakyHistory(2);
  const c = client({ url });
  const log = record(c);
  await c.subscribe('h');
  await until(() => log.messages.length >= 7, 10_000, '7 messages');
  await sleep(100);
  assert.deepEqual(log.messages.map((m) => m.seq), [6, 7, 8, 9, 10, 11, 12]);
  assert.deepEqual(log.gaps, []);
  assert.deepEqual(subscribes.map((f) => f.since?.seq ?? null), [null, 6, 6, 6]);
  assert.deepEqual(c.subscriptions, ['h']);
});

test('a recovery still unavailable after recoveryRetries is a gap; the live stream goes on', async () => {
  const { url, subscribes } = await flakyHistory(Infinity);
  const c = client({ url, recoveryRetries: 1 });
  const log = record(c);
  await c.subscribe('h');
  const gap = await next(c, 'gap', () => true, 5000);
  assert.deepEqual(gap, { channel: 'h', reason: 'unavailable', from: { seq: 6, epoch: 'e' }, position: { seq: 9, epoch: 'e' } });
  await until(() => log.messages.length >= 3, 5000, 'the live messages');
  assert.deepEqual(log.messages.map((m) => m.seq), [6, 10, 11]);
  assert.equal(subscribes.length, 3);
});

test('token in the first message, refresh before expiry, fresh token after 4001 (scripted server)', async () => {
  const conns = [];
  const url = await fakeServer((ws, req) => {
    const conn = { protocol: req.headers['sec-websocket-protocol'], url: req.url, frames: [] };
    conns.push(conn);
    onFrames(ws, (f) => {
      conn.frames.push(f);
      if (f.op === 'connect') send(ws, { type: 'welcome', ref: f.ref, user: 'u', expires_at: now() + 7 });
      if (f.op === 'refresh') {
        send(ws, { type: 'ack', ref: f.ref, expires_at: now() + 3600 });
        setTimeout(() => ws.close(4001, 'token expired'), 100);
      }
    });
  });
  let n = 0;
  const c = client({ url, getToken: async () => `t${++n}` });
  const refreshed = await next(c, 'refresh', () => true, 8000);
  assert.ok(refreshed.expires_at > now() + 3000);
  assert.equal(conns[0].protocol, undefined, 'no token in the upgrade');
  assert.doesNotMatch(conns[0].url, /token/);
  assert.deepEqual(conns[0].frames.map((f) => [f.op, f.token]), [['connect', 't1'], ['refresh', 't2']]);
  await until(() => conns.length === 2 && conns[1].frames.length, 5000, 'reconnect after 4001');
  assert.deepEqual(conns[1].frames[0].op, 'connect');
  assert.equal(conns[1].frames[0].token, 't3');
});

test('a connection that went silent is dropped after a ping without answer, and resumed', async () => {
  const conns = [];
  const url = await fakeServer((ws) => {
    const conn = { frames: [] };
    conns.push(conn);
    send(ws, { type: 'welcome', user: 'u', heartbeat_ms: 200, heartbeat_timeout_ms: 200 });
    onFrames(ws, (f) => {
      conn.frames.push(f);
      if (f.op === 'subscribe') {
        send(ws, { type: 'ack', ref: f.ref, channel: 's', position: { seq: 1, epoch: 'e' } });
        send(ws, { type: 'message', channel: 's', id: 'm2', seq: 2, epoch: 'e', data: null });
      }
      // The first connection then says nothing, answers no ping: a dead network.
      if (f.op === 'ping' && conns.length > 1) send(ws, { type: 'pong', ref: f.ref });
    });
  });
  const c = client({ url });
  const pongs = [];
  c.on('pong', (p) => pongs.push(p));
  const closed = next(c, 'close', () => true, 5000);
  await c.subscribe('s');
  const close = await closed;
  assert.equal(close.code, 4000);
  assert.equal(close.willReconnect, true);
  await until(() => conns.length === 2 && conns[1].frames.some((f) => f.op === 'subscribe'), 5000, 'the resume');
  assert.ok(conns[0].frames.some((f) => f.op === 'ping'), 'a ping before giving up');
  assert.deepEqual(conns[1].frames.find((f) => f.op === 'subscribe').since, { seq: 2, epoch: 'e' });
  await sleep(700); // answered pings keep the second connection
  assert.equal(conns.length, 2);
  assert.equal(c.state, 'open');
  assert.deepEqual(pongs, [], 'the watchdog pongs are not events');
});

test('refresh against the gateway binary (skipped when it has no `connect`/`refresh`)', async (t) => {
  const gw = await startGateway(['--jwt-hs256-secret', SECRET]);
  cleanup.push(() => gw.stop());
  const supported = await new Promise((resolve) => {
    const ws = new WebSocket(gw.url); // no token: refused (401) unless `connect` is supported
    ws.on('open', () => { ws.terminate(); resolve(true); });
    ws.on('error', () => resolve(false));
  });
  if (!supported) return t.skip('this gateway predates connect/refresh');
  let n = 0;
  const getToken = () => jwt(SECRET, { sub: 'dave', exp: now() + 8, n: ++n });
  const c = client({ url: gw.url, getToken });
  const welcome = await next(c, 'welcome');
  assert.equal(welcome.user, 'dave');
  assert.ok(welcome.ref != null, 'welcomed after a connect message');
  const refreshed = await next(c, 'refresh', () => true, 8000);
  assert.ok(refreshed.expires_at >= welcome.expires_at);
  assert.equal(c.state, 'open');
  await c.subscribe('r');
  const r = await c.ping();
  assert.ok(r >= 0);
});

test('in Chromium: the page client resumes after a cut connection, once and in order', async (t) => {
  let chromium;
  try {
    ({ chromium } = await import('playwright-core'));
  } catch {
    return t.skip('playwright-core is not installed');
  }
  const executablePath = process.env.CHROMIUM || '/usr/bin/chromium';
  if (!existsSync(executablePath)) return t.skip(`no browser at ${executablePath}`);
  const gw = await gateway([]);
  const proxy = await proxyTo(gw);
  const browser = await chromium.launch({
    executablePath, headless: true, timeout: 30_000,
    args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run'],
  });
  cleanup.push(() => browser.close());
  const page = await browser.newPage();
  const errors = [];
  page.on('pageerror', (err) => errors.push(err.message));
  await page.exposeFunction('token', () => jwt(SECRET, { sub: 'grace', exp: now() + 600 }));
  await page.goto(gw.http.replace(/\/$/, '/switchboard.js'));
  // This file's client (the binary embeds the copy it was built with).
  const src = readFileSync(new URL('../../gateway/static/switchboard.js', import.meta.url), 'utf8');
  await page.evaluate(async ({ src, url }) => {
    const { Switchboard } = await import(URL.createObjectURL(new Blob([src], { type: 'text/javascript' })));
    const c = new Switchboard({ url, getToken: () => window.token() });
    window.rec = { seqs: [], gaps: [], users: [] };
    c.on('message', (m) => window.rec.seqs.push(m.seq));
    c.on('gap', (g) => window.rec.gaps.push(g));
    c.on('welcome', (w) => window.rec.users.push(w.user));
    window.client = c;
    await c.subscribe('web');
  }, { src, url: proxy.url });
  const pub = client({ url: gw.url, user: 'pub' });
  const rec = () => page.evaluate(() => ({ ...window.rec, reconnects: window.client.reconnects }));
  const before = await publishN(pub, 'web', 3, 'before');
  await until(async () => (await rec()).seqs.length === 3, 5000, 'the first messages in the page');
  proxy.down = true;
  proxy.cut();
  await until(async () => (await page.evaluate(() => window.client.state)) !== 'open', 5000, 'the page to see the cut');
  const away = await publishN(pub, 'web', 30, 'away');
  proxy.down = false;
  await until(async () => (await rec()).seqs.length >= 33, 15_000, 'the recovery in the page');
  await sleep(200);
  const r = await rec();
  assert.deepEqual(r.seqs, [...before, ...away]);
  assert.deepEqual(r.gaps, []);
  assert.ok(r.reconnects >= 1);
  assert.ok(r.users.every((u) => u === 'grace'), `welcomed as ${r.users}`);
  assert.deepEqual(errors, []);
});
