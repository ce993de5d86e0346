// The application's callbacks (status listeners, onResync, event handlers) run inside the
// client's frame handling: what they throw is reported and the client carries on.
import { afterEach, beforeEach, mock, test } from 'node:test';
import assert from 'node:assert/strict';
import { fakeTime, realTime, start, tick } from './fake.mjs';

beforeEach(fakeTime);
afterEach(realTime);

test('callbacks that throw are reported; the client and the other callbacks go on', () => {
  const reported = mock.method(console, 'error', () => {});
  try {
    const { server, client } = start({
      onResync: () => {
        throw new Error('resync failed');
      },
    });
    const statuses = [];
    client.onStatus(() => {
      throw new Error('status failed');
    });
    client.onStatus((status) => statuses.push(status));
    const seen = [];
    client.on('**', () => {
      throw new Error('handler failed');
    });
    client.on('**', (payload, info) => seen.push(info.pos));
    server.socket.welcome({ 't:0': 1 });
    server.socket.event('t:0:2');
    server.socket.drop(1006);
    tick(250);
    server.socket.welcome();
    server.socket.frame({ type: 'resync', reason: 'too old' });
    server.socket.event('t:0:3');
    server.socket.ok(1, ['user:42']);
    server.socket.event('t:0:4');
    assert.deepEqual(seen, ['t:0:2', 't:0:3', 't:0:4']);
    assert.deepEqual(statuses, ['open', 'reconnecting', 'open']);
    assert.equal(client.status, 'open');
    assert.deepEqual(client.positions(), { 't:0': 4 });
    assert.deepEqual(
      reported.mock.calls.map((c) => c.arguments[0].message),
      ['status failed', 'handler failed', 'status failed', 'resync failed', 'handler failed', 'status failed', 'handler failed'],
    );
  } finally {
    reported.mock.restore();
  }
});
