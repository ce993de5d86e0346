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
  private readonly burst_: number;
  private readonly rate_: number;
  private tokens_: number;
  private at_ = Date.now();
  private queue_: string[] = [];
  private timer_?: ReturnType<typeof setTimeout>;

  constructor(
    limit: RateLimit,
    private readonly out_: (data: string) => void,
  ) {
    this.tokens_ = this.burst_ = limit.burst ?? 50;
    this.rate_ = (limit.perSecond ?? 20) / 1000;
  }

  send_(data: string): void {
    this.queue_.push(data);
    this.flush_();
  }

  /** The connection is gone: what waits goes with it (its requests are sent again on the next). */
  stop_(): void {
    clearTimeout(this.timer_);
    this.queue_ = [];
  }

  private flush_(): void {
    const now = Date.now();
    this.tokens_ = Math.min(this.burst_, this.tokens_ + (now - this.at_) * this.rate_);
    this.at_ = now;
    while (this.queue_.length && this.tokens_ >= 1) {
      this.tokens_--;
      this.out_(this.queue_.shift()!);
    }
    if (this.queue_.length && !this.timer_) {
      this.timer_ = setTimeout(() => {
        this.timer_ = undefined;
        this.flush_();
      }, Math.ceil((1 - this.tokens_) / this.rate_));
    }
  }
}
