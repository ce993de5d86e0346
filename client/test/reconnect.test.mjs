// Reconnect policy: by close code, with full-jitter backoff, failover over several URLs, and
// no retry where a retry cannot help.
import { afterEach, beforeEach, test } from 'node:test';
import assert from 'node:assert/strict';
import { fast, jitter, slow } from '../dist/backoff.js';
import { FakeServer, NOW, TOKEN, fakeTime, jwt, realTime, settle, start, tick } from './fake.mjs';
import { connect } from '../dist/index.js';

beforeEach(fakeTime);
afterEach(realTime);

/** Advances to just before `ms`, checks no new socket, then to `ms`, checks one. */
function reconnectsAfter(server, ms) {
  const before = server.count;
  tick(ms - 1);
  assert.equal(server.count, before, `no new connection before ${ms} ms`);
  tick(1);
  assert.equal(server.count, before + 1, `a new connection at ${ms} ms`);
}

test('full jitter stays within zero and the capped exponential', () => {
  const b = (r) => ({ baseMs: 500, maxMs: 30_000, random: () => r });
  assert.equal(jitter(b(0), 0), 0);
  assert.equal(jitter(b(0.999), 0), 499.5);
  assert.equal(jitter(b(0.5), 3), 2000);
  assert.equal(jitter(b(0.999), 20), 29_970);
  assert.equal(jitter(b(1), 60), 30_000);
  assert.equal(fast(b(0.5)), 250);
  assert.equal(slow(b(0)), 15_000);
  assert.equal(slow(b(0.999)), 29_985);
});

test('failures double the ceiling up to the cap; only a connection that stayed up resets it', async () => {
  const { server } = start({ backoff: { baseMs: 100, maxMs: 1000 }, getToken: () => TOKEN, token: undefined });
  await settle();
  // random 0.5: half of 100, 200, ... capped at 1000.
  for (const ceiling of [100, 200, 400, 800, 1000, 1000]) {
    server.socket.fail();
    const before = server.count;
    tick(ceiling / 2 - 1);
    await settle();
    assert.equal(server.count, before, `nothing before ${ceiling / 2} ms`);
    tick(1);
    await settle();
    assert.equal(server.count, before + 1, `a new attempt at ${ceiling / 2} ms`);
  }
  // Welcomed and closed at once: still at the cap.
  server.socket.welcome();
  server.socket.drop(1011);
  tick(499);
  await settle();
  assert.equal(server.count, 7);
  tick(1);
  await settle();
  assert.equal(server.count, 8, 'a connection closed right after its welcome keeps the ceiling');
  server.socket.welcome();
  tick(10_000);
  server.socket.drop(1011);
  tick(49);
  await settle();
  assert.equal(server.count, 8);
  tick(1);
  await settle();
  assert.equal(server.count, 9, 'the ceiling is back at the base once a connection stayed up 10 s');
});

test('1001 (drain) reconnects within a base interval, to the next URL', () => {
  const { server, client } = start({ urls: ['ws://a/ws', 'ws://b/ws'], url: undefined });
  server.socket.welcome();
  server.socket.drop(1001, 'draining');
  assert.equal(client.status, 'reconnecting');
  assert.equal(client.lastError.code, 'going_away');
  assert.equal(client.lastError.closeCode, 1001);
  assert.equal(client.lastError.message, 'draining');
  reconnectsAfter(server, 250);
  assert.equal(server.socket.url, 'ws://b/ws?resume=1');
});

test('4008 (slow consumer) resumes at once, on the same server', () => {
  const { server, client } = start({ urls: ['ws://a/ws', 'ws://b/ws'], url: undefined });
  server.socket.welcome({ 't:0': 5 });
  server.socket.drop(4008, 'slow consumer: resume to catch up');
  assert.equal(server.count, 1);
  tick(0);
  assert.equal(server.count, 2);
  assert.equal(server.socket.url, 'ws://a/ws?resume=1');
  assert.equal(client.lastError.code, 'slow_consumer');
  server.socket.welcome();
  assert.deepEqual(server.socket.sent[0], { type: 'resume', id: 1, positions: { 't:0': 5 }, rooms: [] });
});

test('4001 with getToken: a fresh token, at once', async () => {
  let n = 0;
  const tokens = [jwt({ sub: '42', exp: NOW / 1000 + 60, n: 1 }), jwt({ sub: '42', exp: NOW / 1000 + 3600, n: 2 })];
  const { server, client } = start({ token: undefined, getToken: () => tokens[n++] });
  await settle();
  assert.equal(server.socket.token, tokens[0]);
  server.socket.welcome();
  server.socket.drop(4001, 'token expired');
  assert.equal(client.lastError.code, 'token_expired');
  tick(0);
  await settle();
  assert.equal(n, 2);
  assert.equal(server.count, 2);
  assert.equal(server.socket.token, tokens[1]);
  assert.deepEqual(server.socket.protocols, ['roomcast.v1', `bearer.${tokens[1]}`]);
});

test('4001 with a static token: closed, no retry', () => {
  const { server, client } = start();
  const seen = [];
  client.onStatus((status, error) => seen.push([status, error?.code]));
  server.socket.welcome();
  server.socket.drop(4001, 'token expired');
  assert.equal(client.status, 'closed');
  assert.equal(client.lastError.code, 'token_expired');
  tick(600_000);
  assert.equal(server.count, 1);
  assert.deepEqual(seen, [['open', undefined], ['closed', 'token_expired']]);
});

test('4003: closed, no retry', () => {
  for (const [code, name] of [[4003, 'forbidden']]) {
    const { server, client } = start();
    server.socket.welcome();
    server.socket.drop(code);
    assert.equal(client.status, 'closed');
    assert.equal(client.lastError.code, name);
    assert.equal(client.lastError.closeCode, code);
    tick(600_000);
    assert.equal(server.count, 1);
  }
});

test('client bugs (1002, 1007, 1008, 1009) and 4029 never reconnect sooner than half the cap', () => {
  for (const [code, name] of [[1002, 'protocol_error'], [1007, 'invalid_payload'], [1008, 'policy_violation'], [1009, 'message_too_big'], [4029, 'rate_limited']]) {
    const { server, client } = start({ random: () => 0 });
    server.socket.welcome();
    server.socket.drop(code);
    assert.equal(client.lastError.code, name);
    assert.equal(client.status, 'reconnecting');
    reconnectsAfter(server, 15_000);
    // Every time: an open connection does not make the next one fast.
    server.socket.welcome();
    server.socket.drop(code);
    reconnectsAfter(server, 15_000);
  }
});

test('a 1000 the client did not ask for (a proxy) is a lost connection: back off, resume', () => {
  const { server, client } = start({ random: () => 0.5 });
  server.socket.welcome({ 't:0': 1 });
  server.socket.drop(1000);
  assert.equal(client.status, 'reconnecting');
  assert.equal(client.lastError.code, 'normal_closure');
  reconnectsAfter(server, 250);
  assert.equal(server.socket.url, 'ws://a/ws?resume=1');
});

test('1006 and 1011 back off and fail over in turn', () => {
  const { server } = start({ urls: ['ws://a/ws', 'ws://b/ws', 'ws://c/ws'], url: undefined, random: () => 0 });
  server.socket.welcome();
  server.socket.drop(1006);
  tick(0);
  assert.equal(server.socket.url, 'ws://b/ws?resume=1');
  server.socket.fail();
  tick(0);
  assert.equal(server.socket.url, 'ws://c/ws?resume=1');
  server.socket.welcome();
  server.socket.drop(1011);
  tick(0);
  assert.equal(server.socket.url, 'ws://a/ws?resume=1');
  assert.deepEqual(server.sockets.map((s) => s.url.slice(5, 6)), ['a', 'b', 'c', 'a']);
});

test('a first connection that fails is still a first connection: no ?resume=1', () => {
  const { server } = start({ urls: ['ws://a/ws', 'ws://b/ws'], url: undefined, random: () => 0 });
  server.socket.fail();
  tick(0);
  assert.equal(server.socket.url, 'ws://b/ws');
});

test('a static token that never got a connection gives up after 5 failed attempts', () => {
  const { server, client } = start({ random: () => 0 });
  for (let i = 1; i < 5; i++) {
    server.socket.fail();
    tick(0);
    assert.equal(server.count, i + 1);
    assert.equal(client.status, 'connecting');
    assert.equal(client.lastError.code, 'connection_lost');
  }
  server.socket.fail();
  assert.equal(client.status, 'closed');
  assert.equal(client.lastError.code, 'handshake_refused');
  tick(600_000);
  assert.equal(server.count, 5);
});

test('a static token that worked keeps trying through an outage', () => {
  const { server, client } = start({ random: () => 0 });
  server.socket.welcome();
  for (let i = 0; i < 20; i++) {
    server.socket.fail();
    tick(0);
  }
  assert.equal(client.status, 'reconnecting');
  assert.equal(server.count, 21);
});

test('an expired static token is not offered: closed with token_expired', () => {
  const { server, client } = start({ random: () => 0, token: jwt({ sub: '42', exp: NOW / 1000 + 10 }) });
  server.socket.welcome();
  tick(20_000);
  server.socket.drop(1006);
  tick(0);
  assert.equal(server.count, 1);
  assert.equal(client.status, 'closed');
  assert.equal(client.lastError.code, 'token_expired');
});

test('close() ends it: no reconnect, the socket closed with 1000', () => {
  const { server, client } = start();
  server.socket.welcome();
  const socket = server.socket;
  client.close();
  assert.equal(client.status, 'closed');
  assert.equal(socket.closedWith, 1000);
  socket.drop(1000);
  tick(600_000);
  assert.equal(server.count, 1);
  assert.equal(client.lastError, null);
});

test('connect needs a URL and a token', () => {
  const server = new FakeServer();
  assert.throws(() => connect({ token: TOKEN, WebSocket: server.WebSocket }), TypeError);
  assert.throws(() => connect({ url: 'ws://a/ws', WebSocket: server.WebSocket }), TypeError);
  const global = globalThis.WebSocket;
  delete globalThis.WebSocket;
  try {
    assert.throws(() => connect({ url: 'ws://a/ws', token: TOKEN }), { name: 'TypeError', message: /pass options.WebSocket/ });
  } finally {
    if (global) globalThis.WebSocket = global;
  }
});

test('a getToken that fails is asked again with backoff', async () => {
  let calls = 0;
  const getToken = () => (++calls === 1 ? Promise.reject(new Error('auth service down')) : TOKEN);
  const { server, client } = start({ token: undefined, getToken });
  await settle();
  assert.equal(server.count, 0);
  assert.equal(client.status, 'connecting');
  assert.equal(client.lastError.code, 'token_unavailable');
  assert.equal(client.lastError.message, 'Error: auth service down');
  tick(249);
  await settle();
  assert.equal(calls, 1);
  tick(1);
  await settle();
  assert.equal(calls, 2);
  assert.equal(server.count, 1);
  assert.equal(server.socket.token, TOKEN);
});

test('a getToken that gives an expired token: not offered, asked again with backoff', async () => {
  const expired = jwt({ sub: '42', exp: NOW / 1000 - 1 });
  let calls = 0;
  const { server, client } = start({ token: undefined, getToken: () => (++calls === 1 ? expired : TOKEN) });
  await settle();
  assert.equal(server.count, 0);
  assert.equal(client.lastError.code, 'token_expired');
  tick(249);
  await settle();
  assert.equal(calls, 1);
  tick(1);
  await settle();
  assert.equal(calls, 2);
  assert.equal(server.socket.token, TOKEN);
});

test('4008 or 4001 right after each welcome: at once the first time, then backing off', async () => {
  const { server } = start({ token: undefined, getToken: () => TOKEN });
  await settle();
  server.socket.welcome();
  tick(60_000);
  server.socket.drop(4008);
  tick(0);
  await settle();
  assert.equal(server.count, 2, 'at once after a connection that stayed up');
  for (const [code, ms] of [[4008, 500], [4001, 1000], [4008, 2000]]) {
    server.socket.welcome();
    server.socket.ok(1, ['user:42']);
    server.socket.drop(code);
    const before = server.count;
    tick(ms - 1);
    await settle();
    assert.equal(server.count, before, `${code}: nothing before ${ms} ms`);
    tick(1);
    await settle();
    assert.equal(server.count, before + 1, `${code}: a new attempt at ${ms} ms`);
  }
});

test('a WebSocket constructor that throws: closed when nothing can change, the next URL otherwise', async () => {
  class Throwing {
    constructor() {
      throw new SyntaxError("Failed to construct 'WebSocket': The subprotocol is invalid.");
    }
  }
  const one = connect({ url: 'ws://a/ws', token: 'bad\ntoken', WebSocket: Throwing });
  assert.equal(one.status, 'closed');
  assert.equal(one.lastError.code, 'connect_failed');
  assert.match(one.lastError.message, /subprotocol is invalid/);

  const server = new FakeServer();
  const urls = [];
  class FirstThrows extends server.WebSocket {
    constructor(url, protocols) {
      urls.push(url);
      if (url.startsWith('bad')) throw new SyntaxError('The URL is invalid.');
      super(url, protocols);
    }
  }
  const two = connect({ urls: ['bad url', 'ws://b/ws'], token: TOKEN, WebSocket: FirstThrows, random: () => 0.5 });
  assert.equal(two.status, 'connecting');
  assert.equal(two.lastError.code, 'connect_failed');
  tick(250);
  assert.deepEqual(urls, ['bad url', 'ws://b/ws']);
  server.socket.welcome();
  assert.equal(two.status, 'open');
  assert.equal(two.lastError, null);
  two.close();
});

test('lastError is cleared once a new connection is welcomed and resumed', () => {
  const { server, client } = start();
  const seen = [];
  client.onStatus((status, error) => seen.push([status, error?.code ?? null]));
  server.socket.welcome();
  server.socket.drop(1011);
  assert.equal(client.lastError.code, 'internal_error');
  tick(250);
  server.socket.welcome();
  assert.equal(client.lastError, null);
  server.socket.ok(1, ['user:42']);
  assert.deepEqual(seen, [
    ['open', null],
    ['reconnecting', 'internal_error'],
    ['open', null],
  ]);
});
