#!/usr/bin/env node
// Many Switchboard clients for a cross-process cluster test: Chromium pages and Node clients,
// each subscribed to one or two channels, spread over the gateways; they record every message
// the client delivers to the application.
//
//   node tests/browser/clients.mjs --urls ws://a/ws,ws://b/ws,ws://c/ws --channels c1,c2,c3 \
//        --pages 6 --node-clients 24 (--token-secret SECRET [--token-ttl 3600] | --anonymous)
//
// Client i (pages first, then Node clients) starts on gateway i % G and is given the whole
// list, starting there (the client moves to the next URL on every reconnect). It subscribes
// to channel i % C, and when i is odd also to channel (i + 1) % C (with C > 1). Each page is
// a tab of one headless Chromium (env CHROMIUM, default /usr/bin/chromium) that loaded
// switchboard.js from its gateway's http://host/switchboard.js (or, with --client-js PATH, that
// file in its place: to try a client newer than the gateway binary's embedded copy).
//
// stdout, one JSON object a line:
//   {"ready":true}                        once every client got the ack of each subscribe
//   after each line `report` on stdin, one line per client (what it was shown so far);
//   then, after the line `stop` on stdin (or stdin's end), one line per client:
//   {"client":"page-0","kind":"page","channels":[...],"received":[[channel,seq,epoch,id],...],
//    "gaps":[{channel,reason,from,position}],"reconnects":N}
// and exit 0 (a client that could not report gets {"client":..,"error":".."} and the exit
// status is 1). Failures before that: {"error":"..."} on stdout, details on stderr, exit 1.
// With --token-secret clients get HS256 JWTs (sub = client id, exp = now + --token-ttl s) from
// `getToken`, so a short ttl exercises refreshes and 4001 reconnects; --token-claims JSON adds
// claims (e.g. '{"iss":"me","aud":"sb"}' for --jwt-issuer/--jwt-audience).
import { createHmac } from 'node:crypto';
import { readFileSync } from 'node:fs';
import { createInterface } from 'node:readline';
import WebSocket from 'ws';
import { Switchboard } from '../../gateway/static/switchboard.js';

const READY_TIMEOUT_MS = Number(process.env.READY_TIMEOUT_MS || 60_000);
const started = Date.now();
const log = (line) => process.stderr.write(`[clients ${((Date.now() - started) / 1000).toFixed(1)}s] ${line}\n`);
const out = (v) => process.stdout.write(`${JSON.stringify(v)}\n`);
let browser = null;

async function die(reason) {
  out({ error: String(reason) });
  log(`FAIL: ${reason}`);
  await Promise.race([browser?.close(), new Promise((r) => setTimeout(r, 3000))]).catch(() => {});
  process.exit(1);
}

function parseArgs(argv) {
  const opts = { pages: 0, nodeClients: 0, tokenTtl: 3600, anonymous: false };
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i];
    const val = () => {
      if (i + 1 >= argv.length) throw new Error(`${a} needs a value`);
      return argv[++i];
    };
    if (a === '--urls') opts.urls = val().split(',').filter(Boolean);
    else if (a === '--channels') opts.channels = val().split(',').filter(Boolean);
    else if (a === '--pages') opts.pages = Number(val());
    else if (a === '--node-clients') opts.nodeClients = Number(val());
    else if (a === '--token-secret') opts.secret = val();
    else if (a === '--token-ttl') opts.tokenTtl = Number(val());
    else if (a === '--token-claims') opts.tokenClaims = JSON.parse(val());
    else if (a === '--anonymous') opts.anonymous = true;
    else if (a === '--client-js') opts.clientJs = val();
    else throw new Error(`unknown argument ${a}`);
  }
  if (!opts.urls?.length) throw new Error('--urls is required');
  if (!opts.channels?.length) throw new Error('--channels is required');
  if (!opts.secret && !opts.anonymous) throw new Error('--token-secret or --anonymous is required');
  for (const k of ['pages', 'nodeClients', 'tokenTtl']) {
    if (!Number.isInteger(opts[k]) || opts[k] < 0) throw new Error(`bad --${k}`);
  }
  return opts;
}

let opts;
try {
  opts = parseArgs(process.argv.slice(2));
} catch (err) {
  console.error(`usage: node tests/browser/clients.mjs --urls U1,U2 --channels C1,C2 --pages N --node-clients N (--token-secret S | --anonymous): ${err.message}`);
  process.exit(2);
}

const b64url = (v) => Buffer.from(JSON.stringify(v)).toString('base64url');
function token(sub) {
  const claims = { ...opts.tokenClaims, sub, exp: Math.floor(Date.now() / 1000) + opts.tokenTtl };
  const body = `${b64url({ alg: 'HS256', typ: 'JWT' })}.${b64url(claims)}`;
  return `${body}.${createHmac('sha256', opts.secret).update(body).digest('base64url')}`;
}

/** What client `i` gets: id, its URL list (starting at its gateway) and channels. */
function plan(i, kind, n) {
  const g = i % opts.urls.length;
  const urls = [...opts.urls.slice(g), ...opts.urls.slice(0, g)];
  const C = opts.channels.length;
  const channels = [opts.channels[i % C]];
  if (i % 2 === 1 && C > 1) channels.push(opts.channels[(i + 1) % C]);
  return { id: `${kind}-${n}`, kind, urls, channels };
}

/**
 * Runs in the page and in Node alike: makes the client, records what it delivers, subscribes
 * (again after a 'disconnected' failure: only acked subscriptions are renewed by the client).
 * Returns the recorder; `rec.ready` resolves when every channel was acked.
 */
function startClient(Switchboard, WebSocketImpl, spec, getToken) {
  const rec = { received: [], gaps: [], errors: [] };
  const client = new Switchboard({
    urls: spec.urls, WebSocket: WebSocketImpl, getToken, user: getToken ? undefined : spec.id,
  });
  client.on('message', (m) => rec.received.push([m.channel, m.seq, m.epoch, m.id]));
  client.on('gap', (g) => rec.gaps.push(g));
  client.on('error', (e) => { if (rec.errors.length < 50) rec.errors.push(`${e.code}: ${e.message}`); });
  // Retried until acked, but for refusals that cannot change.
  const FINAL = ['closed', 'forbidden', 'bad_channel', 'bad_request', 'too_many_subscriptions'];
  const subscribe = (channel) => client.subscribe(channel).catch((err) => {
    if (FINAL.includes(err.code)) throw new Error(`subscribe ${channel}: ${err.code}: ${err.message}`);
    const ms = err.code === 'disconnected' ? 100 : Math.max(250, err.retryAfterMs || 0);
    return new Promise((r) => setTimeout(r, ms)).then(() => subscribe(channel));
  });
  rec.ready = Promise.all(spec.channels.map(subscribe)).then(() => true);
  rec.client = client;
  rec.report = () => ({ received: rec.received, gaps: rec.gaps, reconnects: client.reconnects, errors: rec.errors });
  return rec;
}

const specs = [];
for (let n = 0; n < opts.pages; n++) specs.push(plan(specs.length, 'page', n));
for (let n = 0; n < opts.nodeClients; n++) specs.push(plan(specs.length, 'node', n));

const clientSrc = opts.clientJs ? readFileSync(opts.clientJs, 'utf8') : null;
const running = []; // {spec, report: async () => object, close: async () => void}

async function startPage(spec) {
  const page = await browser.newPage();
  page.on('pageerror', (err) => log(`${spec.id} page error: ${err.message}`));
  page.on('console', (msg) => {
    // "Failed to load resource": the page's favicon.ico (404).
    if (msg.type() === 'error' && !msg.text().startsWith('Failed to load resource')) log(`${spec.id} console: ${msg.text()}`);
  });
  if (opts.secret) await page.exposeFunction('switchboardToken', () => token(spec.id));
  // The page's own gateway serves it; another one of the list when that one is down.
  let loaded = null;
  for (const url of spec.urls) {
    const base = new URL(url);
    const script = `${base.protocol === 'wss:' ? 'https:' : 'http:'}//${base.host}/switchboard.js`;
    try {
      const response = await page.goto(script, { waitUntil: 'load', timeout: 15_000 });
      if (response?.ok()) { loaded = script; break; }
      log(`${spec.id}: GET ${script} -> ${response?.status()}`);
    } catch (err) {
      log(`${spec.id}: GET ${script}: ${err.message.split('\n')[0]}`);
    }
  }
  if (!loaded) throw new Error(`${spec.id}: no gateway served /switchboard.js`);
  await page.evaluate(async ({ spec, withToken, startSrc, clientSrc }) => {
    const module = clientSrc ? URL.createObjectURL(new Blob([clientSrc], { type: 'text/javascript' })) : '/switchboard.js';
    const { Switchboard } = await import(module);
    const startClient = (0, eval)(`(${startSrc})`);
    window.switchboardRec = startClient(Switchboard, WebSocket, spec, withToken ? () => window.switchboardToken() : undefined);
  }, { spec, withToken: !!opts.secret, startSrc: startClient.toString(), clientSrc });
  running.push({
    spec,
    ready: () => page.evaluate(() => window.switchboardRec.ready),
    report: () => page.evaluate(() => window.switchboardRec.report()),
    close: () => page.evaluate(() => window.switchboardRec.client.close()).catch(() => {}),
  });
}

function startNode(spec) {
  const rec = startClient(Switchboard, WebSocket, spec, opts.secret ? () => token(spec.id) : undefined);
  running.push({ spec, ready: () => rec.ready, report: async () => rec.report(), close: async () => rec.client.close() });
}

const readyTimer = setTimeout(() => die(`not ready within ${READY_TIMEOUT_MS / 1000} s`), READY_TIMEOUT_MS);

try {
  if (opts.pages > 0) {
    const { chromium } = await import('playwright-core');
    const executablePath = process.env.CHROMIUM || '/usr/bin/chromium';
    browser = await chromium.launch({
      executablePath,
      headless: true,
      args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
        '--disable-background-networking', '--disable-component-update', '--disable-sync',
        '--disable-background-timer-throttling', '--disable-renderer-backgrounding',
        '--disable-backgrounding-occluded-windows'],
      timeout: 30_000,
    });
    log(`launched ${executablePath}`);
  }
  for (const spec of specs) {
    if (spec.kind === 'node') startNode(spec);
  }
  await Promise.all(specs.filter((s) => s.kind === 'page').map(startPage));
  log(`${running.length} clients started`);
  await Promise.all(running.map((r) => r.ready()));
} catch (err) {
  await die(`start: ${err.message.split('\n')[0]}`);
}
clearTimeout(readyTimer);
out({ ready: true });
log('ready');

// One line per client; a client that cannot report (its page crashed) gets a line with
// `error` instead (and the exit status is then 1).
let failed = 0;
async function reportAll() {
  const reports = await Promise.all(running.map(async (r) => {
    try {
      return { r, report: await r.report() };
    } catch (err) {
      return { r, error: err.message.split('\n')[0] };
    }
  }));
  for (const { r, report, error } of reports) {
    const head = { client: r.spec.id, kind: r.spec.kind, channels: r.spec.channels };
    if (error) failed++;
    out(error ? { ...head, error } : { ...head, ...report });
  }
}

// `report`: every client's report so far (the clients go on); `stop` (or stdin's end): the
// final reports, then exit.
await new Promise((resolve) => {
  const lines = createInterface({ input: process.stdin });
  let queue = Promise.resolve();
  lines.on('line', (line) => {
    const cmd = line.trim();
    if (cmd === 'report') queue = queue.then(reportAll);
    else if (cmd === 'stop') queue.then(resolve);
  });
  lines.on('close', () => queue.then(resolve));
});
log('stop');
failed = 0;
await reportAll();
await Promise.race([Promise.all(running.map((r) => r.close())), new Promise((r) => setTimeout(r, 3000))]).catch(() => {});
await Promise.race([browser?.close(), new Promise((r) => setTimeout(r, 5000))]).catch(() => {});
process.exit(failed ? 1 : 0);
