//! Gives memory back to the system after a burst of connections has gone.
//!
//! Three things keep it otherwise. Hash tables (the registry's rooms and memberships, the
//! sessions, the per-user and per-address counts) keep the capacity of their largest size;
//! glibc's allocator keeps freed memory in its per-thread arenas instead of returning it; and
//! each thread's cache of freed chunks pins the pages they sit on (see `thread_cache`). After
//! 10,000 connections with 256 rooms each had closed, the process held 1.2 GB with no
//! connection and no room. Every `INTERVAL`, emptied tables are shrunk, and when they were, or
//! when many connections (sessions, or connections that never upgraded) have ended since the
//! last time, the workers empty their caches and the allocator is asked to trim (on a blocking
//! thread: it walks every arena).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tracing::debug;

use crate::registry::shrink_map;
use crate::thread_cache;
use crate::ws::Hub;

const INTERVAL: Duration = Duration::from_secs(10);

/// Connections closed since the last trim that make another one worth its cost.
const CLOSED_BEFORE_TRIM: u64 = 1000;

/// Runs until `stop` turns true. `unupgraded` counts the connections that ended before an
/// upgrade (see `edge.rs`).
pub async fn run(hub: Arc<Hub>, unupgraded: Arc<AtomicU64>, mut stop: watch::Receiver<bool>) {
    let ended = || {
        let open = hub.sessions.len() as u64;
        let sessions = hub.metrics.connections_opened.get().saturating_sub(open);
        sessions + unupgraded.load(Ordering::Relaxed)
    };
    let mut due = Due::new(ended());
    let mut tick = tokio::time::interval(INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.wait_for(|v| *v) => return,
        }
        let shrunk = hub.registry.shrink()
            | hub.listeners.shrink()
            | hub.presence.as_ref().is_some_and(|p| p.local.shrink())
            | shrink_map(&hub.sessions)
            | hub.users.shrink()
            | hub.addresses.shrink();
        if due.check(ended(), shrunk) {
            let flushed = thread_cache::flush_workers().await;
            let _ = tokio::task::spawn_blocking(trim).await;
            debug!(shrunk, flushed, "memory given back");
        }
    }
}

/// Whether a trim is worth its cost: tables shrank, or enough connections ended since the last.
/// Either is followed by one more trim at the next tick: a burst's last connections may end
/// just after a trim, and what they free then lands in the caches just emptied.
struct Due {
    trimmed_at: u64,
    follow_up: bool,
}

impl Due {
    fn new(ended: u64) -> Due {
        Due {
            trimmed_at: ended,
            follow_up: false,
        }
    }

    fn check(&mut self, ended: u64, shrunk: bool) -> bool {
        let cause = shrunk || ended.saturating_sub(self.trimmed_at) >= CLOSED_BEFORE_TRIM;
        let due = cause || self.follow_up;
        self.follow_up = cause;
        if due {
            self.trimmed_at = ended;
        }
        due
    }
}

/// Returns the allocator's free memory to the system, this thread's cached chunks included.
fn trim() {
    thread_cache::flush_this_thread();
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim takes the allocator's own locks and has no preconditions.
    unsafe {
        libc::malloc_trim(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_trim_is_due_after_a_thousand_ended_connections_or_a_shrink_and_once_more_after() {
        let mut due = Due::new(500);
        assert!(!due.check(1499, false));
        assert!(due.check(1500, false));
        assert!(due.check(1500, false), "the follow-up");
        assert!(!due.check(2000, false), "counted from the last trim");
        assert!(due.check(2000, true), "tables shrank");
        assert!(due.check(2000, false), "the follow-up");
        assert!(!due.check(2999, false));
        assert!(due.check(3000, false));
        assert!(due.check(3999, false), "the follow-up");
        assert!(!due.check(3999, false));
    }
}
