//! This replica's own presence: the sessions' connects, disconnects, joins and leaves, counted
//! as they happen and drained into one batch per interval.
//!
//! A session's call is a counter changed under a lock, with no await and nothing sent: a storm
//! of connects costs the sessions almost nothing and Kafka one batch. Only what differs from
//! the last batch is drained, so a join and a leave within one interval cancel out.

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use tokio::time::{Instant, MissedTickBehavior};

use super::counts::{Counts, Key};

/// What a batch says of the replica's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// The counts that changed since the last batch, as their new values (0: gone).
    Changes,
    /// Every count above zero: replaces whatever a reader held for the replica.
    Snapshot,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Batch {
    pub kind: Kind,
    pub counts: Counts,
}

#[derive(Debug, Default)]
struct State {
    current: HashMap<Key, u32>,
    /// The value at the last drain of every key changed since, so that a drain sends only
    /// what differs from it.
    before: HashMap<Key, u32>,
}

impl State {
    fn change(&mut self, key: Key, up: bool) {
        let now = self.current.get(&key).copied().unwrap_or(0);
        let next = if up { now + 1 } else { now.saturating_sub(1) };
        if next == now {
            return;
        }
        if !self.before.contains_key(&key) {
            self.before.insert(key.clone(), now);
        }
        if next == 0 {
            self.current.remove(&key);
        } else {
            self.current.insert(key, next);
        }
    }

    fn drain(&mut self, kind: Kind) -> Batch {
        let before = std::mem::take(&mut self.before);
        let counts = match kind {
            Kind::Snapshot => self.current.iter().map(|(k, n)| (k.clone(), *n)).collect(),
            Kind::Changes => before
                .into_iter()
                .filter_map(|(key, was)| {
                    let now = self.current.get(&key).copied().unwrap_or(0);
                    (now != was).then_some((key, now))
                })
                .collect(),
        };
        Batch { kind, counts }
    }
}

fn shrink(map: &mut HashMap<Key, u32>) -> bool {
    let worth = crate::registry::worth_shrinking(map.capacity(), map.len());
    if worth {
        map.shrink_to_fit();
    }
    worth
}

/// The counts of this replica's connections, shared by its sessions and its publisher.
#[derive(Debug, Default)]
pub struct Local {
    state: Mutex<State>,
}

impl Local {
    /// A connection of `user` opened.
    pub fn connected(&self, tenant: Option<&str>, user: &str) {
        self.lock().change(Key::user(tenant, user), true);
    }

    /// A connection of `user` ended.
    pub fn disconnected(&self, tenant: Option<&str>, user: &str) {
        self.lock().change(Key::user(tenant, user), false);
    }

    /// A connection of `user` joined `room` (a room it was not in).
    pub fn joined(&self, tenant: Option<&str>, room: &str, user: &str) {
        self.lock().change(Key::member(tenant, room, user), true);
    }

    /// A connection of `user` left `room` (by unsubscribing, or by ending).
    pub fn left(&self, tenant: Option<&str>, room: &str, user: &str) {
        self.lock().change(Key::member(tenant, room, user), false);
    }

    /// What changed since the last drain, or the whole state.
    pub fn drain(&self, kind: Kind) -> Batch {
        self.lock().drain(kind)
    }

    /// Gives back the counts' capacity once most of it stands empty (after a storm has
    /// gone): a hash map never shrinks by itself. True if anything shrank.
    pub fn shrink(&self) -> bool {
        let mut state = self.lock();
        shrink(&mut state.current) | shrink(&mut state.before)
    }

    /// A panicking session cannot leave the counts half-changed: each call is one insert or
    /// remove, so a poisoned lock still guards consistent counts.
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// When the publisher sends what.
#[derive(Debug, Clone, Copy)]
pub struct Cadence {
    /// How long changes are gathered into one batch.
    pub interval: Duration,
    /// The longest time without a record: an empty batch then renews the lease.
    pub renew: Duration,
    /// How often the whole state is sent, for readers starting from the compacted topic.
    pub snapshot: Duration,
}

/// The publisher's memory of what it last sent.
#[derive(Debug, Default)]
pub struct Sent {
    record: Option<Instant>,
    snapshot: Option<Instant>,
}

impl Cadence {
    /// The batch to send at `now`, if any: a snapshot first and every `snapshot`, else the
    /// changes, else an empty batch once the lease is due for renewal.
    pub fn next(&self, local: &Local, sent: &mut Sent, now: Instant) -> Option<Batch> {
        let due = |last: Option<Instant>, every| last.is_none_or(|at| now >= at + every);
        let batch = if due(sent.snapshot, self.snapshot) {
            sent.snapshot = Some(now);
            local.drain(Kind::Snapshot)
        } else {
            let changes = local.drain(Kind::Changes);
            if changes.counts.is_empty() && !due(sent.record, self.renew) {
                return None;
            }
            changes
        };
        sent.record = Some(now);
        Some(batch)
    }
}

/// Drains `local` every interval and hands each batch due to `send`, for ever.
pub async fn publish(local: &Local, cadence: Cadence, mut send: impl FnMut(Batch)) {
    let mut ticks = tokio::time::interval(cadence.interval);
    ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut sent = Sent::default();
    loop {
        let now = ticks.tick().await;
        if let Some(batch) = cadence.next(local, &mut sent, now) {
            send(batch);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::super::record::{Origin, Writer};
    use super::*;

    #[test]
    fn the_counts_give_their_capacity_back_after_a_storm() {
        let local = Local::default();
        for user in 0..20_000 {
            local.connected(None, &user.to_string());
        }
        local.drain(Kind::Changes);
        assert!(!local.shrink(), "a full map is left alone");
        for user in 0..20_000 {
            local.disconnected(None, &user.to_string());
        }
        local.drain(Kind::Changes);
        let full = local.lock().current.capacity();
        assert!(full >= 20_000, "a map does not shrink by itself ({full})");
        assert!(local.shrink());
        assert!(local.lock().current.capacity() < full / 10);
    }

    const CADENCE: Cadence = Cadence {
        interval: Duration::from_millis(200),
        renew: Duration::from_secs(2),
        snapshot: Duration::from_secs(30),
    };

    fn counts(entries: &[(Key, u32)]) -> Counts {
        entries.iter().cloned().collect()
    }

    #[test]
    fn a_join_and_a_leave_within_one_interval_cancel_out() {
        let local = Local::default();
        local.joined(Some("acme"), "task:9", "42");
        local.left(Some("acme"), "task:9", "42");
        local.connected(Some("acme"), "7");
        local.disconnected(Some("acme"), "7");
        assert_eq!(local.drain(Kind::Changes).counts, Counts::new());
        assert_eq!(local.drain(Kind::Snapshot).counts, Counts::new());
    }

    #[test]
    fn a_drain_sends_new_values_and_only_those_that_differ_from_the_last() {
        let local = Local::default();
        local.connected(Some("acme"), "42");
        local.connected(Some("acme"), "42");
        local.joined(Some("acme"), "task:9", "42");
        let first = local.drain(Kind::Changes);
        assert_eq!(first.kind, Kind::Changes);
        assert_eq!(
            first.counts,
            counts(&[
                (Key::user(Some("acme"), "42"), 2),
                (Key::member(Some("acme"), "task:9", "42"), 1),
            ])
        );
        // One of the two connections ends, another room comes and goes: one change.
        local.disconnected(Some("acme"), "42");
        local.joined(Some("acme"), "task:8", "42");
        local.left(Some("acme"), "task:8", "42");
        assert_eq!(
            local.drain(Kind::Changes).counts,
            counts(&[(Key::user(Some("acme"), "42"), 1)])
        );
        local.left(Some("acme"), "task:9", "42");
        local.disconnected(Some("acme"), "42");
        assert_eq!(
            local.drain(Kind::Changes).counts,
            counts(&[
                (Key::user(Some("acme"), "42"), 0),
                (Key::member(Some("acme"), "task:9", "42"), 0),
            ])
        );
        // A disconnect never seen connected changes nothing.
        local.disconnected(Some("acme"), "42");
        assert!(local.drain(Kind::Changes).counts.is_empty());
    }

    #[test]
    fn a_snapshot_is_the_whole_state_and_the_changes_after_it_start_from_it() {
        let local = Local::default();
        local.connected(None, "1");
        local.joined(None, "lobby", "1");
        local.drain(Kind::Changes);
        local.connected(Some("acme"), "2");
        let snapshot = local.drain(Kind::Snapshot);
        assert_eq!(snapshot.kind, Kind::Snapshot);
        assert_eq!(
            snapshot.counts,
            counts(&[
                (Key::user(None, "1"), 1),
                (Key::member(None, "lobby", "1"), 1),
                (Key::user(Some("acme"), "2"), 1),
            ])
        );
        assert!(local.drain(Kind::Changes).counts.is_empty());
    }

    /// The batches sent, with when.
    type Published = Arc<Mutex<Vec<(Instant, Batch)>>>;

    /// Publishes `local` into a shared list, from the instant returned.
    fn publisher(local: &Arc<Local>) -> (Published, Instant) {
        let sent = Arc::new(Mutex::new(Vec::new()));
        let (local, into) = (local.clone(), sent.clone());
        let start = Instant::now();
        tokio::spawn(async move {
            publish(&local, CADENCE, |batch| {
                into.lock().unwrap().push((Instant::now(), batch))
            })
            .await
        });
        (sent, start)
    }

    #[tokio::test(start_paused = true)]
    async fn a_storm_of_10_000_connects_in_one_interval_is_one_batch() {
        let local = Arc::new(Local::default());
        let (sent, start) = publisher(&local);
        tokio::time::sleep(Duration::from_millis(50)).await;
        for user in 0..10_000 {
            let user = format!("u{user}");
            local.connected(Some("acme"), &user);
            local.joined(Some("acme"), &format!("user:{user}"), &user);
            local.joined(Some("acme"), "tenant:acme", &user);
        }
        tokio::time::sleep(Duration::from_millis(1000)).await;
        let sent = std::mem::take(&mut *sent.lock().unwrap());
        // The first tick's snapshot (empty), then the storm in the next tick's batch alone.
        assert_eq!(
            sent.len(),
            2,
            "{:?}",
            sent.iter().map(|s| s.0).collect::<Vec<_>>()
        );
        assert_eq!(
            (sent[0].0 - start, sent[0].1.kind),
            (Duration::ZERO, Kind::Snapshot)
        );
        assert!(sent[0].1.counts.is_empty());
        let (at, storm) = &sent[1];
        assert_eq!((*at - start, storm.kind), (CADENCE.interval, Kind::Changes));
        assert_eq!(storm.counts.len(), 30_000);
        assert_eq!(
            storm.counts[&Key::member(Some("acme"), "tenant:acme", "u9")],
            1
        );
        // Three records at the default bound of 256 KiB.
        let origin = Origin {
            replica: "roomcast-0".into(),
            incarnation: "1".into(),
        };
        let records = Writer::new(origin, Duration::from_secs(10), 256 * 1024).records(storm);
        assert_eq!(records.len(), 3);
    }

    #[tokio::test(start_paused = true)]
    async fn an_idle_replica_renews_its_lease_and_sends_its_state_on_time() {
        let local = Arc::new(Local::default());
        local.connected(Some("acme"), "42");
        let (sent, start) = publisher(&local);
        tokio::time::sleep(Duration::from_secs(61)).await;
        let sent = sent.lock().unwrap();
        let at = |kind| -> Vec<u64> {
            sent.iter()
                .filter(|(_, b)| b.kind == kind)
                .map(|(at, _)| (*at - start).as_millis() as u64)
                .collect()
        };
        assert_eq!(at(Kind::Snapshot), [0, 30_000, 60_000]);
        let renewals: Vec<u64> = (1..30).filter(|s| s % 15 != 0).map(|s| s * 2000).collect();
        assert_eq!(at(Kind::Changes), renewals);
        assert!(sent
            .iter()
            .all(|(_, b)| b.kind == Kind::Snapshot || b.counts.is_empty()));
        assert_eq!(sent[0].1.counts.len(), 1);
    }
}
