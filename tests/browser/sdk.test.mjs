// End to end: pages built on the SDK (`client/dist/roomcast.js`) in Debian's Chromium, against
// real `roomcast serve` replicas and the real Kafka broker of ROOMCAST_TEST_BROKERS. Each test
// has its own topic, replicas and browser context. What the pages received is compared
// exactly with what Kafka acknowledged: every record once, in partition order.
//
// Needs `cargo build --all-targets` (the binary and examples/kafka_feed) and the SDK built
// (`npm ci && npm run build` in client/).

import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import {
  Kafka, Roomcast, byPartition, entityRecord, entityRoute, launchBrowser, openPage,
  produceSteadily, sleep, startSite, token, unique, waitInPage,
} from './harness.mjs';

/** After the last expected record, how long a duplicate would have to show up. */
const SETTLE_MS = 1_500;

describe('the SDK in Chromium, against real replicas and Kafka', { timeout: 600_000 }, () => {
  let kafka;
  let site;
  let browser;
  const replicas = [];
  const contexts = [];

  before(async () => {
    kafka = Kafka.start();
    site = await startSite();
    browser = await launchBrowser();
  });

  after(async () => {
    await Promise.all(contexts.map((c) => c.close().catch(() => {})));
    await browser?.close().catch(() => {});
    await Promise.all(replicas.map((r) => r.stop().catch(() => {})));
    await site?.close();
    await kafka?.stop();
  });

  async function replica(topic, extra) {
    const r = await Roomcast.start({ routes: entityRoute(topic), extra });
    replicas.push(r);
    return r;
  }

  async function newContext() {
    const context = await browser.newContext();
    contexts.push(context);
    return context;
  }

  /** Opens the recorder page and waits until its rooms are joined. */
  async function recorder(context, settings) {
    const page = await openPage(context);
    await page.goto(site.page('recorder.html', { rooms: ['feature:users'], ...settings }));
    await subscribed(page);
    return page;
  }

  async function subscribed(page) {
    await waitInPage(page, 'the subscribe answered', () => window.subscribed !== null);
    assert.deepEqual(await page.evaluate(() => window.subscribed), { rooms: ['feature:users'] });
  }

  /** A record of the users feature carrying its sequence number. */
  const update = (seq) => entityRecord('users', 'user', 'updated', { id: `u${seq % 7}`, seq });

  /**
   * Waits for as many events as were acknowledged, lets duplicates show up, then asserts the
   * page holds exactly those records: each once, per partition in offset order.
   */
  async function assertExactlyOnce(page, acks) {
    try {
      await waitInPage(page, `all ${acks.length} records`, (n) => window.received.length >= n, acks.length);
    } catch (e) {
      const got = new Set((await page.evaluate(() => window.received)).map((r) => r.pos));
      const missing = acks.filter((a) => !got.has(a.pos)).map((a) => a.pos);
      throw new Error(`${e.message}\nmissing: ${missing.join(' ')}`, { cause: e });
    }
    await sleep(SETTLE_MS);
    const received = await page.evaluate(() => window.received);
    assert.deepEqual(byPartition(received.map((r) => r.pos)), byPartition(acks.map((a) => a.pos)));
    assert.deepEqual(received.map((r) => r.seq).sort((x, y) => x - y), acks.map((a) => a.seq));
    assert.ok(received.every((r) => r.event === 'users.user.updated'), JSON.stringify(received.slice(0, 3)));
  }

  const read = (page) => page.evaluate(() => ({
    statuses: window.statuses.map((s) => s.status),
    errors: window.statuses.map((s) => s.error).filter(Boolean),
    sockets: window.sockets.map((u) => new URL(u).host),
    closes: window.closes,
    resyncs: window.resyncs,
    tokenCalls: window.tokenCalls,
  }));

  test('two tabs of one user: a deleted record removes the row in both', async () => {
    const topic = unique('tabs');
    await kafka.createTopic(topic, 1);
    const server = await replica(topic);
    const context = await newContext();
    const settings = {
      url: server.url,
      token: token({ sub: '42' }),
      users: [{ id: 'u1', name: 'Ada' }, { id: 'u2', name: 'Grace' }, { id: 'u3', name: 'Edsger' }],
    };
    const tabs = [await openPage(context), await openPage(context)];
    for (const tab of tabs) {
      await tab.goto(site.page('users.html', settings));
      await subscribed(tab);
    }

    await kafka.produce(topic, entityRecord('users', 'user', 'updated', { id: 'u1', name: 'Ada Lovelace' }));
    await kafka.produce(topic, entityRecord('users', 'user', 'deleted', { id: 'u2' }));

    for (const tab of tabs) {
      // The update comes before the delete in the partition, so once u2 is gone u1 is renamed.
      await waitInPage(tab, 'the row of u2 removed', () => !document.querySelector('li[data-id="u2"]'));
      const rows = await tab.$$eval('#users li', (lis) => lis.map((li) => [li.dataset.id, li.textContent]));
      assert.deepEqual(rows, [['u1', 'Ada Lovelace'], ['u3', 'Edsger']]);
      assert.equal(await tab.locator('#status').textContent(), 'open');
      assert.deepEqual(tab.problems, []);
    }
  });

  test('the replica is kill -9ed and restarted mid-stream: every record once, in order', async () => {
    const topic = unique('kill9');
    await kafka.createTopic(topic, 2);
    const server = await replica(topic);
    site.mint = () => token();
    const page = await recorder(await newContext(), { urls: [server.url] });

    let restarted;
    const acks = await produceSteadily(kafka, topic, {
      count: 80,
      everyMs: 100,
      partitions: 2,
      record: update,
      during: (i) => {
        if (i === 25) restarted = server.kill9().then(() => server.restart());
        return restarted;
      },
    });
    await assertExactlyOnce(page, acks);

    const seen = await read(page);
    assert.ok(seen.sockets.length >= 2, `never reconnected: ${JSON.stringify(seen)}`);
    assert.ok(seen.sockets.every((host) => host === server.public), JSON.stringify(seen.sockets));
    // The kill leaves no close frame: the browser reports 1006.
    assert.equal(seen.closes[0], 1006);
    assert.ok(seen.statuses.includes('reconnecting'), JSON.stringify(seen.statuses));
    assert.equal(seen.statuses.at(-1), 'open');
    assert.deepEqual(seen.resyncs, []);
    assert.deepEqual(page.problems, []);
  });

  test('two replicas, one killed: the page fails over to the other and misses nothing', async () => {
    const topic = unique('failover');
    await kafka.createTopic(topic, 2);
    const [first, second] = [await replica(topic), await replica(topic)];
    site.mint = () => token();
    const page = await recorder(await newContext(), { urls: [first.url, second.url] });
    assert.deepEqual((await read(page)).sockets, [first.public]);

    let killed;
    const acks = await produceSteadily(kafka, topic, {
      count: 60,
      everyMs: 100,
      partitions: 2,
      record: update,
      during: (i) => {
        if (i === 20) killed = first.kill9();
        return killed;
      },
    });
    await assertExactlyOnce(page, acks);

    const seen = await read(page);
    assert.equal(seen.sockets[0], first.public);
    assert.equal(seen.sockets.at(-1), second.public, JSON.stringify(seen.sockets));
    assert.ok(seen.sockets.every((host) => host === first.public || host === second.public));
    assert.equal(seen.statuses.at(-1), 'open');
    assert.deepEqual(seen.resyncs, []);
    assert.deepEqual(page.problems, []);
  });

  test('a short-lived token is refreshed over the open connection, which never drops', async () => {
    const topic = unique('refresh');
    await kafka.createTopic(topic, 1);
    const server = await replica(topic);
    // Without a refresh, the server closes the connection with 4001 within 6 s.
    site.mint = () => token({ ttl: 6 });
    const page = await recorder(await newContext(), { urls: [server.url], refreshBeforeExpirySeconds: 3 });

    const acks = await produceSteadily(kafka, topic, { count: 32, everyMs: 500, record: update });
    await assertExactlyOnce(page, acks);

    const seen = await read(page);
    assert.deepEqual(seen.sockets, [server.public]);
    assert.deepEqual(seen.closes, []);
    assert.deepEqual(seen.statuses, ['connecting', 'open']);
    // 16 s on tokens of at most 6 s: the first and at least two refreshes.
    assert.ok(seen.tokenCalls >= 3, `getToken called ${seen.tokenCalls} times`);
    assert.deepEqual(page.problems, []);
  });

  test('an expired token: 4001, then getToken and a reconnect that misses nothing', async () => {
    const topic = unique('expired');
    await kafka.createTopic(topic, 1);
    const server = await replica(topic);
    // The backend is slow to answer the refresh: the first token expires before it comes.
    site.mint = async ({ call }) => {
      if (call === '1') return token({ ttl: 4 });
      if (call === '2') await sleep(7_000);
      return token();
    };
    const page = await recorder(await newContext(), { urls: [server.url], refreshBeforeExpirySeconds: 2 });

    const acks = await produceSteadily(kafka, topic, { count: 40, everyMs: 300, record: update });
    await assertExactlyOnce(page, acks);

    const seen = await read(page);
    assert.equal(seen.closes[0], 4001, JSON.stringify(seen));
    assert.deepEqual(seen.sockets, [server.public, server.public]);
    assert.ok(seen.tokenCalls >= 2, `getToken called ${seen.tokenCalls} times`);
    assert.ok(seen.statuses.includes('reconnecting'), JSON.stringify(seen.statuses));
    assert.equal(seen.statuses.at(-1), 'open');
    assert.deepEqual(seen.resyncs, []);
    assert.deepEqual(page.problems, []);
  });

  test('a gap older than resume.max_age_seconds calls onResync', async () => {
    const topic = unique('resync');
    await kafka.createTopic(topic, 1);
    const server = await replica(topic, '[resume]\nbuffer_max_age_seconds = 1\nmax_age_seconds = 2\n');
    site.mint = () => token();
    const page = await recorder(await newContext(), { urls: [server.url] });

    await kafka.produce(topic, update(0));
    await waitInPage(page, 'the first record', () => window.received.length === 1);
    await server.kill9();
    await kafka.produce(topic, update(1));
    await kafka.produce(topic, update(2));
    await sleep(3_500); // past max_age_seconds: the gap can no longer be replayed
    await server.restart();
    await waitInPage(page, 'onResync', () => window.resyncs.length > 0);
    await waitInPage(page, 'open again', () => window.client.status === 'open');

    const live = await kafka.produce(topic, update(3));
    await waitInPage(page, 'the live record', () => window.received.length >= 2);
    await sleep(SETTLE_MS);
    const received = await page.evaluate(() => window.received);
    assert.deepEqual(received.map((r) => [r.seq, r.pos]), [[0, `${topic}:0:0`], [3, `${topic}:0:${live.offset}`]]);
    assert.deepEqual((await read(page)).resyncs, [`${topic}:0: older than the replayable window`]);
    assert.deepEqual(page.problems, []);
  });

  test('a reload with persisted positions receives what it missed while gone', async () => {
    const topic = unique('reload');
    await kafka.createTopic(topic, 2);
    const server = await replica(topic);
    site.mint = () => token();
    const settings = { urls: [server.url], persist: true };
    const page = await recorder(await newContext(), settings);

    for (let seq = 0; seq < 4; seq += 1) await kafka.produce(topic, update(seq), { partition: seq % 2 });
    await waitInPage(page, 'the first records', () => window.received.length >= 4);

    await page.goto('about:blank');
    const missed = [];
    for (let seq = 4; seq < 10; seq += 1) {
      const ack = await kafka.produce(topic, update(seq), { partition: seq % 2 });
      missed.push({ seq, pos: `${topic}:${ack.partition}:${ack.offset}` });
    }
    await page.goto(site.page('recorder.html', { rooms: ['feature:users'], ...settings }));
    await subscribed(page);
    const ack = await kafka.produce(topic, update(10), { partition: 0 });
    missed.push({ seq: 10, pos: `${topic}:${ack.partition}:${ack.offset}` });

    await assertExactlyOnce(page, missed);
    assert.deepEqual((await read(page)).resyncs, []);
    assert.deepEqual(page.problems, []);
  });
});
