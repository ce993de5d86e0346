//! Presence across replicas: who is online and who is in a room, cluster-wide, with Kafka as
//! the only shared system (docs/PRESENCE.md).
//!
//! Pure logic, knowing neither Kafka nor WebSocket: `counts` (what is counted, per tenant),
//! `local` (this replica's own changes, coalesced per interval), `record` (the topic's record
//! format, split under a size bound) and `table` (every replica's counts, merged, with leases
//! and the transitions that applying a record or an expiry causes); `live` holds them for a
//! running replica.

pub mod counts;
pub mod live;
pub mod local;
pub mod record;
pub mod table;
