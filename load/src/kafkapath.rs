//! The Kafka path on its own (`kafka-path`): the same open-loop producer as every other mode,
//! and a consumer configured as roomcast's, in one process with no WebSocket anywhere. The age
//! of each record when the consumer gets it, measured from its intended send time, is the part
//! of an end-to-end latency that no fan-out server can remove on this machine: a floor for the
//! Kafka half of the trip, next to roomcast-floor for the WebSocket half.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use rdkafka::consumer::BaseConsumer;
use rdkafka::message::Message;
use serde_json::{json, Value};

use crate::cli::KafkaPathArgs;
use crate::client::{self, now_us, number_after, SLOT_US};
use crate::dist::Dist;
use crate::producer::{self, Counters, Schedule};
use crate::{procstat, round};

/// Runs the probe against `--brokers`/`--topic` for `--warmup` + `--duration` seconds.
pub async fn run(args: &KafkaPathArgs, dist: Dist) -> anyhow::Result<Value> {
    let brokers = args.kafka.brokers("kafka-path")?.to_string();
    let topic = args.kafka.topic.clone();
    let consumer = consumer(&brokers, &topic)?;
    let rooms = dist.rooms(args.rooms.connections.max(1));
    let counters = Arc::new(Counters::new(rooms));
    let mut sink = producer::kafka_sink(&brokers, &topic, &args.kafka.producer(), &counters)?;
    // Let the producer and the consumer connect before the clock starts.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let start = Instant::now() + Duration::from_millis(200);
    let start_us = now_us() + 200_000;
    let schedule = Schedule {
        dist,
        rooms,
        rate: args.production.rate,
        total: ((args.window.warmup + args.window.duration) * args.production.rate) as u64,
        start,
        start_us,
        payload_bytes: args.production.payload_bytes,
        stop: None,
    };
    let expected = schedule.total;
    let warmup_us = (args.window.warmup * 1e6) as u64 + schedule.start_us;
    let done = Arc::new(AtomicBool::new(false));
    let reader = {
        let done = done.clone();
        let drain = Duration::from_secs_f64(args.production.drain);
        std::thread::spawn(move || read(&consumer, expected, warmup_us, &done, drain))
    };
    let broker0 = args
        .broker_pid
        .and_then(|p| procstat::sample(&p.to_string()));
    let self0 = procstat::sample("self");
    let producer_counters = counters.clone();
    let outcome = tokio::task::spawn_blocking(move || {
        producer::run(&mut sink, &schedule, &producer_counters)
    })
    .await?;
    let wall = outcome.elapsed.as_secs_f64();
    let broker1 = args
        .broker_pid
        .and_then(|p| procstat::sample(&p.to_string()));
    let self1 = procstat::sample("self");
    done.store(true, Ordering::Relaxed);
    let got = tokio::task::spawn_blocking(move || reader.join())
        .await?
        .map_err(|_| anyhow::anyhow!("the reader panicked"))?;
    let cores = |a: Option<procstat::ProcSample>, b: Option<procstat::ProcSample>| {
        a.zip(b)
            .map(|(a, b)| round((b.cpu_s - a.cpu_s) / wall.max(1e-9), 3))
    };
    Ok(json!({
        "tool": "roomcast-load",
        "mode": "kafka-path",
        "label": args.output.label,
        "rate": args.production.rate,
        "linger_ms": args.kafka.linger_ms,
        "payload_bytes": args.production.payload_bytes,
        "warmup_s": args.window.warmup,
        "duration_s": args.window.duration,
        "records": {
            "attempted": outcome.attempted,
            "refused": outcome.refused,
            "received": got.received,
            "max_send_delay_us": outcome.max_send_delay_us,
        },
        "age_us": quantiles(&got.age),
        "created_after_intended_ms": quantiles(&got.created),
        "broker_cpu_cores": cores(broker0, broker1),
        "probe_cpu_cores": cores(self0, self1),
    }))
}

/// A consumer beside a fan-out run (`--kafka-probe`): reads the run's topic with roomcast's
/// settings and keeps the age on arrival of every record sent in the window, and its worst per
/// slot, so an end-to-end tail can be split into Kafka's part and the rest on the same run.
pub struct Probe {
    done: Arc<AtomicBool>,
    reader: std::thread::JoinHandle<(Histogram<u64>, Vec<u64>)>,
}

impl Probe {
    pub fn start(brokers: &str, topic: &str, window_us: (u64, u64)) -> anyhow::Result<Probe> {
        let consumer = consumer(brokers, topic)?;
        let done = Arc::new(AtomicBool::new(false));
        let stop = done.clone();
        let reader = std::thread::Builder::new()
            .name("kafka-probe".into())
            .spawn(move || probe(&consumer, window_us, &stop))?;
        Ok(Probe { done, reader })
    }

    pub fn finish(self) -> Value {
        self.done.store(true, Ordering::Relaxed);
        let Ok((age, worst)) = self.reader.join() else {
            return Value::Null;
        };
        json!({
            "age_us": quantiles(&age),
            "over_10ms": client::stalls(&worst),
            "worst_us": worst,
        })
    }
}

fn probe(
    consumer: &BaseConsumer,
    (start, end): (u64, u64),
    done: &AtomicBool,
) -> (Histogram<u64>, Vec<u64>) {
    let mut age = Histogram::new(3).expect("histogram");
    let mut worst = vec![0u64; (end - start).div_ceil(SLOT_US) as usize];
    while !done.load(Ordering::Relaxed) {
        let Some(Ok(m)) = consumer.poll(Duration::from_millis(100)) else {
            continue;
        };
        let now = now_us();
        let Some(sent) = m.payload().and_then(|p| number_after(p, b"\"sent_us\":")) else {
            continue;
        };
        if sent < start || sent >= end {
            continue;
        }
        let a = now.saturating_sub(sent);
        let _ = age.record(a);
        let slot = &mut worst[client::slot_of(sent, start)];
        *slot = (*slot).max(a);
    }
    (age, worst)
}

fn consumer(brokers: &str, topic: &str) -> anyhow::Result<BaseConsumer> {
    crate::tail::from_end(brokers, topic, "roomcast-load-kafka-path")
}

struct Got {
    received: u64,
    /// Intended send time to the consumer's hand, µs.
    age: Histogram<u64>,
    /// Intended send time to the record's CreateTime (set by the producer as it takes the
    /// record), ms: the producer's own share.
    created: Histogram<u64>,
}

fn read(
    consumer: &BaseConsumer,
    expected: u64,
    warmup_us: u64,
    done: &AtomicBool,
    drain: Duration,
) -> Got {
    let mut got = Got {
        received: 0,
        age: Histogram::new(3).expect("histogram"),
        created: Histogram::new(3).expect("histogram"),
    };
    let mut drained_at: Option<Instant> = None;
    while got.received < expected {
        if done.load(Ordering::Relaxed) {
            let since = *drained_at.get_or_insert_with(Instant::now);
            if since.elapsed() > drain {
                break;
            }
        }
        let Some(Ok(m)) = consumer.poll(Duration::from_millis(100)) else {
            continue;
        };
        let now = now_us();
        got.received += 1;
        let Some(sent) = m.payload().and_then(|p| number_after(p, b"\"sent_us\":")) else {
            continue;
        };
        if sent < warmup_us {
            continue;
        }
        let _ = got.age.record(now.saturating_sub(sent));
        if let Some(ts) = m.timestamp().to_millis() {
            let _ = got.created.record((ts as u64).saturating_sub(sent / 1000));
        }
    }
    got
}

fn quantiles(h: &Histogram<u64>) -> Value {
    json!({
        "count": h.len(),
        "p50": h.value_at_quantile(0.5),
        "p90": h.value_at_quantile(0.9),
        "p99": h.value_at_quantile(0.99),
        "p999": h.value_at_quantile(0.999),
        "max": h.max(),
    })
}
