/**
 * `@roomcast/client`: the browser (and Node) client of roomcast. See docs/CLIENT.md.
 */
export { connect, RoomcastClient } from './client.js';
export type {
  ConnectOptions,
  EventInfo,
  EventMap,
  Handler,
  Presence,
  PresenceEvent,
  SocketConstructor,
  SocketLike,
  Status,
} from './client.js';
export type { BackoffOptions } from './backoff.js';
export { RoomcastError } from './errors.js';
export type { Refusal } from './errors.js';
export type { PositionMap, PositionStorage } from './positions.js';
export type { SubscribeOptions } from './subscriptions.js';
