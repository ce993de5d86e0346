// End to end: presence through the SDK (`client/dist/roomcast.js`) in Debian's Chromium, on
// two real `roomcast serve` replicas with presence on, sharing one presence topic on the real
// broker of ROOMCAST_TEST_BROKERS. A page on one replica hears a user of its tenant come and
// go on the other, asks who is in the room, keeps its position map untouched by presence and
// still receives a record once; a page of another tenant hears none of it.
//
// Needs `cargo build --all-targets` (the binary and examples/kafka_feed) and the SDK built
// (`npm ci && npm run build` in client/).

import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import {
  Kafka, Roomcast, entityRecord, entityRoute, launchBrowser, openPage, sign, sleep, startSite,
  unique, waitInPage,
} from './harness.mjs';

/** After the last expected event, how long an extra one would have to show up. */
const SETTLE_MS = 1_500;

/** A connection token of user `sub` in `tenant`. */
function tenantToken(tenant, sub, rooms) {
  const now = Math.floor(Date.now() / 1000);
  return sign({ sub, tenant, rooms, iat: now, exp: now + 3600 });
}

/** Presence on, quick to publish; both replicas get the same topic. */
function presenceSection(topic) {
  return `
[presence]
enabled = true
topic = "${topic}"
interval_seconds = 0.05
renew_seconds = 0.5
expiry_seconds = 3
`;
}

/** A page's presence events from the `from`-th on, without their timestamps (checked here). */
async function presenceSince(page, from) {
  const events = (await page.evaluate(() => window.presence)).slice(from);
  for (const e of events) assert.ok(Number.isInteger(e.ts) && e.ts > 0, JSON.stringify(e));
  return events.map(({ ts, ...rest }) => rest);
}

const countPresence = (page) => page.evaluate(() => window.presence.length);

describe('presence through the SDK in Chromium, across two replicas', { timeout: 300_000 }, () => {
  let kafka;
  let site;
  let browser;
  let topic;
  let first;
  let second;
  const contexts = [];

  before(async () => {
    kafka = Kafka.start();
    site = await startSite();
    browser = await launchBrowser();
    topic = unique('presence-records');
    await kafka.createTopic(topic, 1);
    const extra = presenceSection(unique('presence'));
    first = await Roomcast.start({ routes: entityRoute(topic), extra });
    second = await Roomcast.start({ routes: entityRoute(topic), extra });
  });

  after(async () => {
    await Promise.all(contexts.map((c) => c.close().catch(() => {})));
    await browser?.close().catch(() => {});
    await Promise.all([first, second].map((r) => r?.stop().catch(() => {})));
    await site?.close();
    await kafka?.stop();
  });

  /** A page of its own browser context (its own sessionStorage), open on `server`. */
  async function presencePage(server, token) {
    const context = await browser.newContext();
    contexts.push(context);
    const page = await openPage(context);
    await page.goto(site.page('presence.html', { url: server.url, token, persist: true }));
    await waitInPage(page, 'open', () => window.client.status === 'open');
    return page;
  }

  const subscribe = (page, rooms, options) => page.evaluate(
    ([r, o]) => window.client.subscribe(r, o).then((ok) => ok, (e) => ({ error: e.code, refusals: e.refusals })),
    [rooms, options],
  );
  const query = (page, room) => page.evaluate(
    (r) => window.client.presence(r).then((ok) => ok, (e) => ({ error: e.code })),
    room,
  );
  const positions = (page) => page.evaluate(() => ({
    map: window.client.positions(),
    stored: sessionStorage.getItem('roomcast:positions'),
  }));

  /** Subscribes `rooms` with presence and waits for the page's own join of `room`. */
  async function listen(page, user, rooms, room) {
    assert.deepEqual(await subscribe(page, rooms, { presence: true }), { rooms });
    await waitInPage(page, `${user}'s own join of ${room}`,
      ([u, r]) => window.presence.some((e) => e.type === 'join' && e.user === u && e.room === r), [user, room]);
  }

  test('join, online, leave and offline from the other replica; the query; positions untouched; tenants apart', async () => {
    // Ada (acme) listens on the first replica to task:9 and to her tenant's status room.
    const ada = await presencePage(first, tenantToken('acme', 'ada', ['task:9', 'tenant:acme']));
    await listen(ada, 'ada', ['task:9', 'tenant:acme'], 'task:9');
    // Zed (globex) listens on the second replica to a room of the same name, and to his.
    const zed = await presencePage(second, tenantToken('globex', 'zed', ['task:9', 'tenant:globex']));
    await listen(zed, 'zed', ['task:9', 'tenant:globex'], 'task:9');

    // Whatever each heard of itself, it has heard by now.
    await sleep(SETTLE_MS);
    const adaMark = await countPresence(ada);
    const zedMark = await countPresence(zed);
    const before = await positions(ada);
    assert.ok(before.stored !== null, 'persist: the map is in sessionStorage');

    // Bob (acme) connects to the second replica and enters task:9, not asking for presence.
    const bob = await presencePage(second, tenantToken('acme', 'bob', ['task:9']));
    assert.deepEqual(await subscribe(bob, ['task:9']), { rooms: ['task:9'] });

    await waitInPage(ada, "Bob's online and join", (n) => window.presence.length >= n, adaMark + 2);
    await sleep(SETTLE_MS);
    assert.deepEqual(await presenceSince(ada, adaMark), [
      { type: 'online', user: 'bob' },
      { type: 'join', user: 'bob', room: 'task:9' },
    ]);
    assert.deepEqual(await query(ada, 'task:9'), { users: { ada: 1, bob: 1 }, ready: true });
    assert.deepEqual(await query(bob, 'task:9'), { users: { ada: 1, bob: 1 }, ready: true });
    // The same spelling in another tenant is another room.
    assert.deepEqual(await query(zed, 'task:9'), { users: { zed: 1 }, ready: true });

    // Presence events carry no position: the map, kept and persisted, did not move.
    assert.deepEqual(await positions(ada), before);
    assert.deepEqual(await ada.evaluate(() => window.received), []);

    // A record for acme's task:9 still reaches Ada's handler, once, with its position.
    const ack = await kafka.produce(topic, entityRecord('tasks', 'task', 'updated', { id: '9' }));
    const pos = `${topic}:${ack.partition}:${ack.offset}`;
    await waitInPage(ada, 'the record', () => window.received.length >= 1);
    await waitInPage(bob, 'the record', () => window.received.length >= 1);
    await sleep(SETTLE_MS);
    const record = { event: 'tasks.task.updated', pos, id: '9' };
    assert.deepEqual(await ada.evaluate(() => window.received), [record]);
    assert.deepEqual(await bob.evaluate(() => window.received), [record]);
    const moved = await positions(ada);
    assert.deepEqual(moved.map, { ...before.map, [`${topic}:${ack.partition}`]: ack.offset });
    assert.deepEqual(JSON.parse(moved.stored), moved.map);

    assert.deepEqual(bob.problems, []);

    // Bob's page goes away: Ada hears him leave the room and go offline.
    const leaveMark = await countPresence(ada);
    await bob.close();
    await waitInPage(ada, "Bob's leave and offline", (n) => window.presence.length >= n, leaveMark + 2);
    await sleep(SETTLE_MS);
    // Exactly these two, in either order: the replica publishes the leave and the offline of a
    // closed connection in one batch as a rule, and its table tells a batch's transitions in
    // key order, the user's own count (offline) before its rooms (leave).
    const gone = await presenceSince(ada, leaveMark);
    assert.deepEqual([...gone].sort((x, y) => x.type.localeCompare(y.type)), [
      { type: 'leave', user: 'bob', room: 'task:9' },
      { type: 'offline', user: 'bob' },
    ], JSON.stringify(gone));
    assert.deepEqual(await query(ada, 'task:9'), { users: { ada: 1 }, ready: true });
    assert.deepEqual((await positions(ada)).map, moved.map);

    // Globex heard nothing of acme: no presence, no record.
    assert.deepEqual(await presenceSince(zed, zedMark), []);
    assert.deepEqual(await zed.evaluate(() => window.received), []);
    for (const page of [ada, zed]) {
      assert.equal(await page.evaluate(() => window.client.status), 'open');
      assert.deepEqual(page.problems, []);
    }
  });
});
