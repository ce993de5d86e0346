/**
 * The rooms the application wants to be in, with each room's `events` filter and
 * subscription token, and how a reconnect gets back into them: one `resume` frame (the only
 * way into a room with a replay of what was missed), then `subscribe` frames for what one
 * resume cannot say. Kept with the position map when that outlives the page, so that the
 * next page resumes into them too.
 */
import type { PositionStorage } from './positions.js';

export interface SubscribeOptions {
  /** Event-name patterns delivered through these rooms (at most 16); all events if absent. */
  events?: string[];
  /** A subscription token granting these rooms. */
  token?: string;
  /** Gives a new subscription token when the server refuses `token` on a reconnect. */
  getToken?: () => string | Promise<string>;
  /** Join and leave events of these rooms (and online and offline, in the server's status
   * room) to `onPresence`. */
  presence?: boolean;
}

/** Rooms sharing one filter, one token and one presence: one `subscribe` frame. */
export interface Group extends SubscribeOptions {
  rooms: string[];
}

export interface Plan {
  /** The resume frame's `rooms`, `events`, `token` and `presence`. */
  resume: Group;
  /** Groups joined by the resume with a wider filter than theirs, or without the presence
   * they asked for: subscribed again right after it. */
  narrow: Group[];
  /** Groups of another subscription token than the resume's: joined after it, without a
   * replay of the gap. */
  unreplayed: Group[];
  /** A source of a new token for the resume's, if one of its groups has one. */
  getToken?: () => string | Promise<string>;
}

/** Most patterns in one `events` filter (the server's limit). */
const MAX_FILTER_PATTERNS = 16;

const key = (o: SubscribeOptions) => JSON.stringify([o.events, o.token, !!o.presence]);

export class Subscriptions {
  private readonly rooms_ = new Map<string, SubscribeOptions>();
  /** Each room's latest unsubscribe, in the order of the application's calls: an answer to
   * an older subscribe must not bring the room back. */
  private readonly left_ = new Map<string, number>();
  private calls_ = 0;

  constructor(
    private readonly storage_?: PositionStorage,
    private readonly storageKey_ = '',
  ) {
    try {
      for (const group of JSON.parse(storage_?.getItem(storageKey_) ?? '[]')) this.join_(group.rooms, group, 0);
    } catch {
      // Unreadable: the application subscribes again.
    }
  }

  /** The place of a subscribe call among the others. */
  mark_(): number {
    return ++this.calls_;
  }

  /** Holds `rooms`, joined by a subscribe made at `at`, unless they were left since. */
  join_(rooms: string[], { events, token, getToken, presence }: SubscribeOptions, at: number): void {
    for (const room of rooms) {
      if (!((this.left_.get(room) ?? -1) > at)) this.rooms_.set(room, { events, token, getToken, presence });
    }
    this.save_();
  }

  /** Forgets `rooms`; returns those that were held. */
  leave_(rooms: string[]): string[] {
    const at = this.mark_();
    const held = rooms.filter((room) => this.left_.set(room, at) && this.rooms_.delete(room));
    this.save_();
    return held;
  }

  /** Replaces a subscription token the server refused with a new one. */
  retoken_(old: string, token: string): void {
    for (const options of this.rooms_.values()) if (options.token === old) options.token = token;
    this.save_();
  }

  /** Every room held, grouped by filter and token. */
  groups_(): Group[] {
    const groups = new Map<string, Group>();
    for (const [room, options] of this.rooms_) {
      const k = key(options);
      if (!groups.has(k)) groups.set(k, { ...options, rooms: [] });
      groups.get(k)!.rooms.push(room);
    }
    return [...groups.values()];
  }

  /**
   * A resume takes one filter, one token and one presence. It carries every room of the
   * first token seen (and the rooms that need none), under the union of their filters, with
   * presence only if every one of them asked for it (the groups that did are subscribed again
   * with it right after: presence events are not replayed, a few missed at a reconnect are
   * missed anyway); rooms of other tokens can only be subscribed after it. `pending` are subscriptions asked for but not yet
   * answered: they join the resume so that their rooms get the replay too. Tokens in
   * `denied` were refused on this connection: their groups are left out.
   */
  plan_(pending: Group[], denied: Set<string | undefined>): Plan {
    const held = this.groups_().filter((g) => !denied.has(g.token));
    const all = [...held, ...pending.filter((g) => !denied.has(g.token))];
    const token = all.find((g) => g.token)?.token;
    const fits = (g: Group) => !g.token || g.token === token;
    const resumed = all.filter(fits);
    let events: string[] | undefined = [...new Set(resumed.flatMap((g) => g.events ?? []))];
    if (!events.length || events.length > MAX_FILTER_PATTERNS || resumed.some((g) => !g.events)) events = undefined;
    const resume: Group = {
      rooms: [...new Set(resumed.flatMap((g) => g.rooms))],
      events,
      token: resumed.some((g) => g.token) ? token : undefined,
      presence: (resumed.length > 0 && resumed.every((g) => g.presence)) || undefined,
    };
    return {
      resume,
      narrow: held.filter((g) => fits(g) && key(g) !== key({ ...resume, token: g.token })),
      unreplayed: held.filter((g) => !fits(g)),
      getToken: resumed.find((g) => g.getToken && g.token === token)?.getToken,
    };
  }

  private save_(): void {
    try {
      this.storage_?.setItem(this.storageKey_, JSON.stringify(this.groups_()));
    } catch {
      // As with the map: the next page loses its resume, not this one its events.
    }
  }
}
