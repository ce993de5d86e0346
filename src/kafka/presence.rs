//! The presence topic's side (docs/PRESENCE.md): made at start if missing, written by this
//! replica's publisher, read from its beginning by the reader into the cluster-wide table.
//!
//! Runs only when `presence.enabled`; otherwise none of this is built. The publisher and the
//! reader are tasks of their own: a session never waits on either, and neither holds the
//! table's lock across an await.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, ResourceSpecifier, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::error::KafkaError;
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::{ClientConfig, Message, Offset, TopicPartitionList};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::{info, warn};

use crate::config::{KafkaConfig, PresenceConfig};
use crate::metrics::Metrics;
use crate::presence::live::Presence;
use crate::presence::local::{self, Cadence};
use crate::presence::record::{self, Record, RecordError, Writer};
use crate::presence::table::Outcome;
use crate::shutdown;

/// How often the reader drops the replicas whose lease ran out: the bound on expiry is the
/// lease plus this.
const EXPIRY_CHECK: Duration = Duration::from_millis(500);

/// How often the presence lag is measured.
const LAG_CHECK: Duration = Duration::from_secs(5);

/// How long the goodbye may take to reach the broker at shutdown.
const GOODBYE_FLUSH: Duration = Duration::from_secs(3);

/// How long the start waits for the broker to make the topic.
const CREATE_TIMEOUT: Duration = Duration::from_secs(10);

/// Waiting for a topic made by an operator, or for the broker.
const RETRY: Duration = Duration::from_secs(1);

/// The running publisher and reader; `stop` publishes the goodbye and ends both.
pub struct PresenceTasks {
    stop: watch::Sender<bool>,
    publisher: JoinHandle<()>,
    reader: JoinHandle<()>,
}

impl PresenceTasks {
    /// Makes the topic if missing and asked to, then starts the publisher and the reader.
    /// A topic that cannot be made is logged, not fatal: without presence a replica starts
    /// with its broker down, and with it too; the reader waits for the topic.
    pub async fn start(
        kafka: &KafkaConfig,
        config: &PresenceConfig,
        presence: Arc<Presence>,
        metrics: Arc<Metrics>,
    ) -> Result<PresenceTasks, KafkaError> {
        if config.create_topic {
            if let Err(e) = create_topic(kafka, &config.topic).await {
                warn!(topic = %config.topic, error = %e, "cannot create the presence topic");
            }
        }
        match cleanup_policy(kafka, &config.topic).await {
            Ok(Some(policy)) if !policy.split(',').any(|p| p.trim() == "compact") => warn!(
                topic = %config.topic, %policy,
                "the presence topic is not compacted: it grows without bound, and a replica \
                 that starts reads every record ever written (docs/PRESENCE.md, The topic)"
            ),
            Ok(_) => {}
            Err(e) => {
                warn!(topic = %config.topic, error = %e, "cannot read the presence topic's policy")
            }
        }
        metrics.presence_lag.set(-1);
        let producer: ThreadedProducer<DefaultProducerContext> = producer_config(kafka).create()?;
        let consumer: StreamConsumer = reader_config(kafka, &presence.origin.replica).create()?;
        let (stop, stopped) = watch::channel(false);
        let publisher = tokio::spawn(publish(
            Arc::new(producer),
            config.clone(),
            presence.clone(),
            metrics.clone(),
            stopped.clone(),
        ));
        let reader = tokio::spawn(read(
            Arc::new(consumer),
            config.topic.clone(),
            presence,
            metrics,
            stopped,
        ));
        Ok(PresenceTasks {
            stop,
            publisher,
            reader,
        })
    }

    /// Publishes the goodbye (its users leave everywhere at once) and stops reading.
    pub async fn stop(self) {
        let _ = self.stop.send(true);
        let _ = tokio::time::timeout(GOODBYE_FLUSH + RETRY, self.publisher).await;
        self.reader.abort();
    }
}

/// The topic as docs/PRESENCE.md has it: one partition, compacted, with a compaction lag
/// that keeps every change since a replica's latest snapshot.
async fn create_topic(kafka: &KafkaConfig, topic: &str) -> Result<(), KafkaError> {
    let admin: AdminClient<DefaultClientContext> = base_config(kafka).create()?;
    // -1: the broker's default replication factor.
    let new = NewTopic::new(topic, 1, TopicReplication::Fixed(-1))
        .set("cleanup.policy", "compact")
        .set("min.compaction.lag.ms", "120000")
        .set("segment.ms", "600000");
    let options = AdminOptions::new().request_timeout(Some(CREATE_TIMEOUT));
    let results = admin.create_topics([&new], &options).await?;
    for result in results {
        match result {
            Ok(name) => info!(topic = %name, "presence topic created"),
            Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((_, code)) => return Err(KafkaError::AdminOp(code)),
        }
    }
    Ok(())
}

/// The topic's `cleanup.policy`, as the broker has it (None: no such topic yet).
async fn cleanup_policy(kafka: &KafkaConfig, topic: &str) -> Result<Option<String>, KafkaError> {
    let admin: AdminClient<DefaultClientContext> = base_config(kafka).create()?;
    let options = AdminOptions::new().request_timeout(Some(CREATE_TIMEOUT));
    let results = admin
        .describe_configs([&ResourceSpecifier::Topic(topic)], &options)
        .await?;
    Ok(match results.into_iter().next() {
        Some(Ok(resource)) => resource.get("cleanup.policy").and_then(|e| e.value.clone()),
        Some(Err(RDKafkaErrorCode::UnknownTopicOrPartition)) | None => None,
        Some(Err(code)) => return Err(KafkaError::AdminOp(code)),
    })
}

/// Drains this replica's changes on the cadence, publishes them, and the goodbye when told
/// to stop.
async fn publish(
    producer: Arc<ThreadedProducer<DefaultProducerContext>>,
    config: PresenceConfig,
    presence: Arc<Presence>,
    metrics: Arc<Metrics>,
    stopped: watch::Receiver<bool>,
) {
    let cadence = Cadence {
        interval: Duration::from_secs_f64(config.interval_seconds),
        renew: Duration::from_secs_f64(config.renew_seconds),
        snapshot: Duration::from_secs_f64(config.snapshot_seconds),
    };
    let lease = Duration::from_secs_f64(config.expiry_seconds);
    let mut writer = Writer::new(presence.origin.clone(), lease, config.max_record_bytes);
    let send = |record: &Record| {
        let (key, value) = (record.key(), record.encode());
        match producer.send(BaseRecord::to(&config.topic).key(&key).payload(&value)) {
            Ok(()) => metrics.presence_records_published.inc(),
            Err((e, _)) => warn!(error = %e, "presence record not published"),
        }
    };
    let batches = local::publish(&presence.local, cadence, |batch| {
        for record in writer.records(&batch) {
            send(&record);
            presence.apply_own(record);
        }
    });
    tokio::select! {
        () = batches => {}
        () = shutdown::wait(stopped) => {}
    }
    send(&writer.goodbye());
    let _ = tokio::task::spawn_blocking(move || producer.flush(GOODBYE_FLUSH)).await;
}

/// Reads the topic from its beginning into the table; ready once it has read up to where
/// the topic ended at start. Drops expired replicas on a timer.
async fn read(
    consumer: Arc<StreamConsumer>,
    topic: String,
    presence: Arc<Presence>,
    metrics: Arc<Metrics>,
    stopped: watch::Receiver<bool>,
) {
    let end = tokio::select! {
        end = start_reading(&consumer, &topic) => end,
        () = shutdown::wait(stopped.clone()) => return,
    };
    if end == 0 {
        presence.caught_up();
    }
    let next = Arc::new(AtomicI64::new(0));
    let lag = tokio::spawn(watch_lag(
        consumer.clone(),
        topic,
        next.clone(),
        metrics.clone(),
    ));
    let mut ticks = tokio::time::interval(EXPIRY_CHECK);
    loop {
        tokio::select! {
            message = consumer.recv() => match message {
                Ok(m) => {
                    let value = m.payload().unwrap_or_default();
                    let own = m.key().is_some_and(|k| Record::is_key_of(k, &presence.origin.replica));
                    let read = Read { value, timestamp: m.timestamp().to_millis(), own };
                    consume(&presence, &metrics, read);
                    next.store(m.offset() + 1, Ordering::Relaxed);
                    if !presence.is_ready() && m.offset() + 1 >= end {
                        presence.caught_up();
                    }
                }
                Err(e) => warn!(error = %e, "presence topic: read failed"),
            },
            _ = ticks.tick() => {
                let expired = presence.expire();
                metrics.presence_expired_replicas.inc_by(expired as u64);
                metrics.presence_users_online.set(presence.users_online() as i64);
                metrics.presence_replicas.set(presence.replicas() as i64);
            }
            () = shutdown::wait(stopped.clone()) => break,
        }
    }
    lag.abort();
}

/// Asks the broker where the topic ends, on a timer of its own: a slow answer holds up no
/// record and no expiry.
async fn watch_lag(
    consumer: Arc<StreamConsumer>,
    topic: String,
    next: Arc<AtomicI64>,
    metrics: Arc<Metrics>,
) {
    let mut ticks = tokio::time::interval(LAG_CHECK);
    loop {
        ticks.tick().await;
        let (c, t) = (consumer.clone(), topic.clone());
        let ends = tokio::task::spawn_blocking(move || c.fetch_watermarks(&t, 0, RETRY)).await;
        if let Ok(Ok((_, high))) = ends {
            let lag = high - next.load(Ordering::Relaxed);
            metrics.presence_lag.set(lag.max(0));
        }
    }
}

/// Assigns the one partition from its beginning; the offset it ends at now (retried until
/// the topic exists).
async fn start_reading(consumer: &Arc<StreamConsumer>, topic: &str) -> i64 {
    loop {
        let c = consumer.clone();
        let t = topic.to_string();
        let ends = tokio::task::spawn_blocking(move || c.fetch_watermarks(&t, 0, RETRY)).await;
        match ends {
            Ok(Ok((_, high))) => {
                let mut assignment = TopicPartitionList::new();
                let assigned = assignment
                    .add_partition_offset(topic, 0, Offset::Beginning)
                    .and_then(|()| consumer.assign(&assignment));
                match assigned {
                    Ok(()) => return high,
                    Err(e) => warn!(error = %e, "presence topic: cannot assign"),
                }
            }
            Ok(Err(e)) => warn!(%topic, error = %e, "presence topic: cannot read its end"),
            Err(e) => warn!(error = %e, "presence topic: watermarks lookup failed"),
        }
        tokio::time::sleep(RETRY).await;
    }
}

/// A record as read from the topic.
struct Read<'a> {
    value: &'a [u8],
    timestamp: Option<i64>,
    /// Written under one of this replica's keys.
    own: bool,
}

fn consume(presence: &Presence, metrics: &Metrics, read: Read<'_>) {
    // This replica's own, by their key: applied when published, or an earlier incarnation's.
    let decoded = if read.own {
        Ok(None)
    } else {
        record::decode(read.value).map(Some)
    };
    let outcome = match decoded {
        Ok(None) => "own",
        Ok(Some(record)) => {
            let age = read
                .timestamp
                .map_or(0, |ts| (crate::unix_millis() - ts).max(0));
            let age = Duration::from_millis(age as u64);
            match presence.apply_read(record, age) {
                Some(outcome) => outcome_label(outcome),
                None => "own",
            }
        }
        Err(RecordError::Version(_)) => "unknown",
        Err(e) => {
            warn!(error = %e, "presence topic: unreadable record skipped");
            "unreadable"
        }
    };
    metrics
        .presence_records_consumed
        .with_label_values(&[outcome])
        .inc();
}

fn outcome_label(outcome: Outcome) -> &'static str {
    match outcome {
        Outcome::Applied => "applied",
        Outcome::Gathered => "gathered",
        Outcome::Covered => "covered",
        Outcome::OutOfSequence => "out_of_sequence",
        Outcome::Unknown => "unknown",
    }
}

/// The brokers and the operator's `kafka.*` properties, nothing of the consumer's own.
fn base_config(kafka: &KafkaConfig) -> ClientConfig {
    let mut cc = ClientConfig::new();
    cc.set("bootstrap.servers", &kafka.brokers);
    for (key, value) in &kafka.properties {
        cc.set(key, value);
    }
    cc
}

/// Idempotent: a retried send neither duplicates nor reorders, so `seq` arrives in order.
fn producer_config(kafka: &KafkaConfig) -> ClientConfig {
    let mut cc = base_config(kafka);
    cc.set("enable.idempotence", "true")
        .set("linger.ms", "5")
        .set("socket.nagle.disable", "true");
    cc
}

/// Assigned, never subscribed: the group only names the client; nothing is committed,
/// since every start reads from the beginning.
fn reader_config(kafka: &KafkaConfig, replica: &str) -> ClientConfig {
    let mut cc = base_config(kafka);
    cc.set(
        "group.id",
        format!("{}.{replica}.presence", kafka.group_prefix),
    )
    .set("enable.auto.commit", "false")
    .set("enable.partition.eof", "false")
    .set("fetch.wait.max.ms", "100")
    .set("socket.nagle.disable", "true");
    cc
}
