// The position map by docs/PROTOCOL.md's rules, resume on every reconnect, dedupe, resync,
// subscriptions carried through the resume, and persistence across page loads.
import { afterEach, beforeEach, test } from 'node:test';
import assert from 'node:assert/strict';
import { MemoryStorage, fakeTime, realTime, settle, start, tick } from './fake.mjs';

beforeEach(fakeTime);
afterEach(realTime);

/** A client whose first connection was welcomed at `positions`, and the events it handled. */
function welcomed(positions, options) {
  const { server, client } = start(options);
  const seen = [];
  client.on('**', (payload, info) => seen.push(info.pos));
  server.socket.welcome(positions);
  return { server, client, seen };
}

test('a first connection opens without ?resume=1 and takes the welcome positions', () => {
  const { server, client } = welcomed({ 'task-updates:0': 117, 'entity-updates:0': -1 });
  assert.equal(server.socket.url, 'ws://a/ws');
  assert.deepEqual(client.positions(), { 'task-updates:0': 117, 'entity-updates:0': -1 });
  assert.equal(client.status, 'open');
  assert.deepEqual(server.socket.sent, []);
});

test('events and positions frames advance the map; positions() is a copy', () => {
  const { server, client, seen } = welcomed({ 't:0': 10, 't:1': -1 });
  server.socket.event('t:0:11');
  server.socket.event('t:1:0');
  server.socket.frame({ type: 'positions', positions: { 't:0': 20, 'u:0': 3 } });
  const map = client.positions();
  assert.deepEqual(map, { 't:0': 20, 't:1': 0, 'u:0': 3 });
  map['t:0'] = 0;
  assert.equal(client.positions()['t:0'], 20);
  assert.deepEqual(seen, ['t:0:11', 't:1:0']);
});

test('a topic name with dots and dashes keeps its partition apart', () => {
  const { server, client } = welcomed({});
  server.socket.event('entity-updates.v2:12:7');
  assert.deepEqual(client.positions(), { 'entity-updates.v2:12': 7 });
});

test('events at or before the stored offset are dropped (dedupe)', () => {
  const { server, seen } = welcomed({ 't:0': 10 });
  for (const pos of ['t:0:9', 't:0:10', 't:0:11', 't:0:11', 't:0:12', 't:0:12']) server.socket.event(pos);
  assert.deepEqual(seen, ['t:0:11', 't:0:12']);
});

test('every reconnect opens with ?resume=1 and resumes first, from the stored map', () => {
  const { server, client, seen } = welcomed({ 't:0': 10 });
  server.socket.event('t:0:11');
  server.socket.drop(1006);
  tick(250);
  const second = server.socket;
  assert.equal(second.url, 'ws://a/ws?resume=1');
  assert.deepEqual(second.sent, [], 'nothing before the welcome');
  second.welcome({ 't:0': 500 });
  assert.deepEqual(second.sent, [{ type: 'resume', id: 1, positions: { 't:0': 11 }, rooms: [] }]);
  assert.equal(client.status, 'reconnecting', 'open once the resume is answered');
  // The replay, one record already seen, the cut, then the answer.
  second.event('t:0:11');
  second.event('t:0:12');
  second.frame({ type: 'positions', positions: { 't:0': 500 } });
  second.ok(1, ['user:42'], { replayed: 2, source: 'memory' });
  assert.equal(client.status, 'open');
  assert.deepEqual(seen, ['t:0:11', 't:0:12']);
  assert.deepEqual(client.positions(), { 't:0': 500 });
});

test("a resume connection's welcome positions are never taken", () => {
  // The data loss: a client that stored the head positions of a ?resume=1 welcome and
  // dropped before its resume was answered resumed from the head, losing the gap.
  const { server, client } = welcomed({ 't:0': 10 });
  server.socket.drop(1006);
  tick(250);
  server.socket.welcome({ 't:0': 500, 'u:0': 40 });
  assert.deepEqual(client.positions(), { 't:0': 10 });
  server.socket.drop(1006);
  tick(250);
  server.socket.welcome({ 't:0': 600 });
  assert.deepEqual(server.socket.sent[0].positions, { 't:0': 10 });
  // And a welcome with no positions at all (the server's fix) changes nothing either.
  server.socket.drop(1006);
  tick(250);
  server.socket.frame({ type: 'welcome', connection: '9', user: '42', rooms: [], heartbeat: 25 });
  assert.deepEqual(server.socket.sent[0].positions, { 't:0': 10 });
});

test('resync calls onResync, and the positions that follow are taken where they move forward', () => {
  const resyncs = [];
  const { server, client, seen } = welcomed({ 't:0': 900 }, { onResync: (info) => resyncs.push(info) });
  server.socket.drop(1006);
  tick(250);
  server.socket.welcome();
  server.socket.frame({ type: 'resync', reason: 't:0: position 900 is ahead of the log (12); the topic was recreated' });
  server.socket.frame({ type: 'positions', positions: { 't:0': 950, 'u:0': 3 } });
  server.socket.ok(1, ['user:42'], { replayed: 0, source: 'resync' });
  assert.deepEqual(resyncs, [{ reason: 't:0: position 900 is ahead of the log (12); the topic was recreated' }]);
  assert.deepEqual(client.positions(), { 't:0': 950, 'u:0': 3 });
  server.socket.event('t:0:951');
  assert.deepEqual(seen, ['t:0:951']);
});

test('no position moves back on a positions frame: a replica behind the last one cannot replay what was seen', () => {
  const { server, client, seen } = welcomed({ 't:0': 100, 'u:0': 7 });
  server.socket.event('t:0:101');
  server.socket.frame({ type: 'positions', positions: { 't:0': 90, 'u:0': 8 } });
  assert.deepEqual(client.positions(), { 't:0': 101, 'u:0': 8 });
  for (const pos of ['t:0:96', 't:0:101', 't:0:102']) server.socket.event(pos);
  assert.deepEqual(seen, ['t:0:101', 't:0:102']);
});

test('the cut after a resync is taken as it is: a recreated topic restarts lower and is delivered', () => {
  const resyncs = [];
  const { server, client, seen } = welcomed({ 't:0': 900, 'u:0': 7 }, { onResync: (info) => resyncs.push(info.reason) });
  server.socket.drop(1006);
  tick(250);
  server.socket.welcome();
  server.socket.frame({ type: 'resync', reason: 't:0: position 900 is ahead of the log (12); the topic was recreated' });
  server.socket.frame({ type: 'positions', positions: { 't:0': 12, 'u:0': 7 } });
  server.socket.ok(1, ['user:42'], { replayed: 0, source: 'resync' });
  assert.deepEqual(client.positions(), { 't:0': 12, 'u:0': 7 });
  for (const pos of ['t:0:12', 't:0:13', 't:0:14']) server.socket.event(pos);
  assert.deepEqual(seen, ['t:0:13', 't:0:14']);
  assert.equal(resyncs.length, 1);
  // Only that cut: a later positions frame moves forward only.
  server.socket.frame({ type: 'positions', positions: { 't:0': 3 } });
  assert.equal(client.positions()['t:0'], 14);
});

test('a resume refused as lagging leaves that replica for the next, the map untouched', () => {
  const resyncs = [];
  const { server, client } = start({ urls: ['ws://a/ws', 'ws://b/ws'], url: undefined, random: () => 0, onResync: (i) => resyncs.push(i) });
  server.socket.welcome({ 't:0': 10 });
  server.socket.event('t:0:11');
  server.socket.drop(1006);
  tick(250);
  const lagging = server.socket;
  lagging.welcome();
  lagging.frame({ type: 'error', id: 1, code: 'lagging', message: 'this replica has read t:0 up to 5, behind the position 11 resumed from' });
  assert.equal(lagging.closedWith, 1000, 'the client leaves the lagging replica');
  assert.equal(lagging.sent.length, 1, 'no bare resume on it');
  assert.equal(client.lastError.code, 'lagging');
  assert.deepEqual(client.positions(), { 't:0': 11 });
  tick(30_000);
  const next = server.socket;
  assert.notEqual(next, lagging);
  assert.notEqual(next.url, lagging.url, 'the next URL');
  next.welcome();
  assert.deepEqual(next.sent[0].positions, { 't:0': 11 });
  assert.deepEqual(resyncs, []);
});

test('subscriptions are re-established through the resume, with their filter and token', async () => {
  const { server, client } = welcomed({});
  const joined = client.subscribe(['task:7', 'task:8'], { events: ['task:*'], token: 'sub-jwt' });
  assert.deepEqual(server.socket.last, { type: 'subscribe', id: 1, rooms: ['task:7', 'task:8'], events: ['task:*'], token: 'sub-jwt' });
  server.socket.ok(1, ['task:7', 'task:8']);
  assert.deepEqual(await joined, { rooms: ['task:7', 'task:8'] });
  server.socket.drop(1011);
  tick(250);
  server.socket.welcome();
  assert.deepEqual(server.socket.sent, [
    { type: 'resume', id: 2, positions: {}, rooms: ['task:7', 'task:8'], events: ['task:*'], token: 'sub-jwt' },
  ]);
  // Once resumed, no subscribe is needed: one filter and one token said it all.
  server.socket.ok(2, ['user:42', 'task:7', 'task:8']);
  assert.equal(server.socket.sent.length, 1);
});

test('rooms of another filter are narrowed after the resume; of another token, joined and reported', async () => {
  const resyncs = [];
  const { server, client } = welcomed({}, { onResync: (info) => resyncs.push(info.reason) });
  const answers = [
    [client.subscribe(['a:1'], { events: ['x.*'] }), ['a:1']],
    [client.subscribe(['b:1'], { events: ['y.*'] }), ['b:1']],
    [client.subscribe(['c:1'], { token: 'T1' }), ['c:1']],
    [client.subscribe(['d:1'], { token: 'T2', events: ['z'] }), ['d:1']],
  ];
  answers.forEach(([, rooms], i) => server.socket.ok(i + 1, rooms));
  await Promise.all(answers.map(([p]) => p));
  server.socket.drop(1006);
  tick(250);
  server.socket.welcome();
  // The union of the filters is no filter, since c:1 has none.
  assert.deepEqual(server.socket.sent[0], { type: 'resume', id: 5, positions: {}, rooms: ['a:1', 'b:1', 'c:1'], token: 'T1' });
  server.socket.ok(5, ['user:42', 'a:1', 'b:1', 'c:1']);
  assert.deepEqual(server.socket.sent.slice(1), [
    { type: 'subscribe', id: 6, rooms: ['a:1'], events: ['x.*'] },
    { type: 'subscribe', id: 7, rooms: ['b:1'], events: ['y.*'] },
    { type: 'subscribe', id: 8, rooms: ['d:1'], events: ['z'], token: 'T2' },
  ]);
  assert.deepEqual(resyncs, ['rejoined without a replay: d:1']);
});

test('filters of one token are merged for the resume', async () => {
  const { server, client } = welcomed({});
  const a = client.subscribe(['a:1'], { events: ['x.*'] });
  const b = client.subscribe(['b:1'], { events: ['y.*', 'x.*'] });
  server.socket.ok(1, ['a:1']);
  server.socket.ok(2, ['b:1']);
  await Promise.all([a, b]);
  server.socket.drop(1006);
  tick(250);
  server.socket.welcome();
  assert.deepEqual(server.socket.sent[0], { type: 'resume', id: 3, positions: {}, rooms: ['a:1', 'b:1'], events: ['x.*', 'y.*'] });
});

test('unsubscribed rooms are left out of the next resume', async () => {
  const { server, client } = welcomed({});
  const joined = client.subscribe(['a:1', 'b:1']);
  server.socket.ok(1, ['a:1', 'b:1']);
  await joined;
  const left = client.unsubscribe(['a:1']);
  server.socket.ok(2, ['a:1']);
  assert.deepEqual(await left, { rooms: ['a:1'] });
  server.socket.drop(1006);
  tick(250);
  server.socket.welcome();
  assert.deepEqual(server.socket.sent[0].rooms, ['b:1']);
});

test('rooms refused by the resume are reported and no longer held', async () => {
  const { server, client } = welcomed({});
  const joined = client.subscribe(['a:1', 'b:1']);
  server.socket.ok(1, ['a:1', 'b:1']);
  await joined;
  server.socket.drop(1006);
  tick(250);
  server.socket.welcome();
  server.socket.frame({ type: 'error', id: 2, code: 'forbidden', room: 'b:1', message: 'not allowed to join this room' });
  server.socket.ok(2, ['user:42', 'a:1']);
  assert.equal(client.status, 'open');
  assert.equal(client.lastError.code, 'forbidden');
  assert.equal(client.lastError.room, 'b:1');
  assert.deepEqual(client.lastError.joined, ['user:42', 'a:1']);
  server.socket.drop(1006);
  tick(500);
  server.socket.welcome();
  assert.deepEqual(server.socket.sent[0].rooms, ['a:1']);
});

test('a resume refused whole is sent again with the map alone; its rooms are joined after it', async () => {
  const resyncs = [];
  const { server, client } = welcomed({ 't:0': 4 }, { onResync: (i) => resyncs.push(i.reason) });
  const joined = client.subscribe(['a:1'], { events: ['x.*'] });
  server.socket.ok(1, ['a:1']);
  await joined;
  server.socket.drop(1006);
  tick(250);
  server.socket.welcome();
  server.socket.frame({ type: 'error', id: 2, code: 'bad_request', message: 'bad event pattern' });
  assert.equal(client.lastError.code, 'bad_request');
  assert.deepEqual(server.socket.last, { type: 'resume', id: 3, positions: { 't:0': 4 }, rooms: [] });
  server.socket.ok(3, ['user:42']);
  assert.deepEqual(server.socket.last, { type: 'subscribe', id: 4, rooms: ['a:1'], events: ['x.*'] });
  assert.deepEqual(resyncs, ['rejoined without a replay: a:1']);
});

/** A client holding `a:1` (no token) and `b:1` (token `old`), reconnected and welcomed. */
async function twoGroups(options) {
  const resyncs = [];
  const { server, client, seen } = welcomed({ 't:0': 4 }, { onResync: (i) => resyncs.push(i.reason) });
  const a = client.subscribe(['a:1']);
  const b = client.subscribe(['b:1'], { token: 'old', ...options });
  server.socket.ok(1, ['a:1']);
  server.socket.ok(2, ['b:1']);
  await Promise.all([a, b]);
  server.socket.drop(1006);
  tick(250);
  server.socket.welcome();
  assert.deepEqual(server.socket.sent, [{ type: 'resume', id: 3, positions: { 't:0': 4 }, rooms: ['a:1', 'b:1'], token: 'old' }]);
  server.socket.frame({ type: 'error', id: 3, code: 'invalid_token', message: 'subscription token refused: expired' });
  await settle();
  return { server, client, seen, resyncs };
}

test("a refused subscription token is renewed by its getToken and the resume sent again, replay kept", async () => {
  let asked = 0;
  const { server, client, seen, resyncs } = await twoGroups({ getToken: async () => `new${++asked}` });
  assert.equal(asked, 1);
  assert.deepEqual(server.socket.last, { type: 'resume', id: 4, positions: { 't:0': 4 }, rooms: ['a:1', 'b:1'], token: 'new1' });
  server.socket.event('t:0:5');
  server.socket.ok(4, ['user:42', 'a:1', 'b:1']);
  assert.equal(client.status, 'open');
  assert.equal(client.lastError, null);
  assert.deepEqual(resyncs, []);
  assert.deepEqual(seen, ['t:0:5']);
  assert.equal(server.socket.sent.length, 2, 'nothing joined without its replay');
  server.socket.drop(1006);
  tick(500);
  server.socket.welcome();
  assert.equal(server.socket.sent[0].token, 'new1', 'the new token is kept');
});

test('a refused subscription token without a way to renew it costs its rooms alone', async () => {
  const { server, client, seen, resyncs } = await twoGroups();
  assert.deepEqual(server.socket.last, { type: 'resume', id: 4, positions: { 't:0': 4 }, rooms: ['a:1'] });
  assert.equal(client.lastError.code, 'invalid_token');
  assert.equal(client.lastError.room, 'b:1');
  server.socket.event('t:0:5');
  server.socket.ok(4, ['user:42', 'a:1']);
  assert.equal(client.status, 'open');
  assert.equal(client.lastError.code, 'invalid_token', 'still told once open');
  assert.deepEqual(seen, ['t:0:5']);
  assert.deepEqual(resyncs, []);
  assert.equal(server.socket.sent.length, 2);
  server.socket.drop(1006);
  tick(500);
  server.socket.welcome();
  assert.deepEqual(server.socket.sent[0].rooms, ['a:1'], 'b:1 is no longer held');
});

test('a renewed token refused too is not asked for again', async () => {
  let asked = 0;
  const { server, client } = await twoGroups({ getToken: () => `new${++asked}` });
  server.socket.frame({ type: 'error', id: 4, code: 'invalid_token', message: 'subscription token refused: bad signature' });
  await settle();
  assert.equal(asked, 1);
  assert.deepEqual(server.socket.last, { type: 'resume', id: 5, positions: { 't:0': 4 }, rooms: ['a:1'] });
  server.socket.ok(5, ['user:42', 'a:1']);
  assert.equal(client.lastError.code, 'invalid_token');
  assert.equal(client.lastError.message, 'subscription token refused: bad signature');
});

test('a subscribe waiting at the reconnect whose token is refused is rejected, the others resumed', async () => {
  const { server, client } = welcomed({ 't:0': 4 });
  const a = client.subscribe(['a:1']);
  server.socket.ok(1, ['a:1']);
  await a;
  const b = client.subscribe(['b:1'], { token: 'old' });
  server.socket.drop(1006);
  tick(250);
  server.socket.welcome();
  assert.deepEqual(server.socket.sent, [{ type: 'resume', id: 3, positions: { 't:0': 4 }, rooms: ['a:1', 'b:1'], token: 'old' }]);
  server.socket.frame({ type: 'error', id: 3, code: 'invalid_token', message: 'subscription token refused: expired' });
  assert.deepEqual(server.socket.last, { type: 'resume', id: 4, positions: { 't:0': 4 }, rooms: ['a:1'] });
  server.socket.ok(4, ['user:42', 'a:1']);
  assert.deepEqual(server.socket.last, { type: 'subscribe', id: 2, rooms: ['b:1'], token: 'old' });
  server.socket.frame({ type: 'error', id: 2, code: 'invalid_token', message: 'subscription token refused: expired' });
  const error = await b.then(() => assert.fail('resolved'), (e) => e);
  assert.equal(error.code, 'invalid_token');
});

test('persisted, the rooms subscribed after the welcome are resumed by the next page too', async () => {
  const storage = new MemoryStorage();
  const first = welcomed({ 't:0': 10 }, { persist: storage });
  const joined = first.client.subscribe(['task:7'], { events: ['task.*'], token: 'sub' });
  first.server.socket.ok(1, ['task:7']);
  await joined;
  first.client.close();
  const second = start({ persist: storage });
  assert.equal(second.server.socket.url, 'ws://a/ws?resume=1');
  second.server.socket.welcome();
  assert.deepEqual(second.server.socket.sent, [
    { type: 'resume', id: 1, positions: { 't:0': 10 }, rooms: ['task:7'], events: ['task.*'], token: 'sub' },
  ]);
});

test('persistence: the map outlives the page, and the next page resumes from it', async () => {
  const storage = new MemoryStorage();
  const first = welcomed({ 't:0': 10 }, { persist: storage });
  first.server.socket.event('t:0:11');
  assert.deepEqual(JSON.parse(storage.getItem('roomcast:positions')), { 't:0': 11 });
  first.server.socket.frame({ type: 'positions', positions: { 't:0': 15 } });
  assert.deepEqual(JSON.parse(storage.getItem('roomcast:positions')), { 't:0': 15 });
  first.client.close();

  // A reload: subscriptions made before the welcome ride in the resume, to get their gap.
  const { server, client } = start({ persist: storage });
  const seen = [];
  client.on('task:update', (payload, info) => seen.push(info.pos));
  const joined = client.subscribe(['task:7']);
  assert.equal(server.socket.url, 'ws://a/ws?resume=1');
  server.socket.welcome({ 't:0': 99 });
  assert.deepEqual(server.socket.sent, [{ type: 'resume', id: 2, positions: { 't:0': 15 }, rooms: ['task:7'] }]);
  server.socket.event('t:0:15');
  server.socket.event('t:0:16');
  server.socket.ok(2, ['user:42', 'task:7'], { replayed: 1, source: 'memory' });
  assert.deepEqual(server.socket.last, { type: 'subscribe', id: 1, rooms: ['task:7'] });
  server.socket.ok(1, ['task:7']);
  assert.deepEqual(await joined, { rooms: ['task:7'] });
  assert.deepEqual(seen, ['t:0:16']);
});

test('persist: true uses sessionStorage under persistKey; a bad stored value starts fresh', () => {
  const storage = new MemoryStorage();
  globalThis.sessionStorage = storage;
  try {
    const { server } = welcomed({ 't:0': 3 }, { persist: true, persistKey: 'app:rc' });
    assert.equal(storage.getItem('app:rc'), '{"t:0":3}');
    server.socket.event('t:0:4');
    assert.equal(storage.getItem('app:rc'), '{"t:0":4}');
    storage.setItem('app:rc', '{"t:0":"x"}');
    const fresh = start({ persist: true, persistKey: 'app:rc' });
    assert.equal(fresh.server.socket.url, 'ws://a/ws');
    storage.setItem('app:rc', 'not json');
    assert.equal(start({ persist: true, persistKey: 'app:rc' }).server.socket.url, 'ws://a/ws');
  } finally {
    delete globalThis.sessionStorage;
  }
});

test('persist: true where sessionStorage is blocked runs without it', () => {
  Object.defineProperty(globalThis, 'sessionStorage', { configurable: true, get() { throw new Error('SecurityError'); } });
  try {
    const { server, client } = welcomed({ 't:0': 3 }, { persist: true });
    server.socket.event('t:0:4');
    assert.deepEqual(client.positions(), { 't:0': 4 });
  } finally {
    delete globalThis.sessionStorage;
  }
});

test('without persist nothing is stored; with resume: false a reconnect starts fresh', () => {
  const storage = new MemoryStorage();
  globalThis.sessionStorage = storage;
  try {
    const { server, client } = welcomed({ 't:0': 3 }, { resume: false });
    assert.equal(storage.items.size, 0);
    server.socket.drop(1006);
    tick(250);
    assert.equal(server.socket.url, 'ws://a/ws');
    server.socket.welcome({ 't:0': 50 });
    assert.deepEqual(client.positions(), { 't:0': 50 });
    assert.equal(client.status, 'open');
  } finally {
    delete globalThis.sessionStorage;
  }
});

test('a throwing handler neither stops the others nor the map', async () => {
  const reported = [];
  globalThis.reportError = (e) => reported.push(e.message);
  try {
    const { server, client } = welcomed({});
    const seen = [];
    client.on('task:update', () => {
      throw new Error('boom');
    });
    client.on('task:update', (p, info) => seen.push(info));
    server.socket.frame({ type: 'event', event: 'task:update', pos: 't:0:1', ts: 5, rooms: ['task:7'], payload: {} });
    assert.deepEqual(seen, [{ event: 'task:update', pos: 't:0:1', ts: 5, rooms: ['task:7'] }]);
    assert.deepEqual(reported, ['boom']);
    assert.deepEqual(client.positions(), { 't:0': 1 });
  } finally {
    delete globalThis.reportError;
  }
  await settle();
});

test("a second token's rooms, refused on rejoining, are rejoined with a token from their getToken", async () => {
  const resyncs = [];
  const { server, client } = welcomed({ 't:0': 4 }, { onResync: (i) => resyncs.push(i.reason) });
  const a = client.subscribe(['a:1'], { token: 'ta' });
  const b = client.subscribe(['b:1'], { token: 'tb', getToken: () => 'tb2' });
  server.socket.ok(1, ['a:1']);
  server.socket.ok(2, ['b:1']);
  await Promise.all([a, b]);
  server.socket.drop(1006);
  tick(250);
  server.socket.welcome();
  server.socket.ok(3, ['user:42', 'a:1']);
  assert.deepEqual(server.socket.last, { type: 'subscribe', id: 4, rooms: ['b:1'], token: 'tb' });
  server.socket.frame({ type: 'error', id: 4, code: 'invalid_token', message: 'subscription token refused: expired' });
  await settle();
  assert.deepEqual(server.socket.last, { type: 'subscribe', id: 5, rooms: ['b:1'], token: 'tb2' });
  server.socket.ok(5, ['b:1']);
  assert.equal(client.lastError, null);
  assert.deepEqual(resyncs, ['rejoined without a replay: b:1']);
  server.socket.drop(1006);
  tick(500);
  server.socket.welcome();
  server.socket.ok(6, ['user:42', 'a:1']);
  assert.deepEqual(server.socket.last, { type: 'subscribe', id: 7, rooms: ['b:1'], token: 'tb2' });
});
