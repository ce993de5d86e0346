//! The replay buffer: the recent records of every partition, kept as the frames already
//! encoded for live delivery, so a reconnecting client can be given what it missed without
//! touching Kafka.
//!
//! Each partition keeps a contiguous window of offsets `[start, end)`: every offset in it was
//! read, and the routed ones are kept with their rooms. The window is bounded by bytes and by
//! age; what falls out must come from Kafka instead. A [`Selection`] says which records a
//! connection would have received: same tenant, a shared room, and a filter that admits the
//! event.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::frame::Frame;
use crate::pattern::EventFilter;

use crate::route::Routed;

/// One routed record, as kept for replay.
#[derive(Debug, Clone)]
pub struct Entry {
    pub offset: i64,
    pub tenant: Option<String>,
    pub rooms: Vec<String>,
    pub event: String,
    pub frame: Frame,
    at: Instant,
}

impl Entry {
    /// Keeps a routed record, taking over its strings rather than copying them. `at` is when
    /// it was read.
    pub fn new(routed: Routed<'_>, frame: Frame, at: Instant) -> Entry {
        Entry {
            offset: routed.position.offset,
            tenant: routed.tenant,
            rooms: routed.rooms,
            event: routed.event,
            frame,
            at,
        }
    }

    fn cost(&self) -> usize {
        let rooms: usize = self.rooms.iter().map(|r| r.len() + 16).sum();
        std::mem::size_of::<Entry>() + self.frame.len() + self.event.len() + rooms + 16
    }
}

/// Which records a connection would have received.
#[derive(Debug, Clone, Default)]
pub struct Selection {
    pub tenant: Option<String>,
    /// Room name to its event filter (None: every event).
    pub rooms: HashMap<String, Option<Arc<EventFilter>>>,
}

impl Selection {
    pub fn admits(&self, entry: &Entry) -> bool {
        entry.tenant.as_deref() == self.tenant.as_deref()
            && entry
                .rooms
                .iter()
                .any(|room| match self.rooms.get(&**room) {
                    Some(None) => true,
                    Some(Some(filter)) => filter.matches(&entry.event),
                    None => false,
                })
    }
}

#[derive(Debug, Default)]
struct PartitionBuffer {
    entries: VecDeque<Entry>,
    /// First offset covered.
    start: i64,
    /// One past the last offset covered.
    end: i64,
    bytes: usize,
    /// This partition's equal share of the byte budget.
    share: usize,
}

impl PartitionBuffer {
    /// Lets go of the entries read more than `max_age` before `now`.
    fn expire(&mut self, now: Instant, max_age: Duration) {
        while self
            .entries
            .front()
            .is_some_and(|e| now.saturating_duration_since(e.at) > max_age)
        {
            self.evict_front();
        }
    }

    fn evict_front(&mut self) {
        if let Some(e) = self.entries.pop_front() {
            self.bytes -= e.cost();
            self.start = e.offset + 1;
        }
    }
}

#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub bytes: usize,
    pub max_age: Duration,
}

/// What the buffer can say about a range of one partition.
#[derive(Debug, PartialEq)]
pub enum Lookup {
    /// The range is covered; these are the selected frames in offset order.
    Hit(Vec<Frame>),
    /// Offsets before this one have left the buffer (or were never in it).
    Miss { start: i64 },
}

type Partitions = BTreeMap<String, BTreeMap<i32, PartitionBuffer>>;

pub struct ReplayBuffer {
    limits: Limits,
    partitions: Mutex<Partitions>,
}

impl ReplayBuffer {
    pub fn new(limits: Limits) -> ReplayBuffer {
        ReplayBuffer {
            limits,
            partitions: Mutex::new(BTreeMap::new()),
        }
    }

    /// Starts (or restarts, after an offset reset) a partition's window at `offset`.
    pub fn reset(&self, topic: &str, partition: i32, offset: i64) {
        let buffer = PartitionBuffer {
            start: offset,
            end: offset,
            ..PartitionBuffer::default()
        };
        let mut all = self.lock();
        all.entry(topic.to_string())
            .or_default()
            .insert(partition, buffer);
        let count = all.values().map(BTreeMap::len).sum::<usize>().max(1);
        for p in all.values_mut().flat_map(BTreeMap::values_mut) {
            p.share = self.limits.bytes / count;
        }
    }

    /// Records that `offset` was read; `entry` is the routed record, if it was routable.
    pub fn push(&self, topic: &str, partition: i32, offset: i64, entry: Option<Entry>) {
        let mut all = self.lock();
        let Some(p) = all.get_mut(topic).and_then(|t| t.get_mut(&partition)) else {
            return;
        };
        // An entry was stamped when it was read: no second clock read per record.
        let now = entry.as_ref().map_or_else(Instant::now, |e| e.at);
        if let Some(e) = entry {
            p.bytes += e.cost();
            p.entries.push_back(e);
        }
        p.end = offset + 1;
        while p.bytes > p.share {
            p.evict_front();
        }
        p.expire(now, self.limits.max_age);
    }

    /// The selected frames with offsets in `(after, upto]`, if the buffer covers the range.
    /// Age is judged now, not when the partition last had a record: a quiet partition's
    /// window would otherwise keep what it should have let go.
    pub fn lookup(
        &self,
        topic: &str,
        partition: i32,
        after: i64,
        upto: i64,
        selection: &Selection,
    ) -> Lookup {
        let mut all = self.lock();
        let Some(p) = all.get_mut(topic).and_then(|t| t.get_mut(&partition)) else {
            return Lookup::Miss { start: i64::MAX };
        };
        p.expire(Instant::now(), self.limits.max_age);
        if after + 1 < p.start || upto >= p.end {
            return Lookup::Miss { start: p.start };
        }
        let first = p.entries.partition_point(|e| e.offset <= after);
        let frames = p
            .entries
            .range(first..)
            .take_while(|e| e.offset <= upto)
            .filter(|e| selection.admits(e))
            .map(|e| e.frame.clone())
            .collect();
        Lookup::Hit(frames)
    }

    /// Total bytes held and records kept.
    pub fn usage(&self) -> (usize, usize) {
        let all = self.lock();
        all.values()
            .flat_map(BTreeMap::values)
            .fold((0, 0), |(b, n), p| (b + p.bytes, n + p.entries.len()))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Partitions> {
        self.partitions.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(offset: i64, room: &str, event: &str) -> Entry {
        Entry {
            offset,
            tenant: None,
            rooms: vec![room.into()],
            event: event.into(),
            frame: Frame::from(format!("frame-{offset}")),
            at: Instant::now(),
        }
    }

    fn selection(rooms: &[&str]) -> Selection {
        Selection {
            tenant: None,
            rooms: rooms.iter().map(|r| (r.to_string(), None)).collect(),
        }
    }

    fn frames(l: Lookup) -> Vec<String> {
        match l {
            Lookup::Hit(f) => f.iter().map(|f| f.as_str().to_string()).collect(),
            Lookup::Miss { start } => panic!("miss, buffer starts at {start}"),
        }
    }

    fn buffer(bytes: usize) -> ReplayBuffer {
        ReplayBuffer::new(Limits {
            bytes,
            max_age: Duration::from_secs(60),
        })
    }

    #[test]
    fn selects_the_connections_records_in_a_range() {
        let b = buffer(1 << 20);
        b.reset("t", 0, 10);
        for o in 10..20 {
            let room = if o % 2 == 0 { "a" } else { "b" };
            b.push("t", 0, o, Some(entry(o, room, "e")));
        }
        b.push("t", 0, 20, None); // unroutable: covered, nothing kept
        let got = frames(b.lookup("t", 0, 13, 20, &selection(&["a"])));
        assert_eq!(got, ["frame-14", "frame-16", "frame-18"]);
        assert_eq!(
            frames(b.lookup("t", 0, 9, 11, &selection(&["b"]))),
            ["frame-11"]
        );
        assert_eq!(
            b.lookup("t", 0, 8, 12, &selection(&["a"])),
            Lookup::Miss { start: 10 }
        );
        // Beyond what was read is not covered either.
        assert!(matches!(
            b.lookup("t", 0, 15, 21, &selection(&["a"])),
            Lookup::Miss { .. }
        ));
        assert!(matches!(
            b.lookup("u", 0, 1, 2, &selection(&["a"])),
            Lookup::Miss { .. }
        ));
    }

    #[test]
    fn byte_budget_evicts_the_oldest() {
        let cost = entry(0, "a", "e").cost();
        let b = buffer(cost * 3);
        b.reset("t", 0, 0);
        for o in 0..10 {
            b.push("t", 0, o, Some(entry(o, "a", "e")));
        }
        assert_eq!(b.usage().1, 3);
        assert_eq!(
            b.lookup("t", 0, 5, 9, &selection(&["a"])),
            Lookup::Miss { start: 7 }
        );
        assert_eq!(frames(b.lookup("t", 0, 6, 9, &selection(&["a"]))).len(), 3);
    }

    #[test]
    fn age_is_judged_at_the_lookup_on_a_quiet_partition() {
        let b = buffer(1 << 20);
        b.reset("t", 0, 0);
        let read = Instant::now();
        let young = |o| Entry {
            at: read,
            ..entry(o, "a", "e")
        };
        let aged = |o| Entry {
            at: read - Duration::from_secs(61),
            ..entry(o, "a", "e")
        };
        // Read 61 s ago, and nothing since: the push itself saw them young.
        b.push("t", 0, 0, Some(aged(0)));
        b.push("t", 0, 1, Some(aged(1)));
        assert_eq!(
            b.lookup("t", 0, -1, 1, &selection(&["a"])),
            Lookup::Miss { start: 2 }
        );
        b.push("t", 0, 2, Some(young(2)));
        assert_eq!(
            frames(b.lookup("t", 0, 1, 2, &selection(&["a"]))),
            ["frame-2"]
        );
    }

    #[test]
    fn tenant_and_filters_apply() {
        let b = buffer(1 << 20);
        b.reset("t", 0, 0);
        let mut e = entry(0, "a", "users.user.deleted");
        e.tenant = Some("acme".into());
        b.push("t", 0, 0, Some(e));
        b.push("t", 0, 1, Some(entry(1, "a", "users.user.created")));
        let mut s = selection(&["a"]);
        assert_eq!(frames(b.lookup("t", 0, -1, 1, &s)), ["frame-1"]);
        s.tenant = Some("acme".into());
        assert_eq!(frames(b.lookup("t", 0, -1, 1, &s)), ["frame-0"]);
        let only_created = Arc::new(EventFilter::parse(&["users.*.created".into()]).unwrap());
        s.tenant = None;
        s.rooms.insert("a".into(), Some(only_created));
        assert_eq!(frames(b.lookup("t", 0, -1, 1, &s)), ["frame-1"]);
    }
}
