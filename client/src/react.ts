/**
 * `@roomcast/client/react`: a provider that hands one client to a tree, and hooks for its
 * events and its status. The core never imports React; only this entry does.
 */
import {
  createContext,
  createElement,
  useCallback,
  useContext,
  useEffect,
  useRef,
  useSyncExternalStore,
  type ReactNode,
} from 'react';
import type { EventInfo, RoomcastClient, Status } from './client.js';
import type { RoomcastError } from './errors.js';

const ClientContext = createContext<RoomcastClient<any> | null>(null);

export function RoomcastProvider(props: { client: RoomcastClient<any>; children?: ReactNode }) {
  return createElement(ClientContext.Provider, { value: props.client }, props.children);
}

/** The provider's client. */
export function useRoomcast<E extends Record<string, unknown> = Record<string, any>>(): RoomcastClient<E> {
  const client = useContext(ClientContext);
  if (!client) throw new Error('roomcast: useRoomcast, useEvent and useStatus need a <RoomcastProvider>');
  return client as RoomcastClient<E>;
}

/** Calls `handler` for each event matching `pattern`, for as long as the component is
 * mounted; the latest `handler` is called, without subscribing again on each render. */
export function useEvent<P = any>(pattern: string, handler: (payload: P, info: EventInfo) => void): void {
  const client = useRoomcast();
  const latest = useRef(handler);
  latest.current = handler;
  useEffect(() => client.on(pattern, (payload, info) => latest.current(payload as P, info)), [client, pattern]);
}

/** The connection's status and last error, re-rendering on every change. */
export function useStatus(): { status: Status; error: RoomcastError | null } {
  const client = useRoomcast();
  const subscribe = useCallback((changed: () => void) => client.onStatus(changed), [client]);
  const status = useSyncExternalStore(subscribe, () => client.status, () => client.status);
  const error = useSyncExternalStore(subscribe, () => client.lastError, () => client.lastError);
  return { status, error };
}
