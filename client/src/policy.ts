/**
 * What a close code means for the next connection (docs/PROTOCOL.md, "Close codes"): whether
 * to come back, how soon, to which server, and with what token.
 */

/** `now`: at once; `fast`: within a base interval; `backoff`: full jitter; `slow`: half the cap or more. */
export type Pace = 'stop' | 'now' | 'fast' | 'backoff' | 'slow';

export interface Decision {
  pace: Pace;
  /** Try the next URL: this server is going away or failed. */
  failover?: boolean;
  /** Ask `getToken` for a new token before reconnecting. */
  freshToken?: boolean;
}

/** The name `lastError.code` gives each close code. */
export const CLOSE_NAMES: Record<number, string> = {
  1000: 'normal_closure',
  1001: 'going_away',
  1002: 'protocol_error',
  1006: 'connection_lost',
  1007: 'invalid_payload',
  1008: 'policy_violation',
  1009: 'message_too_big',
  1011: 'internal_error',
  4001: 'token_expired',
  4003: 'forbidden',
  4008: 'slow_consumer',
  4029: 'rate_limited',
};

/** The decision for a connection that was open (welcomed) and then closed with `code`. */
export function decide(code: number, staticToken: boolean): Decision {
  switch (code) {
    case 4003: // The same token would be refused again.
      return { pace: 'stop' };
    case 1001: // Draining (or silent too long): another replica.
      return { pace: 'fast', failover: true };
    case 4008: // Slow consumer: the resume brings back everything missed.
      return { pace: 'now' };
    case 4001:
      return staticToken ? { pace: 'stop' } : { pace: 'now', freshToken: true };
    case 1002:
    case 1007:
    case 1008:
    case 1009:
    case 4029:
      return { pace: 'slow' };
    // 1006 (lost, reset, killed), 1011, anything unknown, and 1000: the server sends it
    // only in answer to a client's close, which this client has stopped listening for by
    // then, so a 1000 it hears comes from something in between (a proxy) and ends nothing.
    default:
      return { pace: 'backoff', failover: true };
  }
}
