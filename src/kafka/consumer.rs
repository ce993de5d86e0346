//! The consumer: reads every partition of the routed topics, routes each record, encodes it
//! once, hands it to the hub, and only then stores its offset.
//!
//! One loop on a thread of its own reads all partitions in order. It is not a task on the
//! runtime because it would then wait its turn behind thousands of writer tasks it has just
//! woken, which put seconds of delay before every record under load. Delivery into
//! per-connection queues never waits, so a slow client can never stall the poll loop.
//! Partitions are discovered from metadata at start (read from their head: history is what
//! resume is for) and on a timer (new partitions are read from their beginning, since all of
//! their records arrived after this replica started).

use std::collections::HashMap;
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer as _, ConsumerContext};
use rdkafka::message::BorrowedMessage;
use rdkafka::statistics::Statistics;
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use tokio::sync::watch;
use tracing::{info, warn};

use crate::config::Config;
use crate::frame::Frame;
use crate::kafka::KafkaSettings;
use crate::metrics::Metrics;
use crate::position::{PartitionTable, PositionMap};
use crate::resume::{Entry, ReplayBuffer};
use crate::route::{Record, Route, Routed};
use crate::ws::protocol;

const METADATA_TIMEOUT: Duration = Duration::from_secs(5);
const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(5);
/// The longest the loop waits in librdkafka, so it sees the stop signal and its timers.
const POLL_MAX: Duration = Duration::from_millis(100);
/// Watermarks go to one slice of the connections per tick, so every connection gets one per
/// interval without all writers waking at once: a tick is about this long, so a slice is
/// small enough that records arriving meanwhile barely wait behind its frames.
const POSITION_TICK: Duration = Duration::from_millis(50);
/// At most this many slices: each tick walks the whole session table to find its slice.
const MAX_POSITION_SLICES: u64 = 100;

#[derive(Debug, thiserror::Error)]
pub enum ConsumerError {
    #[error("cannot create Kafka consumer")]
    Create(#[from] rdkafka::error::KafkaError),
}

/// Receives librdkafka's statistics: the high watermark of every partition, for lag.
pub struct Context {
    partitions: Arc<PartitionTable>,
}

impl ClientContext for Context {
    fn stats(&self, stats: Statistics) {
        for (topic, t) in &stats.topics {
            for (partition, p) in &t.partitions {
                if *partition >= 0 && p.hi_offset >= 0 {
                    self.partitions
                        .set_high_watermark(topic, *partition, p.hi_offset);
                }
            }
        }
    }
}

impl ConsumerContext for Context {}

/// Logs at most once per interval, saying how many were left out meanwhile.
pub struct RateLimitedLog {
    every: Duration,
    state: Mutex<(Option<Instant>, u64)>,
}

impl RateLimitedLog {
    pub fn new(every: Duration) -> Self {
        RateLimitedLog {
            every,
            state: Mutex::new((None, 0)),
        }
    }

    /// Returns the number suppressed since the last log when it is time to log again.
    pub fn admit(&self) -> Option<u64> {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        if s.0
            .is_some_and(|last| now.duration_since(last) < self.every)
        {
            s.1 += 1;
            return None;
        }
        let suppressed = s.1;
        *s = (Some(now), 0);
        Some(suppressed)
    }
}

/// Where the consumer hands records (the live connections: `ws::Hub`), and what it holds
/// while it does. The consumer knows nothing else of the connections.
pub trait Delivery: Send + Sync + 'static {
    /// One record's fan-out, of which a large room's parts may still be to do.
    type Pending: Pending;
    /// Held while one record is handed out and its position advanced, so that a session's
    /// snapshot of positions and its joins fall between two records.
    fn hold_cut(&self) -> impl Sized + '_;
    /// Hands one routed record's frame to every connection in its rooms, never waiting on one.
    fn deliver(&self, routed: &Routed<'_>, frame: &Frame) -> Self::Pending;
    /// Sends one slice of the connections their `positions` watermark, if positions moved.
    fn broadcast_positions(&self, slice: u64, slices: u64, last: &mut PositionMap);
    /// Whether the consumer may write quiet connections' frames itself.
    fn set_direct_writes(&self, on: bool);
}

/// What is left of a record's fan-out once the cut is let go.
pub trait Pending {
    /// Does or waits for the rest, before the next record.
    fn finish(self);
}

/// What the consumer shares with the rest of the service, made by the composition root.
pub struct Shared<D> {
    pub delivery: Arc<D>,
    pub routes: Arc<HashMap<String, Route>>,
    pub partitions: Arc<PartitionTable>,
    pub replay: Arc<ReplayBuffer>,
    pub metrics: Arc<Metrics>,
}

pub struct KafkaConsumer<D: Delivery> {
    consumer: Arc<BaseConsumer<Context>>,
    routes: Arc<HashMap<String, Route>>,
    /// `records_consumed` per routed topic, looked up once rather than per record.
    consumed: HashMap<String, prometheus::IntCounter>,
    delivery: Arc<D>,
    replay: Arc<ReplayBuffer>,
    partitions: Arc<PartitionTable>,
    metrics: Arc<Metrics>,
    refresh: Duration,
    positions_every: Duration,
    warm_window: Duration,
    malformed_log: RateLimitedLog,
    error_log: RateLimitedLog,
    /// Debug builds only (see `PANIC_ON_TOPIC`).
    #[cfg(debug_assertions)]
    panic_on_topic: Option<String>,
}

/// Debug builds only, for tests of the process's supervision of its consumer: a record of the
/// topic this variable names makes the consumer panic. Release builds have no such variable.
#[cfg(debug_assertions)]
pub const PANIC_ON_TOPIC: &str = "ROOMCAST_TEST_PANIC_ON_TOPIC";

impl<D: Delivery> KafkaConsumer<D> {
    pub fn new(
        kafka: &KafkaSettings,
        config: &Config,
        shared: Shared<D>,
    ) -> Result<KafkaConsumer<D>, ConsumerError> {
        let group = &kafka.group;
        let context = Context {
            partitions: shared.partitions.clone(),
        };
        let consumer: BaseConsumer<Context> = kafka.consumer.create_with_context(context)?;
        let consumed = shared
            .routes
            .keys()
            .map(|t| {
                let counter = shared.metrics.records_consumed.with_label_values(&[t]);
                (t.clone(), counter)
            })
            .collect();
        info!(group = %group, "kafka consumer created");
        Ok(KafkaConsumer {
            consumer: Arc::new(consumer),
            routes: shared.routes,
            consumed,
            delivery: shared.delivery,
            replay: shared.replay,
            partitions: shared.partitions,
            metrics: shared.metrics,
            refresh: Duration::from_secs(config.kafka.metadata_refresh_seconds),
            positions_every: Duration::from_secs_f64(config.resume.positions_interval_seconds),
            warm_window: Duration::from_secs(config.resume.buffer_max_age_seconds),
            malformed_log: RateLimitedLog::new(Duration::from_secs(1)),
            error_log: RateLimitedLog::new(Duration::from_secs(5)),
            #[cfg(debug_assertions)]
            panic_on_topic: std::env::var(PANIC_ON_TOPIC).ok(),
        })
    }

    /// Consumes until `stop` turns true, then commits what was handed out. Blocking: run it on
    /// a thread of its own.
    pub fn run(self, stop: watch::Receiver<bool>) {
        let found = self.start_discovery(stop.clone());
        let mut watermarks = Watermarks::new(self.positions_every);
        let mut load = Load::new(Instant::now());
        let mut now = Instant::now();
        while !*stop.borrow() {
            while let Ok(new) = found.try_recv() {
                self.assign(new);
            }
            if watermarks.send_due(now, &*self.delivery) {
                self.store_offsets();
            }
            let wait = watermarks.next.saturating_duration_since(now).min(POLL_MAX);
            let message = self.consumer.poll(wait);
            // Timers, the buffer's age and eviction share this reading; the load measure
            // takes a second one once the record is handled.
            now = Instant::now();
            match message {
                Some(Ok(m)) => {
                    self.process(&m, now);
                    if let Some(busy) = load.record(now, Instant::now()) {
                        self.delivery.set_direct_writes(!busy);
                    }
                }
                Some(Err(e)) => {
                    if let Some(skipped) = self.error_log.admit() {
                        warn!(error = %e, skipped, "kafka consumer error");
                    }
                }
                None => {}
            }
        }
        self.close();
    }

    /// Looks for partitions not yet assigned on a thread of its own, now and then every
    /// refresh interval: a metadata round trip to a busy broker can take a good part of a
    /// second, and the loop would stop delivering meanwhile.
    fn start_discovery(&self, stop: watch::Receiver<bool>) -> mpsc::Receiver<Vec<NewPartition>> {
        let (found, receiver) = mpsc::channel();
        let consumer = self.consumer.clone();
        let topics: Vec<String> = self.routes.keys().cloned().collect();
        let partitions = self.partitions.clone();
        let (refresh, window) = (self.refresh, self.warm_window);
        let spawned = std::thread::Builder::new()
            .name("kafka-discovery".into())
            .spawn(move || {
                let error_log = RateLimitedLog::new(Duration::from_secs(5));
                let mut initial = true;
                while !*stop.borrow() {
                    match new_partitions(&consumer, &topics, &partitions, initial, window) {
                        Ok(new) => {
                            initial = false;
                            if found.send(new).is_err() {
                                return;
                            }
                        }
                        Err(e) => {
                            if let Some(skipped) = error_log.admit() {
                                warn!(error = %e, skipped, "kafka metadata unavailable");
                            }
                        }
                    }
                    sleep_unless_stopped(refresh, &stop);
                }
            });
        if let Err(e) = spawned {
            warn!(error = %e, "cannot start partition discovery");
        }
        receiver
    }

    /// Assigns what discovery found, leaving out what was assigned since it looked.
    fn assign(&self, mut new: Vec<NewPartition>) {
        new.retain(|p| !self.partitions.is_assigned(&p.topic, p.partition));
        if !new.is_empty() {
            let mut tpl = TopicPartitionList::new();
            for p in &new {
                if let Err(e) =
                    tpl.add_partition_offset(&p.topic, p.partition, Offset::Offset(p.start))
                {
                    warn!(error = %e, topic = %p.topic, "cannot assign partition");
                    return;
                }
            }
            if let Err(e) = self.consumer.incremental_assign(&tpl) {
                warn!(error = %e, "cannot assign partitions");
                return;
            }
            for p in &new {
                self.partitions
                    .assign(&p.topic, p.partition, p.start, p.head);
                self.replay.reset(&p.topic, p.partition, p.start);
                info!(topic = %p.topic, partition = p.partition, start = p.start, "partition assigned");
            }
            self.metrics
                .assigned_partitions
                .set(self.partitions.len() as i64);
        }
        self.partitions.set_discovered();
    }

    fn process(&self, m: &BorrowedMessage<'_>, read_at: Instant) {
        let record = super::record(m);
        let (topic, partition, offset) = (record.topic, record.partition, record.offset);
        #[cfg(debug_assertions)]
        if self.panic_on_topic.as_deref() == Some(topic) {
            panic!("{PANIC_ON_TOPIC} names {topic}");
        }
        if let Some(counter) = self.consumed.get(topic) {
            counter.inc();
        }
        let mut delivered = None;
        {
            let _cut = self.delivery.hold_cut();
            // Advanced first (one lock instead of two); nobody sees it before the cut is
            // released but readiness and stats, for which a record early is no harm.
            let Some(state) = self.partitions.advance(topic, partition, offset) else {
                return;
            };
            // Below the head at assignment: read back only to warm the replay buffer.
            let mut live = offset >= state.assigned_head;
            if offset < state.next_offset {
                // The log went back (a recreated topic): what was buffered is another log's,
                // and everything in the new one is live.
                warn!(
                    topic,
                    partition,
                    offset,
                    expected = state.next_offset,
                    "offset reset"
                );
                self.replay.reset(topic, partition, offset);
                self.partitions.rebase(topic, partition, offset);
                live = true;
            }
            let entry = self
                .routes
                .get(topic)
                .and_then(|route| self.route(route, &record, live, read_at, &mut delivered));
            self.replay.push(topic, partition, offset, entry);
        }
        if let Some(delivered) = delivered {
            delivered.finish();
            self.observe_latency(record.timestamp_ms);
        }
    }

    /// Stores every partition's position for the next commit. Done on a timer rather than per
    /// record: the offsets are for lag visibility, and a call into librdkafka per record costs
    /// more than routing it. Only what was handed to the registry is ever stored.
    fn store_offsets(&self) {
        let mut tpl = TopicPartitionList::new();
        for ((topic, partition), state) in self.partitions.snapshot() {
            if state.next_offset > 0 {
                let _ =
                    tpl.add_partition_offset(&topic, partition, Offset::Offset(state.next_offset));
            }
        }
        if tpl.count() == 0 {
            return;
        }
        if let Err(e) = self.consumer.store_offsets(&tpl) {
            if let Some(skipped) = self.error_log.admit() {
                warn!(error = %e, skipped, "cannot store offsets");
            }
        }
    }

    /// Routes and encodes a record, hands it out if `live`, and returns it for the buffer.
    fn route(
        &self,
        route: &Route,
        record: &Record<'_>,
        live: bool,
        read_at: Instant,
        delivered: &mut Option<D::Pending>,
    ) -> Option<Entry> {
        let routed = match route.apply(record) {
            Ok(r) => r,
            Err(e) => {
                self.malformed(record, e.reason(), &e.to_string());
                return None;
            }
        };
        let frame = match protocol::event(&routed) {
            Ok(f) => f,
            Err(e) => {
                self.malformed(record, "not_utf8", &e.to_string());
                return None;
            }
        };
        if live {
            *delivered = Some(self.delivery.deliver(&routed, &frame));
        }
        Some(Entry::new(routed, frame, read_at))
    }

    fn observe_latency(&self, timestamp_ms: Option<i64>) {
        let Some(ts) = timestamp_ms else { return };
        let now = crate::unix_millis();
        self.metrics
            .record_latency
            .observe((now - ts).max(0) as f64 / 1000.0);
    }

    fn malformed(&self, record: &Record<'_>, reason: &'static str, detail: &str) {
        self.metrics
            .records_malformed
            .with_label_values(&[record.topic, reason])
            .inc();
        if let Some(skipped) = self.malformed_log.admit() {
            warn!(
                topic = record.topic,
                partition = record.partition,
                offset = record.offset,
                reason,
                detail,
                skipped,
                "malformed record skipped"
            );
        }
    }

    /// Commits stored offsets and drops the consumer, both bounded in time: against an
    /// unreachable broker either can block for `session.timeout.ms`.
    fn close(self) {
        self.store_offsets();
        let consumer = self.consumer;
        let (done, result) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let committed = consumer.commit_consumer_state(CommitMode::Sync);
            drop(consumer);
            let _ = done.send(committed);
        });
        match result.recv_timeout(SHUTDOWN_TIMEOUT) {
            Ok(Ok(())) => info!("offsets committed"),
            Ok(Err(e)) => info!(error = %e, "no offsets committed"),
            Err(_) => warn!("kafka did not answer in time; exiting without a final commit"),
        }
    }
}

/// How much of its time the loop spends on records, window by window.
struct Load {
    window_start: Instant,
    busy: Duration,
}

/// The loop's load is judged over windows this long.
const LOAD_WINDOW: Duration = Duration::from_millis(100);

impl Load {
    fn new(now: Instant) -> Load {
        Load {
            window_start: now,
            busy: Duration::ZERO,
        }
    }

    /// Counts one record's processing; at the end of a window, whether the loop was busy
    /// for more than half of it.
    fn record(&mut self, started: Instant, done: Instant) -> Option<bool> {
        self.busy += done.saturating_duration_since(started);
        let window = done.saturating_duration_since(self.window_start);
        if window < LOAD_WINDOW {
            return None;
        }
        let busy = self.busy * 2 > window;
        *self = Load::new(done);
        Some(busy)
    }
}

/// When the next `positions` watermark is due, and for which slice of the connections.
struct Watermarks {
    tick: Duration,
    next: Instant,
    slice: u64,
    slices: u64,
    /// What each slice was last sent.
    last: Vec<PositionMap>,
}

impl Watermarks {
    fn new(interval: Duration) -> Watermarks {
        let slices = (interval.as_millis() / POSITION_TICK.as_millis()) as u64;
        let slices = slices.clamp(1, MAX_POSITION_SLICES);
        let tick = interval / slices as u32;
        Watermarks {
            tick,
            next: Instant::now() + tick,
            slice: 0,
            slices,
            last: vec![PositionMap::default(); slices as usize],
        }
    }

    /// Sends the due slice its watermark; true when a whole round has just ended.
    fn send_due(&mut self, now: Instant, delivery: &impl Delivery) -> bool {
        if now < self.next {
            return false;
        }
        let last = &mut self.last[self.slice as usize];
        delivery.broadcast_positions(self.slice, self.slices, last);
        self.slice = (self.slice + 1) % self.slices;
        self.next = Instant::now() + self.tick;
        self.slice == 0
    }
}

/// Sleeps for `total`, waking early when `stop` turns true.
fn sleep_unless_stopped(total: Duration, stop: &watch::Receiver<bool>) {
    let until = Instant::now() + total;
    while !*stop.borrow() {
        let left = until.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return;
        }
        std::thread::sleep(left.min(POLL_MAX));
    }
}

struct NewPartition {
    topic: String,
    partition: i32,
    start: i64,
    head: i64,
}

/// Blocking: reads metadata and watermarks for partitions not assigned yet.
fn new_partitions(
    consumer: &BaseConsumer<Context>,
    topics: &[String],
    assigned: &PartitionTable,
    initial: bool,
    warm_window: Duration,
) -> Result<Vec<NewPartition>, rdkafka::error::KafkaError> {
    let mut new = Vec::new();
    for topic in topics {
        let metadata = consumer.fetch_metadata(Some(topic), METADATA_TIMEOUT)?;
        let Some(t) = metadata.topics().iter().find(|t| t.name() == topic) else {
            continue;
        };
        if t.error().is_some() {
            if initial {
                warn!(topic = %topic, "routed topic does not exist (yet)");
            }
            continue;
        }
        for p in t.partitions() {
            if assigned.is_assigned(topic, p.id()) {
                continue;
            }
            let (low, high) = consumer.fetch_watermarks(topic, p.id(), METADATA_TIMEOUT)?;
            // At start, read back the replay window (to warm the buffer) and go live at the
            // head; a partition that appears later is read from its beginning, since all of
            // its records arrived after this replica started.
            let start = if initial {
                window_start(consumer, topic, p.id(), warm_window)?.clamp(low, high)
            } else {
                low
            };
            new.push(NewPartition {
                topic: topic.clone(),
                partition: p.id(),
                start,
                // Warm-up covers only what was there before this replica started; a partition
                // found later is live from its first record.
                head: if initial { high } else { start },
            });
        }
    }
    Ok(new)
}

/// The first offset of `partition` whose record is younger than `window`; the head if none.
fn window_start(
    consumer: &BaseConsumer<Context>,
    topic: &str,
    partition: i32,
    window: Duration,
) -> Result<i64, rdkafka::error::KafkaError> {
    let mut tpl = TopicPartitionList::new();
    let since = crate::unix_millis() - window.as_millis() as i64;
    tpl.add_partition_offset(topic, partition, Offset::Offset(since))?;
    let found = consumer.offsets_for_times(tpl, METADATA_TIMEOUT)?;
    Ok(
        match found.find_partition(topic, partition).map(|p| p.offset()) {
            Some(Offset::Offset(o)) => o,
            _ => i64::MAX,
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_load_is_judged_per_window() {
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        let mut load = Load::new(t0);
        // 40 ms of work in the first 100 ms: not busy.
        assert_eq!(load.record(t0 + ms(10), t0 + ms(50)), None);
        assert_eq!(load.record(t0 + ms(100), t0 + ms(100)), Some(false));
        // 80 ms of work in the next 100 ms: busy.
        assert_eq!(load.record(t0 + ms(110), t0 + ms(190)), None);
        assert_eq!(load.record(t0 + ms(200), t0 + ms(201)), Some(true));
    }

    #[test]
    fn rate_limited_log_counts_what_it_leaves_out() {
        let log = RateLimitedLog::new(Duration::from_secs(3600));
        assert_eq!(log.admit(), Some(0));
        assert_eq!(log.admit(), None);
        assert_eq!(log.admit(), None);
        let log = RateLimitedLog::new(Duration::ZERO);
        assert_eq!(log.admit(), Some(0));
        assert_eq!(log.admit(), Some(0));
    }
}
