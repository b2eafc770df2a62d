#!/usr/bin/env node
// End-to-end check of the chat demo page (gateway/static/index.html) in a real Chromium.
//
//   node tests/browser/demo.mjs http://127.0.0.1:PORT/
//
// Opens two pages, alice and bob, in the same fresh room (`?name=…&room=…` auto-connects and
// auto-joins), waits until each sees the other in #online, then alice sends a unique text
// (Enter in #text) that bob must see in #messages, and bob answers (#send button) to alice.
// Exit 0 on success, 1 on any failure. Env: CHROMIUM (browser binary, default /usr/bin/chromium),
// SCREENSHOT (optional path for a PNG of bob's page at the end).
import { chromium } from 'playwright-core';

const OVERALL_TIMEOUT_MS = 60_000;
const PRESENCE_TIMEOUT_MS = 15_000;
const DELIVERY_TIMEOUT_MS = 10_000;
const started = Date.now();
let browser = null;

const log = (line) => console.log(`[demo ${((Date.now() - started) / 1000).toFixed(1)}s] ${line}`);

async function fail(reason, pages = []) {
  console.error(`FAIL: ${reason}`);
  for (const [name, page] of pages) {
    try {
      const state = await page.evaluate(() => ({
        status: document.querySelector('#status')?.textContent,
        online: [...document.querySelectorAll('#online li')].map((li) => li.textContent.trim()),
        messages: [...document.querySelectorAll('#messages > *')].map((m) => m.textContent.trim()),
      }));
      console.error(`  ${name}: ${JSON.stringify(state)}`);
    } catch { /* page gone */ }
  }
  await Promise.race([browser?.close(), new Promise((r) => setTimeout(r, 3000))]).catch(() => {});
  process.exit(1);
}

const deadline = setTimeout(() => fail(`overall timeout of ${OVERALL_TIMEOUT_MS / 1000} s`), OVERALL_TIMEOUT_MS);

const base = process.argv[2];
if (!base || !/^https?:\/\//.test(base)) {
  console.error('usage: node tests/browser/demo.mjs http://127.0.0.1:PORT/');
  process.exit(1);
}

const suffix = `${Date.now().toString(36)}${Math.random().toString(36).slice(2, 6)}`;
const room = `e2e-${suffix}`;
const pageUrl = (name) => {
  const url = new URL(base);
  url.searchParams.set('name', name);
  url.searchParams.set('room', room);
  return url.href;
};

const pageErrors = [];
const pages = [];

async function openPage(name) {
  const context = await browser.newContext();
  const page = await context.newPage();
  page.on('pageerror', (err) => pageErrors.push(`${name}: ${err.message}`));
  page.on('console', (msg) => {
    if (msg.type() === 'error') log(`${name} console: ${msg.text()}`);
  });
  const response = await page.goto(pageUrl(name), { waitUntil: 'load', timeout: 15_000 });
  if (!response || !response.ok()) throw new Error(`GET ${pageUrl(name)} -> ${response?.status()}`);
  pages.push([name, page]);
  log(`${name}: page loaded (${page.url()})`);
  return page;
}

function waitOnline(page, user) {
  return page.waitForFunction(
    (u) => [...document.querySelectorAll('#online li')].some((li) => li.textContent.trim() === u),
    user, { timeout: PRESENCE_TIMEOUT_MS, polling: 100 });
}

function waitMessage(page, line) {
  return page.waitForFunction(
    (l) => [...document.querySelectorAll('#messages .msg')].some((m) => m.textContent.includes(l)),
    line, { timeout: DELIVERY_TIMEOUT_MS, polling: 100 });
}

async function step(description, fn) {
  try {
    await fn();
    log(`ok: ${description}`);
  } catch (err) {
    await fail(`${description}: ${err.message.split('\n')[0]}`, pages);
  }
}

const executablePath = process.env.CHROMIUM || '/usr/bin/chromium';
await step(`launch ${executablePath}`, async () => {
  browser = await chromium.launch({
    executablePath,
    headless: true,
    args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
      '--disable-background-networking', '--disable-component-update', '--disable-sync'],
    timeout: 30_000,
  });
});
log(`room: ${room}`);

let alice, bob;
await step('open alice and bob', async () => {
  [alice, bob] = await Promise.all([openPage('alice'), openPage('bob')]);
});
await step('alice is connected', () => alice.waitForSelector('#status[data-state="connected"]', { timeout: PRESENCE_TIMEOUT_MS }));
await step('bob is connected', () => bob.waitForSelector('#status[data-state="connected"]', { timeout: PRESENCE_TIMEOUT_MS }));
await step('alice sees bob online', () => waitOnline(alice, 'bob'));
await step('bob sees alice online', () => waitOnline(bob, 'alice'));

const hello = `hello bob ${suffix}`;
await step('alice sends (Enter)', async () => {
  await alice.fill('#text', hello);
  await alice.press('#text', 'Enter');
});
await step(`bob receives "alice: ${hello}"`, () => waitMessage(bob, `alice: ${hello}`));

const reply = `hi alice ${suffix}`;
await step('bob sends (#send)', async () => {
  await bob.fill('#text', reply);
  await bob.click('#send');
});
await step(`alice receives "bob: ${reply}"`, () => waitMessage(alice, `bob: ${reply}`));

if (process.env.SCREENSHOT) {
  await step(`screenshot ${process.env.SCREENSHOT}`, () => bob.screenshot({ path: process.env.SCREENSHOT }));
}
if (pageErrors.length) await fail(`uncaught page errors: ${pageErrors.join('; ')}`, pages);

await browser.close();
clearTimeout(deadline);
log('PASS');
process.exit(0);
