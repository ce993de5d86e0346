// The test bed of the SDK's browser tests: real `roomcast serve` processes (a config file each),
// the real Kafka broker of ROOMCAST_TEST_BROKERS (topics and records through
// examples/kafka_feed.rs, librdkafka like the service), tokens signed here with the config's
// secret, a small site serving the test pages, the SDK bundle and a token endpoint, and
// Debian's Chromium through playwright-core. ROOMCAST_BIN, ROOMCAST_FEED, ROOMCAST_SDK_BUNDLE and
// CHROMIUM override where the binary, the feed, the SDK bundle and the browser are.

import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { createHmac } from 'node:crypto';
import { existsSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { createServer } from 'node:http';
import { tmpdir } from 'node:os';
import { execFileSync } from 'node:child_process';
import path from 'node:path';
import { createInterface } from 'node:readline';
import { fileURLToPath } from 'node:url';
import { chromium } from 'playwright-core';

const here = path.dirname(fileURLToPath(import.meta.url));
const root = path.resolve(here, '../..');

/** Where cargo builds, as cargo resolves it (CARGO_TARGET_DIR, a cargo config, or target/). */
export function targetDir() {
  return execFileSync(path.join(root, 'scripts/target-dir'), { encoding: 'utf8' }).trim();
}

export const BIN = process.env.ROOMCAST_BIN
  ? path.resolve(process.env.ROOMCAST_BIN)
  : path.join(targetDir(), 'debug/roomcast');
export const FEED = process.env.ROOMCAST_FEED
  ? path.resolve(process.env.ROOMCAST_FEED)
  : path.join(targetDir(), 'debug/examples/kafka_feed');
export const SDK_BUNDLE = process.env.ROOMCAST_SDK_BUNDLE
  ? path.resolve(process.env.ROOMCAST_SDK_BUNDLE)
  : path.join(root, 'client/dist/roomcast.js');
export const CHROMIUM = process.env.CHROMIUM || '/usr/bin/chromium';
export const SECRET = 'browser-sdk-test-secret-0123456789abcdef';
export const TENANT = 'acme';

export const STARTUP_MS = 30_000;
/** How long anything the page should see may take to arrive: generous, never a speed. */
export const EVENT_MS = 30_000;

export function brokers() {
  const b = process.env.ROOMCAST_TEST_BROKERS;
  assert.ok(b, 'ROOMCAST_TEST_BROKERS is not set: run through scripts/test, or start a broker with scripts/kafka.sh');
  return b;
}

let counter = 0;
/** A name no other test (or earlier run) uses: topics and replica names. */
export function unique(prefix) {
  counter += 1;
  return `e2e-${prefix}-${process.pid}-${counter}-${Date.now()}`;
}

export const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

const base64url = (data) => Buffer.from(data).toString('base64url');

/** An HS256 JWT, as a backend holding the config's secret would mint it. */
export function sign(claims, secret = SECRET) {
  const head = base64url(JSON.stringify({ alg: 'HS256', typ: 'JWT' }));
  const body = base64url(JSON.stringify(claims));
  const mac = createHmac('sha256', secret).update(`${head}.${body}`).digest('base64url');
  return `${head}.${body}.${mac}`;
}

/** A connection token of user `sub` in the test tenant, valid for `ttl` seconds. */
export function token({ sub = '42', ttl = 3600, rooms = ['feature:**'] } = {}) {
  const now = Math.floor(Date.now() / 1000);
  return sign({ sub, tenant: TENANT, rooms, iat: now, exp: now + ttl });
}

/** The default entity route, on a test's own topic. */
export function entityRoute(topic) {
  return `
[[route]]
topic = "${topic}"
event = "{feature}.{entity}.{action}"
rooms = ["feature:{feature}", "feature:{feature}:entity:{entity}", "{entity}:{data.id}"]
priority = "{meta.priority}"
tenant = "{meta.tenantId}"
`;
}

/** A record of the entity route's shape, in the test tenant. */
export function entityRecord(feature, entity, action, data) {
  return { feature, entity, action, data, meta: { tenantId: TENANT, priority: 'normal' } };
}

// --- Kafka ---------------------------------------------------------------------------------

/** One `kafka_feed` process: commands in, acknowledgements out, in order. */
export class Kafka {
  static start() {
    assert.ok(existsSync(FEED), `no ${FEED}: run \`cargo build --examples\` first or set ROOMCAST_FEED`);
    return new Kafka(spawn(FEED, [brokers()], { stdio: ['pipe', 'pipe', 'inherit'] }));
  }

  constructor(proc) {
    this.proc = proc;
    this.waiting = [];
    this.exited = new Promise((resolve) => proc.once('exit', resolve));
    proc.once('exit', (code) => {
      for (const w of this.waiting.splice(0)) w.reject(new Error(`kafka_feed exited (${code})`));
    });
    createInterface({ input: proc.stdout }).on('line', (line) => {
      const w = this.waiting.shift();
      const answer = JSON.parse(line);
      if (answer.ok) w?.resolve(answer);
      else w?.reject(new Error(`kafka_feed: ${answer.error}`));
    });
  }

  command(cmd) {
    return new Promise((resolve, reject) => {
      this.waiting.push({ resolve, reject });
      this.proc.stdin.write(`${JSON.stringify(cmd)}\n`);
    });
  }

  createTopic(topic, partitions = 1) {
    return this.command({ op: 'create', topic, partitions });
  }

  /** Produces `value` (JSON-encoded unless a string); resolves with {partition, offset}. */
  produce(topic, value, { partition, headers } = {}) {
    const text = typeof value === 'string' ? value : JSON.stringify(value);
    return this.command({ op: 'produce', topic, partition, value: text, headers });
  }

  async stop() {
    this.proc.stdin.end();
    await Promise.race([this.exited, sleep(5_000)]);
    if (this.proc.exitCode === null) this.proc.kill('SIGKILL');
  }
}

// --- roomcast ------------------------------------------------------------------------------

const running = new Set();
process.on('exit', () => {
  for (const p of running) if (p.exitCode === null && p.signalCode === null) p.kill('SIGKILL');
});

/**
 * A `roomcast serve` replica with a config file of its own. `restart()` starts it again on
 * the same port, with the same name (so the same consumer group), as a supervisor would.
 */
export class Roomcast {
  static async start(options) {
    const server = new Roomcast(options);
    await server.launch('127.0.0.1:0');
    return server;
  }

  constructor({ routes, extra = '', name = unique('replica') }) {
    this.routes = routes;
    this.extra = extra;
    this.name = name;
    this.dir = mkdtempSync(path.join(tmpdir(), 'roomcast-e2e-'));
    this.logs = [];
  }

  config(listen) {
    return `
[server]
listen = "${listen}"
admin_listen = "127.0.0.1:0"
name = "${this.name}"
drain_seconds = 1.0

[kafka]
brokers = "${brokers()}"
metadata_refresh_seconds = 1

[auth]
secret = "${SECRET}"
leeway_seconds = 0
${this.extra}
${this.routes}
`;
  }

  async launch(listen) {
    assert.ok(existsSync(BIN), `no roomcast binary at ${BIN}: run \`cargo build\` first or set ROOMCAST_BIN`);
    const file = path.join(this.dir, 'roomcast.toml');
    writeFileSync(file, this.config(listen));
    const proc = spawn(BIN, ['serve', '--config', file], {
      env: { ...process.env, ROOMCAST_LOG_FORMAT: 'json', ROOMCAST_LOG: 'info,rdkafka=warn' },
      stdio: ['ignore', 'ignore', 'pipe'],
    });
    running.add(proc);
    this.proc = proc;
    this.exited = new Promise((resolve) => proc.once('exit', (code, signal) => {
      running.delete(proc);
      resolve({ code, signal });
    }));
    const addrs = await this.listening(proc);
    this.public = addrs.public;
    this.admin = addrs.admin;
    await this.ready();
  }

  listening(proc) {
    const lines = createInterface({ input: proc.stderr });
    return new Promise((resolve, reject) => {
      const fail = (why) => {
        clearTimeout(timer);
        reject(new Error(`${why}\n--- roomcast stderr (last lines) ---\n${this.logs.slice(-30).join('\n')}`));
      };
      const timer = setTimeout(() => fail(`roomcast did not log "listening" within ${STARTUP_MS} ms`), STARTUP_MS);
      proc.once('error', (e) => fail(`cannot start ${BIN}: ${e.message}`));
      proc.once('exit', (code, signal) => fail(`roomcast exited early (code ${code}, signal ${signal})`));
      lines.on('line', (line) => {
        this.logs.push(line);
        if (this.logs.length > 500) this.logs.shift();
        let log;
        try {
          log = JSON.parse(line);
        } catch {
          return;
        }
        if (log.message === 'listening' && log.public) {
          clearTimeout(timer);
          resolve({ public: log.public, admin: log.admin });
        }
      });
    });
  }

  /** Waits until the replica reads its partitions up to their head (`/readyz`). */
  async ready() {
    const deadline = Date.now() + STARTUP_MS;
    for (;;) {
      const ok = await fetch(`http://${this.admin}/readyz`).then((r) => r.ok, () => false);
      if (ok) return;
      assert.ok(Date.now() < deadline, `replica ${this.name} never became ready`);
      await sleep(100);
    }
  }

  get url() {
    return `ws://${this.public}/ws`;
  }

  get port() {
    return Number(this.public.split(':').pop());
  }

  /** SIGKILL: no drain, no close frames, sockets reset. */
  async kill9() {
    this.proc.kill('SIGKILL');
    await this.exited;
  }

  async restart() {
    await this.launch(`127.0.0.1:${this.port}`);
  }

  /** SIGTERM (a drain), then SIGKILL if it is still there after a while. */
  async stop() {
    if (this.proc && this.proc.exitCode === null && this.proc.signalCode === null) {
      this.proc.kill('SIGTERM');
      const done = await Promise.race([this.exited, sleep(5_000).then(() => null)]);
      if (!done) await this.kill9();
    }
    rmSync(this.dir, { recursive: true, force: true });
  }
}

// --- the site the pages come from ----------------------------------------------------------

const TYPES = { '.html': 'text/html; charset=utf-8', '.js': 'text/javascript; charset=utf-8' };

/**
 * Serves `/roomcast.js` (the SDK bundle), `/pages/*` (the test pages) and `/token`: the
 * application's backend minting connection tokens. `site.mint(params)` decides what it
 * answers (a token, or a promise of one); `site.tokens` lists every token it handed out.
 */
export async function startSite() {
  assert.ok(existsSync(SDK_BUNDLE), `no SDK bundle at ${SDK_BUNDLE}: run \`npm ci && npm run build\` in client/`);
  const site = {
    tokens: [],
    mint: () => token(),
  };
  const server = createServer(async (req, res) => {
    const url = new URL(req.url, 'http://site');
    try {
      if (url.pathname === '/token') {
        const minted = await site.mint(Object.fromEntries(url.searchParams));
        site.tokens.push(minted);
        res.writeHead(200, { 'content-type': 'text/plain', 'cache-control': 'no-store' });
        res.end(minted);
        return;
      }
      const file = url.pathname === '/roomcast.js'
        ? SDK_BUNDLE
        : url.pathname.startsWith('/pages/') && path.join(here, 'pages', path.basename(url.pathname));
      if (!file || !existsSync(file)) {
        res.writeHead(404).end('not found');
        return;
      }
      res.writeHead(200, { 'content-type': TYPES[path.extname(file)] ?? 'application/octet-stream', 'cache-control': 'no-store' });
      res.end(readFileSync(file));
    } catch (e) {
      res.writeHead(500).end(String(e));
    }
  });
  await new Promise((resolve) => server.listen(0, '127.0.0.1', resolve));
  site.origin = `http://127.0.0.1:${server.address().port}`;
  site.close = () => new Promise((resolve) => {
    server.closeAllConnections();
    server.close(resolve);
  });
  /** The URL of a test page, its settings in the fragment (kept across a reload). */
  site.page = (name, settings) => `${site.origin}/pages/${name}#${encodeURIComponent(JSON.stringify(settings))}`;
  return site;
}

// --- the browser ---------------------------------------------------------------------------

export function launchBrowser() {
  return chromium.launch({
    executablePath: CHROMIUM,
    args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
      '--disable-background-networking', '--disable-component-update', '--disable-sync',
      // Background tabs keep their timers: two tabs of one user are both live.
      '--disable-background-timer-throttling', '--disable-renderer-backgrounding',
      '--disable-backgrounding-occluded-windows'],
    timeout: STARTUP_MS,
  });
}

/** A page that fails the test on any uncaught error, with its console kept for a failure. */
export async function openPage(context) {
  const page = await context.newPage();
  page.setDefaultTimeout(EVENT_MS);
  page.problems = [];
  page.console = [];
  page.on('pageerror', (e) => page.problems.push(`pageerror: ${e.message}`));
  page.on('console', (m) => page.console.push(`${m.type()}: ${m.text()}`));
  return page;
}

/** Waits until `fn(arg)` is true in the page; on a timeout, says what the page holds. */
export async function waitInPage(page, what, fn, arg, timeout = EVENT_MS) {
  try {
    await page.waitForFunction(fn, arg, { timeout, polling: 100 });
  } catch (e) {
    const state = await page.evaluate(() => ({
      status: window.client?.status,
      lastError: window.client?.lastError && `${window.client.lastError.code}: ${window.client.lastError.message}`,
      resyncs: window.resyncs,
      statuses: window.statuses,
      received: window.received?.length,
      closes: window.closes,
      sockets: window.sockets,
    })).catch(() => '?');
    throw new Error(`${what}: not within ${timeout} ms. Page: ${JSON.stringify(state)}\n${page.console.slice(-20).join('\n')}`, { cause: e });
  }
}

/**
 * Produces `count` records, one every `everyMs`, round-robin over `partitions`, calling
 * `during(i)` before record i without waiting for it (a replica killed and restarted midway
 * does not pause the records). Resolves, once `during`'s work is done too, with the
 * acknowledged positions in the order produced.
 */
export async function produceSteadily(kafka, topic, { count, everyMs, partitions = 1, during = () => {}, record }) {
  const acks = [];
  const sideWork = [];
  let next = Date.now();
  for (let i = 0; i < count; i += 1) {
    sideWork.push(during(i));
    const ack = await kafka.produce(topic, record(i), { partition: i % partitions });
    acks.push({ seq: i, pos: `${topic}:${ack.partition}:${ack.offset}` });
    next += everyMs;
    await sleep(Math.max(0, next - Date.now()));
  }
  await Promise.all(sideWork);
  return acks;
}

/** Offsets by partition key (`topic:partition`), in the order given. */
export function byPartition(positions) {
  const out = {};
  for (const pos of positions) {
    const cut = pos.lastIndexOf(':');
    (out[pos.slice(0, cut)] ??= []).push(Number(pos.slice(cut + 1)));
  }
  return out;
}
