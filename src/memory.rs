//! Gives memory back to the system after a burst of connections has gone.
//!
//! Two things keep it otherwise. Hash tables (the registry's rooms and memberships, the
//! sessions) keep the capacity of their largest size; and glibc's allocator keeps freed memory
//! in its per-thread arenas instead of returning it. After 10,000 connections with 256 rooms
//! each had closed, the process held 1.2 GB with no connection and no room. Every
//! `INTERVAL`, emptied tables are shrunk, and when they were, or when many connections
//! have closed since the last time, the allocator is asked to trim (on a blocking thread: it
//! walks every arena).

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tracing::debug;

use crate::registry::shrink_map;
use crate::ws::Hub;

const INTERVAL: Duration = Duration::from_secs(10);

/// Connections closed since the last trim that make another one worth its cost.
const CLOSED_BEFORE_TRIM: usize = 1000;

/// Runs until `stop` turns true.
pub async fn run(hub: Arc<Hub>, mut stop: watch::Receiver<bool>) {
    let mut peak = 0usize;
    let mut tick = tokio::time::interval(INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.wait_for(|v| *v) => return,
        }
        let open = hub.sessions.len();
        peak = peak.max(open);
        let shrunk = hub.registry.shrink() | shrink_map(&hub.sessions);
        if shrunk || peak - open >= CLOSED_BEFORE_TRIM {
            let _ = tokio::task::spawn_blocking(trim).await;
            debug!(open, peak, shrunk, "memory given back");
            peak = open;
        }
    }
}

/// Returns the allocator's free memory to the system.
fn trim() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim takes the allocator's own locks and has no preconditions.
    unsafe {
        libc::malloc_trim(0);
    }
}
