//! WebSocket side: the [`Hub`] that sessions and the consumer share, the handshake, the
//! per-connection session, and the wire protocol.

pub mod fanout;
pub mod handshake;
#[cfg(test)]
mod one_writer;
pub mod outbox;
mod presence;
pub mod protocol;
pub mod session;
pub mod throttle;
pub mod wire;
pub mod writer;

use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use dashmap::DashMap;
use tokio::sync::{Mutex, MutexGuard, Semaphore};

use crate::auth::Authenticator;
use crate::config::Config;
use crate::frame::Frame;
use crate::kafka::consumer::{Delivery, Pending};
use crate::kafka::replay::KafkaReplay;
use crate::metrics::Metrics;
use crate::pattern::Pattern;
use crate::position::{PartitionTable, PositionMap};
use crate::presence::live::Presence;
use crate::proxy::TrustedProxies;
use crate::quota::Quota;
use crate::registry::{ConnId, Registry};
use crate::resume::lag::LogEnds;
use crate::resume::ReplayBuffer;
use crate::route::{Priority, Routed};
use crate::setup::Setup;
use fanout::{Fanout, Spread, Tally};
use outbox::{Handover, Peer};
use protocol::close;

/// Recipients per record whose frame may be written by the consumer itself when their
/// connection is quiet: a send costs it a few microseconds, against a task wake-up, a
/// context switch and the send for a writer.
const DIRECT_WRITES: usize = 64;

/// One record's deliveries, of which a large room's parts may still be to do.
#[must_use = "finish the record's fan-out before delivering the next record"]
#[derive(Default)]
pub struct PendingFanout(Option<Arc<Spread>>);

impl Pending for PendingFanout {
    /// Does or waits for what is left of the fan-out.
    fn finish(self) {
        if let Some(spread) = self.0 {
            spread.finish();
        }
    }
}

/// What the hub shares with the consumer, or reads back from Kafka with, made by the
/// composition root.
pub struct HubParts {
    pub metrics: Arc<Metrics>,
    pub partitions: Arc<PartitionTable>,
    pub replay: Arc<ReplayBuffer>,
    pub history: KafkaReplay,
    /// Where a large room's fan-out is spread; none: the consumer does it all.
    pub runtime: Option<tokio::runtime::Handle>,
    /// Presence, when `presence.enabled`: the sessions report to its `Local`.
    pub(crate) presence: Option<Arc<Presence>>,
}

/// Everything a session needs and the consumer delivers into.
pub struct Hub {
    pub(crate) config: Arc<Config>,
    pub(crate) auth: Authenticator,
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) partitions: Arc<PartitionTable>,
    pub(crate) registry: Registry<Peer>,
    /// The connections that asked for presence events, per room (a subset of `registry`'s
    /// members); empty with presence off.
    pub(crate) listeners: Registry<Peer>,
    pub(crate) sessions: DashMap<ConnId, Peer>,
    pub(crate) replay: Arc<ReplayBuffer>,
    pub(crate) kafka_replay: KafkaReplay,
    /// Where the logs end, as the broker last told a resume (see `lag.rs`).
    pub(crate) log_ends: LogEnds,
    /// Held by the consumer while it hands one record out and advances its position, and by
    /// whoever joins rooms and takes a position snapshot that must match them: so a snapshot
    /// and a join always fall between two records, never in the middle of one. An async
    /// mutex: a session waits for it without holding a worker, however long a record takes,
    /// so liveness, signals and every other connection go on meanwhile.
    cut: Mutex<()>,
    /// Bounds open connections; a session holds one permit for its whole life.
    pub(crate) limit: Arc<Semaphore>,
    /// Open connections per (tenant, user) and per client address.
    pub(crate) users: Arc<Quota<u64>>,
    pub(crate) addresses: Arc<Quota<IpAddr>>,
    /// Whose `X-Forwarded-For` names the client address.
    pub(crate) proxies: TrustedProxies,
    draining: AtomicBool,
    /// Whether the consumer may write quiet connections' frames itself (see `deliver`).
    direct_writes: AtomicBool,
    next_id: AtomicU64,
    /// Where a large room's fan-out is spread; none outside a runtime.
    fanout: Option<Fanout>,
    /// Sessions echo their client's messages and send no welcome. Set only by the conformance
    /// harness (`examples/autobahn_echo.rs`), which runs the real edge, handshake, session and
    /// writer under the Autobahn|Testsuite; no configuration of the service sets it.
    #[doc(hidden)]
    pub echo: bool,
    pub(crate) presence: Option<Arc<Presence>>,
    /// `presence.rooms`: the rooms whose presence is kept.
    presence_rooms: Vec<Pattern>,
}

impl Hub {
    /// The hub of a built [`Setup`] (its routes, authenticator and proxies as they are) and of
    /// the state it shares, made by the composition root (`crate::hub_parts`).
    pub fn new(setup: Setup, parts: HubParts) -> Hub {
        let Setup {
            config,
            auth,
            proxies,
            presence_rooms,
            ..
        } = setup;
        let HubParts {
            metrics,
            partitions,
            replay,
            history,
            runtime,
            presence,
        } = parts;
        Hub {
            users: Quota::new(config.server.max_connections_per_user),
            addresses: Quota::new(config.server.max_connections_per_address),
            limit: Arc::new(Semaphore::new(config.server.max_connections)),
            config,
            auth,
            metrics,
            partitions,
            registry: Registry::new(),
            listeners: Registry::new(),
            sessions: DashMap::new(),
            replay,
            kafka_replay: history,
            log_ends: LogEnds::default(),
            cut: Mutex::new(()),
            proxies,
            draining: AtomicBool::new(false),
            direct_writes: AtomicBool::new(true),
            next_id: AtomicU64::new(1),
            fanout: runtime.map(|runtime| Fanout {
                helpers: runtime.metrics().num_workers(),
                runtime,
            }),
            presence,
            presence_rooms,
            echo: false,
        }
    }

    /// Presence, when on and kept for `room` (`presence.rooms`).
    pub(crate) fn presence_of(&self, room: &str) -> Option<&Arc<Presence>> {
        let kept = || self.presence_rooms.iter().any(|p| p.matches(room));
        self.presence.as_ref().filter(|_| kept())
    }

    /// Whether `room` has presence events to listen to: kept, or the tenant's status room,
    /// whose online and offline come from the users' counts whatever `presence.rooms` says.
    pub(crate) fn has_presence_events(&self, tenant: Option<&str>, room: &str) -> bool {
        let status = || self.config.presence.status_room_of(tenant).as_deref() == Some(room);
        self.presence.is_some() && (self.presence_of(room).is_some() || status())
    }

    pub fn config(&self) -> &Arc<Config> {
        &self.config
    }

    /// Whose `X-Forwarded-For` the edge believes, as the hub's own limits do.
    pub fn proxies(&self) -> &TrustedProxies {
        &self.proxies
    }

    /// Turns the consumer's own writes on or off. The consumer turns them off while it is
    /// busy, so that sends move to the writer tasks, which run on every core, and a replica
    /// with more cores than one is not held to what one thread can send.
    pub fn set_direct_writes(&self, on: bool) {
        self.direct_writes.store(on, Ordering::Relaxed);
    }

    /// Recipients of one record that may be written directly.
    fn direct_budget(&self) -> usize {
        if self.direct_writes.load(Ordering::Relaxed) {
            DIRECT_WRITES
        } else {
            0
        }
    }

    pub fn next_connection_id(&self) -> ConnId {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Acquire)
    }

    /// The consumer's hold on the cut (see the field), from its own thread, never from a
    /// worker: uncontended, one atomic operation.
    pub fn hold_cut(&self) -> MutexGuard<'_, ()> {
        self.cut
            .try_lock()
            .unwrap_or_else(|_| self.cut.blocking_lock())
    }

    /// A session's hold on the cut (see the field), for a welcome or a resume: awaited, so a
    /// waiting session holds no worker however long a record takes.
    pub async fn cut(&self) -> MutexGuard<'_, ()> {
        self.cut.lock().await
    }

    /// Sends a `positions` watermark to every live connection of one slice (connection id
    /// modulo `slices`), if positions moved since `last`. Called from the consumer's loop,
    /// between records, so the watermark is queued behind every record it covers. One slice
    /// at a time, because waking every writer at once stalled deliveries for a tenth of a
    /// second at 10,000 connections.
    pub fn broadcast_positions(&self, slice: u64, slices: u64, last: &mut PositionMap) {
        let _cut = self.hold_cut();
        let now = self.partitions.delivered_map();
        if now == *last {
            return;
        }
        let frame = protocol::positions(&now);
        let direct = self.direct_budget() > 0;
        for peer in self.sessions.iter() {
            if peer.key() % slices == slice && peer.is_live() {
                peer.hand_over(&frame, Priority::Critical, Handover::write_if(direct));
            }
        }
        *last = now;
    }

    /// Queues one routed record's frame for every connection in its rooms. Never waits on a
    /// connection. A large room is listed and its parts started, but the caller finishes
    /// them after letting go of the cut (see `fanout.rs`), before the next record, so each
    /// connection still gets records in order.
    pub fn deliver(&self, routed: &Routed<'_>, frame: &Frame) -> PendingFanout {
        let mut tally = Tally::default();
        let tenant = routed.tenant.as_deref();
        let (rooms, event) = (&routed.rooms, &routed.event);
        // The first few recipients of a record may get it written straight away; past that,
        // frames are queued, so a larger fan-out is written in batches by the writers.
        let mut budget = self.direct_budget();
        let mut direct = |peer: &Peer| {
            let write_now = budget > 0;
            budget = budget.saturating_sub(1);
            tally.add(peer.hand_over(frame, routed.priority, Handover::write_if(write_now)))
        };
        let large_at = match self.fanout {
            Some(_) => 2 * fanout::PART,
            None => usize::MAX,
        };
        let large = self
            .registry
            .reach(tenant, rooms, event, large_at, &mut direct);
        tally.count(&self.metrics);
        let spread = large.zip(self.fanout.as_ref()).map(|(members, fanout)| {
            let metrics = self.metrics.clone();
            Spread::start(fanout, members, frame, event, routed.priority, metrics)
        });
        PendingFanout(spread)
    }

    /// Starts draining: no new connections, and every open one is closed with 1001 in paced
    /// batches spread over `window`, so clients do not all reconnect at the same instant.
    pub async fn drain(&self, window: Duration) {
        self.draining.store(true, Ordering::Release);
        let peers: Vec<Peer> = self.sessions.iter().map(|e| e.value().clone()).collect();
        if peers.is_empty() {
            return;
        }
        let tick = Duration::from_millis(50);
        let ticks = (window.as_millis() / tick.as_millis()).max(1) as usize;
        let per_tick = peers.len().div_ceil(ticks);
        for (i, batch) in peers.chunks(per_tick).enumerate() {
            if i > 0 {
                tokio::time::sleep(tick).await;
            }
            for peer in batch {
                peer.close(close::GOING_AWAY, "server shutting down", true);
            }
        }
    }

    /// Waits until every session has ended, or `timeout` passes. True if all ended.
    pub async fn sessions_ended(&self, timeout: Duration) -> bool {
        let all = self.config.server.max_connections as u32;
        tokio::time::timeout(timeout, self.limit.acquire_many(all))
            .await
            .is_ok()
    }
}

impl Delivery for Hub {
    type Pending = PendingFanout;

    fn hold_cut(&self) -> impl Sized + '_ {
        Hub::hold_cut(self)
    }

    fn deliver(&self, routed: &Routed<'_>, frame: &Frame) -> PendingFanout {
        Hub::deliver(self, routed, frame)
    }

    fn broadcast_positions(&self, slice: u64, slices: u64, last: &mut PositionMap) {
        Hub::broadcast_positions(self, slice, slices, last)
    }

    fn set_direct_writes(&self, on: bool) {
        Hub::set_direct_writes(self, on)
    }
}
