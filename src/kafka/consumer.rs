//! The consumer: reads every partition of the routed topics, routes each record, encodes it
//! once, hands it to the hub, and only then stores its offset.
//!
//! One loop reads all partitions in order; delivery into per-connection queues never waits,
//! so a slow client can never stall the poll loop (and make librdkafka leave the group).
//! Partitions are discovered from metadata at start (read from their head: history is what
//! resume is for) and on a timer (new partitions are read from their beginning, since all of
//! their records arrived after this replica started).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::consumer::{CommitMode, Consumer as _, ConsumerContext, StreamConsumer};
use rdkafka::message::{BorrowedMessage, Headers, Message};
use rdkafka::statistics::Statistics;
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use tokio::sync::watch;
use tracing::{info, warn};

use crate::config::Config;
use crate::metrics::Metrics;
use crate::position::PartitionTable;
use crate::route::{Record, Route};
use crate::ws::protocol;
use crate::ws::Hub;

const METADATA_TIMEOUT: Duration = Duration::from_secs(5);
const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum ConsumerError {
    #[error("cannot create Kafka consumer: {0}")]
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

pub struct KafkaConsumer {
    consumer: Arc<StreamConsumer<Context>>,
    routes: HashMap<String, Route>,
    hub: Arc<Hub>,
    partitions: Arc<PartitionTable>,
    metrics: Arc<Metrics>,
    refresh: Duration,
    discovered: Arc<AtomicBool>,
    malformed_log: RateLimitedLog,
    error_log: RateLimitedLog,
}

impl KafkaConsumer {
    pub fn new(
        config: &Config,
        hub: Arc<Hub>,
        discovered: Arc<AtomicBool>,
    ) -> Result<KafkaConsumer, ConsumerError> {
        let group = super::group_id(&config.kafka, &config.server.name);
        let context = Context {
            partitions: hub.partitions.clone(),
        };
        let consumer: StreamConsumer<Context> =
            super::client_config(&config.kafka, &group).create_with_context(context)?;
        let routes = config
            .routes
            .iter()
            .map(|r| {
                let route = Route::from_config(r).expect("routes are validated with the config");
                (r.topic.clone(), route)
            })
            .collect();
        info!(group = %group, "kafka consumer created");
        Ok(KafkaConsumer {
            consumer: Arc::new(consumer),
            routes,
            partitions: hub.partitions.clone(),
            metrics: hub.metrics.clone(),
            hub,
            refresh: Duration::from_secs(config.kafka.metadata_refresh_seconds.max(1)),
            discovered,
            malformed_log: RateLimitedLog::new(Duration::from_secs(1)),
            error_log: RateLimitedLog::new(Duration::from_secs(5)),
        })
    }

    /// Consumes until `stop` turns true, then commits what was handed out.
    pub async fn run(self, stop: watch::Receiver<bool>) {
        let mut refresh = tokio::time::interval(self.refresh);
        refresh.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = crate::shutdown::wait(stop.clone()) => break,
                _ = refresh.tick() => self.discover().await,
                message = self.consumer.recv() => match message {
                    Ok(m) => self.process(&m),
                    Err(e) => {
                        if let Some(skipped) = self.error_log.admit() {
                            warn!(error = %e, skipped, "kafka consumer error");
                        }
                    }
                },
            }
        }
        self.close().await;
    }

    /// Assigns partitions of routed topics that are not yet assigned.
    async fn discover(&self) {
        let consumer = self.consumer.clone();
        let topics: Vec<String> = self.routes.keys().cloned().collect();
        let partitions = self.partitions.clone();
        let initial = !self.discovered.load(Ordering::Acquire);
        let found = tokio::task::spawn_blocking(move || {
            new_partitions(&consumer, &topics, &partitions, initial)
        })
        .await;
        let new = match found {
            Ok(Ok(new)) => new,
            Ok(Err(e)) => {
                if let Some(skipped) = self.error_log.admit() {
                    warn!(error = %e, skipped, "kafka metadata unavailable");
                }
                return;
            }
            Err(e) => {
                warn!(error = %e, "metadata task failed");
                return;
            }
        };
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
                info!(topic = %p.topic, partition = p.partition, start = p.start, "partition assigned");
            }
            self.metrics
                .assigned_partitions
                .set(self.partitions.len() as i64);
        }
        self.discovered.store(true, Ordering::Release);
    }

    fn process(&self, m: &BorrowedMessage<'_>) {
        let (topic, partition, offset) = (m.topic(), m.partition(), m.offset());
        self.metrics
            .records_consumed
            .with_label_values(&[topic])
            .inc();
        if let Some(route) = self.routes.get(topic) {
            let headers = m
                .headers()
                .map(|hs| {
                    hs.iter()
                        .filter_map(|h| h.value.map(|v| (h.key, v)))
                        .collect()
                })
                .unwrap_or_default();
            let record = Record {
                topic,
                partition,
                offset,
                timestamp_ms: m.timestamp().to_millis(),
                value: m.payload(),
                headers,
            };
            self.route_and_deliver(route, &record);
        }
        self.partitions.advance(topic, partition, offset);
        if let Err(e) = self.consumer.store_offset_from_message(m) {
            if let Some(skipped) = self.error_log.admit() {
                warn!(error = %e, skipped, "cannot store offset");
            }
        }
    }

    fn route_and_deliver(&self, route: &Route, record: &Record<'_>) {
        let routed = match route.apply(record) {
            Ok(r) => r,
            Err(e) => return self.malformed(record, e.reason(), &e.to_string()),
        };
        let frame = match protocol::event(&routed) {
            Ok(f) => f,
            Err(e) => return self.malformed(record, "not_utf8", &e.to_string()),
        };
        self.hub.deliver(&routed, &frame);
        if let Some(ts) = record.timestamp_ms {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_millis() as i64)
                .unwrap_or(ts);
            self.metrics
                .record_latency
                .observe((now - ts).max(0) as f64 / 1000.0);
        }
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
    async fn close(self) {
        let consumer = self.consumer;
        let work = tokio::task::spawn_blocking(move || {
            let result = consumer.commit_consumer_state(CommitMode::Sync);
            drop(consumer);
            result
        });
        match tokio::time::timeout(SHUTDOWN_TIMEOUT, work).await {
            Ok(Ok(Ok(()))) => info!("offsets committed"),
            Ok(Ok(Err(e))) => info!(error = %e, "no offsets committed"),
            _ => warn!("kafka did not answer in time; exiting without a final commit"),
        }
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
    consumer: &StreamConsumer<Context>,
    topics: &[String],
    assigned: &PartitionTable,
    initial: bool,
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
            let start = if initial { high } else { low };
            new.push(NewPartition {
                topic: topic.clone(),
                partition: p.id(),
                start,
                head: high,
            });
        }
    }
    Ok(new)
}

#[cfg(test)]
mod tests {
    use super::*;

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
