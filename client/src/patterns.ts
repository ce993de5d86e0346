/**
 * Event-name patterns with the server's rules (`src/pattern.rs`): segments split on `.`, `*`
 * stands for exactly one whole segment, `**` for any number (zero or more), anything else only
 * for itself. A `*` inside a segment (`users-*`) is refused, as the server refuses it.
 */
import { RoomcastError } from './errors.js';

/** Longest pattern, in bytes, and most segments: the server's limits, kept so a pattern
 * that works in `on` also works as a subscription's `events` filter. */
export const MAX_PATTERN_BYTES = 256;
export const MAX_PATTERN_SEGMENTS = 32;

/** A segment: its text, or ONE for `*`, or ANY for `**`. */
const ONE = 1;
const ANY = 2;
type Segment = string | typeof ONE | typeof ANY;

export type Matcher = (name: string) => boolean;

/** Compiles a pattern; throws a `bad_request` RoomcastError as the server would refuse it. */
export function compile(source: string, sep = '.'): Matcher {
  const refuse = (message: string) => new RoomcastError('bad_request', message);
  // Length first, so that no message repeats more than the limit's worth of input.
  const bytes = new TextEncoder().encode(source).length;
  if (bytes > MAX_PATTERN_BYTES) {
    throw refuse(`a pattern of ${bytes} bytes is over the limit of ${MAX_PATTERN_BYTES} bytes`);
  }
  const parts = source.split(sep);
  if (parts.length > MAX_PATTERN_SEGMENTS) {
    throw refuse(`a pattern of ${parts.length} segments is over the limit of ${MAX_PATTERN_SEGMENTS} segments`);
  }
  if (!source) throw refuse('empty pattern');
  const segs: Segment[] = [];
  for (const part of parts) {
    const seg: Segment = part === '*' ? ONE : part === '**' ? ANY : part;
    if (typeof seg === 'string' && seg.includes('*')) {
      throw refuse(`pattern ${JSON.stringify(source)}: '*' must stand for a whole segment`);
    }
    // Consecutive `**` match exactly what one does.
    if (!(seg === ANY && segs[segs.length - 1] === ANY)) segs.push(seg);
  }
  return (name) => glob(segs, name.split(sep));
}

/**
 * Two pointers, as the server matches: only the last `**` seen is ever retried, one more
 * name segment each time, so the work stays within (segments + 1) x (name segments + 1).
 */
function glob(segs: Segment[], parts: string[]): boolean {
  let p = 0;
  let n = 0;
  let retry: [number, number] | undefined;
  for (;;) {
    const seg = segs[p];
    if (seg === ANY) {
      retry = [++p, n];
      continue;
    }
    if (seg !== undefined && n < parts.length && (seg === ONE || seg === parts[n])) {
      p++;
      n++;
      continue;
    }
    if (seg === undefined && n === parts.length) return true;
    if (!retry || retry[1] >= parts.length) return false;
    p = retry[0];
    n = ++retry[1];
  }
}
