//! A connection's budget of client messages: a token bucket, kept as the generic cell rate
//! algorithm's one instant, so it costs a connection a few bytes and no timer.
//!
//! A message over the budget is not handled. The first of a run of refusals is answered with
//! one `rate_limited` error, at most one a second, so a flood cannot turn the server into an
//! amplifier; a client that goes on for another burst's worth of refused messages in a row is
//! closed.

use std::time::Duration;

use tokio::time::Instant;

/// At most one `rate_limited` error per this interval.
const WARN_EVERY: Duration = Duration::from_secs(1);

/// The budget, from `websocket.client_messages_per_second` and `websocket.client_burst`.
#[derive(Debug, Clone, Copy)]
pub struct Budget {
    /// The bucket's refill: one message per this interval.
    every: Duration,
    /// How many messages the full bucket holds.
    burst: u32,
}

impl Budget {
    pub fn new(per_second: u32, burst: u32) -> Budget {
        Budget {
            every: Duration::from_secs(1) / per_second.max(1),
            burst: burst.max(1),
        }
    }

    /// How far ahead of `now` the bucket may run before it is empty.
    fn tolerance(&self) -> Duration {
        self.every * (self.burst - 1)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Pass,
    /// Not handled; `warn` when the client is to be told (once per run, once a second).
    Refuse {
        warn: bool,
    },
    /// Refused once more after a burst's worth of refusals in a row: close the connection.
    Close,
}

#[derive(Debug)]
pub struct Throttle {
    /// When the bucket would be full again if nothing more came.
    full_at: Instant,
    warned_at: Option<Instant>,
    /// Refused messages since the last one that passed.
    refused: u32,
}

impl Throttle {
    /// A full bucket.
    pub fn new(now: Instant) -> Throttle {
        Throttle {
            full_at: now,
            warned_at: None,
            refused: 0,
        }
    }

    /// Takes one message's worth from the bucket at `now`, if there is one.
    pub fn admit(&mut self, now: Instant, budget: Budget) -> Verdict {
        let full_at = self.full_at.max(now);
        if full_at - now <= budget.tolerance() {
            self.full_at = full_at + budget.every;
            self.refused = 0;
            return Verdict::Pass;
        }
        self.refused += 1;
        if self.refused > budget.burst {
            return Verdict::Close;
        }
        let warn = self.refused == 1
            && self
                .warned_at
                .is_none_or(|at| now.duration_since(at) >= WARN_EVERY);
        if warn {
            self.warned_at = Some(now);
        }
        Verdict::Refuse { warn }
    }
}

/// A connection's budget of room changes (rooms joined or left by `subscribe` and
/// `unsubscribe`), taken a message's rooms at a time: each change may cost every replica a
/// presence record and every listener of the room an event, and a client flapping hundreds
/// of rooms in a few messages a second would otherwise stay within its message budget.
#[derive(Debug)]
pub struct Allowance {
    full_at: Instant,
}

impl Allowance {
    pub fn new(now: Instant) -> Allowance {
        Allowance { full_at: now }
    }

    /// Takes `n` changes at `now` if the bucket holds them, else nothing.
    pub fn take(&mut self, now: Instant, budget: Budget, n: u32) -> bool {
        let after = self.full_at.max(now) + budget.every * n;
        if after - now <= budget.every * budget.burst {
            self.full_at = after;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    fn take(t: &mut Throttle, now: Instant, budget: Budget, n: u32) -> Vec<Verdict> {
        (0..n).map(|_| t.admit(now, budget)).collect()
    }

    #[test]
    fn a_full_bucket_passes_a_burst_then_refills_at_the_rate() {
        let budget = Budget::new(20, 50);
        let t0 = Instant::now();
        let mut t = Throttle::new(t0);
        assert!(take(&mut t, t0, budget, 50)
            .iter()
            .all(|v| *v == Verdict::Pass));
        assert_eq!(t.admit(t0, budget), Verdict::Refuse { warn: true });
        // One message per 50 ms comes back, and no more.
        assert_eq!(
            t.admit(t0 + 49 * MS, budget),
            Verdict::Refuse { warn: false }
        );
        assert_eq!(t.admit(t0 + 50 * MS, budget), Verdict::Pass);
        assert_eq!(
            t.admit(t0 + 50 * MS, budget),
            Verdict::Refuse { warn: false }
        );
        assert_eq!(t.admit(t0 + 100 * MS, budget), Verdict::Pass);
        // Idle for the time of a whole burst: the bucket is full again, and no fuller.
        let later = t0 + 100 * MS + 50 * 50 * MS;
        assert!(take(&mut t, later, budget, 50)
            .iter()
            .all(|v| *v == Verdict::Pass));
        assert_ne!(t.admit(later, budget), Verdict::Pass);
    }

    #[test]
    fn room_changes_are_taken_a_message_at_a_time_within_the_burst() {
        let budget = Budget::new(100, 512);
        let t0 = Instant::now();
        let mut a = Allowance::new(t0);
        assert!(a.take(t0, budget, 256), "a full subscribe");
        assert!(a.take(t0, budget, 256), "and its unsubscribe");
        assert!(!a.take(t0, budget, 1), "the burst is spent");
        // 10 ms a change: 100 ms bring back 10, not 11.
        assert!(!a.take(t0 + 100 * MS, budget, 11));
        assert!(a.take(t0 + 100 * MS, budget, 10));
        // Never more than the burst at once, however long idle.
        let later = t0 + 3600 * 1000 * MS;
        assert!(!a.take(later, budget, 513));
        assert!(a.take(later, budget, 512));
    }

    #[test]
    fn a_client_within_the_rate_is_never_refused() {
        let budget = Budget::new(20, 50);
        let t0 = Instant::now();
        let mut t = Throttle::new(t0);
        for i in 0..10_000 {
            assert_eq!(
                t.admit(t0 + i * 50 * MS, budget),
                Verdict::Pass,
                "message {i}"
            );
        }
    }

    #[test]
    fn one_warning_per_run_and_second_then_a_close_after_a_burst_of_refusals() {
        let budget = Budget::new(20, 50);
        let t0 = Instant::now();
        let mut t = Throttle::new(t0);
        take(&mut t, t0, budget, 50);
        let first = t.admit(t0, budget);
        assert_eq!(first, Verdict::Refuse { warn: true });
        // A pass ends the run; the next run's first refusal within the second is not told.
        assert_eq!(t.admit(t0 + 50 * MS, budget), Verdict::Pass);
        assert_eq!(
            t.admit(t0 + 50 * MS, budget),
            Verdict::Refuse { warn: false }
        );
        // A second on, the bucket has 20 messages again; the run after them is told.
        let second = t0 + 1050 * MS;
        assert!(take(&mut t, second, budget, 20)
            .iter()
            .all(|v| *v == Verdict::Pass));
        assert_eq!(t.admit(second, budget), Verdict::Refuse { warn: true });
        // 50 refusals in a row are refusals; the 51st closes.
        let rest = take(&mut t, second, budget, 49);
        assert!(rest.iter().all(|v| *v == Verdict::Refuse { warn: false }));
        assert_eq!(t.admit(second, budget), Verdict::Close);
    }
}
