//! Replay from Kafka itself, for resumes the replay buffer no longer covers.
//!
//! Shared and bounded: a semaphore caps how many partitions are read back at once, so a
//! reconnect storm cannot overload the broker or this replica; a record count and an age
//! bound (`resume.max_age_seconds`) cap what one resume may ask for. Anything beyond is
//! answered with `resync`.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use tokio::sync::Semaphore;

use crate::frame::Frame;
use crate::resume::lag::Log;
use crate::resume::{Entry, History, HistoryError, Selection};
use crate::route::Route;
use crate::ws::protocol;

const CALL_TIMEOUT: Duration = Duration::from_secs(5);
const READ_TIMEOUT: Duration = Duration::from_secs(20);

impl From<rdkafka::error::KafkaError> for HistoryError {
    fn from(e: rdkafka::error::KafkaError) -> Self {
        HistoryError::Kafka(e.to_string())
    }
}

pub struct KafkaReplay {
    config: ClientConfig,
    routes: Arc<HashMap<String, Route>>,
    permits: Arc<Semaphore>,
    max_age: Duration,
    max_records: i64,
}

impl KafkaReplay {
    pub fn new(
        mut config: ClientConfig,
        routes: Arc<HashMap<String, Route>>,
        concurrency: usize,
        max_age: Duration,
        max_records: i64,
    ) -> KafkaReplay {
        config
            .set("enable.auto.commit", "false")
            .set("statistics.interval.ms", "0");
        KafkaReplay {
            config,
            routes,
            permits: Arc::new(Semaphore::new(concurrency)),
            max_age,
            max_records,
        }
    }
}

impl History for KafkaReplay {
    async fn read(
        &self,
        topic: &str,
        partition: i32,
        after: i64,
        upto: i64,
        selection: &Selection,
    ) -> Result<Vec<Frame>, HistoryError> {
        if upto - after > self.max_records {
            return Err(HistoryError::TooMany(self.max_records));
        }
        let _permit = self
            .permits
            .acquire()
            .await
            .map_err(|e| HistoryError::Kafka(e.to_string()))?;
        let job = Job {
            config: self.config.clone(),
            route: self.routes.get(topic).cloned(),
            topic: topic.to_string(),
            partition,
            after,
            upto,
            max_age: self.max_age,
            selection: selection.clone(),
        };
        tokio::task::spawn_blocking(move || job.run())
            .await
            .map_err(|e| HistoryError::Kafka(e.to_string()))?
    }
}

impl Log for KafkaReplay {
    /// Asked of the broker, through the same permits as a read back: a failover brings every
    /// client of the failed replica at once.
    async fn high_watermark(&self, topic: &str, partition: i32) -> Result<i64, HistoryError> {
        let _permit = self
            .permits
            .acquire()
            .await
            .map_err(|e| HistoryError::Kafka(e.to_string()))?;
        let config = self.config.clone();
        let topic = topic.to_string();
        tokio::task::spawn_blocking(move || {
            let consumer: BaseConsumer = config.create()?;
            let (_low, high) = consumer.fetch_watermarks(&topic, partition, CALL_TIMEOUT)?;
            Ok(high)
        })
        .await
        .map_err(|e| HistoryError::Kafka(e.to_string()))?
    }
}

struct Job {
    config: ClientConfig,
    route: Option<Route>,
    topic: String,
    partition: i32,
    after: i64,
    upto: i64,
    max_age: Duration,
    selection: Selection,
}

impl Job {
    fn run(self) -> Result<Vec<Frame>, HistoryError> {
        let consumer: BaseConsumer = self.config.create()?;
        self.check_window(&consumer)?;
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(&self.topic, self.partition, Offset::Offset(self.after + 1))?;
        consumer.assign(&tpl)?;
        let mut frames = Vec::new();
        let deadline = Instant::now() + READ_TIMEOUT;
        let mut next = self.after + 1;
        while next <= self.upto {
            if Instant::now() > deadline {
                return Err(HistoryError::Kafka("read back timed out".into()));
            }
            let Some(message) = consumer.poll(Duration::from_millis(200)) else {
                continue;
            };
            let m = message?;
            next = m.offset() + 1;
            if m.offset() > self.upto {
                break;
            }
            if let Some(frame) = self.select(&m) {
                frames.push(frame);
            }
        }
        Ok(frames)
    }

    /// Refuses ranges that start before the log's low watermark (retention) or whose first
    /// record is older than the maximum age.
    fn check_window(&self, consumer: &BaseConsumer) -> Result<(), HistoryError> {
        let (low, _high) = consumer.fetch_watermarks(&self.topic, self.partition, CALL_TIMEOUT)?;
        if self.after + 1 < low {
            return Err(HistoryError::TooOld);
        }
        let cutoff = crate::unix_millis() - self.max_age.as_millis() as i64;
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(&self.topic, self.partition, Offset::Offset(cutoff))?;
        let found = consumer.offsets_for_times(tpl, CALL_TIMEOUT)?;
        let first_young = found
            .find_partition(&self.topic, self.partition)
            .map(|p| p.offset());
        match first_young {
            Some(Offset::Offset(o)) if self.after + 1 < o => Err(HistoryError::TooOld),
            // No record is young enough: everything after `after` is too old, if anything.
            Some(Offset::End) if self.after < self.upto => Err(HistoryError::TooOld),
            _ => Ok(()),
        }
    }

    fn select(&self, m: &rdkafka::message::BorrowedMessage<'_>) -> Option<Frame> {
        let route = self.route.as_ref()?;
        let routed = route.apply(&super::record(m)).ok()?;
        let frame = protocol::event(&routed).ok()?;
        let entry = Entry::new(routed, frame, std::time::Instant::now());
        self.selection.admits(&entry).then_some(entry.frame)
    }
}
