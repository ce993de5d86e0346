// A scripted fake server: a WebSocket class the client is given, whose sockets a test drives
// frame by frame, and what the tests share (tokens, timers, a storage).
import { mock } from 'node:test';
import { connect } from '../dist/index.js';

/** Every socket the client opened, in order, each scripted by the test. */
export class FakeServer {
  sockets = [];

  constructor() {
    const server = this;
    this.WebSocket = class FakeSocket {
      constructor(url, protocols) {
        this.url = url;
        this.protocols = protocols;
        this.sent = [];
        this.pings = [];
        this.mute = false;
        this.closedWith = undefined;
        this.onmessage = this.onclose = this.onerror = null;
        server.sockets.push(this);
      }
      send(data) {
        if (this.closedWith !== undefined) throw new Error('send after close');
        const frame = JSON.parse(data);
        // Heartbeat pings are answered at once (unless the test mutes the server) and kept
        // apart, so that `sent` shows what the tests are about.
        if (frame.type === 'ping') {
          this.pings.push(frame);
          if (!this.mute) this.frame({ type: 'pong', id: frame.id });
          return;
        }
        this.sent.push(frame);
      }
      close(code) {
        this.closedWith = code ?? 1005;
      }
      /** The server sends a frame. */
      frame(frame) {
        this.onmessage({ data: JSON.stringify(frame) });
      }
      welcome(positions = {}, extra = {}) {
        this.frame({ type: 'welcome', connection: '1', user: '42', rooms: ['user:42'], heartbeat: 25, positions, server: 'r0', protocol: 1, ...extra });
      }
      event(pos, event = 'task:update', payload = { pos }) {
        this.frame({ type: 'event', event, pos, ts: 1, payload });
      }
      ok(id, rooms = [], extra = {}) {
        this.frame({ type: 'ok', id, rooms, ...extra });
      }
      /** The server closes (a close frame, or 1006 when the TCP connection just ends). */
      drop(code = 1006, reason = '') {
        this.onclose({ code, reason });
      }
      /** The connection fails before the upgrade (a refusal, or no server): what a browser sees. */
      fail() {
        this.onerror?.({});
        this.onclose({ code: 1006, reason: '' });
      }
      /** The last frame the client sent. */
      get last() {
        return this.sent[this.sent.length - 1];
      }
      /** The token offered in the subprotocol list. */
      get token() {
        return this.protocols[1].slice('bearer.'.length);
      }
    };
  }

  get count() {
    return this.sockets.length;
  }

  /** The newest socket. */
  get socket() {
    return this.sockets[this.sockets.length - 1];
  }
}

export const NOW = 1_800_000_000_000;

/** An unsigned JWT whose payload has `claims` (the client never checks the signature). */
export function jwt(claims) {
  const part = (o) => Buffer.from(JSON.stringify(o)).toString('base64url');
  return `${part({ alg: 'HS256' })}.${part(claims)}.sig`;
}

/** A token valid for an hour from NOW. */
export const TOKEN = jwt({ sub: '42', exp: NOW / 1000 + 3600 });

/** Takes over setTimeout and Date, starting at NOW. */
export function fakeTime() {
  mock.timers.enable({ apis: ['setTimeout', 'Date'], now: NOW });
}

export function realTime() {
  mock.timers.reset();
}

export function tick(ms) {
  mock.timers.tick(ms);
}

/** Lets pending promise callbacks run (getToken, request settlement). */
export async function settle() {
  for (let i = 0; i < 10; i++) await Promise.resolve();
}

/** A client on a fake server; random is 0.5 unless said otherwise. */
export function start(options = {}) {
  const server = new FakeServer();
  const client = connect({ url: 'ws://a/ws', token: TOKEN, random: () => 0.5, WebSocket: server.WebSocket, ...options });
  return { server, client };
}

/** A Web Storage of a Map. */
export class MemoryStorage {
  items = new Map();
  getItem(key) {
    return this.items.has(key) ? this.items.get(key) : null;
  }
  setItem(key, value) {
    this.items.set(key, String(value));
  }
  removeItem(key) {
    this.items.delete(key);
  }
}
