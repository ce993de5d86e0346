// Token refresh over the open connection, `refreshBeforeExpirySeconds` before `exp`, and a
// reconnect with a fresh token when the refresh is refused.
import { afterEach, beforeEach, test } from 'node:test';
import assert from 'node:assert/strict';
import { NOW, fakeTime, jwt, realTime, settle, start, tick } from './fake.mjs';

beforeEach(fakeTime);
afterEach(realTime);

const token = (expIn, n) => jwt({ sub: '42', exp: NOW / 1000 + expIn, n });

// Heartbeat pings take request ids too: these tests' connections ping once a day.
const QUIET = { heartbeat: 86_400 };

test('refreshes refreshBeforeExpirySeconds before exp, then again before the new exp', async () => {
  const tokens = [token(120, 1), token(300, 2), token(600, 3)];
  let asked = 0;
  const { server, client } = start({ token: undefined, getToken: () => tokens[asked++], refreshBeforeExpirySeconds: 30 });
  await settle();
  server.socket.welcome({}, QUIET);
  tick(89_999);
  await settle();
  assert.equal(asked, 1);
  assert.deepEqual(server.socket.sent, []);
  tick(1);
  await settle();
  assert.equal(asked, 2);
  assert.deepEqual(server.socket.last, { type: 'refresh', id: 1, token: tokens[1] });
  server.socket.ok(1);
  // The new token expires at +300 s: the next refresh is due at +270 s.
  tick(270_000 - 90_000 - 1);
  await settle();
  assert.equal(server.socket.sent.length, 1);
  tick(1);
  await settle();
  assert.deepEqual(server.socket.last, { type: 'refresh', id: 2, token: tokens[2] });
  assert.equal(server.count, 1, 'no reconnect');
  assert.equal(client.status, 'open');
});

test('the default is 30 s before exp; a static token is never refreshed', async () => {
  const dynamic = start({ token: undefined, getToken: () => token(100) });
  await settle();
  dynamic.server.socket.welcome({}, QUIET);
  tick(69_999);
  await settle();
  assert.equal(dynamic.server.socket.sent.length, 0);
  tick(1);
  await settle();
  assert.equal(dynamic.server.socket.last.type, 'refresh');

  const fixed = start({ token: token(100) });
  fixed.server.socket.welcome({}, QUIET);
  tick(99_000);
  await settle();
  assert.deepEqual(fixed.server.socket.sent, []);
});

test('a refused refresh reconnects at once with a token asked anew', async () => {
  const tokens = [token(60, 1), token(60, 2), token(3600, 3)];
  let asked = 0;
  const { server, client } = start({ token: undefined, getToken: () => tokens[asked++] });
  await settle();
  server.socket.welcome({ 't:0': 7 }, QUIET);
  tick(30_000);
  await settle();
  const first = server.socket;
  assert.deepEqual(first.last, { type: 'refresh', id: 1, token: tokens[1] });
  first.frame({ type: 'error', id: 1, code: 'invalid_token', message: 'refresh token refused: bad_signature' });
  assert.equal(first.closedWith, 1000);
  assert.equal(client.lastError.code, 'invalid_token');
  assert.equal(client.status, 'reconnecting');
  tick(0);
  await settle();
  assert.equal(asked, 3);
  assert.equal(server.count, 2);
  assert.equal(server.socket.token, tokens[2]);
  assert.equal(server.socket.url, 'ws://a/ws?resume=1');
  // The closed socket's own close event changes nothing.
  first.drop(1000);
  assert.equal(client.status, 'reconnecting');
  server.socket.welcome({}, QUIET);
  assert.deepEqual(server.socket.sent[0].positions, { 't:0': 7 });
});

test('a lead of most of the token\'s life is kept: 35 s before the exp of a 40 s token', async () => {
  const { server } = start({ token: undefined, getToken: () => token(40), refreshBeforeExpirySeconds: 35 });
  await settle();
  server.socket.welcome({}, QUIET);
  tick(4_999);
  await settle();
  assert.equal(server.socket.sent.length, 0);
  tick(1);
  await settle();
  assert.equal(server.socket.last.type, 'refresh');
});

test('a token shorter-lived than the lead is refreshed halfway through, each time', async () => {
  // Tokens of 20 s, the lead 30 s: every 10 s, not in a loop.
  const fresh = () => jwt({ sub: '42', exp: Date.now() / 1000 + 20 });
  const { server } = start({ token: undefined, getToken: fresh });
  await settle();
  server.socket.welcome({}, QUIET);
  for (let n = 1; n <= 3; n++) {
    tick(9_999);
    await settle();
    assert.equal(server.socket.sent.length, n - 1);
    tick(1);
    await settle();
    assert.equal(server.socket.sent.length, n);
    assert.equal(server.socket.last.type, 'refresh');
    server.socket.ok(n);
  }
});

test('a getToken that keeps giving the same token refreshes no more than once a second', async () => {
  const stale = token(10);
  const { server } = start({ token: undefined, getToken: () => stale });
  await settle();
  server.socket.welcome({}, QUIET);
  const at = [];
  for (let ms = 0; ms < 12_000; ms += 100) {
    tick(100);
    await settle();
    if (server.socket.sent.length > at.length) {
      at.push(ms + 100);
      server.socket.ok(at.length);
    }
  }
  // Halfway each time (5 s, then 2.5 s, 1.25 s), then a second apart.
  assert.deepEqual(at.slice(0, 5), [5000, 7500, 8800, 9800, 10800]);
});

test('a token living longer than a timer can wait is not refreshed at once', async () => {
  // Real timers: a delay past 2^31-1 ms is what makes setTimeout fire at once.
  realTime();
  const long = jwt({ sub: '42', exp: Math.floor(Date.now() / 1000) + 100 * 86_400 });
  let asked = 0;
  const { server, client } = start({ token: undefined, getToken: () => (asked++, long) });
  try {
    await settle();
    server.socket.welcome({}, QUIET);
    await new Promise((resolve) => setTimeout(resolve, 50));
    assert.equal(asked, 1);
    assert.deepEqual(server.socket.sent, []);
  } finally {
    client.close();
  }
});
