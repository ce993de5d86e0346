//! The open-loop producer: record `i` is due at `start + i / rate`, carries that intended time,
//! and is sent as soon as possible after it. A slow sink delays sends but never the schedule:
//! the delay shows up in the measured latency, and the worst one is reported.

use std::io::{BufWriter, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::config::ClientConfig;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{BaseRecord, DeliveryResult, Producer, ProducerContext, ThreadedProducer};
use rdkafka::ClientContext;

use crate::dist::Dist;

/// Where records go: a Kafka topic, or the floor's control socket.
pub enum Sink {
    Kafka {
        producer: ThreadedProducer<Ctx>,
        topic: String,
    },
    Floor(BufWriter<TcpStream>),
}

/// Counts records that Kafka did not take, per room (the opaque is the record's `seq`).
pub struct Ctx {
    failed: Arc<Vec<AtomicU64>>,
    errors: Arc<AtomicU64>,
    lost_seqs: Arc<Mutex<Vec<u64>>>,
}

impl ClientContext for Ctx {}

impl ProducerContext for Ctx {
    type DeliveryOpaque = usize;

    fn delivery(&self, result: &DeliveryResult<'_>, seq: usize) {
        if result.is_err() {
            let room = seq % self.failed.len().max(1);
            self.failed[room].fetch_add(1, Ordering::Relaxed);
            self.errors.fetch_add(1, Ordering::Relaxed);
            lock(&self.lost_seqs).push(seq as u64);
        }
    }
}

pub struct Counters {
    /// Records handed to the sink, per room, less the ones reported failed.
    pub sent: Vec<AtomicU64>,
    pub failed: Arc<Vec<AtomicU64>>,
    pub errors: Arc<AtomicU64>,
    /// Records the schedule has dealt with so far (sent or refused): every `seq` below it.
    pub attempted: AtomicU64,
    /// Every `seq` that did not reach the sink: refused at once or failed after sending.
    pub lost_seqs: Arc<Mutex<Vec<u64>>>,
    /// Key and value bytes of the records handed to the sink.
    pub bytes: AtomicU64,
}

impl Counters {
    pub fn new(rooms: usize) -> Counters {
        Counters {
            sent: (0..rooms).map(|_| AtomicU64::new(0)).collect(),
            failed: Arc::new((0..rooms).map(|_| AtomicU64::new(0)).collect()),
            errors: Arc::new(AtomicU64::new(0)),
            attempted: AtomicU64::new(0),
            lost_seqs: Arc::new(Mutex::new(Vec::new())),
            bytes: AtomicU64::new(0),
        }
    }

    /// The `seq`s that did not reach the sink, sorted.
    pub fn lost(&self) -> Vec<u64> {
        let mut v = lock(&self.lost_seqs).clone();
        v.sort_unstable();
        v
    }

    /// Records that reached the sink for `room`.
    pub fn delivered(&self, room: usize) -> u64 {
        self.sent[room]
            .load(Ordering::Relaxed)
            .saturating_sub(self.failed[room].load(Ordering::Relaxed))
    }
}

/// `settings`: librdkafka properties on top of the defaults below (see `Args::producer`).
pub fn kafka_sink(
    brokers: &str,
    topic: &str,
    settings: &[(String, String)],
    counters: &Counters,
) -> Result<Sink, KafkaError> {
    let ctx = Ctx {
        failed: counters.failed.clone(),
        errors: counters.errors.clone(),
        lost_seqs: counters.lost_seqs.clone(),
    };
    let mut config = ClientConfig::new();
    config
        .set("bootstrap.servers", brokers)
        .set("queue.buffering.max.messages", "1000000")
        .set("message.timeout.ms", "30000");
    for (key, value) in settings {
        config.set(key, value);
    }
    let producer: ThreadedProducer<Ctx> = config.create_with_context(ctx)?;
    Ok(Sink::Kafka {
        producer,
        topic: topic.to_string(),
    })
}

pub struct Schedule {
    pub dist: Dist,
    pub rooms: usize,
    pub rate: f64,
    pub total: u64,
    /// The instant record 0 is due, and the same moment in µs since the epoch.
    pub start: Instant,
    pub start_us: u64,
    pub payload_bytes: usize,
    /// Ends the schedule early when set (for open-ended runs: `total` = u64::MAX).
    pub stop: Option<Arc<AtomicBool>>,
}

#[derive(Debug, Default, Clone, Copy)]
pub struct Outcome {
    pub attempted: u64,
    /// Refused at once (librdkafka's queue full, or a socket error).
    pub refused: u64,
    /// The largest gap between a record's intended and actual send time.
    pub max_send_delay_us: u64,
    pub elapsed: Duration,
}

/// Runs the schedule on the calling thread; bounded by `schedule.total`.
pub fn run(sink: &mut Sink, s: &Schedule, counters: &Counters) -> Outcome {
    let mut out = Outcome::default();
    let mut value = String::with_capacity(s.payload_bytes + 128);
    let fields: Vec<(&'static str, String)> =
        (0..s.rooms).map(|r| s.dist.record_field(r)).collect();
    let floor_rooms: Vec<String> = match &*sink {
        Sink::Floor(_) => (0..s.rooms).map(|r| s.dist.record_room(r)).collect(),
        Sink::Kafka { .. } => Vec::new(),
    };
    let mut i: u64 = 0;
    let stopped = || s.stop.as_ref().is_some_and(|f| f.load(Ordering::Relaxed));
    while i < s.total && !stopped() {
        let due = s.start + offset(i, s.rate);
        let now = Instant::now();
        if due > now {
            // Short naps, so a stop is noticed within a few milliseconds.
            std::thread::sleep((due - now).min(Duration::from_millis(5)));
            continue;
        }
        // Everything due by now goes out in one burst, each with its own intended time.
        while i < s.total {
            let off = offset(i, s.rate);
            let now = Instant::now();
            if s.start + off > now {
                break;
            }
            let delay = now.duration_since(s.start + off).as_micros() as u64;
            out.max_send_delay_us = out.max_send_delay_us.max(delay);
            let room = (i % s.rooms as u64) as usize;
            let (key, target) = &fields[room];
            let sent_us = s.start_us + off.as_micros() as u64;
            write_value(&mut value, (key, target), i, sent_us, s.payload_bytes);
            out.attempted += 1;
            let ok = match &mut *sink {
                Sink::Kafka { producer, topic } => {
                    let record = BaseRecord::with_opaque_to(topic, i as usize)
                        .key(target.as_bytes())
                        .payload(value.as_bytes());
                    match producer.send(record) {
                        Ok(()) => true,
                        Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => {
                            false
                        }
                        Err(_) => false,
                    }
                }
                Sink::Floor(w) => {
                    let line = format!("{}\t{}\n", floor_rooms[room], value);
                    w.write_all(line.as_bytes()).is_ok()
                }
            };
            if ok {
                counters.sent[room].fetch_add(1, Ordering::Relaxed);
                counters
                    .bytes
                    .fetch_add((target.len() + value.len()) as u64, Ordering::Relaxed);
            } else {
                out.refused += 1;
                lock(&counters.lost_seqs).push(i);
            }
            i += 1;
            counters.attempted.store(i, Ordering::Release);
        }
        if let Sink::Floor(w) = &mut *sink {
            if w.flush().is_err() {
                // The floor is gone: the rest cannot be sent.
                out.refused += s.total.saturating_sub(i);
                break;
            }
        }
    }
    if let Sink::Kafka { producer, .. } = &*sink {
        let _ = producer.flush(Duration::from_secs(30));
    }
    out.elapsed = s.start.elapsed();
    out
}

/// A record's JSON value, padded to `payload_bytes`: the shape the receivers and the bench
/// route config (`user:{userId}`, `task:{taskId}`) expect, from every mode that produces.
pub fn write_value(
    value: &mut String,
    (key, target): (&str, &str),
    seq: u64,
    sent_us: u64,
    payload_bytes: usize,
) {
    use std::fmt::Write as _;
    value.clear();
    let _ = write!(
        value,
        r#"{{"{key}":"{target}","seq":{seq},"sent_us":{sent_us},"pad":""#
    );
    // The closing `"}` counts towards the size.
    while value.len() + 2 < payload_bytes {
        value.push('x');
    }
    value.push_str("\"}");
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn offset(i: u64, rate: f64) -> Duration {
    Duration::from_nanos((i as f64 * 1e9 / rate) as u64)
}

/// Creates `topic` unless it exists.
pub async fn create_topic(brokers: &str, topic: &str, partitions: i32) -> anyhow::Result<()> {
    use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
    use rdkafka::client::DefaultClientContext;
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()?;
    let new = NewTopic::new(topic, partitions, TopicReplication::Fixed(1));
    let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(20)));
    for r in admin.create_topics([&new], &opts).await? {
        match r {
            Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((t, e)) => anyhow::bail!("cannot create topic {t}: {e}"),
        }
    }
    Ok(())
}
