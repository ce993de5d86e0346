//! The presence a running replica holds: its own connections' counts (`Local`), which the
//! sessions change, and the cluster-wide table, which the publisher and the reader of the
//! topic change and the admin listener reads.
//!
//! Knows no Kafka: the topic's side (`kafka/presence.rs`) hands records in and takes
//! batches out. The table's lock is held for one record or one query, never across an await.

use std::collections::BTreeMap;
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use serde::Serialize;
use tokio::time::Instant;

use super::local::Local;
use super::record::{Origin, Record};
use super::table::{Applied, Outcome, Table};

pub struct Presence {
    pub origin: Origin,
    pub local: Local,
    table: Mutex<Table>,
}

/// `/presence`: per tenant (`""` for tokens without one), per room, the users present and
/// their connections; and each tenant's online users.
#[derive(Debug, Serialize, PartialEq, Eq)]
pub struct View {
    pub ready: bool,
    pub replicas: usize,
    pub tenants: BTreeMap<String, TenantView>,
}

#[derive(Debug, Default, Serialize, PartialEq, Eq)]
pub struct TenantView {
    pub users: BTreeMap<String, u32>,
    pub rooms: BTreeMap<String, BTreeMap<String, u32>>,
}

impl Presence {
    pub fn new(origin: Origin) -> Presence {
        Presence {
            origin,
            local: Local::default(),
            table: Mutex::new(Table::default()),
        }
    }

    /// A record of this replica's, applied as it is published: its own connections show
    /// without a round trip through Kafka.
    pub fn apply_own(&self, record: Record) {
        self.table().apply(record, Instant::now(), Duration::ZERO);
    }

    /// A record read from the topic, `age` after its timestamp. This incarnation's own
    /// records were applied when published. An earlier incarnation of this replica's name is
    /// skipped too: it is dead, since this process holds the name now, and its snapshot read
    /// back after this incarnation's would replace this replica's own counts in the table.
    pub fn apply_read(&self, record: Record, age: Duration) -> Option<Outcome> {
        if record.origin.replica == self.origin.replica {
            return None;
        }
        let Applied { outcome, .. } = self.table().apply(record, Instant::now(), age);
        Some(outcome)
    }

    /// Drops the replicas whose lease ran out; returns how many there were.
    pub fn expire(&self) -> usize {
        let mut table = self.table();
        let before = table.replicas();
        table.expire(Instant::now());
        before - table.replicas()
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
        self.table()
            .sums()
            .keys()
            .filter(|k| k.room.is_none())
            .count()
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
            tenants,
        }
    }

    /// A panic while applying one record leaves the table as whole as any record leaves it.
    fn table(&self) -> MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
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
            assert_eq!(a.apply_read(record.clone(), Duration::ZERO), None);
            assert_eq!(b.apply_read(record, Duration::ZERO), Some(Outcome::Applied));
        }
        b.caught_up();
        let view = b.view();
        assert!(view.ready);
        assert_eq!(view.replicas, 1);
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
