/**
 * The position map (docs/PROTOCOL.md, "Nothing lost"): `{"topic:partition": offset}`, every
 * record up to the offset delivered or not for this client. It drops events already passed
 * (dedupe) and, when asked, outlives the page in a storage.
 */

export type PositionMap = Record<string, number>;

/** The part of the Web Storage API the map needs (sessionStorage, localStorage, or the app's). */
export interface PositionStorage {
  getItem(key: string): string | null;
  setItem(key: string, value: string): void;
  removeItem(key: string): void;
}

/** The page's sessionStorage, if it has one it may use (reading it throws where storage is blocked). */
export function sessionStore(): PositionStorage | undefined {
  try {
    return (globalThis as any).sessionStorage;
  } catch {
    return undefined;
  }
}

export class Positions {
  /** Null until the first welcome (or a persisted map): a connection then starts fresh. */
  private map_: PositionMap | null = null;

  constructor(
    private readonly storage_?: PositionStorage,
    private readonly key_ = 'roomcast:positions',
  ) {
    try {
      const saved = JSON.parse(storage_?.getItem(key_) ?? 'null');
      if (saved && typeof saved === 'object' && Object.values(saved).every(Number.isInteger)) this.map_ = saved;
    } catch {
      // Unreadable: start fresh, as with nothing stored.
    }
  }

  /** Whether there is a map to resume from. */
  get known_(): boolean {
    return this.map_ !== null;
  }

  /** Takes the entries of a `positions` frame (or a fresh connection's welcome) that move
   * the map forward: a lower one would let what was already handled through again. `reset`:
   * the cut after a resync, taken as it is, lower where the log itself restarted lower. */
  set_(positions: PositionMap, reset = false): void {
    const map = (this.map_ ??= {});
    for (const [partition, offset] of Object.entries(positions)) {
      if (reset || !(map[partition] >= offset)) map[partition] = offset;
    }
    this.save_();
  }

  /** Records an event's `topic:partition:offset`; false when that offset was already passed. */
  advance_(pos: string): boolean {
    const cut = pos.lastIndexOf(':');
    const partition = pos.slice(0, cut);
    const offset = Number(pos.slice(cut + 1));
    const map = (this.map_ ??= {});
    if (offset <= map[partition]) return false;
    map[partition] = offset;
    this.save_();
    return true;
  }

  snapshot_(): PositionMap {
    return { ...this.map_ };
  }

  private save_(): void {
    try {
      this.storage_?.setItem(this.key_, JSON.stringify(this.map_));
    } catch {
      // A full or disabled storage costs the next page its resume, not this one its events.
    }
  }
}
