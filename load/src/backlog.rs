//! Route throughput from a backlog: how many records per second, and per second of server
//! CPU, one roomcast consumes and routes when no live producer limits it.
//!
//! N records go to a fresh single-partition topic as fast as the broker takes them (batched,
//! acks=all). Then a server starts on that topic with a replay window longer than the run
//! (`[resume] buffer_max_age_seconds`): at start it reads the whole partition back, routing
//! and encoding every record into its replay buffer before it goes live. Nobody is connected,
//! so nothing is delivered. The server's CPU counts from its spawn (its /proc totals), and its
//! consumed-records counter is polled until it reaches N.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use rdkafka::config::ClientConfig;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{BaseRecord, DeliveryResult, Producer, ProducerContext, ThreadedProducer};
use rdkafka::ClientContext;
use serde_json::{json, Value};

use crate::cli::RouteBacklogArgs;
use crate::dist::Dist;
use crate::procstat::{self, status_kib, ThreadCpu};
use crate::producer;
use crate::round;
use crate::server::{self, Server, Spec};

const CONSUMED: &str = "roomcast_records_consumed_total";
const POLL: Duration = Duration::from_millis(100);
/// Near the end, so that the moment the last record is read is known to 10 ms, not 100.
const FINE_POLL: Duration = Duration::from_millis(10);
/// A server that is ready and has read nothing new for this long will not read the rest:
/// its window did not reach back to the first record.
const STALL: f64 = 5.0;
const METADATA_TIMEOUT: Duration = Duration::from_secs(10);
const FLUSH_TIMEOUT: Duration = Duration::from_secs(300);
/// Threads listed one by one in the report (the rest only by name).
const TOP_THREADS: usize = 8;

/// What to produce.
struct Plan {
    brokers: String,
    topic: String,
    records: u64,
    dist: Dist,
    rooms: usize,
    payload_bytes: usize,
}

struct Produced {
    seconds: f64,
    bytes: u64,
}

/// What the polls saw, in seconds since spawn.
struct Polled {
    ready_s: Option<f64>,
    first_seen_s: Option<f64>,
    /// The first poll that saw every record; CPU and threads are sampled right after it.
    all_consumed_s: f64,
    /// The server's CPU at the last poll that saw no record yet: its start-up.
    startup_cpu_s: f64,
}

/// Everything seen from the server's spawn until it had consumed every record.
struct Readback {
    pid: u32,
    listening_s: f64,
    polled: Polled,
    cpu_s: f64,
    threads: Vec<ThreadCpu>,
    rss_kib: Option<u64>,
    hwm_kib: Option<u64>,
    metrics: Option<HashMap<String, f64>>,
    broker_cpu_s: Option<f64>,
    /// Busy CPU seconds of the machine that neither the server, the broker nor this tool used.
    other_busy_s: Option<f64>,
}

pub async fn run(args: &RouteBacklogArgs, spec: Spec) -> anyhow::Result<Value> {
    let brokers = args.kafka.brokers("route-backlog")?;
    if args.records == 0 {
        bail!("--records must be at least 1");
    }
    let dist = Dist::parse(&args.rooms.dist).map_err(anyhow::Error::msg)?;
    let plan = Plan {
        brokers: brokers.to_string(),
        topic: args.kafka.topic.clone(),
        records: args.records,
        rooms: dist.rooms(args.rooms.connections),
        dist,
        payload_bytes: args.payload_bytes,
    };
    // One partition: the server reads all partitions on one loop, so more would only
    // interleave them.
    producer::create_topic(brokers, &plan.topic, 1).await?;
    eprintln!(
        "producing {} records of {} bytes to {} ({} rooms, {})",
        plan.records, plan.payload_bytes, plan.topic, plan.rooms, plan.dist
    );
    let (plan, produced) = tokio::task::spawn_blocking(move || {
        let p = produce(&plan);
        (plan, p)
    })
    .await?;
    let produced = produced?;
    eprintln!(
        "produced and acknowledged in {:.2} s; starting the server",
        produced.seconds
    );
    let read = read_back(spec, plan.records, args.broker_pid).await?;
    let report = report(args, &plan, &produced, &read);
    print(&report);
    Ok(report)
}

/// Counts acknowledgements: every record must be in the log before the server starts.
#[derive(Default)]
struct Acks {
    ok: AtomicU64,
    failed: AtomicU64,
}

impl ClientContext for Acks {}

impl ProducerContext for Acks {
    type DeliveryOpaque = ();

    fn delivery(&self, result: &DeliveryResult<'_>, _: ()) {
        let n = if result.is_ok() {
            &self.ok
        } else {
            &self.failed
        };
        n.fetch_add(1, Ordering::Relaxed);
    }
}

/// Writes the plan's records and waits for all of them to be acknowledged. Blocking.
fn produce(p: &Plan) -> anyhow::Result<Produced> {
    // Large batches and a short linger: the broker takes records as fast as it can, which
    // is not what is measured here.
    let producer: ThreadedProducer<Acks> = ClientConfig::new()
        .set("bootstrap.servers", &p.brokers)
        .set("acks", "all")
        .set("linger.ms", "5")
        .set("batch.size", "1000000")
        .set("batch.num.messages", "100000")
        .set("queue.buffering.max.messages", "1000000")
        .set("message.timeout.ms", "120000")
        .create_with_context(Acks::default())?;
    let before = partition_len(&producer, &p.topic)?;
    if before > 0 {
        bail!(
            "topic {} already holds {before} records: give a fresh topic, the server would read them too",
            p.topic
        );
    }
    let fields: Vec<(&str, String)> = (0..p.rooms).map(|r| p.dist.record_field(r)).collect();
    let mut value = String::with_capacity(p.payload_bytes + 128);
    let mut bytes = 0u64;
    let started = Instant::now();
    for seq in 0..p.records {
        let (key, target) = &fields[(seq % p.rooms as u64) as usize];
        let sent_us = crate::client::now_us();
        producer::write_value(&mut value, (key, target), seq, sent_us, p.payload_bytes);
        send(&producer, &p.topic, target.as_bytes(), value.as_bytes())?;
        bytes += (target.len() + value.len()) as u64;
    }
    producer
        .flush(FLUSH_TIMEOUT)
        .context("not every record was acknowledged")?;
    let seconds = started.elapsed().as_secs_f64();
    let acks = producer.context();
    let (ok, failed) = (
        acks.ok.load(Ordering::Relaxed),
        acks.failed.load(Ordering::Relaxed),
    );
    if failed > 0 || ok != p.records {
        bail!(
            "{ok} of {} records acknowledged, {failed} failed",
            p.records
        );
    }
    let after = partition_len(&producer, &p.topic)?;
    if after != p.records as i64 {
        bail!("the partition holds {after} records, not {}", p.records);
    }
    Ok(Produced { seconds, bytes })
}

/// Sends one record, waiting while librdkafka's queue is full: a backlog must be complete.
fn send(
    producer: &ThreadedProducer<Acks>,
    topic: &str,
    key: &[u8],
    value: &[u8],
) -> anyhow::Result<()> {
    let mut record = BaseRecord::to(topic).partition(0).key(key).payload(value);
    loop {
        match producer.send(record) {
            Ok(()) => return Ok(()),
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), r)) => {
                record = r;
                std::thread::sleep(Duration::from_millis(1));
            }
            Err((e, _)) => bail!("cannot produce: {e}"),
        }
    }
}

/// Records in the topic's only partition. A topic just created may take a moment to show.
fn partition_len(producer: &ThreadedProducer<Acks>, topic: &str) -> anyhow::Result<i64> {
    let client = producer.client();
    let deadline = Instant::now() + METADATA_TIMEOUT;
    loop {
        let md = client.fetch_metadata(Some(topic), METADATA_TIMEOUT)?;
        let partitions = md
            .topics()
            .iter()
            .find(|t| t.name() == topic && t.error().is_none())
            .map(|t| t.partitions().len());
        match partitions {
            Some(1) => break,
            Some(n) if n > 1 => bail!("topic {topic} has {n} partitions; this mode needs 1"),
            _ if Instant::now() > deadline => bail!("topic {topic} does not show up"),
            _ => std::thread::sleep(Duration::from_millis(200)),
        }
    }
    let (low, high) = client.fetch_watermarks(topic, 0, METADATA_TIMEOUT)?;
    Ok(high - low)
}

/// The consumed count over the polls.
#[derive(Debug, Default)]
struct Progress {
    /// The previous poll: seconds since spawn, records consumed.
    last: (f64, f64),
    /// Records per second between the last two polls.
    rate: f64,
    first_seen_s: Option<f64>,
    changed_s: f64,
}

impl Progress {
    /// Takes one poll; true once the count has reached `n`.
    fn observe(&mut self, at: f64, consumed: f64, n: f64) -> bool {
        if consumed > 0.0 && self.first_seen_s.is_none() {
            self.first_seen_s = Some(at);
        }
        if consumed != self.last.1 {
            self.changed_s = at;
        }
        if at > self.last.0 {
            self.rate = (consumed - self.last.1) / (at - self.last.0);
        }
        self.last = (at, consumed);
        consumed >= n
    }

    /// Polls come faster once the count is due to reach `n` before the next normal one.
    fn next_poll(&self, n: f64) -> Duration {
        let left = (n - self.last.1) / self.rate.max(1e-9);
        if left < 1.5 * POLL.as_secs_f64() {
            FINE_POLL
        } else {
            POLL
        }
    }

    fn stalled(&self, at: f64) -> bool {
        at - self.changed_s > STALL
    }
}

fn cpu_of(pid: u32) -> Option<f64> {
    procstat::sample(&pid.to_string()).map(|s| s.cpu_s)
}

/// Starts the server and polls it until it has consumed `n` records; stops it. Its CPU is
/// its whole lifetime's: it did nothing but start and read the backlog.
async fn read_back(spec: Spec, n: u64, broker_pid: Option<u32>) -> anyhow::Result<Readback> {
    let broker0 = broker_pid.and_then(cpu_of);
    let self0 = cpu_of(std::process::id());
    let machine0 = procstat::machine_busy_s();
    let mut server = tokio::task::spawn_blocking(move || spec.spawn()).await??;
    let pid = server.pid;
    eprintln!(
        "roomcast pid {pid}, admin {}, listening after {:.2} s",
        server.admin,
        server.listening_after.as_secs_f64()
    );
    let mut polled = poll_until_consumed(&mut server, n).await?;
    // Right after the poll that saw the last record, so that idle time after it does not
    // dilute the figures.
    let cpu_s = cpu_of(pid).context("cannot read the server's CPU")?;
    let threads = procstat::threads(pid);
    let broker_cpu_s = broker_pid.and_then(cpu_of).zip(broker0).map(|(b, a)| b - a);
    let self_cpu = cpu_of(std::process::id()).zip(self0).map(|(b, a)| b - a);
    let other_busy_s = procstat::machine_busy_s()
        .zip(machine0)
        .map(|(b, a)| b - a - cpu_s - broker_cpu_s.unwrap_or(0.0) - self_cpu.unwrap_or(0.0));
    let metrics = procstat::scrape(&server.metrics_url());
    if polled.ready_s.is_none() {
        polled.ready_s = wait_ready(&server).await;
    }
    let read = Readback {
        pid,
        listening_s: server.listening_after.as_secs_f64(),
        polled,
        cpu_s,
        threads,
        rss_kib: status_kib(pid, "VmRSS:"),
        hwm_kib: status_kib(pid, "VmHWM:"),
        metrics,
        broker_cpu_s,
        other_busy_s,
    };
    let _ = tokio::task::spawn_blocking(move || server.terminate()).await?;
    Ok(read)
}

/// Polls the consumed count (and readiness) every 100 ms, every 10 ms near the end, until it
/// reaches `n`.
async fn poll_until_consumed(server: &mut Server, n: u64) -> anyhow::Result<Polled> {
    let url = server.metrics_url();
    // Generous: a server ten times slower than expected still finishes.
    let limit = 120.0 + n as f64 / 2000.0;
    let mut progress = Progress::default();
    let mut ready_s = None;
    let mut startup_cpu_s = 0.0;
    loop {
        tokio::time::sleep(progress.next_poll(n as f64)).await;
        server.check_running()?;
        let consumed = procstat::scrape(&url)
            .and_then(|m| m.get(CONSUMED).copied())
            .unwrap_or(0.0);
        let at = server.spawned.elapsed().as_secs_f64();
        if consumed == 0.0 {
            startup_cpu_s = cpu_of(server.pid).unwrap_or(startup_cpu_s);
        }
        if ready_s.is_none() && server::http_status(server.admin, "/readyz") == Some(200) {
            ready_s = Some(at);
        }
        if progress.observe(at, consumed, n as f64) {
            return Ok(Polled {
                ready_s,
                first_seen_s: progress.first_seen_s,
                all_consumed_s: at,
                startup_cpu_s,
            });
        }
        if ready_s.is_some() && progress.stalled(at) {
            bail!(
                "the server is live after reading {consumed} of {n} records: its replay window \
                 ([resume] buffer_max_age_seconds) must reach back to the first record"
            );
        }
        if at > limit {
            bail!("the server consumed {consumed} of {n} records in {at:.0} s");
        }
    }
}

/// Seconds since spawn until /readyz answers 200, if within 30 s more.
async fn wait_ready(server: &Server) -> Option<f64> {
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if server::http_status(server.admin, "/readyz") == Some(200) {
            return Some(server.spawned.elapsed().as_secs_f64());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    None
}

/// CPU seconds per thread name (several threads share one: the runtime's workers, say),
/// largest first.
fn by_name(threads: &[ThreadCpu]) -> Vec<Value> {
    let mut sums: BTreeMap<&str, (usize, f64)> = BTreeMap::new();
    for t in threads {
        let e = sums.entry(t.comm.as_str()).or_default();
        e.0 += 1;
        e.1 += t.cpu_s;
    }
    let mut v: Vec<_> = sums.into_iter().collect();
    v.sort_by(|a, b| b.1 .1.total_cmp(&a.1 .1));
    v.into_iter()
        .map(|(name, (count, cpu))| json!({ "name": name, "threads": count, "cpu_s": round(cpu, 2) }))
        .collect()
}

/// The busiest threads one by one: which of the runtime's threads runs the consumer loop.
fn top_threads(threads: &[ThreadCpu]) -> Vec<Value> {
    let mut v: Vec<&ThreadCpu> = threads.iter().collect();
    v.sort_by(|a, b| b.cpu_s.total_cmp(&a.cpu_s));
    v.into_iter()
        .take(TOP_THREADS)
        .map(|t| json!({ "tid": t.tid, "name": t.comm, "cpu_s": round(t.cpu_s, 2) }))
        .collect()
}

fn report(args: &RouteBacklogArgs, plan: &Plan, produced: &Produced, r: &Readback) -> Value {
    let n = plan.records as f64;
    let wall = r.polled.all_consumed_s.max(1e-9);
    let metric = |k: &str| r.metrics.as_ref().and_then(|m| m.get(k)).map(|v| *v as u64);
    json!({
        "tool": "roomcast-load",
        "mode": "route-backlog",
        "label": args.output.label,
        "target": "roomcast",
        "topic": plan.topic,
        "records": plan.records,
        "payload_bytes": plan.payload_bytes,
        "dist": plan.dist.to_string(),
        "rooms": plan.rooms,
        "production": {
            "seconds": round(produced.seconds, 3),
            "per_s": (n / produced.seconds.max(1e-9)).round() as u64,
            "bytes": produced.bytes,
            "acks": "all",
            "linger_ms": 5,
        },
        "server": server_json(n, r),
        "replay_buffer": {
            "records": metric("roomcast_replay_buffer_records"),
            "bytes": metric("roomcast_replay_buffer_bytes"),
        },
        "broker_cpu_s": r.broker_cpu_s.map(|s| round(s, 2)),
        "other_busy_cores": r.other_busy_s.map(|s| round(s.max(0.0) / wall, 3)),
    })
}

fn server_json(n: f64, r: &Readback) -> Value {
    let p = &r.polled;
    let wall = p.all_consumed_s.max(1e-9);
    let live: f64 = r.threads.iter().map(|t| t.cpu_s).sum();
    let rdk: f64 = r
        .threads
        .iter()
        .filter(|t| t.comm.starts_with("rdk:"))
        .map(|t| t.cpu_s)
        .sum();
    let reading_cpu = (r.cpu_s - p.startup_cpu_s).max(1e-9);
    json!({
        "pid": r.pid,
        "listening_after_s": round(r.listening_s, 3),
        "ready_after_s": p.ready_s.map(|s| round(s, 2)),
        "first_record_seen_s": p.first_seen_s.map(|s| round(s, 2)),
        "all_consumed_after_s": round(p.all_consumed_s, 3),
        "records_per_s": (n / wall).round() as u64,
        "cpu_s": round(r.cpu_s, 3),
        "cpu_cores": round(r.cpu_s / wall, 3),
        "records_per_cpu_s": (n / r.cpu_s.max(1e-9)).round() as u64,
        "cpu_us_per_record": round(r.cpu_s * 1e6 / n, 3),
        // Start-up (config, runtime, Kafka metadata) left out: what a record costs.
        "startup_cpu_s": round(p.startup_cpu_s, 3),
        "records_per_cpu_s_reading": (n / reading_cpu).round() as u64,
        "rss_end_kib": r.rss_kib,
        "rss_peak_kib": r.hwm_kib,
        "threads_by_name": by_name(&r.threads),
        "top_threads": top_threads(&r.threads),
        "librdkafka_cpu_s": round(rdk, 2),
        "roomcast_threads_cpu_s": round(live - rdk, 2),
        // Threads that had exited by the sample: in the total, not in the split.
        "exited_threads_cpu_s": round((r.cpu_s - live).max(0.0), 2),
    })
}

fn print(r: &Value) {
    let s = &r["server"];
    let p = &r["production"];
    eprintln!(
        "== route backlog: {} records of {} bytes, {} ({} rooms) {}",
        r["records"],
        r["payload_bytes"],
        r["dist"].as_str().unwrap_or("-"),
        r["rooms"],
        r["label"].as_str().unwrap_or("")
    );
    eprintln!(
        "produced in {} s ({} records/s, acks=all)",
        p["seconds"], p["per_s"]
    );
    eprintln!(
        "server: listening {} s, first record seen {} s, all consumed {} s, ready {} s after spawn: {} records/s",
        s["listening_after_s"],
        s["first_record_seen_s"],
        s["all_consumed_after_s"],
        s["ready_after_s"],
        s["records_per_s"]
    );
    eprintln!(
        "server CPU: {} s ({} cores) = {} records per CPU second ({} µs each); {} without the {} s of start-up; RSS {} KiB (peak {} KiB)",
        s["cpu_s"],
        s["cpu_cores"],
        s["records_per_cpu_s"],
        s["cpu_us_per_record"],
        s["records_per_cpu_s_reading"],
        s["startup_cpu_s"],
        s["rss_end_kib"],
        s["rss_peak_kib"]
    );
    let names: Vec<String> = s["threads_by_name"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|t| {
            let name = t["name"].as_str().unwrap_or("?");
            format!("{name} x{} {} s", t["threads"], t["cpu_s"])
        })
        .collect();
    let top = &s["top_threads"][0];
    eprintln!(
        "threads: {}; librdkafka {} s, roomcast {} s, exited {} s; busiest: {} (tid {}) {} s",
        names.join(", "),
        s["librdkafka_cpu_s"],
        s["roomcast_threads_cpu_s"],
        s["exited_threads_cpu_s"],
        top["name"].as_str().unwrap_or("-"),
        top["tid"],
        top["cpu_s"]
    );
    eprintln!(
        "replay buffer: {} records, {} bytes; broker CPU {} s; other busy cores {}",
        r["replay_buffer"]["records"],
        r["replay_buffer"]["bytes"],
        r["broker_cpu_s"],
        r["other_busy_cores"]
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn follows_progress() {
        let mut p = Progress::default();
        assert!(!p.observe(0.1, 0.0, 1000.0));
        assert_eq!(p.next_poll(1000.0), POLL);
        assert!(!p.observe(0.2, 100.0, 1000.0));
        assert_eq!(p.first_seen_s, Some(0.2));
        // 1,000 records/s, 900 to go: not soon.
        assert_eq!(p.next_poll(1000.0), POLL);
        assert!(!p.observe(0.3, 900.0, 1000.0));
        // 8,000 records/s, 100 to go: within the next normal poll.
        assert_eq!(p.next_poll(1000.0), FINE_POLL);
        assert!(p.observe(0.31, 1000.0, 1000.0));
        assert!(!p.stalled(0.31 + STALL - 0.1));
        assert!(p.stalled(0.31 + STALL + 0.1));
    }

    #[test]
    fn sums_threads_by_name() {
        let t = |tid, comm: &str, cpu_s| ThreadCpu {
            tid,
            comm: comm.into(),
            cpu_s,
        };
        let threads = [
            t(1, "roomcast", 1.0),
            t(2, "rdk:main", 0.5),
            t(3, "roomcast", 2.0),
        ];
        let v = by_name(&threads);
        assert_eq!(v[0]["name"], "roomcast");
        assert_eq!(v[0]["threads"], 2);
        assert_eq!(v[0]["cpu_s"], 3.0);
        assert_eq!(top_threads(&threads)[0]["tid"], 3);
    }
}
