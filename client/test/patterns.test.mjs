// `on` patterns: the cases of the server's src/pattern.rs tests, with `.` as the separator
// the SDK matches event names on (and `:` where the server's tests use room names).
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { compile } from '../dist/patterns.js';
import { RoomcastError } from '../dist/index.js';

const room = (p) => compile(p, ':');
const event = (p) => compile(p, '.');

test('one star is one segment', () => {
  const p = room('task:*');
  assert.ok(p('task:7'));
  assert.ok(!p('task'));
  assert.ok(!p('task:7:x'));
  assert.ok(!p('tasks:7'));
  assert.ok(!room('feature:*')('feature:users:entity:user'));
});

test('double star is any number of segments', () => {
  const p = room('feature:**');
  assert.ok(p('feature:users'));
  assert.ok(p('feature:users:entity:user'));
  assert.ok(!p('task:1'));
  assert.ok(room('**')('anything:at:all'));
  const e = event('users.**.deleted');
  assert.ok(e('users.deleted'));
  assert.ok(e('users.user.deleted'));
  assert.ok(!e('users.user.created'));
});

test('exact and mixed', () => {
  const e = event('users.*.deleted');
  assert.ok(e('users.user.deleted'));
  assert.ok(!e('rbac.user.deleted'));
  assert.ok(room('user:42')('user:42'));
  assert.ok(!room('user:42')('user:420'));
  assert.throws(() => room('task-*'), { name: 'RoomcastError', code: 'bad_request', message: `pattern "task-*": '*' must stand for a whole segment` });
  assert.throws(() => room(''), { code: 'bad_request', message: 'empty pattern' });
});

test('consecutive double stars merge and still match zero segments', () => {
  const p = event('a.**.**.**.b');
  assert.ok(p('a.b'));
  assert.ok(p('a.x.y.b'));
  assert.ok(!p('a.x.y'));
});

test('patterns are bounded in bytes and segments', () => {
  const longest = 'x'.repeat(256);
  assert.ok(room(longest)(longest));
  assert.throws(() => room(longest + 'x'), { code: 'bad_request', message: 'a pattern of 257 bytes is over the limit of 256 bytes' });
  const most = Array(32).fill('*').join('.');
  assert.ok(event(most)(Array(32).fill('a').join('.')));
  assert.throws(() => event(most + '.*'), { message: 'a pattern of 33 segments is over the limit of 32 segments' });
  // A partial star in a long pattern is refused for its length, not echoed back.
  assert.throws(() => event('a*' + 'x'.repeat(300)), { message: 'a pattern of 302 bytes is over the limit of 256 bytes' });
  // Bytes, not characters: 128 two-byte characters are 256 bytes.
  assert.throws(() => event('é'.repeat(129)), { message: 'a pattern of 258 bytes is over the limit of 256 bytes' });
  assert.ok(new RoomcastError('x', 'y') instanceof Error);
});

/** The server's reference: the recursive matcher, right and exponential. */
function reference(segs, parts) {
  if (!segs.length) return !parts.length;
  const [seg, ...rest] = segs;
  if (seg === '**') {
    for (let skip = 0; skip <= parts.length; skip++) if (reference(rest, parts.slice(skip))) return true;
    return false;
  }
  return parts.length > 0 && (seg === '*' || seg === parts[0]) && reference(rest, parts.slice(1));
}

/** Every sequence of 1 to `max` items drawn from `alphabet`. */
function words(alphabet, max) {
  const all = [];
  let last = [[]];
  for (let i = 0; i < max; i++) {
    last = last.flatMap((w) => alphabet.map((a) => [...w, a]));
    all.push(...last);
  }
  return all;
}

test('agrees with the recursive matcher on every small case', () => {
  const names = words(['a', 'b'], 6);
  let compared = 0;
  for (const pattern of words(['a', 'b', '*', '**'], 5)) {
    const matches = event(pattern.join('.'));
    for (const name of names) {
      assert.equal(matches(name.join('.')), reference(pattern, name), `${pattern} against ${name}`);
      compared++;
    }
  }
  assert.equal(compared, 1364 * 126);
});

test('a long run of stars stays fast', () => {
  // 2^64-ish states for a recursive matcher; the server's two pointers take a few thousand steps.
  const name = Array(64).fill('a').join('.');
  const started = performance.now();
  assert.ok(!event('**.a.'.repeat(15) + 'zzz')(name));
  assert.ok(!event(`**.${Array(30).fill('a').join('.')}.b`)(name));
  assert.ok(performance.now() - started < 100);
});
