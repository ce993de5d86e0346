// The browser bundle (dist/roomcast.js) is the same client: one round trip through it.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { connect, RoomcastError } from '../dist/roomcast.js';
import { FakeServer, TOKEN } from './fake.mjs';

test('the minified bundle connects, subscribes and hands out events', async () => {
  const server = new FakeServer();
  const client = connect({ url: 'ws://a/ws', token: TOKEN, WebSocket: server.WebSocket });
  const seen = [];
  client.on('users.*.deleted', (payload) => seen.push(payload.data.id));
  const joined = client.subscribe(['feature:users']);
  server.socket.welcome({ 'entity-updates:0': 3 });
  server.socket.ok(1, ['feature:users']);
  assert.deepEqual(await joined, { rooms: ['feature:users'] });
  server.socket.event('entity-updates:0:4', 'users.user.deleted', { data: { id: 'u1' } });
  assert.deepEqual(seen, ['u1']);
  assert.equal(typeof RoomcastError, 'function');
  client.close();
});

test('the minified bundle asks for presence and hands out presence events', async () => {
  const server = new FakeServer();
  const client = connect({ url: 'ws://a/ws', token: TOKEN, WebSocket: server.WebSocket });
  const changes = [];
  client.onPresence((change) => changes.push(change));
  const joined = client.subscribe(['task:9'], { presence: true });
  const asked = client.presence('task:9');
  server.socket.welcome({ 't:0': 3 });
  assert.deepEqual(server.socket.sent, [
    { type: 'subscribe', id: 1, rooms: ['task:9'], presence: true },
    { type: 'presence', id: 2, room: 'task:9' },
  ]);
  server.socket.ok(1, ['task:9']);
  server.socket.frame({ type: 'ok', id: 2, room: 'task:9', users: { 42: 1 }, ready: true });
  assert.deepEqual(await joined, { rooms: ['task:9'] });
  assert.deepEqual(await asked, { users: { 42: 1 }, ready: true });
  server.socket.frame({ type: 'event', event: 'presence.join', ts: 5, payload: { room: 'task:9', user: '7' } });
  assert.deepEqual(changes, [{ type: 'join', room: 'task:9', user: '7', ts: 5 }]);
  assert.deepEqual(client.positions(), { 't:0': 3 });
  client.close();
});
