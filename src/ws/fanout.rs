//! The fan-out of one record to a large room, cut into parts that the runtime's workers and
//! the consumer's thread take from a shared list.
//!
//! The consumer never waits for a worker to get round to a part: after spawning helpers it
//! takes parts itself until none is left, then waits only for parts a worker has already
//! started. Waiting for spawned tasks instead made the consumer queue behind the thousands of
//! writer tasks the previous record had woken, on a machine whose workers are all busy, and
//! the fan-out fell to a tenth of what the consumer manages alone.

use std::ops::Range;
use std::sync::{Arc, Condvar, Mutex};

use super::outbox::{Delivery, Handover, Peer};
use crate::frame::Frame;
use crate::metrics::Metrics;
use crate::registry::Members;
use crate::route::Priority;

/// Members per part; rooms of fewer than two parts are not spread, since a spawned task
/// costs about what a thousand deliveries do.
pub const PART: usize = 1024;

/// Where large rooms are spread.
pub struct Fanout {
    pub runtime: tokio::runtime::Handle,
    /// Helpers spawned per spread record: one per worker.
    pub helpers: usize,
}

/// What one pass of deliveries did, counted into the metrics once at its end.
#[derive(Default)]
pub struct Tally {
    shed: u64,
    overflowed: u64,
    queued: u64,
}

impl Tally {
    pub fn add(&mut self, delivery: Delivery) {
        match delivery {
            Delivery::Accepted => self.queued += 1,
            Delivery::Shed => self.shed += 1,
            Delivery::Overflow => self.overflowed += 1,
            Delivery::Closed => {}
        }
    }

    pub fn count(self, metrics: &Metrics) {
        metrics.deliveries.inc_by(self.queued);
        if self.shed > 0 {
            metrics.frames_shed.inc_by(self.shed);
        }
        if self.overflowed > 0 {
            metrics.slow_consumer_closes.inc_by(self.overflowed);
        }
    }
}

/// One record's fan-out to a large room, in parts.
pub struct Spread {
    members: Members<Peer>,
    frame: Frame,
    event: String,
    priority: Priority,
    metrics: Arc<Metrics>,
    parts: usize,
    state: Mutex<Progress>,
    finished: Condvar,
}

#[derive(Default)]
struct Progress {
    next: usize,
    running: usize,
}

impl Spread {
    /// Cuts the fan-out in parts and lets the runtime's workers start on them.
    pub fn start(
        fanout: &Fanout,
        members: Members<Peer>,
        frame: &Frame,
        event: &str,
        priority: Priority,
        metrics: Arc<Metrics>,
    ) -> Arc<Spread> {
        let parts = members.len().div_ceil(PART).min(fanout.helpers + 1);
        let spread = Arc::new(Spread {
            members,
            frame: frame.clone(),
            event: event.to_string(),
            priority,
            metrics,
            parts,
            state: Mutex::new(Progress::default()),
            finished: Condvar::new(),
        });
        for _ in 1..parts {
            let helper = spread.clone();
            fanout.runtime.spawn(async move { helper.work() });
        }
        spread
    }

    /// Takes parts until none is left, then waits for those others are still running.
    pub fn finish(&self) {
        self.work();
        let mut state = self.lock();
        while state.running > 0 {
            state = self.finished.wait(state).unwrap_or_else(|e| e.into_inner());
        }
    }

    fn work(&self) {
        while let Some(range) = self.claim() {
            let mut tally = Tally::default();
            self.members
                .for_each_ahead(range, &self.event, Peer::prefetch, |peer| {
                    tally.add(peer.hand_over(&self.frame, self.priority, Handover::Queue))
                });
            tally.count(&self.metrics);
            let mut state = self.lock();
            state.running -= 1;
            if state.running == 0 {
                self.finished.notify_all();
            }
        }
    }

    fn claim(&self) -> Option<Range<usize>> {
        let mut state = self.lock();
        if state.next == self.parts {
            return None;
        }
        let part = state.next;
        state.next += 1;
        state.running += 1;
        let per_part = self.members.len().div_ceil(self.parts);
        let end = ((part + 1) * per_part).min(self.members.len());
        Some(part * per_part..end)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Progress> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::Registry;
    use crate::ws::outbox::Limits;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn every_member_gets_the_frame_once_whoever_takes_the_parts() {
        let limits = Limits {
            frames: 4,
            bytes: 1024,
            shed_low_after: 4,
        };
        let registry = Registry::new();
        let mut inboxes = Vec::new();
        for conn in 0..3000 {
            let (peer, inbox) = Peer::new(limits, None);
            registry.join(conn, None, "big", &peer, None);
            inboxes.push(inbox);
        }
        let rooms = ["big".to_string()];
        let members = registry
            .reach(None, &rooms, "e", 2 * PART, |_| {
                panic!("a large room is listed")
            })
            .unwrap();
        let fanout = Fanout {
            runtime: tokio::runtime::Handle::current(),
            helpers: 2,
        };
        let metrics = Arc::new(Metrics::new());
        let frame = Frame::from("x");
        let spread = Spread::start(&fanout, members, &frame, "e", Priority::Normal, metrics);
        tokio::task::spawn_blocking(move || spread.finish())
            .await
            .unwrap();
        let counts: Vec<usize> = inboxes.iter_mut().map(|i| i.take_queued().len()).collect();
        assert!(counts.iter().all(|&n| n == 1), "each member once");
    }
}
