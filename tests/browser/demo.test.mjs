// End-to-end: the real `roomcast demo` binary, its page (built on the SDK, served with it as
// /roomcast.js) in Debian's Chromium (playwright-core,
// no browser download). Run with `npm install && node --test` in this folder, after
// `cargo build` at the root. ROOMCAST_BIN overrides the binary, CHROMIUM the browser.

import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { existsSync } from 'node:fs';
import path from 'node:path';
import { createInterface } from 'node:readline';
import { chromium } from 'playwright-core';
import { targetDir } from './harness.mjs';

const BIN = process.env.ROOMCAST_BIN
  ? path.resolve(process.env.ROOMCAST_BIN)
  : path.join(targetDir(), 'debug/roomcast');
const CHROMIUM = process.env.CHROMIUM || '/usr/bin/chromium';
// Fixed, so a second server started on the same port accepts the page's token (reconnect test).
const SECRET = 'browser-test-secret-0123456789abcdef';

const STARTUP_MS = 30_000;
const EVENT_MS = 15_000;
const STOP_GRACE_MS = 5_000;

const servers = new Set();

/**
 * Starts `roomcast <mode>` (demo by default); resolves with its addresses once it logs
 * "listening".
 */
function startServer({ mode = 'demo', listen = '127.0.0.1:0', extra = [] } = {}) {
  assert.ok(existsSync(BIN), `no roomcast binary at ${BIN}: run \`cargo build\` first or set ROOMCAST_BIN`);
  const proc = spawn(BIN, [mode, '--listen', listen, '--admin-listen', '127.0.0.1:0', ...extra], {
    env: {
      ...process.env,
      ROOMCAST_LOG_FORMAT: 'json',
      ROOMCAST_LOG: 'info',
      ROOMCAST_JWT_SECRET: SECRET,
      ROOMCAST_DRAIN_SECONDS: '1',
      // Named, so the page's status line is known whatever the host is called.
      ROOMCAST_SERVER_NAME: 'roomcast-demo',
    },
    stdio: ['ignore', 'ignore', 'pipe'],
  });
  const server = { proc, logs: [], exited: null };
  servers.add(server);
  server.exited = new Promise((resolve) => proc.once('exit', (code, signal) => resolve({ code, signal })));
  const lines = createInterface({ input: proc.stderr });
  return new Promise((resolve, reject) => {
    const fail = (why) => {
      clearTimeout(timer);
      reject(new Error(`${why}\n--- roomcast stderr (last lines) ---\n${server.logs.slice(-30).join('\n')}`));
    };
    const timer = setTimeout(() => fail(`roomcast did not log "listening" within ${STARTUP_MS} ms`), STARTUP_MS);
    proc.once('error', (e) => fail(`cannot start ${BIN}: ${e.message}`));
    proc.once('exit', (code, signal) => fail(`roomcast exited early (code ${code}, signal ${signal})`));
    lines.on('line', (line) => {
      server.logs.push(line);
      if (server.logs.length > 500) server.logs.shift();
      let log;
      try {
        log = JSON.parse(line);
      } catch {
        return; // not every line is ours (e.g. a panic message)
      }
      if (log.message === 'listening' && log.public) {
        clearTimeout(timer);
        server.public = log.public;
        server.admin = log.admin;
        resolve(server);
      }
    });
  });
}

/** SIGTERM, then SIGKILL if still alive after the grace period. */
async function stopServer(server) {
  if (!server) return;
  const { proc } = server;
  if (proc.exitCode === null && proc.signalCode === null) {
    proc.kill('SIGTERM');
    const timedOut = Symbol('timeout');
    let timer;
    const done = await Promise.race([
      server.exited,
      new Promise((r) => { timer = setTimeout(() => r(timedOut), STOP_GRACE_MS); }),
    ]);
    clearTimeout(timer);
    if (done === timedOut) {
      proc.kill('SIGKILL');
      await Promise.race([server.exited, new Promise((r) => setTimeout(r, 2_000))]);
    }
  }
  servers.delete(server);
  return server.exited;
}

// Last resort if the runner dies between hooks.
process.on('exit', () => {
  for (const s of servers) if (s.proc.exitCode === null) s.proc.kill('SIGKILL');
});

const CONNECTED_42 = /connected as user 42\b/i;

/** Waits (bounded) for the status to match `re`. */
async function waitStatus(page, re, timeout = EVENT_MS) {
  try {
    await page.waitForFunction(
      ([src, flags]) => new RegExp(src, flags).test(document.getElementById('status')?.textContent ?? ''),
      [re.source, re.flags],
      { timeout, polling: 100 },
    );
  } catch (e) {
    const now = await page.locator('#status').textContent().catch(() => '?');
    throw new Error(`status never matched ${re} within ${timeout} ms; it reads: ${JSON.stringify(now)}`, { cause: e });
  }
}

const joinedRooms = (page) => page.$$eval('#rooms .room', (els) => els.map((e) => e.firstChild.textContent));

describe('demo page in Chromium', { timeout: 180_000 }, () => {
  let server;
  let browser;
  let context;
  let base;

  before(async () => {
    server = await startServer();
    base = `http://${server.public}/`;
    browser = await chromium.launch({
      executablePath: CHROMIUM,
      args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
        '--disable-background-networking', '--disable-component-update', '--disable-sync'],
      timeout: STARTUP_MS,
    });
  }, { timeout: 2 * STARTUP_MS });

  after(async () => {
    await context?.close().catch(() => {});
    await browser?.close().catch(() => {});
    await Promise.all([...servers].map(stopServer));
  }, { timeout: 30_000 });

  async function newPage() {
    await context?.close().catch(() => {});
    context = await browser.newContext({ viewport: { width: 1200, height: 800 } });
    const page = await context.newPage();
    page.setDefaultTimeout(EVENT_MS);
    page.setDefaultNavigationTimeout(EVENT_MS);
    const problems = [];
    page.on('pageerror', (e) => problems.push(`pageerror: ${e.message}`));
    const sockets = [];
    page.on('websocket', (ws) => sockets.push(ws.url()));
    return { page, problems, sockets };
  }

  test('connects with the embedded token and shows live events', { timeout: 60_000 }, async () => {
    const { page, problems, sockets } = await newPage();
    await page.goto(base);
    await waitStatus(page, CONNECTED_42);
    assert.match(await page.locator('#status').textContent(), /on server roomcast-demo/);

    await page.waitForFunction(
      () => [...document.querySelectorAll('.event')].some((e) => {
        const name = e.getAttribute('data-event') || '';
        return name === 'task:update' || name.startsWith('users.') || name.startsWith('rbac.');
      }),
      null,
      { timeout: EVENT_MS, polling: 100 },
    );
    const count = Number(await page.locator('#count').textContent());
    assert.ok(count >= 1, `count shows ${count}`);

    // The auto-joined room plus the two feature subscriptions.
    await page.waitForFunction(() => document.querySelectorAll('#rooms .room').length >= 3, null, { timeout: EVENT_MS });
    const rooms = await joinedRooms(page);
    for (const r of ['user:42', 'feature:users', 'feature:rbac']) assert.ok(rooms.includes(r), `${r} not in ${rooms}`);

    // The token goes as a subprotocol, never in the URL; the form's token field is hidden.
    assert.deepEqual(sockets.map((u) => new URL(u).pathname), ['/ws']);
    assert.ok(sockets.every((u) => !new URL(u).search), `token in URL: ${sockets}`);
    assert.equal(await page.locator('#token').isVisible(), false);
    assert.deepEqual(problems, []);

    // The page is an application of the SDK, which the same server serves.
    const bundle = await fetch(new URL('roomcast.js', base));
    assert.equal(bundle.status, 200);
    assert.equal(bundle.headers.get('content-type'), 'text/javascript; charset=utf-8');

    // At most 200 rows, whatever the rate.
    assert.ok((await page.locator('.event').count()) <= 200);
    await page.screenshot({ path: process.env.SCREENSHOT || path.join(process.env.TMPDIR || '/tmp', 'roomcast-demo.png') });
  });

  test('in serve mode it asks for a token, and connects with it', { timeout: 60_000 }, async () => {
    // `serve` embeds no token. No Kafka behind it (nothing listens on port 9): the WebSocket
    // side works all the same, only no event comes. The token is the demo page's own, signed
    // with the secret both servers share.
    const demoHtml = await (await fetch(base)).text();
    const token = /const EMBEDDED = "([^"]+)"/.exec(demoHtml)?.[1];
    assert.ok(token && token.split('.').length === 3, 'no token embedded in the demo page');
    const plain = await startServer({ mode: 'serve', extra: ['--brokers', '127.0.0.1:9'] });
    const plainBase = `http://${plain.public}/`;
    assert.ok(!(await (await fetch(plainBase)).text()).includes(token), 'serve mode embeds a token');

    const { page, problems, sockets } = await newPage();
    await page.goto(plainBase);
    assert.equal(await page.locator('#token').isVisible(), true);
    assert.equal(await page.locator('#connect').isVisible(), true);
    assert.match(await page.locator('#status').textContent(), /not connected/i);
    await page.waitForTimeout(500);
    assert.deepEqual(sockets, [], 'connected without being asked');

    // A bad token: refused at the handshake, and the page says so instead of retrying.
    await page.fill('#token', 'not.a.token');
    await page.click('#connect');
    await waitStatus(page, /could not connect/i);
    assert.equal(await page.locator('#token').isEnabled(), true);

    // The real one, with a room it may join and one it may not.
    await page.fill('#token', token);
    await page.fill('#room-input', 'task:t0, secret:1, secret:2');
    await page.click('#connect');
    await waitStatus(page, CONNECTED_42);
    await page.waitForFunction(() => document.getElementById('notice').textContent.includes('secret:2'), null, { timeout: EVENT_MS });
    assert.match(await page.locator('#notice').textContent(), /secret:1.*forbidden.*secret:2.*forbidden/);
    await page.waitForFunction(() => [...document.querySelectorAll('#rooms .room')].some((e) => e.firstChild.textContent === 'task:t0'), null, { timeout: EVENT_MS });
    const rooms = await joinedRooms(page);
    assert.ok(rooms.includes('user:42') && !rooms.some((r) => r.startsWith('secret:')), `rooms: ${rooms}`);
    assert.ok(sockets.every((u) => !u.includes(token) && !new URL(u).search), `token in a WebSocket URL: ${sockets}`);
    assert.deepEqual(problems, []);
    await context.close();
    context = null;
    await stopServer(plain);
  });

  test('reconnects and re-subscribes after the server drains and comes back', { timeout: 90_000 }, async () => {
    const { page, problems } = await newPage();
    // Keep every status the page shows: the 1001 one lasts only until the retry.
    await page.addInitScript(() => {
      window.__statuses = [];
      document.addEventListener('DOMContentLoaded', () => {
        const el = document.getElementById('status');
        const keep = () => window.__statuses.push(el.textContent);
        keep();
        new MutationObserver(keep).observe(el, { childList: true, characterData: true, subtree: true });
      });
    });
    await page.goto(base);
    await waitStatus(page, CONNECTED_42);
    await page.locator('.event').first().waitFor({ timeout: EVENT_MS });

    const port = new URL(base).port;
    await stopServer(server);
    await page.waitForFunction(() => window.__statuses.some((s) => /code 1001/.test(s)), null, { timeout: EVENT_MS });
    await page.evaluate(() => { window.__statuses.length = 0; });
    const before = Number(await page.locator('#count').textContent());

    server = await startServer({ listen: `127.0.0.1:${port}` });
    await waitStatus(page, CONNECTED_42, 45_000);
    await page.waitForFunction(
      () => ['feature:users', 'feature:rbac'].every((r) =>
        [...document.querySelectorAll('#rooms .room')].some((e) => e.firstChild.textContent === r)),
      null,
      { timeout: EVENT_MS },
    );
    await page.waitForFunction((n) => Number(document.getElementById('count').textContent) > n, before, { timeout: EVENT_MS });
    assert.deepEqual(problems, []);
  });
});
