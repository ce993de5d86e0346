// Presence (docs/PRESENCE.md, "Client protocol"): the query, `presence: true` carried by
// subscribes and resumes, and presence events, which have no position: handed to onPresence
// listeners, never to `on` handlers, never deduplicated, never moving the map.
import { afterEach, beforeEach, test } from 'node:test';
import assert from 'node:assert/strict';
import { RoomcastError } from '../dist/index.js';
import { MemoryStorage, fakeTime, realTime, settle, start, tick } from './fake.mjs';

beforeEach(fakeTime);
afterEach(realTime);

const join = (room, user, ts = 1) => ({ type: 'event', event: 'presence.join', ts, payload: { room, user } });
const leave = (room, user, ts = 1) => ({ type: 'event', event: 'presence.leave', ts, payload: { room, user } });

/** A welcomed client, what its `on('**')` handlers and its onPresence listener saw. */
function welcomed(positions = {}, options) {
  const { server, client } = start(options);
  const events = [];
  const changes = [];
  client.on('**', (payload, info) => events.push(info.pos));
  client.onPresence((change) => changes.push(change));
  server.socket.welcome(positions);
  return { server, client, events, changes };
}

test('a presence query resolves with the users and their connection counts, and ready', async () => {
  const { server, client } = welcomed();
  const asked = client.presence('task:9', { token: 'sub-jwt' });
  assert.deepEqual(server.socket.last, { type: 'presence', id: 1, room: 'task:9', token: 'sub-jwt' });
  server.socket.frame({ type: 'ok', id: 1, room: 'task:9', users: { 42: 2, 7: 1 }, ready: true });
  assert.deepEqual(await asked, { users: { 42: 2, 7: 1 }, ready: true });

  const early = client.presence('task:8');
  assert.deepEqual(server.socket.last, { type: 'presence', id: 2, room: 'task:8' });
  server.socket.frame({ type: 'ok', id: 2, room: 'task:8', users: {}, ready: false });
  assert.deepEqual(await early, { users: {}, ready: false }, 'a server still reading the presence topic says so');

  const large = client.presence('tenant:acme');
  server.socket.frame({ type: 'ok', id: 3, room: 'tenant:acme', users: { 1: 1 }, ready: true, truncated: true });
  assert.deepEqual(await large, { users: { 1: 1 }, ready: true, truncated: true }, 'a room larger than the answer says so');
});

test('a refused presence query rejects with the final error', async () => {
  const { server, client } = welcomed();
  const off = client.presence('task:9');
  server.socket.frame({ type: 'error', id: 1, code: 'presence_disabled', message: 'presence is disabled' });
  const error = await off.then(() => assert.fail('resolved'), (e) => e);
  assert.ok(error instanceof RoomcastError);
  assert.equal(error.code, 'presence_disabled');
  assert.equal(error.message, 'presence is disabled');

  const forbidden = client.presence('task:10');
  server.socket.frame({ type: 'error', id: 2, code: 'forbidden', room: 'task:10', message: 'not allowed to join this room' });
  server.socket.frame({ type: 'error', id: 2, code: 'forbidden', message: 'not allowed to join this room' });
  await assert.rejects(forbidden, {
    code: 'forbidden',
    refusals: [{ room: 'task:10', code: 'forbidden', message: 'not allowed to join this room' }],
  });
  assert.equal(client.lastError, null, 'an answered request is not a connection error');
});

test('a presence query waits for the connection, is asked again after a drop, and times out', async () => {
  const { server, client } = start({ requestTimeoutMs: 5000 });
  const asked = client.presence('task:9');
  assert.deepEqual(server.socket.sent, []);
  server.socket.welcome();
  assert.deepEqual(server.socket.sent, [{ type: 'presence', id: 1, room: 'task:9' }]);
  server.socket.drop(1006);
  tick(250);
  server.socket.welcome();
  server.socket.ok(2, ['user:42']);
  assert.deepEqual(server.socket.last, { type: 'presence', id: 1, room: 'task:9' });
  server.socket.frame({ type: 'ok', id: 1, room: 'task:9', users: { 42: 1 }, ready: true });
  assert.deepEqual(await asked, { users: { 42: 1 }, ready: true });

  const unanswered = client.presence('task:9');
  tick(5000);
  await assert.rejects(unanswered, { code: 'timeout' });
});

test('subscribe sends presence: true; without it, no presence field', async () => {
  const { server, client } = welcomed();
  const a = client.subscribe(['task:9'], { presence: true });
  const b = client.subscribe(['task:8']);
  assert.deepEqual(server.socket.sent, [
    { type: 'subscribe', id: 1, rooms: ['task:9'], presence: true },
    { type: 'subscribe', id: 2, rooms: ['task:8'] },
  ]);
  server.socket.ok(1, ['task:9']);
  server.socket.ok(2, ['task:8']);
  assert.deepEqual(await a, { rooms: ['task:9'] });
  assert.deepEqual(await b, { rooms: ['task:8'] });
});

test('the resume after a reconnect carries presence: true, with the filter and token', async () => {
  const { server, client } = welcomed({ 't:0': 4 });
  const joined = client.subscribe(['task:9', 'tenant:acme'], { presence: true, events: ['task.*'], token: 'sub' });
  server.socket.ok(1, ['task:9', 'tenant:acme']);
  await joined;
  server.socket.drop(1006);
  tick(250);
  server.socket.welcome();
  assert.deepEqual(server.socket.sent, [
    { type: 'resume', id: 2, positions: { 't:0': 4 }, rooms: ['task:9', 'tenant:acme'], events: ['task.*'], token: 'sub', presence: true },
  ]);
  server.socket.ok(2, ['user:42', 'task:9', 'tenant:acme']);
  assert.equal(server.socket.sent.length, 1, 'one resume said it all');
});

test('rooms with and without presence: the resume asks none, the rooms with it are subscribed again with it', async () => {
  const { server, client } = welcomed();
  const a = client.subscribe(['task:9'], { presence: true });
  const b = client.subscribe(['task:8']);
  const c = client.subscribe(['task:7'], { presence: false });
  server.socket.ok(1, ['task:9']);
  server.socket.ok(2, ['task:8']);
  server.socket.ok(3, ['task:7']);
  await Promise.all([a, b, c]);
  server.socket.drop(1006);
  tick(250);
  server.socket.welcome();
  assert.deepEqual(server.socket.sent, [{ type: 'resume', id: 4, positions: {}, rooms: ['task:9', 'task:8', 'task:7'] }]);
  server.socket.ok(4, ['user:42', 'task:9', 'task:8', 'task:7']);
  assert.deepEqual(server.socket.sent.slice(1), [{ type: 'subscribe', id: 5, rooms: ['task:9'], presence: true }]);
});

test('a subscribe with presence still unanswered at a drop rides in the resume with it', async () => {
  const { server, client } = welcomed();
  const joined = client.subscribe(['task:9'], { presence: true });
  server.socket.drop(1006);
  tick(250);
  server.socket.welcome();
  assert.deepEqual(server.socket.sent[0], { type: 'resume', id: 2, positions: {}, rooms: ['task:9'], presence: true });
  server.socket.ok(2, ['user:42', 'task:9']);
  assert.deepEqual(server.socket.last, { type: 'subscribe', id: 1, rooms: ['task:9'], presence: true });
  server.socket.ok(1, ['task:9']);
  assert.deepEqual(await joined, { rooms: ['task:9'] });
});

test('without resume, a new connection subscribes again with presence', async () => {
  const { server, client } = welcomed({}, { resume: false });
  const joined = client.subscribe(['task:9'], { presence: true, events: ['task.*'] });
  server.socket.ok(1, ['task:9']);
  await joined;
  server.socket.drop(1006);
  tick(250);
  assert.equal(server.socket.url, 'ws://a/ws');
  server.socket.welcome();
  assert.deepEqual(server.socket.sent, [{ type: 'subscribe', id: 2, rooms: ['task:9'], events: ['task.*'], presence: true }]);
});

test('persisted, presence is resumed by the next page too', async () => {
  const storage = new MemoryStorage();
  const first = welcomed({ 't:0': 10 }, { persist: storage });
  const joined = first.client.subscribe(['task:9'], { presence: true });
  first.server.socket.ok(1, ['task:9']);
  await joined;
  first.client.close();
  const second = start({ persist: storage });
  second.server.socket.welcome();
  assert.deepEqual(second.server.socket.sent, [{ type: 'resume', id: 1, positions: { 't:0': 10 }, rooms: ['task:9'], presence: true }]);
});

test('presence events go to onPresence, never to on() handlers, and never touch the map', () => {
  const storage = new MemoryStorage();
  const { server, client, events, changes } = welcomed({ 't:0': 10 }, { persist: storage });
  const stored = storage.getItem('roomcast:positions');
  server.socket.frame(join('task:9', '7', 100));
  server.socket.frame({ type: 'event', event: 'presence.online', ts: 101, payload: { user: '7' } });
  server.socket.frame(leave('task:9', '7', 102));
  server.socket.frame({ type: 'event', event: 'presence.offline', ts: 103, payload: { user: '7' } });
  assert.deepEqual(changes, [
    { type: 'join', room: 'task:9', user: '7', ts: 100 },
    { type: 'online', user: '7', ts: 101 },
    { type: 'leave', room: 'task:9', user: '7', ts: 102 },
    { type: 'offline', user: '7', ts: 103 },
  ]);
  assert.deepEqual(events, []);
  assert.deepEqual(client.positions(), { 't:0': 10 });
  assert.equal(storage.getItem('roomcast:positions'), stored);
});

test('presence events are not deduplicated: the same change twice is handed out twice', () => {
  const { server, changes } = welcomed({ 't:0': 10 });
  server.socket.frame(join('task:9', '7'));
  server.socket.frame(leave('task:9', '7'));
  server.socket.frame(join('task:9', '7'));
  assert.deepEqual(
    changes.map((c) => c.type),
    ['join', 'leave', 'join'],
  );
});

test('events with a position in the same room are handled and deduplicated as before, between presence events', () => {
  const { server, client, events, changes } = welcomed({ 't:0': 10 });
  server.socket.frame(join('task:9', '7'));
  server.socket.event('t:0:11', 'task.updated', { room: 'task:9' });
  server.socket.frame(join('task:9', '8'));
  server.socket.event('t:0:11', 'task.updated');
  server.socket.event('t:0:10', 'task.updated');
  server.socket.event('t:0:12', 'task.updated');
  assert.deepEqual(events, ['t:0:11', 't:0:12']);
  assert.deepEqual(
    changes.map((c) => c.user),
    ['7', '8'],
  );
  assert.deepEqual(client.positions(), { 't:0': 12 });
});

test('presence events during a resume are handed out and leave the map to the replay', () => {
  const { server, client, events, changes } = welcomed({ 't:0': 10 });
  server.socket.drop(1006);
  tick(250);
  server.socket.welcome({ 't:0': 50 });
  server.socket.frame(join('task:9', '7'));
  server.socket.event('t:0:11');
  server.socket.frame({ type: 'positions', positions: { 't:0': 12 } });
  server.socket.ok(1, ['user:42']);
  assert.deepEqual(changes, [{ type: 'join', room: 'task:9', user: '7', ts: 1 }]);
  assert.deepEqual(events, ['t:0:11']);
  assert.deepEqual(client.positions(), { 't:0': 12 });
});

test('every onPresence listener is called; one that throws stops none; its unsubscribe works', () => {
  const { server, client, changes } = welcomed();
  const reported = [];
  const original = console.error;
  console.error = (e) => reported.push(e.message);
  const other = [];
  try {
    client.onPresence(() => {
      throw new Error('listener bug');
    });
    const off = client.onPresence((change) => other.push(change.user));
    server.socket.frame(join('task:9', '7'));
    off();
    server.socket.frame(join('task:9', '8'));
  } finally {
    console.error = original;
  }
  assert.deepEqual(
    changes.map((c) => c.user),
    ['7', '8'],
  );
  assert.deepEqual(other, ['7']);
  assert.deepEqual(reported, ['listener bug', 'listener bug']);
  assert.equal(client.status, 'open');
});

test('close() rejects a waiting presence query', async () => {
  const { client } = start();
  const asked = client.presence('task:9');
  client.close();
  await settle();
  await assert.rejects(asked, { code: 'closed' });
});
