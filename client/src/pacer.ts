/**
 * The client's side of the server's message budget (docs/PROTOCOL.md, `rate_limited`): a
 * token bucket of `burst` messages refilled at `perSecond`. The server drops what goes over
 * it unanswered, so frames beyond the budget wait here instead, in order.
 */

export interface RateLimit {
  /** Messages sent at once (the server's `websocket.client_burst`, default 50). */
  burst?: number;
  /** Messages a second after that (`websocket.client_messages_per_second`, default 20). */
  perSecond?: number;
}

export class Pacer {
  private readonly burst: number;
  private readonly rate: number;
  private tokens: number;
  private at = Date.now();
  private queue: string[] = [];
  private timer?: ReturnType<typeof setTimeout>;

  constructor(
    limit: RateLimit,
    private readonly out: (data: string) => void,
  ) {
    this.tokens = this.burst = limit.burst ?? 50;
    this.rate = (limit.perSecond ?? 20) / 1000;
  }

  send(data: string): void {
    this.queue.push(data);
    this.flush();
  }

  /** The connection is gone: what waits goes with it (its requests are sent again on the next). */
  stop(): void {
    clearTimeout(this.timer);
    this.queue = [];
  }

  private flush(): void {
    const now = Date.now();
    this.tokens = Math.min(this.burst, this.tokens + (now - this.at) * this.rate);
    this.at = now;
    while (this.queue.length && this.tokens >= 1) {
      this.tokens--;
      this.out(this.queue.shift()!);
    }
    if (this.queue.length && !this.timer) {
      this.timer = setTimeout(() => {
        this.timer = undefined;
        this.flush();
      }, Math.ceil((1 - this.tokens) / this.rate));
    }
  }
}
