/**
 * One logical connection to roomcast: the state machine that dials, resumes, reconnects by
 * close code, re-establishes subscriptions, refreshes the token before it expires, and hands
 * each event, once, to the handlers whose pattern matches its name.
 */
import { fast, jitter, slow, type Backoff, type BackoffOptions } from './backoff.js';
import { RoomcastError, type Refusal } from './errors.js';
import { compile, type Matcher } from './patterns.js';
import { CLOSE_NAMES, decide, type Decision } from './policy.js';
import { Positions, sessionStore, type PositionMap, type PositionStorage } from './positions.js';
import { Requests, type ServerFrame } from './requests.js';
import { Subscriptions, type Group, type SubscribeOptions } from './subscriptions.js';
import { expiry } from './token.js';

export type Status = 'connecting' | 'open' | 'reconnecting' | 'closed';

/** What a handler learns besides the payload. */
export interface EventInfo {
  /** The event's name. */
  event: string;
  /** `topic:partition:offset`. */
  pos: string;
  /** The Kafka record's timestamp in milliseconds, when it has one. */
  ts?: number;
  /** The rooms the record targeted, when the route exposes them. */
  rooms?: string[];
}

export type Handler<P> = (payload: P, info: EventInfo) => void;

/** Event names to payload types, for `connect<Events>()`. */
export type EventMap = Record<string, unknown>;

/** The part of the WebSocket API the client uses (the browser's, or one passed in). */
export interface SocketLike {
  onmessage: ((event: { data: any }) => void) | null;
  onclose: ((event: { code: number; reason: string }) => void) | null;
  onerror: ((event: unknown) => void) | null;
  send(data: string): void;
  close(code?: number, reason?: string): void;
}
export type SocketConstructor = new (url: string, protocols: string[]) => SocketLike;

export interface ConnectOptions {
  /** The server's WebSocket URL (`wss://host/ws`). */
  url?: string;
  /** Several servers, tried in turn when one fails or goes away. */
  urls?: string[];
  /** A connection token. */
  token?: string;
  /** Gives a connection token: asked on the first connection, after the server refused or
   * expired one, and before the current one expires (refreshed over the open connection). */
  getToken?: () => string | Promise<string>;
  /** Keep the position map and resume on reconnect (default true). */
  resume?: boolean;
  /** Keep the map across page loads: true for sessionStorage, or a storage of the app's. */
  persist?: boolean | PositionStorage;
  /** The storage key (default `roomcast:positions`). */
  persistKey?: string;
  /** The gap could not be replayed: refetch the state this page shows. */
  onResync?: (info: { reason: string }) => void;
  backoff?: BackoffOptions;
  /** Refresh this long before the token's `exp` (default 30). */
  refreshBeforeExpirySeconds?: number;
  /** A WebSocket implementation (default `globalThis.WebSocket`). */
  WebSocket?: SocketConstructor;
  /** A source of uniform numbers in [0, 1) for the backoff's jitter (default `Math.random`). */
  random?: () => number;
}

/** Failed attempts before a static token that never got a connection is taken as refused:
 * a browser cannot tell a 401 from a server that is down. */
const STATIC_TOKEN_ATTEMPTS = 5;

const SUBPROTOCOL = 'roomcast.v1';

const report = (error: unknown) => ((globalThis as any).reportError ?? console.error)(error);

export class RoomcastClient<E extends EventMap = Record<string, any>> {
  status: Status = 'connecting';
  lastError: RoomcastError | null = null;

  private readonly urls: string[];
  private readonly backoff: Backoff;
  private readonly Socket: SocketConstructor;
  private readonly store: Positions;
  private readonly rooms = new Subscriptions();
  private readonly requests = new Requests();
  private readonly handlers = new Set<[Matcher, Handler<any>]>();
  private readonly listeners = new Set<(status: Status, error: RoomcastError | null) => void>();
  private ws?: SocketLike;
  /** The current connection was opened with `?resume=1`. */
  private resuming = false;
  /** The current connection is welcomed (and resumed): requests go out as they are made. */
  private ready = false;
  private token?: string;
  private freshToken = true;
  private turn = 0;
  private attempt = 0;
  private failedBeforeOpen = 0;
  private everOpen = false;
  private timer?: ReturnType<typeof setTimeout>;
  private refreshTimer?: ReturnType<typeof setTimeout>;
  private beatTimer?: ReturnType<typeof setTimeout>;
  /** A frame arrived since the last heartbeat. */
  private heard = true;

  constructor(private readonly options: ConnectOptions) {
    this.urls = options.urls ?? (options.url ? [options.url] : []);
    if (!this.urls.length) throw new TypeError('roomcast: url or urls is required');
    if (!options.token && !options.getToken) throw new TypeError('roomcast: token or getToken is required');
    this.token = options.token;
    this.backoff = {
      baseMs: options.backoff?.baseMs ?? 500,
      maxMs: options.backoff?.maxMs ?? 30_000,
      random: options.random ?? Math.random,
    };
    this.Socket = options.WebSocket ?? (globalThis as any).WebSocket;
    if (!this.Socket) throw new TypeError('roomcast: no global WebSocket here: pass one as options.WebSocket');
    const persist = options.persist;
    this.store = new Positions(persist === true ? sessionStore() : persist || undefined, options.persistKey);
    void this.dial();
  }

  /** Calls `listener` on every change of status or error; returns its unsubscribe. */
  onStatus(listener: (status: Status, error: RoomcastError | null) => void): () => void {
    this.listeners.add(listener);
    return () => void this.listeners.delete(listener);
  }

  /** Calls `handler` for each event whose name matches `pattern` (`*`: one segment, `**`:
   * any number); returns its unsubscribe. */
  on<K extends keyof E & string>(pattern: K, handler: Handler<E[K]>): () => void;
  on(pattern: string, handler: Handler<unknown>): () => void;
  on(pattern: string, handler: Handler<any>): () => void {
    const entry: [Matcher, Handler<any>] = [compile(pattern), handler];
    this.handlers.add(entry);
    return () => void this.handlers.delete(entry);
  }

  /** Joins `rooms`; resolves when every room is joined, rejects with the refusals otherwise.
   * The rooms are joined again after every reconnect. */
  subscribe(rooms: string[], options: SubscribeOptions = {}): Promise<{ rooms: string[] }> {
    const frame = { type: 'subscribe', rooms, events: options.events, token: options.token };
    return this.request(frame, (joined) => {
      this.rooms.join(joined, options);
      return joined;
    });
  }

  /** Leaves `rooms`; resolves with the rooms left. */
  unsubscribe(rooms: string[]): Promise<{ rooms: string[] }> {
    const held = this.rooms.leave(rooms);
    return this.request({ type: 'unsubscribe', rooms }, (left) => [...new Set([...left, ...held])]);
  }

  /** The current position map, `{"topic:partition": offset}`. */
  positions(): PositionMap {
    return this.store.snapshot();
  }

  /** Closes the connection for good: no reconnect, waiting requests rejected. */
  close(): void {
    this.stop(null);
  }

  private request(
    frame: Record<string, unknown>,
    settle: (rooms: string[]) => string[],
  ): Promise<{ rooms: string[] }> {
    return new Promise((resolve, reject) => {
      if (this.status === 'closed') return reject(new RoomcastError('closed', 'the client is closed'));
      const sent = this.requests.add(
        frame,
        (answer, refusals) => {
          if (answer.type !== 'ok') return reject(refused(answer, refusals));
          const rooms = settle(answer.rooms ?? []);
          if (refusals.length) reject(refused(refusals[0], refusals, rooms));
          else resolve({ rooms });
        },
        true,
      );
      if (this.ready) this.send(sent);
    });
  }

  /** A request of this connection's own (resume, refresh, re-subscribe): not sent again. */
  private internal(frame: Record<string, unknown>, final: (answer: ServerFrame, refusals: Refusal[]) => void): void {
    this.send(this.requests.add(frame, final, false));
  }

  private send(frame: object): void {
    this.ws?.send(JSON.stringify(frame));
  }

  private async dial(): Promise<void> {
    const { getToken } = this.options;
    if (getToken && (this.freshToken || !this.token || expiry(this.token)! <= Date.now())) {
      try {
        this.token = await getToken();
        this.freshToken = false;
      } catch (e) {
        return this.retry(new RoomcastError('token_unavailable', String(e)), { pace: 'backoff' });
      }
    } else if (!getToken && expiry(this.token)! <= Date.now()) {
      return this.stop(new RoomcastError('token_expired', 'the token has expired and there is no getToken'));
    }
    if (this.status === 'closed') return;
    this.resuming = this.options.resume !== false && this.store.known;
    const url = this.urls[this.turn % this.urls.length];
    const ws = new this.Socket(
      this.resuming ? url + (url.includes('?') ? '&' : '?') + 'resume=1' : url,
      [SUBPROTOCOL, 'bearer.' + this.token],
    );
    this.ws = ws;
    let welcomed = false;
    ws.onmessage = (message) => {
      if (this.ws !== ws) return;
      this.heard = true;
      const frame: ServerFrame = JSON.parse(message.data);
      if (frame.type === 'welcome') welcomed = true;
      this.frame(frame);
    };
    ws.onclose = (event) => {
      if (this.ws === ws) this.dropped(event.code, event.reason, welcomed);
    };
    ws.onerror = () => {};
  }

  private frame(frame: ServerFrame): void {
    switch (frame.type) {
      case 'welcome':
        return this.welcome(frame);
      case 'event':
        return this.event(frame);
      case 'positions':
        return this.store.set(frame.positions);
      case 'resync':
        return this.options.onResync?.({ reason: frame.reason });
      default:
        // `ok`, `error`, `pong`. A `rate_limited` error has no id: this client sends too much.
        if (!this.requests.answer(frame) && frame.type === 'error') {
          this.setStatus(this.status, new RoomcastError(frame.code, frame.message));
          // Messages over the budget were dropped unanswered: ask again, once it has refilled.
          const ws = this.ws;
          if (frame.code === 'rate_limited') {
            setTimeout(() => this.ws === ws && this.ready && this.requests.frames().forEach((f) => this.send(f)), 1000);
          }
        }
    }
  }

  private welcome(frame: ServerFrame): void {
    this.everOpen = true;
    this.failedBeforeOpen = 0;
    this.scheduleRefresh();
    this.listen((frame.heartbeat || 25) * 1000);
    if (!this.resuming) {
      // A fresh connection's map starts at its welcome. On `?resume=1` the welcome's positions
      // are never taken: the stored map is what the resume replays from, and a drop before
      // the resume is answered must leave it as it was.
      this.store.reset(frame.positions ?? {});
      for (const group of this.rooms.groups()) this.resubscribe(group);
      return this.opened();
    }
    this.resume(this.rooms.plan(this.pendingSubscriptions()));
  }

  private resume({ resume, narrow, unreplayed }: ReturnType<Subscriptions['plan']>): void {
    const frame = { type: 'resume', positions: this.store.snapshot(), ...resume };
    this.internal(frame, (answer, refusals) => {
      if (answer.type !== 'ok') {
        // Refused whole; the server still waits for a resume. Resume into the user's own
        // rooms alone, and join the others without their gap.
        const error = refused(answer, refusals);
        if (!resume.rooms.length) {
          // Even the bare map is refused: never in a fast loop.
          const ws = this.ws!;
          this.detach();
          ws.close(1000);
          return this.retry(error, { pace: 'slow' });
        }
        this.setStatus(this.status, error);
        const groups = this.rooms.groups();
        return this.resume({ resume: { rooms: [] }, narrow: [], unreplayed: groups });
      }
      if (refusals.length) this.lost(refusals, answer.rooms);
      for (const group of narrow) this.resubscribe(group);
      for (const group of unreplayed) this.resubscribe(group);
      if (unreplayed.length) {
        const rooms = unreplayed.flatMap((g) => g.rooms).join(', ');
        this.options.onResync?.({ reason: `rejoined without a replay: ${rooms}` });
      }
      this.opened();
    });
  }

  /** Subscribes again to rooms held before; drops those the server now refuses. */
  private resubscribe({ rooms, events, token }: Group): void {
    this.internal({ type: 'subscribe', rooms, events, token }, (answer, refusals) => {
      if (answer.type !== 'ok') this.lost(rooms.map((room) => ({ room, code: answer.code, message: answer.message })), []);
      else if (refusals.length) this.lost(refusals, answer.rooms);
    });
  }

  /** Rooms held before that the server refused on a reconnect: no longer held. */
  private lost(refusals: Refusal[], joined: string[]): void {
    this.rooms.leave(refusals.map((r) => r.room));
    this.setStatus(this.status, refused(refusals[0], refusals, joined));
  }

  private pendingSubscriptions(): Group[] {
    return this.requests
      .frames()
      .filter((f) => f.type === 'subscribe')
      .map((f) => ({ rooms: f.rooms, events: f.events, token: f.token }) as Group);
  }

  private opened(): void {
    this.ready = true;
    this.attempt = 0;
    this.setStatus('open');
    for (const frame of this.requests.frames()) this.send(frame);
  }

  private event(frame: ServerFrame): void {
    if (!this.store.advance(frame.pos)) return;
    const info: EventInfo = { event: frame.event, pos: frame.pos, ts: frame.ts, rooms: frame.rooms };
    for (const [matches, handler] of this.handlers) {
      if (!matches(frame.event)) continue;
      try {
        handler(frame.payload, info);
      } catch (error) {
        report(error);
      }
    }
  }

  /**
   * A browser sees neither the server's pings nor a connection that died without a word
   * (a laptop asleep, a network gone): a `ping` each heartbeat, and a connection silent for
   * a whole heartbeat after one is taken as lost.
   */
  private listen(ms: number): void {
    this.beatTimer = setTimeout(() => {
      if (this.heard) {
        this.heard = false;
        this.internal({ type: 'ping' }, () => {});
        return this.listen(ms);
      }
      const ws = this.ws!;
      this.detach();
      ws.close(1000);
      this.retry(new RoomcastError('connection_lost', 'no answer from the server', { closeCode: 1006 }), {
        pace: 'backoff',
        failover: true,
      });
    }, ms);
  }

  private scheduleRefresh(): void {
    clearTimeout(this.refreshTimer);
    const exp = expiry(this.token);
    if (!exp || !this.options.getToken) return;
    const left = exp - Date.now();
    const due = left - (this.options.refreshBeforeExpirySeconds ?? 30) * 1000;
    // A token shorter-lived than the lead is refreshed halfway through what is left, not at
    // once; and never sooner than a second, so that a getToken that keeps giving a token
    // near its end cannot make a loop of refreshes.
    this.refreshTimer = setTimeout(() => void this.refresh(), Math.max(due > 0 ? due : left / 2, 1000));
  }

  private async refresh(): Promise<void> {
    const ws = this.ws;
    let token: string;
    try {
      token = await this.options.getToken!();
    } catch {
      // The server's 4001 at `exp` brings a reconnect with a fresh token.
      return;
    }
    if (this.ws !== ws || !ws) return;
    this.internal({ type: 'refresh', token }, (answer, refusals) => {
      if (answer.type === 'ok') {
        this.token = token;
        return this.scheduleRefresh();
      }
      // Refused: a new connection, with a token asked for anew.
      this.detach();
      ws.close(1000);
      this.retry(refused(answer, refusals), { pace: 'now', freshToken: true });
    });
  }

  private dropped(code: number, reason: string, welcomed: boolean): void {
    this.detach();
    const error = new RoomcastError(CLOSE_NAMES[code] ?? 'closed', reason || `closed with ${code}`, {
      closeCode: code,
    });
    if (welcomed) return this.retry(error, decide(code, !this.options.getToken));
    // Refused before the upgrade, or the server is unreachable: the browser cannot tell.
    if (!this.options.getToken && !this.everOpen && ++this.failedBeforeOpen >= STATIC_TOKEN_ATTEMPTS) {
      return this.stop(new RoomcastError('handshake_refused', `no connection in ${STATIC_TOKEN_ATTEMPTS} attempts`, { closeCode: code }));
    }
    this.retry(error, { pace: 'backoff', failover: true, freshToken: true });
  }

  /** Forgets the current connection and what was tied to it. */
  private detach(): void {
    this.ws = undefined;
    this.ready = false;
    this.heard = true;
    clearTimeout(this.refreshTimer);
    clearTimeout(this.beatTimer);
    this.requests.disconnected();
  }

  private retry(error: RoomcastError, decision: Decision): void {
    if (decision.pace === 'stop') return this.stop(error);
    if (decision.failover) this.turn++;
    if (decision.freshToken) this.freshToken = true;
    const b = this.backoff;
    const pace = decision.pace;
    const delay = pace === 'now' ? 0 : pace === 'fast' ? fast(b) : pace === 'slow' ? slow(b) : jitter(b, this.attempt++);
    this.setStatus(this.everOpen ? 'reconnecting' : 'connecting', error);
    this.timer = setTimeout(() => void this.dial(), delay);
  }

  private stop(error: RoomcastError | null): void {
    if (this.status === 'closed') return;
    clearTimeout(this.timer);
    const ws = this.ws;
    this.detach();
    ws?.close(1000);
    this.setStatus('closed', error);
    this.requests.fail({ type: 'error', code: error?.code ?? 'closed', message: error?.message ?? 'the client is closed' });
  }

  private setStatus(status: Status, error?: RoomcastError | null): void {
    this.status = status;
    if (error) this.lastError = error;
    for (const listener of [...this.listeners]) listener(status, this.lastError);
  }
}

/** The error a request rejects with: the final error, or the first of the refused rooms. */
function refused(first: Record<string, any>, refusals: Refusal[], joined: string[] = []) {
  return new RoomcastError(first.code, first.message, { room: first.room, refusals, joined });
}

/** Opens a connection; `Events` maps event names to their payload types. */
export function connect<E extends EventMap = Record<string, any>>(options: ConnectOptions): RoomcastClient<E> {
  return new RoomcastClient<E>(options);
}
