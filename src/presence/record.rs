//! The presence topic's records: a replica's batch as versioned JSON, split so that no record
//! passes a size bound, with the key compaction keeps the latest of.
//!
//! Every record of a replica's incarnation has its own `seq`, one more than the last, so a
//! reader tells a gap from a record it has already covered. A snapshot is split into parts of
//! consecutive `seq` that apply only together; a batch of changes into records that each
//! apply alone (their counts are new values, not differences).

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::counts::{Counts, Key};
use super::local::{Batch, Kind};

/// The longest lease a record may give: `presence.expiry_seconds`' upper bound, a day.
pub const MAX_LEASE_MS: u64 = 86_400_000;

/// The version this replica writes and reads.
pub const VERSION: u32 = 1;

/// The least bound a record may be given: a single count (a room of 200 bytes, a user of a
/// token that fitted a request head) always fits in a record.
pub const MIN_RECORD_BYTES: usize = 64 * 1024;

/// Which replica, and which start of it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Origin {
    pub replica: String,
    pub incarnation: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Body {
    Changes(Counts),
    Snapshot {
        part: u32,
        parts: u32,
        counts: Counts,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub origin: Origin,
    pub seq: u64,
    /// How long after the record's timestamp the replica's entries stand without another.
    pub lease: Duration,
    pub body: Body,
}

impl Record {
    /// The Kafka key: compaction keeps the latest snapshot's parts and the latest changes.
    pub fn key(&self) -> String {
        match &self.body {
            Body::Changes(_) => format!("{}/changes", self.origin.replica),
            Body::Snapshot { part, .. } => format!("{}/snapshot/{part}", self.origin.replica),
        }
    }

    /// Whether `key` is one `replica`'s records are written under: its own records read back
    /// are skipped by their key, before the cost of decoding them.
    pub fn is_key_of(key: &[u8], replica: &str) -> bool {
        let Some(rest) = key
            .strip_prefix(replica.as_bytes())
            .and_then(|r| r.strip_prefix(b"/"))
        else {
            return false;
        };
        match rest.strip_prefix(b"snapshot/") {
            Some(part) => !part.is_empty() && part.iter().all(u8::is_ascii_digit),
            None => rest == b"changes",
        }
    }

    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(&Wire::from(self)).expect("a record always serializes")
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    #[error("not a presence record: {0}")]
    Malformed(#[from] serde_json::Error),
    #[error("presence record of version {0}; this replica reads version {VERSION}")]
    Version(u32),
    #[error("snapshot part {part} of {parts}")]
    Part { part: u32, parts: u32 },
}

pub fn decode(value: &[u8]) -> Result<Record, RecordError> {
    #[derive(Deserialize)]
    struct Versioned {
        v: u32,
    }
    let Versioned { v } = serde_json::from_slice(value)?;
    if v != VERSION {
        return Err(RecordError::Version(v));
    }
    let wire: Wire = serde_json::from_slice(value)?;
    wire.into_record()
}

/// Turns one replica's batches into records.
#[derive(Debug)]
pub struct Writer {
    origin: Origin,
    next_seq: u64,
    lease: Duration,
    max_bytes: usize,
}

impl Writer {
    /// `max_bytes` below [`MIN_RECORD_BYTES`] is taken as that.
    pub fn new(origin: Origin, lease: Duration, max_bytes: usize) -> Writer {
        Writer {
            origin,
            next_seq: 0,
            lease,
            max_bytes: max_bytes.max(MIN_RECORD_BYTES),
        }
    }

    /// The records of a batch, each encoding to at most the size bound; an empty batch is one
    /// record (a lease renewal, or an empty snapshot).
    pub fn records(&mut self, batch: &Batch) -> Vec<Record> {
        let chunks = split(&batch.counts, self.budget());
        let parts = chunks.len() as u32;
        let lease = self.lease;
        chunks
            .into_iter()
            .zip(0..)
            .map(|(counts, part)| {
                let body = match batch.kind {
                    Kind::Changes => Body::Changes(counts),
                    Kind::Snapshot => Body::Snapshot {
                        part,
                        parts,
                        counts,
                    },
                };
                self.record(lease, body)
            })
            .collect()
    }

    /// The last record of a clean shutdown: an empty state, standing for no time.
    pub fn goodbye(&mut self) -> Record {
        let body = Body::Snapshot {
            part: 0,
            parts: 1,
            counts: Counts::new(),
        };
        self.record(Duration::ZERO, body)
    }

    fn record(&mut self, lease: Duration, body: Body) -> Record {
        let seq = self.next_seq;
        self.next_seq += 1;
        Record {
            origin: self.origin.clone(),
            seq,
            lease,
            body,
        }
    }

    /// What the counts of one record may take: the bound less the envelope, whose numbers
    /// are counted at their widest.
    fn budget(&self) -> usize {
        const ENVELOPE: usize = 256;
        let origin = json_len(&self.origin.replica) + json_len(&self.origin.incarnation);
        self.max_bytes - ENVELOPE - origin
    }
}

/// Cuts `counts` into pieces of at most `budget` bytes once written, in key order, so that
/// a tenant's and a room's counts stay together as far as the bound lets them.
fn split(counts: &Counts, budget: usize) -> Vec<Counts> {
    let mut pieces = Vec::new();
    let mut piece = Counts::new();
    let (mut used, mut last) = (0, None::<&Key>);
    for (key, &count) in counts {
        let mut cost = cost(last, key, count);
        if used + cost > budget && !piece.is_empty() {
            pieces.push(std::mem::take(&mut piece));
            cost = cost_alone(key, count);
            used = 0;
        }
        used += cost;
        piece.insert(key.clone(), count);
        last = Some(key);
    }
    if !piece.is_empty() || pieces.is_empty() {
        pieces.push(piece);
    }
    pieces
}

/// The most a count adds to a record after `last`: `["user",2],`, and the opening of its
/// tenant's group (`{"tenant":..,"users":[],"rooms":[]},`) or room's group
/// (`{"room":..,"users":[]},`) when it starts one.
fn cost(last: Option<&Key>, key: &Key, count: u32) -> usize {
    let Some(last) = last.filter(|l| l.tenant == key.tenant) else {
        return cost_alone(key, count);
    };
    let mut cost = entry_len(&key.user, count);
    if let Some(room) = &key.room {
        if !last.same_room(key) {
            cost += json_len(room) + 22;
        }
    }
    cost
}

fn cost_alone(key: &Key, count: u32) -> usize {
    let tenant = key.tenant.as_deref().map_or(4, json_len) + 35;
    let room = key.room.as_deref().map_or(0, |r| json_len(r) + 22);
    entry_len(&key.user, count) + tenant + room
}

/// `["user",2],`
fn entry_len(user: &str, count: u32) -> usize {
    json_len(user) + itoa::Buffer::new().format(count).len() + 4
}

/// The length of `s` written as a JSON string, quotes included.
fn json_len(s: &str) -> usize {
    2 + s
        .chars()
        .map(|c| match c {
            '"' | '\\' | '\n' | '\r' | '\t' | '\u{8}' | '\u{c}' => 2,
            c if (c as u32) < 0x20 => 6,
            c => c.len_utf8(),
        })
        .sum::<usize>()
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
enum WireKind {
    Changes,
    Snapshot,
}

/// The JSON of a record. Unknown fields are ignored: a later version-1 writer may add some.
#[derive(Debug, Serialize, Deserialize)]
struct Wire {
    v: u32,
    replica: String,
    incarnation: String,
    seq: u64,
    kind: WireKind,
    part: u32,
    parts: u32,
    lease_ms: u64,
    tenants: Vec<WireTenant>,
}

#[derive(Debug, Serialize, Deserialize)]
struct WireTenant {
    tenant: Option<String>,
    #[serde(default)]
    users: Vec<(String, u32)>,
    #[serde(default)]
    rooms: Vec<WireRoom>,
}

#[derive(Debug, Serialize, Deserialize)]
struct WireRoom {
    room: String,
    users: Vec<(String, u32)>,
}

impl From<&Record> for Wire {
    fn from(record: &Record) -> Wire {
        let (kind, part, parts, counts) = match &record.body {
            Body::Changes(counts) => (WireKind::Changes, 0, 1, counts),
            Body::Snapshot {
                part,
                parts,
                counts,
            } => (WireKind::Snapshot, *part, *parts, counts),
        };
        Wire {
            v: VERSION,
            replica: record.origin.replica.clone(),
            incarnation: record.origin.incarnation.clone(),
            seq: record.seq,
            kind,
            part,
            parts,
            lease_ms: record.lease.as_millis() as u64,
            tenants: grouped(counts),
        }
    }
}

/// Counts in key order, grouped per tenant, then per room.
fn grouped(counts: &Counts) -> Vec<WireTenant> {
    let mut tenants: Vec<WireTenant> = Vec::new();
    for (key, &count) in counts {
        if tenants.last().is_none_or(|t| t.tenant != key.tenant) {
            tenants.push(WireTenant {
                tenant: key.tenant.clone(),
                users: Vec::new(),
                rooms: Vec::new(),
            });
        }
        let tenant = tenants.last_mut().expect("pushed above");
        let user = (key.user.clone(), count);
        let Some(room) = &key.room else {
            tenant.users.push(user);
            continue;
        };
        if tenant.rooms.last().is_none_or(|r| &r.room != room) {
            tenant.rooms.push(WireRoom {
                room: room.clone(),
                users: Vec::new(),
            });
        }
        tenant
            .rooms
            .last_mut()
            .expect("pushed above")
            .users
            .push(user);
    }
    tenants
}

impl Wire {
    fn into_record(self) -> Result<Record, RecordError> {
        let mut counts = Counts::new();
        for t in self.tenants {
            let tenant = t.tenant.as_deref();
            for (user, count) in t.users {
                counts.insert(Key::user(tenant, &user), count);
            }
            for r in t.rooms {
                for (user, count) in r.users {
                    counts.insert(Key::member(tenant, &r.room, &user), count);
                }
            }
        }
        let body = match self.kind {
            WireKind::Changes => Body::Changes(counts),
            WireKind::Snapshot if self.part < self.parts => Body::Snapshot {
                part: self.part,
                parts: self.parts,
                counts,
            },
            WireKind::Snapshot => {
                let (part, parts) = (self.part, self.parts);
                return Err(RecordError::Part { part, parts });
            }
        };
        Ok(Record {
            origin: Origin {
                replica: self.replica,
                incarnation: self.incarnation,
            },
            seq: self.seq,
            // A lease past the longest `presence.expiry_seconds` is no replica's: cut to it,
            // a record written by anyone else cannot make its users stay for ever.
            lease: Duration::from_millis(self.lease_ms.min(MAX_LEASE_MS)),
            body,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The bound of the design's default.
    const DEFAULT_BOUND: usize = 256 * 1024;

    fn writer(max_bytes: usize) -> Writer {
        let origin = Origin {
            replica: "roomcast-0".into(),
            incarnation: "18c3a0f2e41-7d2e".into(),
        };
        Writer::new(origin, Duration::from_secs(10), max_bytes)
    }

    fn storm(users: usize) -> Counts {
        let mut counts = Counts::new();
        for user in 0..users {
            let user = format!("u{user}");
            counts.insert(Key::user(Some("acme"), &user), 1);
            counts.insert(Key::member(Some("acme"), &format!("user:{user}"), &user), 1);
            counts.insert(Key::member(Some("acme"), "tenant:acme", &user), 1);
        }
        counts
    }

    /// Every record decodes to itself and keeps to the bound; their counts together are the
    /// batch's.
    fn check(records: &[Record], counts: &Counts, bound: usize) {
        let mut all = Counts::new();
        for record in records {
            let value = record.encode();
            assert!(value.len() <= bound, "{} bytes", value.len());
            assert_eq!(&decode(&value).unwrap(), record);
            let (Body::Changes(c) | Body::Snapshot { counts: c, .. }) = &record.body;
            all.extend(c.iter().map(|(k, n)| (k.clone(), *n)));
        }
        assert_eq!(&all, counts);
    }

    #[test]
    fn a_storm_of_10_000_connects_is_a_handful_of_records_under_the_bound() {
        let counts = storm(10_000);
        let mut writer = writer(DEFAULT_BOUND);
        let batch = Batch {
            kind: Kind::Changes,
            counts: counts.clone(),
        };
        let records = writer.records(&batch);
        check(&records, &counts, DEFAULT_BOUND);
        let bytes: usize = records.iter().map(|r| r.encode().len()).sum();
        assert!((600_000..800_000).contains(&bytes), "{bytes} bytes");
        // 676 KB of JSON: three records, the first two filled close to the bound.
        assert_eq!(records.len(), 3);
        let seqs: Vec<u64> = records.iter().map(|r| r.seq).collect();
        assert_eq!(seqs, (0..records.len() as u64).collect::<Vec<_>>());
        assert!(records.iter().all(|r| r.key() == "roomcast-0/changes"));
        // A snapshot of the same is as many parts of consecutive seq, keyed by part.
        let snapshot = writer.records(&Batch {
            kind: Kind::Snapshot,
            ..batch
        });
        check(&snapshot, &counts, DEFAULT_BOUND);
        let n = records.len() as u64;
        for (i, record) in snapshot.iter().enumerate() {
            assert_eq!(record.seq, n + i as u64);
            assert_eq!(record.key(), format!("roomcast-0/snapshot/{i}"));
            let Body::Snapshot { part, parts, .. } = record.body else {
                panic!("{record:?}");
            };
            assert_eq!((part, parts), (i as u32, snapshot.len() as u32));
        }
    }

    #[test]
    fn names_that_json_escapes_are_counted_at_their_written_length() {
        let mut counts = Counts::new();
        for i in 0..3_000 {
            let user = format!("\"\u{1}\\{i}\u{2028}");
            let room = format!("r\u{7}\"{}", i % 7);
            counts.insert(Key::member(Some("t\"\u{3}"), &room, &user), 0);
            counts.insert(Key::user(None, &user), u32::MAX);
        }
        let records = writer(0).records(&Batch {
            kind: Kind::Changes,
            counts: counts.clone(),
        });
        assert!(records.len() > 1);
        check(&records, &counts, MIN_RECORD_BYTES);
    }

    #[test]
    fn an_empty_batch_is_one_record_and_goodbye_stands_for_no_time() {
        let mut writer = writer(0);
        let records = writer.records(&Batch {
            kind: Kind::Changes,
            counts: Counts::new(),
        });
        assert_eq!(records.len(), 1);
        check(&records, &Counts::new(), MIN_RECORD_BYTES);
        let goodbye = writer.goodbye();
        assert_eq!((goodbye.seq, goodbye.lease), (1, Duration::ZERO));
        assert_eq!(goodbye.key(), "roomcast-0/snapshot/0");
        assert_eq!(decode(&goodbye.encode()).unwrap(), goodbye);
    }

    #[test]
    fn a_replica_s_keys_are_told_from_those_of_a_replica_named_like_them() {
        let mut writer = writer(0);
        let changes = writer.records(&Batch {
            kind: Kind::Changes,
            counts: Counts::new(),
        });
        let snapshot = writer.goodbye();
        for record in [&changes[0], &snapshot] {
            assert!(Record::is_key_of(record.key().as_bytes(), "roomcast-0"));
            assert!(!Record::is_key_of(record.key().as_bytes(), "roomcast"));
        }
        for other in [
            "roomcast-0/snapshot/changes",
            "roomcast-0/snapshot/1/changes",
            "roomcast-0/x",
        ] {
            assert!(
                !Record::is_key_of(other.as_bytes(), "roomcast-0"),
                "{other}"
            );
        }
        assert!(Record::is_key_of(b"a/b/changes", "a/b"));
        assert!(!Record::is_key_of(b"a/b/changes", "a"));
    }

    #[test]
    fn a_lease_past_a_day_is_cut_to_a_day() {
        let text = r#"{"v":1,"replica":"r","incarnation":"i","seq":0,"kind":"changes","part":0,"parts":1,"lease_ms":18446744073709551615,"tenants":[]}"#;
        let record = decode(text.as_bytes()).unwrap();
        assert_eq!(record.lease, Duration::from_secs(86_400));
    }

    #[test]
    fn the_format_is_as_documented_and_other_versions_are_refused() {
        let mut counts = Counts::new();
        counts.insert(Key::user(Some("acme"), "42"), 2);
        counts.insert(Key::user(Some("acme"), "7"), 0);
        counts.insert(Key::member(Some("acme"), "task:9", "42"), 1);
        counts.insert(Key::member(Some("acme"), "task:9", "7"), 0);
        let mut writer = writer(0);
        writer.next_seq = 42;
        let record = writer.records(&Batch {
            kind: Kind::Changes,
            counts,
        });
        let json = String::from_utf8(record[0].encode()).unwrap();
        assert_eq!(
            json,
            r#"{"v":1,"replica":"roomcast-0","incarnation":"18c3a0f2e41-7d2e","seq":42,"kind":"changes","part":0,"parts":1,"lease_ms":10000,"tenants":[{"tenant":"acme","users":[["42",2],["7",0]],"rooms":[{"room":"task:9","users":[["42",1],["7",0]]}]}]}"#
        );
        let later = json.replace(r#""v":1"#, r#""v":2"#);
        assert!(matches!(
            decode(later.as_bytes()),
            Err(RecordError::Version(2))
        ));
        let extra = json.replace(r#""seq":42"#, r#""seq":42,"zone":"eu-1""#);
        assert_eq!(decode(extra.as_bytes()).unwrap(), record[0]);
        assert!(matches!(decode(b"{}"), Err(RecordError::Malformed(_))));
        let bad_part = json
            .replace(r#""kind":"changes""#, r#""kind":"snapshot""#)
            .replace(r#""part":0"#, r#""part":1"#);
        assert!(matches!(
            decode(bad_part.as_bytes()),
            Err(RecordError::Part { part: 1, parts: 1 })
        ));
    }
}
