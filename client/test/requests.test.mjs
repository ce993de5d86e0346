// Request and answer matching: ids, per-room refusals collected for the final answer, a final
// error, requests carried over a reconnect, and requests rejected by close().
import { afterEach, beforeEach, test } from 'node:test';
import assert from 'node:assert/strict';
import { RoomcastError } from '../dist/index.js';
import { fakeTime, realTime, settle, start, tick } from './fake.mjs';

beforeEach(fakeTime);
afterEach(realTime);

test('answers are matched by id, whatever their order', async () => {
  const { server, client } = start();
  server.socket.welcome();
  const a = client.subscribe(['a:1']);
  const b = client.subscribe(['b:1']);
  server.socket.ok(2, ['b:1']);
  server.socket.ok(1, ['a:1']);
  assert.deepEqual(await a, { rooms: ['a:1'] });
  assert.deepEqual(await b, { rooms: ['b:1'] });
});

test('per-room refusals before the ok reject with every refusal and the rooms joined', async () => {
  const { server, client } = start();
  server.socket.welcome();
  const joined = client.subscribe(['task:8', 'task:9', 'bad*'], { events: ['task:*'] });
  server.socket.frame({ type: 'error', id: 1, code: 'forbidden', room: 'task:9', message: 'not allowed to join this room' });
  server.socket.frame({ type: 'error', id: 1, code: 'invalid_room', room: 'bad*', message: 'room names are ...' });
  server.socket.ok(1, ['task:8']);
  const error = await joined.then(() => assert.fail('resolved'), (e) => e);
  assert.ok(error instanceof RoomcastError);
  assert.equal(error.code, 'forbidden');
  assert.equal(error.room, 'task:9');
  assert.equal(error.message, 'not allowed to join this room');
  assert.deepEqual(error.joined, ['task:8']);
  assert.deepEqual(error.refusals, [
    { room: 'task:9', code: 'forbidden', message: 'not allowed to join this room' },
    { room: 'bad*', code: 'invalid_room', message: 'room names are ...' },
  ]);
  // The room that was joined is held, and resumed.
  server.socket.drop(1006);
  tick(250);
  server.socket.welcome();
  assert.deepEqual(server.socket.sent[0].rooms, ['task:8']);
});

test('a final error rejects with its code; nothing is held', async () => {
  const { server, client } = start();
  server.socket.welcome();
  const joined = client.subscribe(['task:9'], { token: 'expired' });
  server.socket.frame({ type: 'error', id: 1, code: 'invalid_token', message: 'subscription token refused: expired' });
  await assert.rejects(joined, { name: 'RoomcastError', code: 'invalid_token', message: 'subscription token refused: expired', joined: [], refusals: [] });
  const tooMany = client.subscribe(['x']);
  server.socket.frame({ type: 'error', id: 2, code: 'bad_request', message: '300 rooms in one message, over the limit of 256 per connection' });
  await assert.rejects(tooMany, { code: 'bad_request' });
  server.socket.drop(1006);
  tick(250);
  server.socket.welcome();
  assert.deepEqual(server.socket.sent[0].rooms, []);
});

test('an error frame without an id (rate_limited) is exposed as the last error', () => {
  const { server, client } = start();
  server.socket.welcome();
  const seen = [];
  client.onStatus((status, error) => seen.push([status, error.code]));
  server.socket.frame({ type: 'error', id: null, code: 'rate_limited', message: 'too many messages' });
  assert.equal(client.lastError.code, 'rate_limited');
  assert.deepEqual(seen, [['open', 'rate_limited']]);
});

test('requests made before the welcome are sent after it, in order', async () => {
  const { server, client } = start();
  const a = client.subscribe(['a:1']);
  const b = client.unsubscribe(['z:1']);
  assert.deepEqual(server.socket.sent, []);
  server.socket.welcome();
  assert.deepEqual(server.socket.sent, [
    { type: 'subscribe', id: 1, rooms: ['a:1'] },
    { type: 'unsubscribe', id: 2, rooms: ['z:1'] },
  ]);
  server.socket.ok(1, ['a:1']);
  server.socket.ok(2, []);
  assert.deepEqual(await a, { rooms: ['a:1'] });
  assert.deepEqual(await b, { rooms: [] });
});

test('requests unanswered at a disconnect are sent again after the resume, refusals collected anew', async () => {
  const { server, client } = start();
  server.socket.welcome({ 't:0': 1 });
  const joined = client.subscribe(['a:1', 'b:1']);
  server.socket.frame({ type: 'error', id: 1, code: 'forbidden', room: 'b:1', message: 'no' });
  server.socket.drop(1006);
  tick(250);
  server.socket.welcome();
  // The waiting subscription rides in the resume (for its gap), then is asked again.
  assert.deepEqual(server.socket.sent, [{ type: 'resume', id: 2, positions: { 't:0': 1 }, rooms: ['a:1', 'b:1'] }]);
  server.socket.frame({ type: 'error', id: 2, code: 'forbidden', room: 'b:1', message: 'no' });
  server.socket.ok(2, ['user:42', 'a:1']);
  assert.deepEqual(server.socket.last, { type: 'subscribe', id: 1, rooms: ['a:1', 'b:1'] });
  server.socket.ok(1, ['a:1', 'b:1']);
  assert.deepEqual(await joined, { rooms: ['a:1', 'b:1'] });
});

test('an unsubscribe carried over a reconnect resolves with the rooms it left', async () => {
  const { server, client } = start();
  server.socket.welcome();
  const joined = client.subscribe(['a:1']);
  server.socket.ok(1, ['a:1']);
  await joined;
  const left = client.unsubscribe(['a:1']);
  server.socket.drop(1006);
  tick(250);
  server.socket.welcome();
  assert.deepEqual(server.socket.sent[0].rooms, []);
  server.socket.ok(3, ['user:42']);
  assert.deepEqual(server.socket.last, { type: 'unsubscribe', id: 2, rooms: ['a:1'] });
  server.socket.ok(2, []);
  assert.deepEqual(await left, { rooms: ['a:1'] });
});

test('close() rejects what waits, and what is asked after', async () => {
  const { server, client } = start();
  server.socket.welcome();
  const waiting = client.subscribe(['a:1']);
  client.close();
  await assert.rejects(waiting, { code: 'closed' });
  await assert.rejects(client.subscribe(['b:1']), { code: 'closed' });
  assert.equal(server.socket.sent.length, 1);
});

test('a terminal close rejects what waits with its reason', async () => {
  const { server, client } = start();
  server.socket.welcome();
  const waiting = client.subscribe(['a:1']);
  server.socket.drop(4003, 'forbidden');
  await assert.rejects(waiting, { code: 'forbidden' });
  await settle();
});

test('subscribe then unsubscribe before the ok: the room stays left, after a reconnect too', async () => {
  const { server, client } = start();
  server.socket.welcome({});
  const joined = client.subscribe(['a:1', 'b:1']);
  const left = client.unsubscribe(['a:1']);
  server.socket.ok(1, ['a:1', 'b:1']);
  server.socket.ok(2, ['a:1']);
  await Promise.all([joined, left]);
  // And a subscribe after the unsubscribe holds it again.
  const again = client.subscribe(['b:2']);
  const gone = client.unsubscribe(['b:2']);
  const back = client.subscribe(['b:2']);
  server.socket.ok(3, ['b:2']);
  server.socket.ok(4, ['b:2']);
  server.socket.ok(5, ['b:2']);
  await Promise.all([again, gone, back]);
  server.socket.drop(1006);
  tick(250);
  server.socket.welcome();
  assert.deepEqual(server.socket.sent[0].rooms, ['b:1', 'b:2']);
});

test('a request unanswered for requestTimeoutMs is rejected with timeout; its late answer is ignored', async () => {
  const { server, client } = start({ requestTimeoutMs: 5000 });
  server.socket.welcome({});
  const joined = client.subscribe(['a:1']);
  tick(4999);
  await settle();
  let settled = false;
  joined.catch(() => {}).finally(() => (settled = true));
  await settle();
  assert.equal(settled, false);
  tick(1);
  const error = await joined.then(() => assert.fail('resolved'), (e) => e);
  assert.ok(error instanceof RoomcastError);
  assert.equal(error.code, 'timeout');
  server.socket.ok(1, ['a:1']);
  assert.equal(client.lastError, null);
  server.socket.drop(1006);
  tick(250);
  server.socket.welcome();
  assert.deepEqual(server.socket.sent[0].rooms, [], 'a timed-out subscribe is not held');
});

test('the default request timeout is 30 s', async () => {
  const { server, client } = start();
  server.socket.welcome({});
  const joined = client.subscribe(['a:1']);
  tick(30_000);
  assert.equal((await joined.then(() => null, (e) => e)).code, 'timeout');
});

test('requests beyond the burst are paced at the refill rate, none lost', async () => {
  const { server, client } = start({ requestTimeoutMs: 0 });
  for (let i = 0; i < 60; i++) client.subscribe([`r:${i}`], { events: [`e${i}`] });
  server.socket.welcome({});
  assert.equal(server.socket.sent.length, 50, 'the burst at once');
  tick(49);
  assert.equal(server.socket.sent.length, 50);
  tick(1);
  assert.equal(server.socket.sent.length, 51, 'then one each 50 ms');
  tick(450);
  assert.equal(server.socket.sent.length, 60);
  assert.deepEqual(
    server.socket.sent.map((f) => f.id),
    Array.from({ length: 60 }, (_, i) => i + 1),
  );
});

test('the re-subscribes of a reconnect are paced too', async () => {
  const { server, client } = start({ requestTimeoutMs: 0, rateLimit: { burst: 5, perSecond: 10 } });
  server.socket.welcome({});
  for (let i = 0; i < 8; i++) client.subscribe([`r:${i}`], { token: `t${i}` });
  for (let i = 0; i < 8; i++) server.socket.ok(i + 1, [`r:${i}`]);
  await settle();
  server.socket.drop(1006);
  tick(250);
  server.socket.welcome();
  server.socket.ok(9, ['user:42', 'r:0']);
  // The resume, then 4 of 7 re-subscribes at once, the rest one each 100 ms.
  assert.equal(server.socket.sent.length, 5);
  tick(300);
  assert.deepEqual(
    server.socket.sent.map((f) => f.rooms),
    [['r:0'], ['r:1'], ['r:2'], ['r:3'], ['r:4'], ['r:5'], ['r:6'], ['r:7']],
  );
});

test('after rate_limited, only the requests the server dropped are sent again, and with backoff', async () => {
  const { server, client } = start();
  server.socket.welcome({});
  const a = client.subscribe(['a:1']);
  server.socket.frame({ type: 'error', id: null, code: 'rate_limited', message: 'too many messages' });
  const b = client.subscribe(['b:1']); // Still in flight when the budget has refilled.
  server.socket.mute = true;
  tick(1000);
  assert.equal(server.socket.pings.length, 1, 'a ping tells what was dropped');
  server.socket.ok(2, ['b:1']);
  server.socket.frame({ type: 'pong', id: server.socket.pings[0].id });
  assert.deepEqual(
    server.socket.sent.map((f) => f.id),
    [1, 2, 1],
    'the subscribe answered before the pong is not sent again',
  );
  // Dropped again: the next try waits twice as long.
  server.socket.frame({ type: 'error', id: null, code: 'rate_limited', message: 'too many messages' });
  tick(1999);
  assert.equal(server.socket.pings.length, 1);
  tick(1);
  assert.equal(server.socket.pings.length, 2);
  server.socket.ok(1, ['a:1']);
  assert.deepEqual(await Promise.all([a, b]), [{ rooms: ['a:1'] }, { rooms: ['b:1'] }]);
});
