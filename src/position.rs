//! Positions: where this replica stands in every partition it reads.
//!
//! The consumer writes, everyone else reads: the welcome frame takes a snapshot, readiness asks
//! whether the partitions have been discovered and each read up to the head it had when it was
//! assigned (a resume waits for it), and
//! `/stats` and `/metrics` show offsets and lag. Lookups by `&str` topic allocate nothing,
//! since the consumer touches this table for every record.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::RwLock;

/// `{"topic:partition": offset}`: everything up to and including the offset is covered.
pub type PositionMap = BTreeMap<String, i64>;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PartitionState {
    /// The next offset to read: everything before it has been handed to the registry.
    pub next_offset: i64,
    /// The partition's head when it was assigned. Records before it only warm the replay
    /// buffer; readiness waits until it is reached.
    pub assigned_head: i64,
    /// The latest known high watermark.
    pub high_watermark: i64,
}

impl PartitionState {
    pub fn lag(&self) -> i64 {
        (self.high_watermark - self.next_offset).max(0)
    }
}

type Table = BTreeMap<String, BTreeMap<i32, PartitionState>>;

#[derive(Debug, Default)]
pub struct PartitionTable {
    partitions: RwLock<Table>,
    /// Set once the first partition discovery has succeeded: before it, an empty table says
    /// nothing about what there is to read.
    discovered: AtomicBool,
}

impl PartitionTable {
    pub fn assign(&self, topic: &str, partition: i32, start: i64, head: i64) {
        let state = PartitionState {
            next_offset: start,
            assigned_head: head,
            high_watermark: head,
        };
        self.write()
            .entry(topic.to_string())
            .or_default()
            .insert(partition, state);
    }

    pub fn get(&self, topic: &str, partition: i32) -> Option<PartitionState> {
        self.read().get(topic)?.get(&partition).copied()
    }

    /// Records that `offset` has been read; returns the state before, None if unassigned.
    pub fn advance(&self, topic: &str, partition: i32, offset: i64) -> Option<PartitionState> {
        let mut table = self.write();
        let p = table.get_mut(topic)?.get_mut(&partition)?;
        let before = *p;
        p.next_offset = offset + 1;
        p.high_watermark = p.high_watermark.max(p.next_offset);
        Some(before)
    }

    /// After the log went back to `offset`: nothing before it is warm-up any more, and the
    /// old log's high watermark no longer says where this one ends (a resume would take a
    /// position of the old log for one this replica has yet to read).
    pub fn rebase(&self, topic: &str, partition: i32, offset: i64) {
        if let Some(p) = self
            .write()
            .get_mut(topic)
            .and_then(|t| t.get_mut(&partition))
        {
            p.assigned_head = p.assigned_head.min(offset);
            p.high_watermark = p.next_offset;
        }
    }

    pub fn set_high_watermark(&self, topic: &str, partition: i32, high: i64) {
        if let Some(p) = self
            .write()
            .get_mut(topic)
            .and_then(|t| t.get_mut(&partition))
        {
            p.high_watermark = high.max(p.next_offset);
        }
    }

    pub fn is_assigned(&self, topic: &str, partition: i32) -> bool {
        self.get(topic, partition).is_some()
    }

    pub fn len(&self) -> usize {
        self.read().values().map(BTreeMap::len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn set_discovered(&self) {
        self.discovered.store(true, Ordering::Release);
    }

    /// Discovered, and every partition read up to its head at assignment: only then do the
    /// positions handed out stand where the log does.
    pub fn ready(&self) -> bool {
        self.discovered.load(Ordering::Acquire) && self.caught_up()
    }

    /// True when every assigned partition has been read up to its head at assignment.
    pub fn caught_up(&self) -> bool {
        self.read()
            .values()
            .flat_map(BTreeMap::values)
            .all(|p| p.next_offset >= p.assigned_head)
    }

    pub fn snapshot(&self) -> Vec<((String, i32), PartitionState)> {
        self.read()
            .iter()
            .flat_map(|(t, ps)| ps.iter().map(move |(p, s)| ((t.clone(), *p), *s)))
            .collect()
    }

    /// The last offset handed out per partition, -1 where nothing has been read.
    pub fn delivered_map(&self) -> PositionMap {
        self.read()
            .iter()
            .flat_map(|(t, ps)| {
                ps.iter()
                    .map(move |(p, s)| (format!("{t}:{p}"), s.next_offset - 1))
            })
            .collect()
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Table> {
        self.partitions.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Table> {
        self.partitions.write().unwrap_or_else(|e| e.into_inner())
    }
}

/// Splits `topic:partition` (topics cannot contain ':').
pub fn parse_partition_key(key: &str) -> Option<(&str, i32)> {
    let (topic, partition) = key.rsplit_once(':')?;
    Some((topic, partition.parse().ok()?))
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
        assert_eq!(t.get("a", 0).unwrap().lag(), 3);
        assert_eq!(t.len(), 2);
    }

    #[test]
    fn a_log_gone_back_forgets_the_old_logs_end() {
        let t = PartitionTable::default();
        t.assign("a", 0, 0, 0);
        t.set_high_watermark("a", 0, 500);
        // The consumer reads offset 0 of the recreated log, then rebases.
        t.advance("a", 0, 0);
        t.rebase("a", 0, 0);
        assert_eq!(t.get("a", 0).unwrap().high_watermark, 1);
    }

    #[test]
    fn partition_keys() {
        assert_eq!(
            parse_partition_key("task-updates:3"),
            Some(("task-updates", 3))
        );
        assert_eq!(parse_partition_key("nope"), None);
        assert_eq!(parse_partition_key("t:x"), None);
    }
}
