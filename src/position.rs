//! Positions: where this replica stands in every partition it reads.
//!
//! The consumer writes, everyone else reads: the welcome frame takes a snapshot, readiness asks
//! whether every partition has been read up to the head it had when it was assigned, and
//! `/stats` and `/metrics` show offsets and lag.

use std::collections::BTreeMap;
use std::sync::RwLock;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PartitionState {
    /// The next offset to read: everything before it has been handed to the registry.
    pub next_offset: i64,
    /// The partition's head when it was assigned; readiness waits until it is reached.
    pub assigned_head: i64,
    /// The latest known high watermark.
    pub high_watermark: i64,
}

impl PartitionState {
    pub fn lag(&self) -> i64 {
        (self.high_watermark - self.next_offset).max(0)
    }
}

#[derive(Debug, Default)]
pub struct PartitionTable {
    partitions: RwLock<BTreeMap<(String, i32), PartitionState>>,
}

impl PartitionTable {
    pub fn assign(&self, topic: &str, partition: i32, start: i64, head: i64) {
        let state = PartitionState {
            next_offset: start,
            assigned_head: head,
            high_watermark: head,
        };
        self.write().insert((topic.to_string(), partition), state);
    }

    /// Records that `offset` has been handed to the registry.
    pub fn advance(&self, topic: &str, partition: i32, offset: i64) {
        if let Some(p) = self.write().get_mut(&(topic.to_string(), partition)) {
            p.next_offset = p.next_offset.max(offset + 1);
            p.high_watermark = p.high_watermark.max(p.next_offset);
        }
    }

    pub fn set_high_watermark(&self, topic: &str, partition: i32, high: i64) {
        if let Some(p) = self.write().get_mut(&(topic.to_string(), partition)) {
            p.high_watermark = high.max(p.next_offset);
        }
    }

    pub fn is_assigned(&self, topic: &str, partition: i32) -> bool {
        self.read().contains_key(&(topic.to_string(), partition))
    }

    pub fn len(&self) -> usize {
        self.read().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// True when every assigned partition has been read up to its head at assignment.
    pub fn caught_up(&self) -> bool {
        self.read()
            .values()
            .all(|p| p.next_offset >= p.assigned_head)
    }

    pub fn snapshot(&self) -> Vec<((String, i32), PartitionState)> {
        self.read().iter().map(|(k, v)| (k.clone(), *v)).collect()
    }

    /// `{"topic:partition": last offset handed out}`, -1 where nothing has been read.
    pub fn delivered_map(&self) -> BTreeMap<String, i64> {
        self.read()
            .iter()
            .map(|((t, p), s)| (format!("{t}:{p}"), s.next_offset - 1))
            .collect()
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, BTreeMap<(String, i32), PartitionState>> {
        self.partitions.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, BTreeMap<(String, i32), PartitionState>> {
        self.partitions.write().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caught_up_and_positions() {
        let t = PartitionTable::default();
        t.assign("a", 0, 5, 7);
        t.assign("a", 1, 0, 0);
        assert!(!t.caught_up());
        t.advance("a", 0, 5);
        t.advance("a", 0, 6);
        assert!(t.caught_up());
        t.set_high_watermark("a", 0, 10);
        let map = t.delivered_map();
        assert_eq!(map["a:0"], 6);
        assert_eq!(map["a:1"], -1);
        assert_eq!(t.snapshot()[0].1.lag(), 3);
    }
}
