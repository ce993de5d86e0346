/**
 * The rooms the application wants to be in, with each room's `events` filter and
 * subscription token, and how a reconnect gets back into them: one `resume` frame (the only
 * way into a room with a replay of what was missed), then `subscribe` frames for what one
 * resume cannot say.
 */

export interface SubscribeOptions {
  /** Event-name patterns delivered through these rooms (at most 16); all events if absent. */
  events?: string[];
  /** A subscription token granting these rooms. */
  token?: string;
}

/** Rooms sharing one filter and one token: one `subscribe` frame. */
export interface Group extends SubscribeOptions {
  rooms: string[];
}

export interface Plan {
  /** The resume frame's `rooms`, `events` and `token`. */
  resume: Group;
  /** Groups joined by the resume with a wider filter than theirs: narrowed right after it. */
  narrow: Group[];
  /** Groups of another subscription token than the resume's: joined after it, without a
   * replay of the gap. */
  unreplayed: Group[];
}

/** Most patterns in one `events` filter (the server's limit). */
const MAX_FILTER_PATTERNS = 16;

const key = (o: SubscribeOptions) => JSON.stringify([o.events, o.token]);

export class Subscriptions {
  private readonly rooms = new Map<string, SubscribeOptions>();

  join(rooms: string[], options: SubscribeOptions): void {
    for (const room of rooms) this.rooms.set(room, { events: options.events, token: options.token });
  }

  /** Forgets `rooms`; returns those that were held. */
  leave(rooms: string[]): string[] {
    return rooms.filter((room) => this.rooms.delete(room));
  }

  /** Every room held, grouped by filter and token. */
  groups(): Group[] {
    const groups = new Map<string, Group>();
    for (const [room, options] of this.rooms) {
      const k = key(options);
      if (!groups.has(k)) groups.set(k, { ...options, rooms: [] });
      groups.get(k)!.rooms.push(room);
    }
    return [...groups.values()];
  }

  /**
   * A resume takes one filter and one token. It carries every room of the first token seen
   * (and the rooms that need none), under the union of their filters; rooms of other tokens
   * can only be subscribed after it. `pending` are subscriptions asked for but not yet
   * answered: they join the resume so that their rooms get the replay too.
   */
  plan(pending: Group[]): Plan {
    const held = this.groups();
    const all = [...held, ...pending];
    const token = all.find((g) => g.token)?.token;
    const fits = (g: Group) => !g.token || g.token === token;
    const resumed = all.filter(fits);
    let events: string[] | undefined = [
      ...new Set(resumed.flatMap((g) => g.events ?? [])),
    ];
    if (!events.length || events.length > MAX_FILTER_PATTERNS || resumed.some((g) => !g.events)) events = undefined;
    const resume: Group = {
      rooms: [...new Set(resumed.flatMap((g) => g.rooms))],
      events,
      token: resumed.some((g) => g.token) ? token : undefined,
    };
    return {
      resume,
      narrow: held.filter((g) => fits(g) && key(g) !== key({ events, token: g.token })),
      unreplayed: held.filter((g) => !fits(g)),
    };
  }
}
