/**
 * One logical connection to roomcast: the state machine that dials, resumes, reconnects by
 * close code, re-establishes subscriptions, refreshes the token before it expires, and hands
 * each event, once, to the handlers whose pattern matches its name.
 */
import { fast, jitter, slow, type Backoff, type BackoffOptions } from './backoff.js';
import { RoomcastError, type Refusal } from './errors.js';
import { Pacer, type RateLimit } from './pacer.js';
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

/** A change of presence, in a room subscribed with `presence: true`. */
export interface PresenceEvent {
  /** `join`, `leave`: the user's first connection in `room` (on any server) opened, its last
   * closed. `online`, `offline`: the same for the user's connections anywhere, sent to the
   * server's status room (by default the tenant's room). */
  type: 'join' | 'leave' | 'online' | 'offline';
  user: string;
  /** The room joined or left (not for `online` and `offline`). */
  room?: string;
  /** When the server saw the change, in milliseconds. */
  ts?: number;
}

/** Who is in a room now. */
export interface Presence {
  /** Every user in the room on any server, with their connections in it. */
  users: Record<string, number>;
  /** False while the answering server is still reading the cluster's presence: `users` may
   * lack some, ask again in a moment. */
  ready: boolean;
  /** True when the room held more users than the server answers with
   * (`presence.max_query_users`): `users` holds the first of them. */
  truncated?: boolean;
}

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
  /** The server's message budget, which the client keeps to (default 50 at once, 20 a second). */
  rateLimit?: RateLimit;
  /** A subscribe or unsubscribe not answered within this is rejected with `timeout`
   * (default 30,000; 0: never). */
  requestTimeoutMs?: number;
}

/** Failed attempts before a static token that never got a connection is taken as refused:
 * a browser cannot tell a 401 from a server that is down. */
const STATIC_TOKEN_ATTEMPTS = 5;

const SUBPROTOCOL = 'roomcast.v1';

/** How long a connection stays up before its backoff starts again from the base: one that is
 * welcomed and then closed at once, again and again, must not reconnect in a tight loop. */
const STABLE_MS = 10_000;

/** The longest a timer can wait: setTimeout fires at once past it. */
const MAX_DELAY = 2 ** 31 - 1;

const report = (error: unknown) => ((globalThis as any).reportError ?? console.error)(error);

/** Calls the application; what it throws is reported and stops nothing of the client's. */
function call<A extends unknown[]>(f: ((...args: A) => void) | undefined, ...args: A): void {
  try {
    f?.(...args);
  } catch (error) {
    report(error);
  }
}

export class RoomcastClient<E extends EventMap = Record<string, any>> {
  status: Status = 'connecting';
  lastError: RoomcastError | null = null;

  private readonly options_: ConnectOptions;
  private readonly urls_: string[];
  private readonly backoff_: Backoff;
  private readonly Socket_: SocketConstructor;
  private readonly store_: Positions;
  private readonly rooms_: Subscriptions;
  private readonly requests_ = new Requests();
  private readonly handlers_ = new Set<[Matcher, Handler<any>]>();
  private readonly listeners_ = new Set<(status: Status, error: RoomcastError | null) => void>();
  private readonly presenceListeners_ = new Set<(event: PresenceEvent) => void>();
  private ws_?: SocketLike;
  private pacer_?: Pacer;
  /** Frames sent on the current connection, for telling the requests before a pong. */
  private sends_ = 0;
  /** `rate_limited` errors heard on the current connection. */
  private limited_ = 0;
  /** The current connection was opened with `?resume=1`. */
  private resuming_ = false;
  /** Its resume is not answered yet: a replay may keep the server quiet for seconds. */
  private resumeOut_ = false;
  /** A `resync` came: the `positions` frame after it is the cut, taken as it is. */
  private resynced_?: boolean;
  /** The current connection is welcomed (and resumed): requests go out as they are made. */
  private ready_ = false;
  private token_?: string;
  private freshToken_ = true;
  private turn_ = 0;
  private attempt_ = 0;
  private failedBeforeOpen_ = 0;
  private everOpen_ = false;
  private timer_?: ReturnType<typeof setTimeout>;
  private refreshTimer_?: ReturnType<typeof setTimeout>;
  private beatTimer_?: ReturnType<typeof setTimeout>;
  private stableTimer_?: ReturnType<typeof setTimeout>;
  /** A frame arrived since the last heartbeat. */
  private heard_ = true;

  constructor(options: ConnectOptions) {
    this.options_ = options;
    this.urls_ = options.urls ?? (options.url ? [options.url] : []);
    if (!this.urls_.length) throw new TypeError('roomcast: url or urls is required');
    if (!options.token && !options.getToken) throw new TypeError('roomcast: token or getToken is required');
    this.token_ = options.token;
    this.backoff_ = {
      baseMs: options.backoff?.baseMs ?? 500,
      maxMs: options.backoff?.maxMs ?? 30_000,
      random: options.random ?? Math.random,
    };
    this.Socket_ = options.WebSocket ?? (globalThis as any).WebSocket;
    if (!this.Socket_) throw new TypeError('roomcast: no WebSocket: pass options.WebSocket');
    const persist = options.persist;
    const storage = persist === true ? sessionStore() : persist || undefined;
    this.store_ = new Positions(storage, options.persistKey);
    this.rooms_ = new Subscriptions(storage, (options.persistKey ?? 'roomcast:positions') + ':rooms');
    void this.dial_();
  }

  /** Calls `listener` on every change of status or error; returns its unsubscribe. */
  onStatus(listener: (status: Status, error: RoomcastError | null) => void): () => void {
    this.listeners_.add(listener);
    return () => void this.listeners_.delete(listener);
  }

  /** Calls `handler` for each event whose name matches `pattern` (`*`: one segment, `**`:
   * any number); returns its unsubscribe. */
  on<K extends keyof E & string>(pattern: K, handler: Handler<E[K]>): () => void;
  on(pattern: string, handler: Handler<unknown>): () => void;
  on(pattern: string, handler: Handler<any>): () => void {
    const entry: [Matcher, Handler<any>] = [compile(pattern), handler];
    this.handlers_.add(entry);
    return () => void this.handlers_.delete(entry);
  }

  /** Calls `listener` with each presence event of the rooms subscribed with `presence: true`;
   * returns its unsubscribe. They are live only: none is replayed after a reconnect. */
  onPresence(listener: (event: PresenceEvent) => void): () => void {
    this.presenceListeners_.add(listener);
    return () => void this.presenceListeners_.delete(listener);
  }

  /** Joins `rooms`; resolves when every room is joined, rejects with the refusals otherwise.
   * The rooms are joined again after every reconnect. */
  subscribe(rooms: string[], { events, token, getToken, presence }: SubscribeOptions = {}): Promise<{ rooms: string[] }> {
    const at = this.rooms_.mark_();
    // getToken rides along unsent (JSON leaves functions out), for a resume that needs it.
    const frame = { type: 'subscribe', rooms, events, token, presence, getToken };
    return this.request_(frame, (answer) => {
      const rooms: string[] = answer.rooms ?? [];
      this.rooms_.join_(rooms, frame, at);
      return { rooms };
    });
  }

  /** Leaves `rooms`; resolves with the rooms left. */
  unsubscribe(rooms: string[]): Promise<{ rooms: string[] }> {
    const held = this.rooms_.leave_(rooms);
    return this.request_({ type: 'unsubscribe', rooms }, (answer) => ({
      rooms: [...new Set([...(answer.rooms ?? []), ...held])],
    }));
  }

  /** Who is in `room` now, on every server; authorized as a subscribe to it is (`token`: a
   * subscription token granting it). */
  presence(room: string, { token }: { token?: string } = {}): Promise<Presence> {
    return this.request_({ type: 'presence', room, token }, ({ users, ready, truncated }) =>
      truncated ? { users, ready, truncated } : { users, ready });
  }

  /** The current position map, `{"topic:partition": offset}`. */
  positions(): PositionMap {
    return this.store_.snapshot_();
  }

  /** Closes the connection for good: no reconnect, waiting requests rejected. */
  close(): void {
    this.stop_(null);
  }

  /** An application's request; `settle` makes the result of its `ok`. */
  private request_<T>(frame: Record<string, unknown>, settle: (answer: ServerFrame) => T): Promise<T> {
    return new Promise((resolve, reject) => {
      if (this.status === 'closed') return reject(new RoomcastError('closed', 'the client is closed'));
      const ms = this.options_.requestTimeoutMs ?? 30_000;
      const timer =
        ms > 0
          ? setTimeout(() => this.requests_.drop_(sent.id) && reject(new RoomcastError('timeout', `no answer in ${ms} ms`)), ms)
          : undefined;
      const sent = this.requests_.add_(
        frame,
        (answer, refusals) => {
          clearTimeout(timer);
          if (answer.type !== 'ok') return reject(refused(answer, refusals));
          const result = settle(answer);
          if (refusals.length) reject(refused(refusals[0], refusals, (result as { rooms?: string[] }).rooms));
          else resolve(result);
        },
        true,
      );
      if (this.ready_) this.send_(sent);
    });
  }

  /** A request of this connection's own (resume, refresh, re-subscribe): not sent again. */
  private internal_(frame: Record<string, unknown>, final: (answer: ServerFrame, refusals: Refusal[]) => void): void {
    this.send_(this.requests_.add_(frame, final, false));
  }

  private send_(frame: { id?: unknown }): void {
    this.requests_.sent_(frame.id, ++this.sends_);
    this.pacer_?.send_(JSON.stringify(frame));
  }

  private async dial_(): Promise<void> {
    const { getToken } = this.options_;
    if (getToken && (this.freshToken_ || !this.token_ || expiry(this.token_)! <= Date.now())) {
      try {
        this.token_ = await getToken();
        this.freshToken_ = false;
      } catch (e) {
        return this.retry_(new RoomcastError('token_unavailable', String(e)), { pace: 'backoff' });
      }
      // Offered, it would be closed with 4001 at once, and asked for again at once.
      if (expiry(this.token_)! <= Date.now()) {
        return this.retry_(new RoomcastError('token_expired', 'getToken gave an expired token'), { pace: 'backoff', freshToken: true });
      }
    } else if (!getToken && expiry(this.token_)! <= Date.now()) {
      return this.stop_(new RoomcastError('token_expired', 'the token has expired and there is no getToken'));
    }
    if (this.status === 'closed') return;
    this.resuming_ = this.options_.resume !== false && this.store_.known_;
    const url = this.urls_[this.turn_ % this.urls_.length];
    let ws: SocketLike;
    try {
      ws = new this.Socket_(this.resuming_ ? url + (url.includes('?') ? '&' : '?') + 'resume=1' : url, [
        SUBPROTOCOL,
        'bearer.' + this.token_,
      ]);
    } catch (e) {
      // A malformed URL or token: another URL or another token may do, the same ones never.
      const error = new RoomcastError('connect_failed', String(e));
      if (this.urls_.length < 2 && !getToken) return this.stop_(error);
      return this.retry_(error, { pace: 'backoff', failover: true, freshToken: true });
    }
    this.ws_ = ws;
    this.sends_ = 0;
    this.pacer_ = new Pacer(this.options_.rateLimit ?? {}, (data) => ws.send(data));
    let welcomed = false;
    ws.onmessage = (message) => {
      if (this.ws_ !== ws) return;
      this.heard_ = true;
      const frame: ServerFrame = JSON.parse(message.data);
      if (frame.type === 'welcome') welcomed = true;
      this.frame_(frame);
    };
    ws.onclose = (event) => {
      if (this.ws_ === ws) this.dropped_(event.code, event.reason, welcomed);
    };
    ws.onerror = () => {};
  }

  private frame_(frame: ServerFrame): void {
    switch (frame.type) {
      case 'welcome':
        return this.welcome_(frame);
      case 'event':
        return this.event_(frame);
      case 'positions':
        // The cut after a resync is the log as it now is (a recreated topic restarts lower).
        this.store_.set_(frame.positions, this.resynced_);
        return void (this.resynced_ = false);
      case 'resync':
        this.resynced_ = true;
        return call(this.options_.onResync, { reason: frame.reason });
      default:
        // `ok`, `error`, `pong`. A `rate_limited` error has no id: this client sends too much.
        if (!this.requests_.answer_(frame) && frame.type === 'error') {
          this.setStatus_(this.status, new RoomcastError(frame.code, frame.message));
          // Messages over the budget were dropped unanswered. Once it has refilled (later each
          // time), a ping tells which: those sent before it and still unanswered.
          const ws = this.ws_;
          if (frame.code === 'rate_limited') {
            setTimeout(() => this.ws_ === ws && !this.resumeOut_ && this.ping_(), 1000 * 2 ** Math.min(this.limited_++, 4));
          }
        }
    }
  }

  private ping_(): void {
    const mark = this.sends_ + 1;
    this.internal_({ type: 'ping' }, () => {
      if (this.limited_) for (const frame of this.requests_.unanswered_(mark)) this.send_(frame);
    });
  }

  private welcome_(frame: ServerFrame): void {
    this.everOpen_ = true;
    this.failedBeforeOpen_ = 0;
    // The error that ended the last connection is history now; what this one meets replaces it.
    this.lastError = null;
    this.stableTimer_ = setTimeout(() => (this.attempt_ = 0), STABLE_MS);
    this.scheduleRefresh_();
    this.listen_((frame.heartbeat || 25) * 1000);
    if (!this.resuming_) {
      // A fresh connection's map starts at its welcome. On `?resume=1` the welcome's positions
      // are never taken: the stored map is what the resume replays from, and a drop before
      // the resume is answered must leave it as it was.
      this.store_.set_(frame.positions ?? {});
      for (const group of this.rooms_.groups_()) this.resubscribe_(group);
      return this.opened_();
    }
    this.resume_(new Set(), new Set());
  }

  /**
   * Resumes into the rooms held and asked for. `denied` are subscription tokens the server
   * refused on this connection, `renewed` those got in their place: the server waits for a
   * resume until one is accepted, so a refused token costs only its own groups their replay.
   * `bare`: the resume was refused for another reason; the map alone, the rooms after it.
   */
  private resume_(denied: Set<string | undefined>, renewed: Set<string>, bare = false): void {
    const plan = bare
      ? { resume: { rooms: [] }, narrow: [], unreplayed: this.rooms_.groups_() }
      : this.rooms_.plan_(this.pendingSubscriptions_(), denied);
    const { resume, narrow, unreplayed } = plan;
    const frame = { type: 'resume', positions: this.store_.snapshot_(), ...resume };
    this.resumeOut_ = true;
    this.internal_(frame, (answer, refusals) => {
      if (answer.type !== 'ok') {
        const error = refused(answer, refusals);
        if (answer.code === 'invalid_token' && resume.token) {
          return void this.renew_(resume.token, plan.getToken, error, denied, renewed);
        }
        // This replica has not read as far as the map: another one, or this one later.
        if (answer.code === 'lagging') return this.abandon_(error, { pace: 'backoff', failover: true });
        // Even the bare map is refused: never in a fast loop.
        if (!resume.rooms.length) return this.abandon_(error, { pace: 'slow' });
        this.setStatus_(this.status, error);
        return this.resume_(denied, renewed, true);
      }
      this.resumeOut_ = false;
      if (refusals.length) this.lost_(refusals, answer.rooms);
      for (const group of narrow) this.resubscribe_(group);
      for (const group of unreplayed) this.resubscribe_(group);
      if (unreplayed.length) {
        const rooms = unreplayed.flatMap((g) => g.rooms).join(', ');
        call(this.options_.onResync, { reason: `rejoined without a replay: ${rooms}` });
      }
      this.opened_();
    });
  }

  /** The resume's subscription token was refused: resume again with a new one from its
   * subscription's getToken, or without its rooms, which are then reported lost. */
  private async renew_(
    token: string,
    getToken: (() => string | Promise<string>) | undefined,
    error: RoomcastError,
    denied: Set<string | undefined>,
    renewed: Set<string>,
  ): Promise<void> {
    const ws = this.ws_;
    let next: string | undefined;
    try {
      // A token just given and refused already is not asked for again: that would loop.
      if (getToken && !renewed.has(token)) next = await getToken();
    } catch (e) {
      report(e);
    }
    if (this.ws_ !== ws) return;
    if (next) {
      renewed.add(next);
      this.rooms_.retoken_(token, next);
      for (const frame of this.requests_.frames_()) if (frame.token === token) frame.token = next;
    } else {
      denied.add(token);
      const rooms = this.rooms_.groups_().filter((g) => g.token === token).flatMap((g) => g.rooms);
      if (rooms.length) this.lost_(rooms.map((room) => ({ room, code: error.code, message: error.message })), []);
      else this.setStatus_(this.status, error);
    }
    this.resume_(denied, renewed);
  }

  /** Subscribes again to rooms held before; drops those the server now refuses. */
  private resubscribe_(group: Group, renewed = false): void {
    const { rooms, events, token, getToken, presence } = group;
    const ws = this.ws_;
    this.internal_({ type: 'subscribe', rooms, events, token, presence }, async (answer, refusals) => {
      // Its subscription token refused: once, with a new one from the subscription's getToken.
      if (answer.code === 'invalid_token' && getToken && !renewed) {
        try {
          const next = await getToken();
          if (this.ws_ !== ws) return;
          this.rooms_.retoken_(token!, next);
          return this.resubscribe_({ ...group, token: next }, true);
        } catch (e) {
          report(e);
        }
      }
      if (answer.type !== 'ok') this.lost_(rooms.map((room) => ({ room, code: answer.code, message: answer.message })), []);
      else if (refusals.length) this.lost_(refusals, answer.rooms);
    });
  }

  /** Rooms held before that the server refused on a reconnect: no longer held. */
  private lost_(refusals: Refusal[], joined: string[]): void {
    this.rooms_.leave_(refusals.map((r) => r.room));
    this.setStatus_(this.status, refused(refusals[0], refusals, joined));
  }

  private pendingSubscriptions_(): Group[] {
    return this.requests_
      .frames_()
      .filter((f) => f.type === 'subscribe')
      .map((f) => ({ rooms: f.rooms, events: f.events, token: f.token, getToken: f.getToken, presence: f.presence }) as Group);
  }

  private opened_(): void {
    this.ready_ = true;
    this.setStatus_('open');
    for (const frame of this.requests_.frames_()) this.send_(frame);
  }

  private event_(frame: ServerFrame): void {
    // A presence event has no position: it is never replayed, so there is nothing to dedupe
    // and nothing to move in the map. `presence.join` is a `join`.
    if (!frame.pos) {
      const change = { ...frame.payload, type: frame.event.slice(9), ts: frame.ts };
      for (const listener of [...this.presenceListeners_]) call(listener, change);
      return;
    }
    if (!this.store_.advance_(frame.pos)) return;
    const info: EventInfo = { event: frame.event, pos: frame.pos, ts: frame.ts, rooms: frame.rooms };
    for (const [matches, handler] of this.handlers_) if (matches(frame.event)) call(handler, frame.payload, info);
  }

  /**
   * A browser sees neither the server's pings nor a connection that died without a word
   * (a laptop asleep, a network gone): a `ping` each heartbeat, and a connection silent for
   * a whole heartbeat after one is taken as lost. Not while a resume waits for its answer:
   * a replica may take seconds to be ready and to replay, and says nothing meanwhile.
   */
  private listen_(ms: number): void {
    this.beatTimer_ = setTimeout(() => {
      if (this.heard_ || this.resumeOut_) {
        this.heard_ = this.resumeOut_;
        if (!this.resumeOut_) this.ping_();
        return this.listen_(ms);
      }
      const ws = this.ws_!;
      this.detach_();
      ws.close(1000);
      this.retry_(new RoomcastError('connection_lost', 'no answer from the server', { closeCode: 1006 }), {
        pace: 'backoff',
        failover: true,
      });
    }, ms);
  }

  private scheduleRefresh_(): void {
    clearTimeout(this.refreshTimer_);
    const exp = expiry(this.token_);
    if (!exp || !this.options_.getToken) return;
    const left = exp - Date.now();
    const due = left - (this.options_.refreshBeforeExpirySeconds ?? 30) * 1000;
    // A token shorter-lived than the lead is refreshed halfway through what is left, not at
    // once; and never sooner than a second, so that a getToken that keeps giving a token
    // near its end cannot make a loop of refreshes.
    const delay = Math.max(due > 0 ? due : left / 2, 1000);
    this.refreshTimer_ = setTimeout(
      () => void (delay > MAX_DELAY ? this.scheduleRefresh_() : this.refresh_()),
      Math.min(delay, MAX_DELAY),
    );
  }

  private async refresh_(): Promise<void> {
    const ws = this.ws_;
    let token: string;
    try {
      token = await this.options_.getToken!();
    } catch {
      // The server's 4001 at `exp` brings a reconnect with a fresh token.
      return;
    }
    if (this.ws_ !== ws || !ws) return;
    this.internal_({ type: 'refresh', token }, (answer, refusals) => {
      if (answer.type === 'ok') {
        this.token_ = token;
        return this.scheduleRefresh_();
      }
      // Refused: a new connection, with a token asked for anew.
      this.detach_();
      ws.close(1000);
      this.retry_(refused(answer, refusals), { pace: 'now', freshToken: true });
    });
  }

  private dropped_(code: number, reason: string, welcomed: boolean): void {
    this.detach_();
    const error = new RoomcastError(CLOSE_NAMES[code] ?? 'closed', reason || `closed with ${code}`, {
      closeCode: code,
    });
    if (welcomed) return this.retry_(error, decide(code, !this.options_.getToken));
    // Refused before the upgrade, or the server is unreachable: the browser cannot tell.
    if (!this.options_.getToken && !this.everOpen_ && ++this.failedBeforeOpen_ >= STATIC_TOKEN_ATTEMPTS) {
      return this.stop_(new RoomcastError('handshake_refused', `no connection in ${STATIC_TOKEN_ATTEMPTS} attempts`, { closeCode: code }));
    }
    this.retry_(error, { pace: 'backoff', failover: true, freshToken: true });
  }

  /** Forgets the current connection and what was tied to it. */
  private detach_(): void {
    this.ws_ = undefined;
    this.pacer_?.stop_();
    this.pacer_ = undefined;
    this.ready_ = this.resumeOut_ = false;
    this.heard_ = true;
    this.limited_ = 0;
    clearTimeout(this.refreshTimer_);
    clearTimeout(this.beatTimer_);
    clearTimeout(this.stableTimer_);
    this.requests_.disconnected_();
  }

  /** Leaves this connection and decides the next one. */
  private abandon_(error: RoomcastError, decision: Decision): void {
    const ws = this.ws_!;
    this.detach_();
    ws.close(1000);
    this.retry_(error, decision);
  }

  private retry_(error: RoomcastError, decision: Decision): void {
    if (decision.pace === 'stop') return this.stop_(error);
    if (decision.failover) this.turn_++;
    if (decision.freshToken) this.freshToken_ = true;
    const b = this.backoff_;
    const pace = decision.pace;
    // `now` is at once only after a connection that stayed up; closed again soon after, it backs off.
    const delay = pace === 'fast' ? fast(b) : pace === 'slow' ? slow(b) : pace === 'now' && !this.attempt_ ? 0 : jitter(b, this.attempt_);
    if (pace === 'now' || pace === 'backoff') this.attempt_++;
    this.setStatus_(this.everOpen_ ? 'reconnecting' : 'connecting', error);
    this.timer_ = setTimeout(() => void this.dial_(), delay);
  }

  private stop_(error: RoomcastError | null): void {
    if (this.status === 'closed') return;
    clearTimeout(this.timer_);
    const ws = this.ws_;
    this.detach_();
    ws?.close(1000);
    this.setStatus_('closed', error);
    this.requests_.fail_({ type: 'error', code: error?.code ?? 'closed', message: error?.message ?? 'the client is closed' });
  }

  private setStatus_(status: Status, error?: RoomcastError | null): void {
    this.status = status;
    if (error) this.lastError = error;
    for (const listener of [...this.listeners_]) call(listener, status, this.lastError);
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
