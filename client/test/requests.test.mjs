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
