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
