// Compile-time checks of the public types, through the package's own exports map (`npm test`
// runs `tsc -p test` first). Each `@ts-expect-error` must meet an error, or tsc fails.
import { connect, RoomcastError, type EventInfo, type Presence, type PresenceEvent, type Status } from '@roomcast/client';
import { RoomcastProvider, useEvent, useStatus } from '@roomcast/client/react';

type Events = {
  'users.user.deleted': { data: { id: string } };
  'task:update': { taskId: number };
};

export async function typed(WebSocket: any) {
  const client = connect<Events>({ url: 'ws://a/ws', getToken: async () => 'jwt', WebSocket });
  client.on('users.user.deleted', (payload, info: EventInfo) => {
    const id: string = payload.data.id;
    const pos: string = info.pos;
    return [id, pos];
  });
  // @ts-expect-error: the payload of task:update has no data
  client.on('task:update', (payload) => payload.data);
  // A pattern is not a key: its payload is unknown until narrowed.
  // @ts-expect-error: unknown has no taskId
  client.on('task:*', (payload) => payload.taskId);
  const { rooms }: { rooms: string[] } = await client.subscribe(['task:7'], { events: ['task:*'], token: 't' });
  await client.unsubscribe(rooms);
  await client.subscribe(['task:9'], { presence: true });
  const here: Presence = await client.presence('task:9', { token: 't' });
  const count: number = here.users['42'];
  const ready: boolean = here.ready;
  const offPresence: () => void = client.onPresence((change: PresenceEvent) => {
    const user: string = change.user;
    const room: string | undefined = change.room;
    // @ts-expect-error: a presence event is join, leave, online or offline
    if (change.type === 'joined') return;
    return [user, room, change.ts];
  });
  offPresence();
  const status: Status = client.status;
  const error: RoomcastError | null = client.lastError;
  const off: () => void = client.onStatus((s: Status, e: RoomcastError | null) => [s, e]);
  off();
  const map: Record<string, number> = client.positions();
  // @ts-expect-error: status is one of four
  const wrong: 'open' | 'closed' = client.status;
  client.close();
  return [status, error, map, wrong, count, ready, RoomcastProvider, useEvent, useStatus];
}

export function untyped(WebSocket: any) {
  const client = connect({ urls: ['ws://a/ws', 'ws://b/ws'], token: 'jwt', WebSocket, persist: true });
  // Without an event map, payloads are `any`.
  client.on('anything.**', (payload) => payload.whatever);
  // @ts-expect-error: subscribe takes a list of rooms
  void client.subscribe('task:7');
}
