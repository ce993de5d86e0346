//! The presence a running replica holds: its own connections' counts (`Local`), which the
//! sessions change, and the cluster-wide table, which the publisher and the reader of the
//! topic change and the admin listener reads.
//!
//! Knows no Kafka: the topic's side (`kafka/presence.rs`) hands records in and takes
//! batches out. The table's lock is held for one record or one query, never across an await,
//! and never while anything is sent: a change's transitions, and a query's answer, go in
//! order into one queue, which a thread of its own (the teller) empties into the `Audience`.
//! A storm's events therefore hold up neither the table nor a runtime worker, and an answer
//! is never older than an event sent before it.

use std::collections::BTreeMap;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::mpsc;

use serde::Serialize;
use tokio::time::Instant;

use super::local::Local;
use super::record::{Origin, Record};
use super::table::{Applied, Outcome, ReplicaState, Table, Transition};

/// Who hears of the transitions: the connections listening to presence. Told in the order
/// the table yielded them, even when the publisher and the reader apply records at once.
pub trait Audience: Send + Sync {
    fn tell(&self, transitions: &[Transition]);
}

/// What the teller does next, queued under the table's lock so that the order is the table's.
enum Told {
    Transitions(Vec<Transition>),
    /// A query's answer, sent in its place among the events.
    Answer(Box<dyn FnOnce() + Send>),
}

pub struct Presence {
    pub origin: Origin,
    pub local: Local,
    table: Mutex<Table>,
    queue: mpsc::UnboundedSender<Told>,
    /// The queue's other end, until the teller takes it.
    pending: Mutex<mpsc::UnboundedReceiver<Told>>,
    /// Users in the answers queued and not yet sent: bounds what queries can hold in memory
    /// while the teller is busy with a storm.
    queued_users: Arc<AtomicUsize>,
}

/// The most users queued answers may hold at once (tens of megabytes).
const MAX_QUEUED_USERS: usize = 1_000_000;

/// A query refused: answers already queued hold too many users.
#[derive(Debug, PartialEq, Eq)]
pub struct Busy;

/// The answer to a client's query of a room.
#[derive(Debug, PartialEq, Eq)]
pub struct RoomView {
    pub users: BTreeMap<String, u32>,
    pub ready: bool,
    /// More users were in the room than an answer holds.
    pub truncated: bool,
}

/// `/presence`: per tenant (`""` for tokens without one), per room, the users present and
/// their connections; and each tenant's online users.
#[derive(Debug, Serialize, PartialEq, Eq)]
pub struct View {
    pub ready: bool,
    pub replicas: usize,
    pub replica_states: Vec<ReplicaState>,
    pub tenants: BTreeMap<String, TenantView>,
}

#[derive(Debug, Default, Serialize, PartialEq, Eq)]
pub struct TenantView {
    pub users: BTreeMap<String, u32>,
    pub rooms: BTreeMap<String, BTreeMap<String, u32>>,
}

impl Presence {
    pub fn new(origin: Origin) -> Presence {
        let (queue, pending) = mpsc::unbounded_channel();
        Presence {
            origin,
            local: Local::default(),
            table: Mutex::new(Table::default()),
            queue,
            pending: Mutex::new(pending),
            queued_users: Arc::default(),
        }
    }

    /// Starts the teller: a thread that tells `audience` of every change, in order, for as
    /// long as the process runs. A thread, not a task: telling a storm to thousands of
    /// listeners takes as long as it takes, and must not hold a runtime worker meanwhile.
    pub fn start_teller(self: &Arc<Self>, audience: Arc<dyn Audience>) -> std::io::Result<()> {
        let presence = self.clone();
        std::thread::Builder::new()
            .name("presence-teller".into())
            .spawn(move || loop {
                let Some(told) = presence.pending().blocking_recv() else {
                    return;
                };
                // One change that cannot be told must not end the telling: the queue would
                // grow for ever, and no query would be answered again.
                let tell = AssertUnwindSafe(|| presence.tell_one(told, &*audience));
                if std::panic::catch_unwind(tell).is_err() {
                    tracing::error!("presence: a change could not be told; going on");
                }
            })
            .map(drop)
    }

    /// Tells `audience` of everything queued so far; how many were told. For tests, where no
    /// teller runs.
    #[cfg(test)]
    pub fn tell_pending(&self, audience: &dyn Audience) -> usize {
        let mut told = 0;
        while let Ok(next) = self.pending().try_recv() {
            self.tell_one(next, audience);
            told += 1;
        }
        told
    }

    fn tell_one(&self, told: Told, audience: &dyn Audience) {
        match told {
            Told::Transitions(transitions) => audience.tell(&transitions),
            Told::Answer(answer) => answer(),
        }
    }

    fn pending(&self) -> MutexGuard<'_, mpsc::UnboundedReceiver<Told>> {
        self.pending.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A record of this replica's, applied as it is published: its own connections show
    /// without a round trip through Kafka.
    pub fn apply_own(&self, record: Record) {
        self.change(|table| {
            table
                .apply(record, Instant::now(), Duration::ZERO)
                .transitions
        });
    }

    /// A record read from the topic, `age` after its timestamp. This incarnation's own
    /// records were applied when published. An earlier incarnation of this replica's name is
    /// skipped too: it is dead, since this process holds the name now, and its snapshot read
    /// back after this incarnation's would replace this replica's own counts in the table.
    pub fn apply_read(&self, record: Record, age: Duration) -> Option<Outcome> {
        if record.origin.replica == self.origin.replica {
            return None;
        }
        let mut outcome = Outcome::Covered;
        self.change(|table| {
            let Applied {
                outcome: o,
                transitions,
            } = table.apply(record, Instant::now(), age);
            outcome = o;
            transitions
        });
        Some(outcome)
    }

    /// Drops the replicas whose lease ran out; returns how many there were.
    pub fn expire(&self) -> usize {
        let mut expired = 0;
        self.change(|table| {
            let before = table.replicas();
            let transitions = table.expire(Instant::now());
            expired = before - table.replicas();
            transitions
        });
        expired
    }

    /// The users in `room` of `tenant` on any replica, and whether the table is whole yet.
    #[cfg(test)]
    pub fn room(&self, tenant: Option<&str>, room: &str) -> RoomView {
        let table = self.table();
        RoomView {
            users: table.room(tenant, room),
            ready: table.is_ready(),
            truncated: false,
        }
    }

    /// A client's query: `answer` is called with the room as the table holds it now, by the
    /// teller, after every event of an earlier change and before any of a later one.
    /// At most `max` users are copied, under the table's lock.
    pub fn query(
        &self,
        (tenant, room): (Option<&str>, &str),
        max: usize,
        answer: impl FnOnce(RoomView) + Send + 'static,
    ) -> Result<(), Busy> {
        let table = self.table();
        let (users, truncated) = table.room_within(tenant, room, max);
        let n = users.len().max(1);
        let queued = self.queued_users.fetch_add(n, Ordering::AcqRel);
        if queued + n > MAX_QUEUED_USERS {
            self.queued_users.fetch_sub(n, Ordering::AcqRel);
            return Err(Busy);
        }
        let view = RoomView {
            users,
            ready: table.is_ready(),
            truncated,
        };
        let queued_users = self.queued_users.clone();
        let told = move || {
            queued_users.fetch_sub(n, Ordering::AcqRel);
            answer(view);
        };
        let _ = self.queue.send(Told::Answer(Box::new(told)));
        Ok(())
    }

    fn change(&self, apply: impl FnOnce(&mut Table) -> Vec<Transition>) {
        let mut table = self.table();
        let mut transitions = apply(&mut table);
        if transitions.is_empty() {
            return;
        }
        in_order(&mut transitions);
        // Under the table's lock: the queue's order is the table's.
        let _ = self.queue.send(Told::Transitions(transitions));
    }

    pub fn caught_up(&self) {
        self.table().caught_up(Instant::now());
    }

    pub fn is_ready(&self) -> bool {
        self.table().is_ready()
    }

    pub fn replicas(&self) -> usize {
        self.table().replicas()
    }

    /// Users online, summed over the tenants.
    pub fn users_online(&self) -> usize {
        self.table().online()
    }

    pub fn view(&self) -> View {
        let table = self.table();
        let mut tenants: BTreeMap<String, TenantView> = BTreeMap::new();
        for (key, &n) in table.sums() {
            let tenant = tenants
                .entry(key.tenant.clone().unwrap_or_default())
                .or_default();
            let users = match &key.room {
                None => &mut tenant.users,
                Some(room) => tenant.rooms.entry(room.clone()).or_default(),
            };
            users.insert(key.user.clone(), n);
        }
        View {
            ready: table.is_ready(),
            replicas: table.replicas(),
            replica_states: table.replica_states(Instant::now()),
            tenants,
        }
    }

    /// A panic while applying one record leaves the table as whole as any record leaves it.
    fn table(&self) -> MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A user comes online before joining rooms and leaves them before going offline, whatever
/// order the table's keys gave (a user's own count sorts before its rooms). Stable: each
/// kind keeps the table's order.
fn in_order(transitions: &mut [Transition]) {
    transitions.sort_by_key(|t| match t {
        Transition::Came(key) if key.room.is_none() => 0,
        Transition::Came(_) => 1,
        Transition::Went(key) if key.room.is_some() => 2,
        Transition::Went(_) => 3,
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::presence::counts::Key;
    use crate::presence::local::Kind;
    use crate::presence::record::Writer;

    fn origin(name: &str) -> Origin {
        Origin {
            replica: name.into(),
            incarnation: "i1".into(),
        }
    }

    #[tokio::test]
    async fn the_view_keeps_tenants_apart_and_skips_its_own_records_read_back() {
        let a = Presence::new(origin("a"));
        let b = Presence::new(origin("b"));
        a.local.connected(Some("acme"), "42");
        a.local.joined(Some("acme"), "task:9", "42");
        a.local.connected(Some("globex"), "7");
        a.local.joined(Some("globex"), "task:9", "7");
        let mut writer = Writer::new(a.origin.clone(), Duration::from_secs(10), 0);
        let records = writer.records(&a.local.drain(Kind::Snapshot));
        for record in records {
            a.apply_own(record.clone());
            let heard = Heard::default();
            assert_eq!(a.apply_read(record.clone(), Duration::ZERO), None);
            assert_eq!(b.apply_read(record, Duration::ZERO), Some(Outcome::Applied));
            assert_eq!(b.tell_pending(&heard), 0, "history is told nothing");
        }
        b.caught_up();
        let view = b.view();
        assert!(view.ready);
        assert_eq!(view.replicas, 1);
        let state = &view.replica_states[0];
        assert_eq!((state.replica.as_str(), state.seq), ("a", 0));
        assert_eq!(state.counts, 4);
        assert!(!state.waiting_for_snapshot);
        assert!(state.lease_left_ms > 9_000 && state.lease_left_ms <= 10_000);
        let acme = &view.tenants["acme"];
        assert_eq!(acme.users, BTreeMap::from([("42".to_string(), 1)]));
        assert_eq!(
            acme.rooms["task:9"],
            BTreeMap::from([("42".to_string(), 1)])
        );
        assert_eq!(
            view.tenants["globex"].rooms["task:9"],
            BTreeMap::from([("7".to_string(), 1)])
        );
        assert_eq!(a.view().tenants, view.tenants);
        assert!(!a.is_ready());
        assert_eq!(b.users_online(), 2);
        assert_eq!(
            b.room(Some("acme"), "task:9"),
            RoomView {
                users: BTreeMap::from([("42".to_string(), 1)]),
                ready: true,
                truncated: false,
            }
        );
        assert!(b.room(None, "task:9").users.is_empty());
    }

    #[tokio::test]
    async fn once_ready_the_audience_hears_each_change_in_order() {
        let a = Presence::new(origin("a"));
        let b = Presence::new(origin("b"));
        b.caught_up();
        let mut writer = Writer::new(a.origin.clone(), Duration::from_secs(10), 0);
        let heard = Heard::default();
        let mut publish = |kind| {
            for record in writer.records(&a.local.drain(kind)) {
                b.apply_read(record, Duration::ZERO);
            }
        };
        a.local.connected(Some("acme"), "42");
        a.local.joined(Some("acme"), "task:9", "42");
        publish(Kind::Snapshot);
        a.local.left(Some("acme"), "task:9", "42");
        publish(Kind::Changes);
        a.local.disconnected(Some("acme"), "42");
        publish(Kind::Changes);
        assert_eq!(b.tell_pending(&heard), 3);
        let user = Key::user(Some("acme"), "42");
        let member = Key::member(Some("acme"), "task:9", "42");
        assert_eq!(
            *heard.0.lock().unwrap(),
            vec![
                Transition::Came(user.clone()),
                Transition::Came(member.clone()),
                Transition::Went(member),
                Transition::Went(user),
            ]
        );
    }

    #[tokio::test]
    async fn an_expired_replica_s_users_are_told_gone() {
        let a = Presence::new(origin("a"));
        let b = Presence::new(origin("b"));
        b.caught_up();
        let mut writer = Writer::new(a.origin.clone(), Duration::from_secs(1), 0);
        a.local.connected(None, "7");
        let heard = Heard::default();
        for record in writer.records(&a.local.drain(Kind::Snapshot)) {
            b.apply_read(record, Duration::ZERO);
        }
        assert_eq!(b.expire(), 0);
        tokio::time::pause();
        tokio::time::advance(Duration::from_secs(2)).await;
        assert_eq!(b.expire(), 1);
        b.tell_pending(&heard);
        let user = Key::user(None, "7");
        assert_eq!(
            *heard.0.lock().unwrap(),
            vec![Transition::Came(user.clone()), Transition::Went(user)]
        );
    }

    #[tokio::test]
    async fn rooms_are_left_before_going_offline_within_one_batch() {
        let a = Presence::new(origin("a"));
        let b = Presence::new(origin("b"));
        b.caught_up();
        let mut writer = Writer::new(a.origin.clone(), Duration::from_secs(10), 0);
        let heard = Heard::default();
        a.local.connected(Some("acme"), "42");
        a.local.joined(Some("acme"), "task:9", "42");
        a.local.joined(Some("acme"), "task:1", "42");
        for record in writer.records(&a.local.drain(Kind::Snapshot)) {
            b.apply_read(record, Duration::ZERO);
        }
        a.local.left(Some("acme"), "task:9", "42");
        a.local.left(Some("acme"), "task:1", "42");
        a.local.disconnected(Some("acme"), "42");
        for record in writer.records(&a.local.drain(Kind::Changes)) {
            b.apply_read(record, Duration::ZERO);
        }
        b.tell_pending(&heard);
        let user = Key::user(Some("acme"), "42");
        let room = |r| Key::member(Some("acme"), r, "42");
        assert_eq!(
            *heard.0.lock().unwrap(),
            vec![
                Transition::Came(user.clone()),
                Transition::Came(room("task:1")),
                Transition::Came(room("task:9")),
                Transition::Went(room("task:1")),
                Transition::Went(room("task:9")),
                Transition::Went(user),
            ]
        );
    }

    #[tokio::test]
    async fn an_answer_takes_its_place_among_the_events() {
        let a = Presence::new(origin("a"));
        let b = Presence::new(origin("b"));
        b.caught_up();
        let mut writer = Writer::new(a.origin.clone(), Duration::from_secs(10), 0);
        let log = Arc::new(Mutex::new(Vec::new()));
        a.local.connected(None, "1");
        a.local.joined(None, "r", "1");
        // Before any snapshot, changes wait; a snapshot first.
        for record in writer.records(&a.local.drain(Kind::Snapshot)) {
            b.apply_read(record, Duration::ZERO);
        }
        let answered = log.clone();
        b.query((None, "r"), 10, move |view| {
            answered
                .lock()
                .unwrap()
                .push(format!("answer {:?}", view.users));
        })
        .unwrap();
        a.local.left(None, "r", "1");
        for record in writer.records(&a.local.drain(Kind::Changes)) {
            b.apply_read(record, Duration::ZERO);
        }
        let told = Told(log.clone());
        assert_eq!(b.tell_pending(&told), 3);
        assert_eq!(
            *log.lock().unwrap(),
            vec![
                "came None".to_string(),
                "came Some(\"r\")".to_string(),
                "answer {\"1\": 1}".to_string(),
                "went Some(\"r\")".to_string(),
            ]
        );
    }

    #[tokio::test]
    async fn the_teller_goes_on_after_a_change_it_could_not_tell() {
        struct Fails;
        impl Audience for Fails {
            fn tell(&self, _: &[Transition]) {
                panic!("an audience that fails");
            }
        }
        let a = Presence::new(origin("a"));
        let b = Arc::new(Presence::new(origin("b")));
        b.caught_up();
        b.start_teller(Arc::new(Fails)).unwrap();
        let mut writer = Writer::new(a.origin.clone(), Duration::from_secs(10), 0);
        a.local.connected(None, "1");
        for record in writer.records(&a.local.drain(Kind::Snapshot)) {
            b.apply_read(record, Duration::ZERO);
        }
        let (answered, answer) = std::sync::mpsc::channel();
        b.query((None, "r"), 10, move |view| {
            answered.send(view.ready).unwrap()
        })
        .unwrap();
        let ready = answer.recv_timeout(Duration::from_secs(10));
        assert_eq!(ready, Ok(true), "the answer behind the failed change");
    }

    #[tokio::test]
    async fn answers_waiting_to_be_sent_are_bounded() {
        let a = Presence::new(origin("a"));
        let b = Presence::new(origin("b"));
        b.caught_up();
        let mut writer = Writer::new(a.origin.clone(), Duration::from_secs(10), 0);
        for user in ["1", "2"] {
            a.local.connected(None, user);
            a.local.joined(None, "r", user);
        }
        for record in writer.records(&a.local.drain(Kind::Snapshot)) {
            b.apply_read(record, Duration::ZERO);
        }
        b.tell_pending(&Heard::default());
        b.queued_users
            .store(MAX_QUEUED_USERS - 1, Ordering::Release);
        assert_eq!(
            b.query((None, "r"), 10, |_| {}),
            Err(Busy),
            "two more are over"
        );
        assert_eq!(b.query((None, "r"), 1, |_| {}), Ok(()), "one more is not");
        assert_eq!(b.queued_users.load(Ordering::Acquire), MAX_QUEUED_USERS);
        b.tell_pending(&Heard::default());
        assert_eq!(b.queued_users.load(Ordering::Acquire), MAX_QUEUED_USERS - 1);
    }

    struct Told(Arc<Mutex<Vec<String>>>);

    impl Audience for Told {
        fn tell(&self, transitions: &[Transition]) {
            for t in transitions {
                let line = match t {
                    Transition::Came(k) => format!("came {:?}", k.room),
                    Transition::Went(k) => format!("went {:?}", k.room),
                };
                self.0.lock().unwrap().push(line);
            }
        }
    }

    #[derive(Default)]
    struct Heard(Mutex<Vec<Transition>>);

    impl Audience for Heard {
        fn tell(&self, transitions: &[Transition]) {
            self.0.lock().unwrap().extend_from_slice(transitions);
        }
    }

    #[tokio::test]
    async fn a_restarted_replica_keeps_its_own_counts_over_its_earlier_incarnation_s() {
        let earlier = Presence::new(origin("a"));
        earlier.local.connected(Some("acme"), "7");
        let mut writer = Writer::new(earlier.origin.clone(), Duration::from_secs(10), 0);
        let history = writer.records(&earlier.local.drain(Kind::Snapshot));

        let restarted = Presence::new(Origin {
            replica: "a".into(),
            incarnation: "i2".into(),
        });
        restarted.local.connected(Some("acme"), "42");
        let mut writer = Writer::new(restarted.origin.clone(), Duration::from_secs(10), 0);
        for record in writer.records(&restarted.local.drain(Kind::Snapshot)) {
            restarted.apply_own(record);
        }
        // The reader starts from the topic's beginning: the earlier incarnation comes after.
        for record in history {
            restarted.apply_read(record, Duration::ZERO);
        }
        restarted.caught_up();
        restarted.local.connected(Some("acme"), "43");
        for record in writer.records(&restarted.local.drain(Kind::Changes)) {
            restarted.apply_own(record);
        }

        let view = restarted.view();
        assert_eq!(view.replicas, 1);
        assert_eq!(
            view.tenants["acme"].users,
            BTreeMap::from([("42".to_string(), 1), ("43".to_string(), 1)])
        );
    }
}
