/**
 * How long to wait before the next connection attempt: exponential backoff with full jitter
 * (uniform between zero and the capped exponential), so that clients dropped together do not
 * come back together.
 */

export interface BackoffOptions {
  /** The first attempt's ceiling, doubled each failed attempt. Default 500. */
  baseMs?: number;
  /** The highest ceiling. Default 30,000. */
  maxMs?: number;
}

export interface Backoff {
  baseMs: number;
  maxMs: number;
  random: () => number;
}

/** Full jitter for the `attempt`-th consecutive failure (0 for the first). */
export function jitter(b: Backoff, attempt: number): number {
  return b.random() * Math.min(b.maxMs, b.baseMs * 2 ** attempt);
}

/** After a drain: soon, but spread over one base interval, since a whole replica's clients move at once. */
export function fast(b: Backoff): number {
  return b.random() * b.baseMs;
}

/** After a close that says the client is at fault: never sooner than half the cap, so a bug cannot loop. */
export function slow(b: Backoff): number {
  return (b.maxMs * (1 + b.random())) / 2;
}
