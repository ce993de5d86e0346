// The React entry: the provider hands the client down, useEvent follows its handler and
// pattern and lets go on unmount, useStatus re-renders on every change of status and error.
import { afterEach, beforeEach, test } from 'node:test';
import assert from 'node:assert/strict';
import { createElement as h, useState } from 'react';
import TestRenderer from 'react-test-renderer';
import { RoomcastProvider, useEvent, useStatus } from '../dist/react.js';
import { fakeTime, realTime, start } from './fake.mjs';

const { act, create } = TestRenderer;
globalThis.IS_REACT_ACT_ENVIRONMENT = true;

beforeEach(fakeTime);
afterEach(realTime);

function Badge() {
  const { status, error } = useStatus();
  return h('span', null, error ? `${status}: ${error.code}` : status);
}

function Rows({ pattern }) {
  const [rows, setRows] = useState([]);
  useEvent(pattern, (payload, info) => setRows((r) => [...r, `${info.event}#${payload.id}`]));
  return h('ul', null, rows.join(','));
}

const render = (client, child) => {
  let root;
  act(() => {
    root = create(h(RoomcastProvider, { client }, child));
  });
  return root;
};

test('useStatus follows the status and the last error', () => {
  const { server, client } = start();
  const root = render(client, h(Badge));
  assert.equal(root.toJSON().children[0], 'connecting');
  act(() => server.socket.welcome());
  assert.equal(root.toJSON().children[0], 'open');
  act(() => server.socket.drop(1001, 'draining'));
  assert.equal(root.toJSON().children[0], 'reconnecting: going_away');
  act(() => client.close());
  assert.equal(root.toJSON().children[0], 'closed: going_away');
  act(() => root.unmount());
});

test('useEvent delivers matching events while mounted, with its latest pattern', () => {
  const { server, client } = start();
  const root = render(client, h(Rows, { pattern: 'users.*.deleted' }));
  act(() => server.socket.welcome());
  act(() => {
    server.socket.event('e:0:1', 'users.user.deleted', { id: 1 });
    server.socket.event('e:0:2', 'users.user.created', { id: 2 });
    server.socket.event('e:0:3', 'users.role.deleted', { id: 3 });
  });
  assert.equal(root.toJSON().children[0], 'users.user.deleted#1,users.role.deleted#3');
  act(() => root.update(h(RoomcastProvider, { client }, h(Rows, { pattern: 'users.**' }))));
  act(() => server.socket.event('e:0:4', 'users.user.created', { id: 4 }));
  assert.equal(root.toJSON().children[0], 'users.user.deleted#1,users.role.deleted#3,users.user.created#4');
  act(() => root.unmount());
  // Unmounted: its handler is gone (React would warn of a state update otherwise).
  const errors = [];
  const original = console.error;
  console.error = (...args) => errors.push(args.join(' '));
  try {
    server.socket.event('e:0:5', 'users.user.deleted', { id: 5 });
  } finally {
    console.error = original;
  }
  assert.deepEqual(errors, []);
  assert.equal(client.handlers_.size, 0, 'the handler was removed');
});

test('the hooks need a provider', () => {
  const errors = console.error;
  console.error = () => {};
  try {
    assert.throws(() => act(() => create(h(Badge))), /RoomcastProvider/);
  } finally {
    console.error = errors;
  }
});
