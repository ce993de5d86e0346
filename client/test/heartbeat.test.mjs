// Liveness: a ping each heartbeat, a silent connection taken as lost; requests the server
// dropped for the rate limit asked again.
import { afterEach, beforeEach, test } from 'node:test';
import assert from 'node:assert/strict';
import { fakeTime, realTime, start, tick } from './fake.mjs';

beforeEach(fakeTime);
afterEach(realTime);

test('a ping each heartbeat; an answering server is kept', () => {
  const { server, client } = start();
  server.socket.welcome({}, { heartbeat: 10 });
  tick(9_999);
  assert.equal(server.socket.pings.length, 0);
  tick(1);
  assert.deepEqual(server.socket.pings, [{ type: 'ping', id: 1 }]);
  for (let i = 0; i < 60; i++) tick(10_000);
  assert.equal(server.socket.pings.length, 61);
  assert.deepEqual(server.socket.pings.at(-1), { type: 'ping', id: 61 });
  assert.equal(server.count, 1);
  assert.equal(client.status, 'open');
});

test('a connection silent for a heartbeat after a ping is closed and resumed elsewhere', () => {
  const { server, client } = start({ urls: ['ws://a/ws', 'ws://b/ws'], url: undefined, random: () => 0 });
  server.socket.welcome({ 't:0': 3 }, { heartbeat: 10 });
  const first = server.socket;
  first.mute = true;
  tick(10_000);
  // Events count as life too: no pong needed while they flow.
  first.event('t:0:4');
  tick(10_000);
  assert.equal(first.closedWith, undefined);
  tick(9_999);
  assert.equal(first.closedWith, undefined);
  tick(1);
  assert.equal(first.closedWith, 1000);
  assert.equal(client.status, 'reconnecting');
  assert.equal(client.lastError.code, 'connection_lost');
  tick(0);
  assert.equal(server.count, 2);
  assert.equal(server.socket.url, 'ws://b/ws?resume=1');
  server.socket.welcome();
  assert.deepEqual(server.socket.sent[0].positions, { 't:0': 4 });
});

test('requests dropped for the rate limit are sent again a second later', async () => {
  const { server, client } = start();
  server.socket.welcome();
  const joined = client.subscribe(['a:1']);
  server.socket.frame({ type: 'error', id: null, code: 'rate_limited', message: 'too many messages' });
  assert.equal(server.socket.sent.length, 1);
  tick(999);
  assert.equal(server.socket.sent.length, 1);
  tick(1);
  assert.deepEqual(server.socket.sent, [
    { type: 'subscribe', id: 1, rooms: ['a:1'] },
    { type: 'subscribe', id: 1, rooms: ['a:1'] },
  ]);
  server.socket.ok(1, ['a:1']);
  // The first one's answer, had it come, would find nothing waiting.
  server.socket.ok(1, ['a:1']);
  assert.deepEqual(await joined, { rooms: ['a:1'] });
});

test('a long resume is not cut by the silence check, and no ping goes ahead of it', () => {
  const { server, client } = start();
  server.socket.welcome({ 't:0': 3 }, { heartbeat: 10 });
  server.socket.drop(1006);
  tick(250);
  const second = server.socket;
  second.welcome({}, { heartbeat: 10 });
  second.mute = true;
  // A replica getting ready, then a replay from Kafka: a minute without a frame.
  tick(60_000);
  assert.equal(second.closedWith, undefined);
  assert.equal(second.pings.length, 0);
  assert.equal(client.status, 'reconnecting');
  second.event('t:0:4');
  second.ok(1, ['user:42']);
  assert.equal(client.status, 'open');
  // Resumed, the check is back: a ping, then silence for a heartbeat, and it is cut.
  tick(10_000);
  assert.equal(second.pings.length, 1);
  tick(10_000);
  assert.equal(second.closedWith, 1000);
  assert.equal(client.lastError.code, 'connection_lost');
});
