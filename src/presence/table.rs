//! The cluster-wide presence table: every replica's counts as its records last said, with its
//! lease, and their sums, which answer "who is in this room" and "is this user online".
//!
//! Applying a record, or the expiry of a replica, yields the transitions it caused: a sum
//! crossing zero. A user present through two replicas leaves a room only when gone from both.
//! Until the table is ready (it has read the topic up to where it stood at start), nothing
//! expires and no transition is yielded: what it reads then is history.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use tokio::time::Instant;

use super::counts::{Counts, Key};
use super::record::{Body, Origin, Record};

/// A sum that crossed zero. A key of a room is a join or a leave; a user's own key is
/// online or offline.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Transition {
    Came(Key),
    Went(Key),
}

/// What became of a record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Its counts are the replica's now.
    Applied,
    /// A part of a snapshot, kept until its last part.
    Gathered,
    /// Older than what the table holds of the replica.
    Covered,
    /// A part or a change out of sequence: the replica's changes wait for its next snapshot.
    OutOfSequence,
    /// Changes of an incarnation the table holds no snapshot of.
    Unknown,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Applied {
    pub outcome: Outcome,
    pub transitions: Vec<Transition>,
}

#[derive(Debug)]
struct Replica {
    incarnation: String,
    seq: u64,
    lease_until: Instant,
    counts: Counts,
    /// False after a gap in `seq`: changes are not applied until the next snapshot.
    in_sequence: bool,
}

/// A snapshot whose parts are being read.
#[derive(Debug)]
struct Gathering {
    incarnation: String,
    next_seq: u64,
    next_part: u32,
    counts: Counts,
    /// The lease of its latest part: a snapshot whose writer died half way is dropped when
    /// it runs out, like the writer's entries.
    until: Instant,
}

#[derive(Debug, Default)]
pub struct Table {
    replicas: HashMap<String, Replica>,
    gathering: HashMap<String, Gathering>,
    sums: Sums,
    ready: bool,
}

impl Table {
    /// Applies a record read `age` after its timestamp (this replica's clock less the
    /// record's): its lease runs from the timestamp, not from the reading.
    pub fn apply(&mut self, record: Record, now: Instant, age: Duration) -> Applied {
        let lease_until = now + record.lease.saturating_sub(age);
        let goodbye = record.lease.is_zero();
        let Record {
            origin, seq, body, ..
        } = record;
        let mut transitions = Vec::new();
        let outcome = match body {
            Body::Changes(changes) => {
                self.changes(&origin, seq, changes, lease_until, &mut transitions)
            }
            Body::Snapshot {
                part,
                parts,
                counts,
            } => match self.gather(&origin, seq, part, parts, counts, lease_until) {
                Some(whole) => {
                    let name = origin.replica.clone();
                    let outcome = self.snapshot(origin, seq, whole, lease_until, &mut transitions);
                    // A clean shutdown's goodbye, an empty snapshot with a lease of 0: the
                    // replica goes with its users, not at the next expiry, which would count
                    // it as expired.
                    if goodbye && outcome == Outcome::Applied {
                        self.replicas.remove(&name);
                    }
                    outcome
                }
                None if self.gathering.contains_key(&origin.replica) => Outcome::Gathered,
                None => Outcome::OutOfSequence,
            },
        };
        if !self.ready {
            transitions.clear();
        }
        Applied {
            outcome,
            transitions,
        }
    }

    fn changes(
        &mut self,
        origin: &Origin,
        seq: u64,
        changes: Counts,
        lease_until: Instant,
        out: &mut Vec<Transition>,
    ) -> Outcome {
        let Some(replica) = self
            .replicas
            .get_mut(&origin.replica)
            .filter(|r| r.incarnation == origin.incarnation)
        else {
            return Outcome::Unknown;
        };
        if seq <= replica.seq {
            return Outcome::Covered;
        }
        replica.lease_until = lease_until;
        let follows = replica.seq.checked_add(1) == Some(seq) && replica.in_sequence;
        replica.seq = seq;
        if !follows {
            replica.in_sequence = false;
            return Outcome::OutOfSequence;
        }
        for (key, count) in changes {
            let before = if count == 0 {
                replica.counts.remove(&key)
            } else {
                replica.counts.insert(key.clone(), count)
            };
            self.sums.add(&key, before.unwrap_or(0), count, out);
        }
        Outcome::Applied
    }

    /// Adds a part to its replica's snapshot, and returns the snapshot's counts with its last.
    fn gather(
        &mut self,
        origin: &Origin,
        seq: u64,
        part: u32,
        parts: u32,
        counts: Counts,
        lease_until: Instant,
    ) -> Option<Counts> {
        let name = &origin.replica;
        if part == 0 {
            self.gathering.insert(
                name.clone(),
                Gathering {
                    incarnation: origin.incarnation.clone(),
                    next_seq: seq,
                    next_part: 0,
                    counts: Counts::new(),
                    until: lease_until,
                },
            );
        }
        let gathering = self.gathering.get_mut(name)?;
        let next = gathering.incarnation == origin.incarnation
            && gathering.next_seq == seq
            && gathering.next_part == part;
        // Checked: a record written by anyone may carry the last `seq`.
        let after = seq.checked_add(1).zip(part.checked_add(1));
        let Some((next_seq, next_part)) = after.filter(|_| next) else {
            self.gathering.remove(name);
            return None;
        };
        gathering.counts.extend(counts);
        gathering.next_seq = next_seq;
        gathering.next_part = next_part;
        gathering.until = lease_until;
        if gathering.next_part < parts {
            return None;
        }
        self.gathering.remove(name).map(|g| g.counts)
    }

    fn snapshot(
        &mut self,
        origin: Origin,
        seq: u64,
        counts: Counts,
        lease_until: Instant,
        out: &mut Vec<Transition>,
    ) -> Outcome {
        let old = match self.replicas.get(&origin.replica) {
            Some(r) if r.incarnation == origin.incarnation && r.seq >= seq => {
                return Outcome::Covered
            }
            _ => self.replicas.remove(&origin.replica),
        };
        self.sums.replace(old.map(|r| r.counts), &counts, out);
        let replica = Replica {
            incarnation: origin.incarnation,
            seq,
            lease_until,
            counts,
            in_sequence: true,
        };
        self.replicas.insert(origin.replica, replica);
        Outcome::Applied
    }

    /// Removes the replicas whose lease has run out by `now`, with the transitions that
    /// causes. Nothing expires before the table is ready.
    pub fn expire(&mut self, now: Instant) -> Vec<Transition> {
        let mut out = Vec::new();
        if !self.ready {
            return out;
        }
        self.gathering.retain(|_, g| g.until > now);
        let expired: Vec<String> = self
            .replicas
            .iter()
            .filter(|(_, r)| r.lease_until <= now)
            .map(|(name, _)| name.clone())
            .collect();
        for name in expired {
            let gone = self.replicas.remove(&name).map(|r| r.counts);
            self.sums.replace(gone, &Counts::new(), &mut out);
        }
        out
    }

    /// The table has read the topic up to where it stood at start: the replicas whose lease
    /// has run out are dropped without a word, and from now on transitions are yielded.
    pub fn caught_up(&mut self, now: Instant) {
        self.ready = true;
        self.expire(now);
    }

    pub fn is_ready(&self) -> bool {
        self.ready
    }

    /// When the next lease runs out, for the expiry's timer.
    // Read by the client's `presence` query and events, which the service does not serve yet.
    #[allow(dead_code)]
    pub fn next_expiry(&self) -> Option<Instant> {
        self.replicas.values().map(|r| r.lease_until).min()
    }

    /// The users in a room, on any replica, with their connections in it.
    #[cfg(test)]
    pub fn room(&self, tenant: Option<&str>, room: &str) -> BTreeMap<String, u32> {
        self.room_within(tenant, room, usize::MAX).0
    }

    /// As `room`, with at most `max` users (the first in order), and whether there were more.
    pub fn room_within(
        &self,
        tenant: Option<&str>,
        room: &str,
        max: usize,
    ) -> (BTreeMap<String, u32>, bool) {
        let start = Key::room_start(tenant, room);
        let mut members = self
            .sums
            .counts
            .range(&start..)
            .take_while(|(key, _)| key.same_room(&start));
        let users = members
            .by_ref()
            .take(max)
            .map(|(key, &n)| (key.user.clone(), n))
            .collect();
        (users, members.next().is_some())
    }

    /// A user's connections, on any replica.
    #[cfg(test)]
    pub fn connections(&self, tenant: Option<&str>, user: &str) -> u32 {
        let key = Key::user(tenant, user);
        self.sums.counts.get(&key).copied().unwrap_or(0)
    }

    /// Every sum, in key order.
    pub fn sums(&self) -> &Counts {
        &self.sums.counts
    }

    /// Users online, summed over the tenants.
    pub fn online(&self) -> usize {
        self.sums.online
    }

    pub fn replicas(&self) -> usize {
        self.replicas.len()
    }

    /// What the table holds of each replica, by name, for operators.
    pub fn replica_states(&self, now: Instant) -> Vec<ReplicaState> {
        let mut states: Vec<ReplicaState> = self
            .replicas
            .iter()
            .map(|(name, r)| ReplicaState {
                replica: name.clone(),
                incarnation: r.incarnation.clone(),
                seq: r.seq,
                lease_left_ms: r.lease_until.saturating_duration_since(now).as_millis() as u64,
                waiting_for_snapshot: !r.in_sequence,
                counts: r.counts.len(),
            })
            .collect();
        states.sort_by(|a, b| a.replica.cmp(&b.replica));
        states
    }
}

/// One replica as the table holds it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ReplicaState {
    pub replica: String,
    pub incarnation: String,
    /// The last record of it applied.
    pub seq: u64,
    pub lease_left_ms: u64,
    /// Its changes skipped a `seq`: they wait for its next snapshot.
    pub waiting_for_snapshot: bool,
    /// Its counts above zero (users and memberships).
    pub counts: usize,
}

/// The counts summed over the replicas, and how many users are online, kept as they change
/// so that the gauge of users online walks nothing.
#[derive(Debug, Default)]
struct Sums {
    counts: Counts,
    online: usize,
}

impl Sums {
    /// Moves one replica's counts from `old` to `new`.
    fn replace(&mut self, old: Option<Counts>, new: &Counts, out: &mut Vec<Transition>) {
        let mut old = old.unwrap_or_default();
        for (key, &count) in new {
            let before = old.remove(key).unwrap_or(0);
            self.add(key, before, count, out);
        }
        for (key, before) in old {
            self.add(&key, before, 0, out);
        }
    }

    /// Changes a replica's share of a sum from `before` to `after`.
    fn add(&mut self, key: &Key, before: u32, after: u32, out: &mut Vec<Transition>) {
        if before == after {
            return;
        }
        let sums = &mut self.counts;
        let was = sums.get(key).copied().unwrap_or(0);
        let now = was.saturating_sub(before).saturating_add(after);
        if now == 0 {
            sums.remove(key);
        } else {
            sums.insert(key.clone(), now);
        }
        let transition = match (was, now) {
            (0, 1..) => Transition::Came(key.clone()),
            (1.., 0) => Transition::Went(key.clone()),
            _ => return,
        };
        if key.room.is_none() {
            match transition {
                Transition::Came(_) => self.online += 1,
                Transition::Went(_) => self.online -= 1,
            }
        }
        out.push(transition);
    }
}

#[cfg(test)]
mod tests {
    use super::super::local::{Kind, Local};
    use super::super::record::Writer;
    use super::*;

    const LEASE: Duration = Duration::from_secs(10);

    /// A replica's publishing side: its sessions' counts and its writer.
    struct Node {
        local: Local,
        writer: Writer,
    }

    impl Node {
        fn new(name: &str, incarnation: &str) -> Node {
            let origin = Origin {
                replica: name.into(),
                incarnation: incarnation.into(),
            };
            Node {
                local: Local::default(),
                writer: Writer::new(origin, LEASE, 0),
            }
        }

        fn publish(&mut self, kind: Kind) -> Vec<Record> {
            self.writer.records(&self.local.drain(kind))
        }
    }

    /// The topic: records with their timestamps, in log order.
    #[derive(Default, Clone)]
    struct Log(Vec<(Record, Instant)>);

    impl Log {
        fn append(&mut self, records: Vec<Record>) -> Vec<Record> {
            let now = Instant::now();
            self.0.extend(records.iter().map(|r| (r.clone(), now)));
            records
        }

        /// What Kafka's compaction may leave: of the records older than `lag`, only the
        /// latest of each key.
        fn compacted(&self, lag: Duration) -> Log {
            let now = Instant::now();
            let kept = self.0.iter().enumerate().filter(|(i, (record, at))| {
                now - *at < lag || !self.0[i + 1..].iter().any(|(r, _)| r.key() == record.key())
            });
            Log(kept.map(|(_, r)| r.clone()).collect())
        }

        /// A reader starting now: the whole log, then caught up.
        fn read(&self) -> Table {
            let mut table = Table::default();
            let now = Instant::now();
            for (record, at) in &self.0 {
                let applied = table.apply(record.clone(), now, now - *at);
                assert!(applied.transitions.is_empty());
            }
            table.caught_up(now);
            table
        }
    }

    /// A snapshot part as anyone able to write to the topic could make it.
    fn forged(seq: u64, part: u32, parts: u32, lease: Duration) -> Record {
        let mut counts = Counts::new();
        counts.insert(Key::user(None, "ghost"), 1);
        Record {
            origin: Origin {
                replica: "forged".into(),
                incarnation: "x".into(),
            },
            seq,
            lease,
            body: Body::Snapshot {
                part,
                parts,
                counts,
            },
        }
    }

    #[tokio::test(start_paused = true)]
    async fn forged_records_neither_panic_nor_stay() {
        let mut table = ready();
        let now = Instant::now();
        // The last seq: nothing overflows, and a snapshot cannot go on from there.
        let first = table.apply(forged(u64::MAX, 0, 2, LEASE), now, Duration::ZERO);
        assert_eq!(first.outcome, Outcome::OutOfSequence);
        let second = table.apply(forged(u64::MAX, 1, 2, LEASE), now, Duration::ZERO);
        assert_eq!(second.outcome, Outcome::OutOfSequence);
        // A snapshot begun and never ended is dropped with its lease.
        let begun = table.apply(forged(7, 0, u32::MAX, LEASE), now, Duration::ZERO);
        assert_eq!(begun.outcome, Outcome::Gathered);
        assert_eq!(table.gathering.len(), 1);
        tokio::time::advance(LEASE).await;
        table.expire(Instant::now());
        assert!(table.gathering.is_empty());
        // A snapshot just before the last seq, then changes up to it and past it.
        let whole = forged(u64::MAX - 1, 0, 1, LEASE);
        let whole = table.apply(whole, Instant::now(), Duration::ZERO);
        assert_eq!(whole.outcome, Outcome::Applied);
        let mut changes = forged(u64::MAX, 0, 1, LEASE);
        changes.body = Body::Changes(Counts::new());
        let last = table.apply(changes.clone(), Instant::now(), Duration::ZERO);
        assert_eq!(last.outcome, Outcome::Applied);
        let again = table.apply(changes, Instant::now(), Duration::ZERO);
        assert_eq!(again.outcome, Outcome::Covered);
    }

    fn apply_all(table: &mut Table, records: Vec<Record>) -> Vec<Transition> {
        let mut out = Vec::new();
        for record in records {
            out.extend(
                table
                    .apply(record, Instant::now(), Duration::ZERO)
                    .transitions,
            );
        }
        out
    }

    fn ready() -> Table {
        let mut table = Table::default();
        table.caught_up(Instant::now());
        table
    }

    fn came(key: Key) -> Transition {
        Transition::Came(key)
    }

    fn went(key: Key) -> Transition {
        Transition::Went(key)
    }

    fn users(entries: &[(&str, u32)]) -> BTreeMap<String, u32> {
        entries.iter().map(|(u, n)| (u.to_string(), *n)).collect()
    }

    /// `user` connects to `node` and joins `room`.
    fn enter(node: &Node, tenant: Option<&str>, room: &str, user: &str) {
        node.local.connected(tenant, user);
        node.local.joined(tenant, room, user);
    }

    fn exit(node: &Node, tenant: Option<&str>, room: &str, user: &str) {
        node.local.left(tenant, room, user);
        node.local.disconnected(tenant, user);
    }

    #[tokio::test(start_paused = true)]
    async fn a_user_on_two_replicas_leaves_a_room_only_when_gone_from_both() {
        let (mut a, mut b) = (Node::new("a", "1"), Node::new("b", "1"));
        let mut table = ready();
        apply_all(&mut table, a.publish(Kind::Snapshot));
        apply_all(&mut table, b.publish(Kind::Snapshot));
        let acme = Some("acme");
        enter(&a, acme, "task:9", "42");
        assert_eq!(
            apply_all(&mut table, a.publish(Kind::Changes)),
            [
                came(Key::user(acme, "42")),
                came(Key::member(acme, "task:9", "42"))
            ]
        );
        enter(&b, acme, "task:9", "42");
        enter(&b, acme, "task:9", "42");
        assert!(apply_all(&mut table, b.publish(Kind::Changes)).is_empty());
        assert_eq!(table.room(acme, "task:9"), users(&[("42", 3)]));
        assert_eq!(table.connections(acme, "42"), 3);
        exit(&a, acme, "task:9", "42");
        assert!(apply_all(&mut table, a.publish(Kind::Changes)).is_empty());
        exit(&b, acme, "task:9", "42");
        assert!(apply_all(&mut table, b.publish(Kind::Changes)).is_empty());
        assert_eq!(table.room(acme, "task:9"), users(&[("42", 1)]));
        exit(&b, acme, "task:9", "42");
        assert_eq!(
            apply_all(&mut table, b.publish(Kind::Changes)),
            [
                went(Key::user(acme, "42")),
                went(Key::member(acme, "task:9", "42"))
            ]
        );
        assert!(table.room(acme, "task:9").is_empty());
        assert!(table.sums().is_empty());
        assert_eq!(table.online(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_room_is_answered_within_a_bound_and_says_when_cut() {
        let mut a = Node::new("a", "1");
        let mut table = ready();
        apply_all(&mut table, a.publish(Kind::Snapshot));
        for user in ["1", "2", "3"] {
            enter(&a, Some("acme"), "task:9", user);
        }
        enter(&a, Some("acme"), "task:90", "4");
        apply_all(&mut table, a.publish(Kind::Changes));
        let room = |max| table.room_within(Some("acme"), "task:9", max);
        assert_eq!(room(3), (users(&[("1", 1), ("2", 1), ("3", 1)]), false));
        assert_eq!(room(2), (users(&[("1", 1), ("2", 1)]), true));
        assert_eq!(room(0), (users(&[]), true));
    }

    #[tokio::test(start_paused = true)]
    async fn tenants_never_meet_even_through_a_room_of_the_same_spelling() {
        let mut a = Node::new("a", "1");
        let mut table = ready();
        apply_all(&mut table, a.publish(Kind::Snapshot));
        enter(&a, Some("acme"), "task:9", "42");
        enter(&a, Some("globex"), "task:9", "7");
        enter(&a, None, "task:9", "5");
        // Names that a key spelled as one string could confuse.
        enter(&a, Some("acme/task:9"), "x", "1");
        enter(&a, Some("acme"), "task:9/x", "1");
        apply_all(&mut table, a.publish(Kind::Changes));
        assert_eq!(table.room(Some("acme"), "task:9"), users(&[("42", 1)]));
        assert_eq!(table.room(Some("globex"), "task:9"), users(&[("7", 1)]));
        assert_eq!(table.room(None, "task:9"), users(&[("5", 1)]));
        let acme = table.room_within(Some("acme"), "task:9", 1);
        assert_eq!(acme, (users(&[("42", 1)]), false), "one fits in one");

        assert_eq!(table.connections(Some("acme"), "7"), 0);
        assert_eq!(table.connections(Some("globex"), "7"), 1);
        // 42, 7, 5, and 1 of two tenants.
        assert_eq!(table.online(), 5);
        exit(&a, Some("globex"), "task:9", "7");
        assert_eq!(
            apply_all(&mut table, a.publish(Kind::Changes)),
            [
                went(Key::user(Some("globex"), "7")),
                went(Key::member(Some("globex"), "task:9", "7"))
            ]
        );
        assert_eq!(table.room(Some("acme"), "task:9"), users(&[("42", 1)]));
    }

    #[tokio::test(start_paused = true)]
    async fn a_dead_replica_expires_with_exactly_the_leaves_and_offlines_it_alone_held() {
        let (mut a, mut b) = (Node::new("a", "1"), Node::new("b", "1"));
        let mut table = ready();
        let acme = Some("acme");
        enter(&a, acme, "task:9", "42");
        enter(&a, acme, "task:9", "7");
        enter(&b, acme, "task:9", "7");
        enter(&b, acme, "task:8", "9");
        apply_all(&mut table, a.publish(Kind::Snapshot));
        apply_all(&mut table, b.publish(Kind::Snapshot));
        let start = Instant::now();
        assert_eq!(table.next_expiry(), Some(start + LEASE));
        // b renews its lease every 2 s; a has died.
        for _ in 0..10 {
            tokio::time::advance(Duration::from_secs(2)).await;
            apply_all(&mut table, b.publish(Kind::Changes));
            let gone = table.expire(Instant::now());
            if start.elapsed() < LEASE {
                assert!(gone.is_empty(), "at {:?}: {gone:?}", start.elapsed());
                continue;
            }
            if start.elapsed() == LEASE {
                assert_eq!(
                    gone,
                    [
                        went(Key::user(acme, "42")),
                        went(Key::member(acme, "task:9", "42"))
                    ]
                );
            } else {
                assert!(gone.is_empty());
            }
        }
        assert_eq!(table.replicas(), 1);
        assert_eq!(table.room(acme, "task:9"), users(&[("7", 1)]));
        assert_eq!(table.room(acme, "task:8"), users(&[("9", 1)]));
        assert_eq!(table.next_expiry(), Some(Instant::now() + LEASE));
    }

    #[tokio::test(start_paused = true)]
    async fn a_record_read_late_has_as_much_lease_left_as_its_age_leaves_it() {
        let mut a = Node::new("a", "1");
        enter(&a, None, "lobby", "1");
        let mut table = ready();
        let now = Instant::now();
        let record = a.publish(Kind::Snapshot).remove(0);
        table.apply(record, now, Duration::from_secs(7));
        assert_eq!(table.next_expiry(), Some(now + Duration::from_secs(3)));
        // The goodbye of a clean shutdown takes everything away at once, the replica too:
        // nothing is left to expire.
        let gone = apply_all(&mut table, vec![a.writer.goodbye()]);
        assert_eq!(
            gone,
            [
                went(Key::user(None, "1")),
                went(Key::member(None, "lobby", "1"))
            ]
        );
        assert_eq!(table.replicas(), 0);
        assert!(table.expire(Instant::now()).is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn a_reader_restarted_from_the_compacted_topic_builds_the_same_table() {
        let snapshot_every = Duration::from_secs(30);
        let mut nodes = [
            Node::new("a", "1"),
            Node::new("b", "1"),
            Node::new("c", "1"),
        ];
        let mut log = Log::default();
        let mut live = ready();
        for node in &mut nodes {
            apply_all(&mut live, log.append(node.publish(Kind::Snapshot)));
        }
        // 140 s of comings and goings, changes every 200 ms, snapshots every 30 s (the last
        // 20 s before the end); `c` dies at 100 s.
        for tick in 1..=700u32 {
            tokio::time::advance(Duration::from_millis(200)).await;
            let elapsed = Instant::now() - log.0[0].1;
            for (n, node) in nodes.iter_mut().enumerate() {
                if n == 2 && elapsed >= Duration::from_secs(100) {
                    continue;
                }
                let user = format!("u{}", (tick * 7 + n as u32) % 50);
                let room = format!("room:{}", tick % 5);
                let tenant = ["acme", "globex"][(tick % 2) as usize];
                if tick % 3 == 0 {
                    exit(node, Some(tenant), &room, &user);
                } else {
                    enter(node, Some(tenant), &room, &user);
                }
                let kind = if tick % 150 == 0 {
                    Kind::Snapshot
                } else {
                    Kind::Changes
                };
                apply_all(&mut live, log.append(node.publish(kind)));
            }
            live.expire(Instant::now());
        }
        assert_eq!(live.replicas(), 2);
        assert!(!live.sums().is_empty());
        let compacted = log.compacted(2 * snapshot_every);
        assert!(compacted.0.len() < log.0.len() / 2, "{}", compacted.0.len());
        let restarted = compacted.read();
        assert_eq!(restarted.sums(), live.sums());
        assert_eq!(restarted.replicas(), 2);
        // So does one that reads the whole log.
        assert_eq!(log.read().sums(), live.sums());
    }

    #[tokio::test(start_paused = true)]
    async fn changes_after_a_gap_wait_for_the_next_snapshot() {
        let mut a = Node::new("a", "1");
        let mut table = ready();
        apply_all(&mut table, a.publish(Kind::Snapshot));
        enter(&a, None, "lobby", "1");
        let lost = a.publish(Kind::Changes);
        enter(&a, None, "lobby", "2");
        let after = a.publish(Kind::Changes).remove(0);
        let now = Instant::now();
        let applied = table.apply(after.clone(), now, Duration::ZERO);
        assert_eq!(applied.outcome, Outcome::OutOfSequence);
        assert!(table.sums().is_empty());
        // Read again, or the lost one read late: already covered.
        assert_eq!(
            table.apply(after, now, Duration::ZERO).outcome,
            Outcome::Covered
        );
        let lost = lost.into_iter().next().unwrap();
        assert_eq!(
            table.apply(lost, now, Duration::ZERO).outcome,
            Outcome::Covered
        );
        enter(&a, None, "lobby", "3");
        let next = a.publish(Kind::Changes).remove(0);
        assert_eq!(
            table.apply(next, now, Duration::ZERO).outcome,
            Outcome::OutOfSequence
        );
        assert!(table.sums().is_empty());
        // Still alive meanwhile: its lease was renewed by every record.
        tokio::time::advance(LEASE - Duration::from_secs(1)).await;
        assert!(table.expire(Instant::now()).is_empty());
        apply_all(&mut table, a.publish(Kind::Snapshot));
        assert_eq!(
            table.room(None, "lobby"),
            users(&[("1", 1), ("2", 1), ("3", 1)])
        );
        enter(&a, None, "lobby", "4");
        let next = a.publish(Kind::Changes).remove(0);
        assert_eq!(
            table.apply(next, Instant::now(), Duration::ZERO).outcome,
            Outcome::Applied
        );
        // Changes of an incarnation whose snapshot was never read are not applied.
        let mut b = Node::new("b", "1");
        b.publish(Kind::Snapshot);
        enter(&b, None, "lobby", "9");
        let unknown = b.publish(Kind::Changes).remove(0);
        assert_eq!(
            table.apply(unknown, now, Duration::ZERO).outcome,
            Outcome::Unknown
        );
        assert_eq!(table.room(None, "lobby").len(), 4);
    }

    #[tokio::test(start_paused = true)]
    async fn a_snapshot_applies_only_whole_and_a_new_incarnation_replaces_the_old() {
        let mut old = Node::new("a", "1");
        for user in 0..8_000 {
            enter(
                &old,
                Some("acme"),
                "tenant:acme",
                &format!("user-{user:05}"),
            );
        }
        let mut table = ready();
        let parts = old.publish(Kind::Snapshot);
        assert!(parts.len() > 2, "{}", parts.len());
        let (last, first) = parts.split_last().unwrap();
        let now = Instant::now();
        for part in first {
            let applied = table.apply(part.clone(), now, Duration::ZERO);
            assert_eq!(applied.outcome, Outcome::Gathered);
            assert!(table.sums().is_empty());
        }
        // A part out of place drops what was gathered: a stale part alone applies nothing.
        let applied = table.apply(last.clone(), now, Duration::ZERO);
        assert_eq!(applied.outcome, Outcome::Applied);
        assert_eq!(applied.transitions.len(), 16_000);
        assert_eq!(table.room(Some("acme"), "tenant:acme").len(), 8_000);
        let mut other = Table::default();
        other.caught_up(now);
        let skipped = [parts[0].clone(), parts[2].clone()];
        let outcomes: Vec<Outcome> = skipped
            .into_iter()
            .map(|p| other.apply(p, now, Duration::ZERO).outcome)
            .collect();
        assert_eq!(outcomes, [Outcome::Gathered, Outcome::OutOfSequence]);
        assert_eq!(
            other.apply(parts[1].clone(), now, Duration::ZERO).outcome,
            Outcome::OutOfSequence
        );
        assert!(other.sums().is_empty());
        // The replica restarts under the same name: its first snapshot replaces the old state.
        let mut new = Node::new("a", "2");
        enter(&new, Some("acme"), "tenant:acme", "user-00001");
        let gone = apply_all(&mut table, new.publish(Kind::Snapshot));
        assert_eq!(gone.len(), 2 * 7_999);
        assert!(gone.iter().all(|t| matches!(t, Transition::Went(_))));
        assert_eq!(
            table.room(Some("acme"), "tenant:acme"),
            users(&[("user-00001", 1)])
        );
        // A late record of the old incarnation changes nothing.
        exit(&old, Some("acme"), "tenant:acme", "user-00001");
        let late = old.publish(Kind::Changes).remove(0);
        assert_eq!(
            table.apply(late, now, Duration::ZERO).outcome,
            Outcome::Unknown
        );
        assert_eq!(table.connections(Some("acme"), "user-00001"), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn before_it_is_caught_up_the_table_says_nothing_and_expires_nothing() {
        let (mut a, mut dead) = (Node::new("a", "1"), Node::new("dead", "1"));
        let mut table = Table::default();
        enter(&dead, None, "lobby", "1");
        let now = Instant::now();
        for record in dead.publish(Kind::Snapshot) {
            let applied = table.apply(record, now, LEASE * 3);
            assert_eq!(applied.outcome, Outcome::Applied);
            assert!(applied.transitions.is_empty());
        }
        enter(&a, None, "lobby", "2");
        assert!(apply_all(&mut table, a.publish(Kind::Snapshot)).is_empty());
        assert!(table.expire(now).is_empty());
        assert_eq!(table.room(None, "lobby").len(), 2);
        assert!(!table.is_ready());
        table.caught_up(now);
        assert!(table.is_ready());
        assert_eq!(table.room(None, "lobby"), users(&[("2", 1)]));
        enter(&a, None, "lobby", "3");
        assert_eq!(apply_all(&mut table, a.publish(Kind::Changes)).len(), 2);
    }
}
