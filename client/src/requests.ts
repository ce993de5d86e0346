/**
 * Requests waiting for their answer. Each carries an `id`; the server answers it with exactly
 * one final frame of that id (`ok`, or `error` without a `room`), after any per-room `error`
 * frames, which are collected for the final answer.
 */
import type { Refusal } from './errors.js';

/** A server frame as the SDK reads it. */
export interface ServerFrame {
  type: string;
  id?: number | null;
  [field: string]: any;
}

export type Final = (answer: ServerFrame, refusals: Refusal[]) => void;

interface Pending {
  frame: Record<string, unknown> & { id: number };
  final: Final;
  /** Sent again on the next connection (the application's requests, all idempotent), or
   * dropped with this one (the connection's own: resume, refresh). */
  durable: boolean;
  /** When it was last sent, in the order of the connection's frames. */
  at?: number;
}

export class Requests {
  private next_ = 1;
  private readonly pending_ = new Map<number, Pending & { refusals: Refusal[] }>();

  /** Registers a request and gives it its id (the frame stays the caller's to amend). */
  add_(frame: Record<string, unknown>, final: Final, durable: boolean): Pending['frame'] {
    const withId = Object.assign(frame, { id: this.next_++ });
    this.pending_.set(withId.id, { frame: withId, final, durable, refusals: [] });
    return withId;
  }

  /** Notes that request `id` went out as the connection's `at`-th frame. */
  sent_(id: unknown, at: number): void {
    const request = this.pending_.get(id as number);
    if (request) request.at = at;
  }

  /**
   * The requests sent before frame `mark` and still unanswered. The server answers in the
   * order it reads (a resume aside, answered after its replay), so once the answer to frame
   * `mark` is in, these were dropped by its rate limit.
   */
  unanswered_(mark: number): Pending['frame'][] {
    return [...this.pending_.values()]
      .filter((r) => r.at! < mark && r.frame.type !== 'resume' && r.frame.type !== 'ping')
      .map((r) => r.frame);
  }

  /** Gives up on a request: its answer, if one comes, finds nothing waiting. */
  drop_(id: number): boolean {
    return this.pending_.delete(id);
  }

  /** Takes an `ok` or `error` frame; false if it answers none of ours. */
  answer_(frame: ServerFrame): boolean {
    const request = this.pending_.get(frame.id as number);
    if (!request) return false;
    if (frame.type === 'error' && frame.room != null) {
      request.refusals.push({ room: frame.room, code: frame.code, message: frame.message });
      return true;
    }
    this.pending_.delete(frame.id as number);
    request.final(frame, request.refusals);
    return true;
  }

  /** After a disconnect: forgets the connection's own requests, and the refusals collected
   * for the others, which are sent again whole. */
  disconnected_(): void {
    for (const [id, request] of this.pending_) {
      if (request.durable) request.refusals = [];
      else this.pending_.delete(id);
    }
  }

  /** The application's waiting requests, in the order they were made. */
  frames_(): Pending['frame'][] {
    return [...this.pending_.values()].filter((r) => r.durable).map((r) => r.frame);
  }

  /** Answers every request with `frame` (the client was closed). */
  fail_(frame: ServerFrame): void {
    const all = [...this.pending_.values()];
    this.pending_.clear();
    for (const request of all) request.final(frame, []);
  }
}
