/**
 * The SDK's one error type: a request the server refused (whole, or room by room) and the
 * reason a connection ended, as `client.lastError` exposes it.
 */

/** One room the server would not join, from an `error` frame that names it. */
export interface Refusal {
  room: string;
  code: string;
  message: string;
}

export interface ErrorDetails {
  room?: string;
  refusals?: Refusal[];
  joined?: string[];
  closeCode?: number;
}

export class RoomcastError extends Error {
  /** The server's code (`forbidden`, `invalid_token`, ...) or the close's name (`token_expired`, ...). */
  readonly code: string;
  /** The first refused room, for a refusal of single rooms. */
  readonly room?: string;
  /** Every per-room refusal the request met. */
  readonly refusals: Refusal[];
  /** The rooms joined anyway. */
  readonly joined: string[];
  /** The WebSocket close code that ended the connection, when one did. */
  readonly closeCode?: number;

  constructor(code: string, message: string, details: ErrorDetails = {}) {
    super(message);
    this.name = 'RoomcastError';
    this.code = code;
    this.room = details.room;
    this.refusals = details.refusals ?? [];
    this.joined = details.joined ?? [];
    this.closeCode = details.closeCode;
  }
}
