//! Memory of the replay buffer: a server with no connections, records produced until the
//! buffer's own accounting (`roomcast_replay_buffer_bytes`) reaches each target, and at each
//! one the process's RSS against the raw bytes of the records held (key + value: the window)
//! and against the bytes the buffer says it holds.
//!
//! The server must be configured so nothing leaves the buffer (a byte budget above the last
//! target, a long maximum age) and read a topic of its own, so it starts empty.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde_json::{json, Value};

use crate::cli::ReplayMemoryArgs;
use crate::dist::Dist;
use crate::procstat::{self, status_kib};
use crate::producer::{self, Counters, Schedule, Sink};
use crate::round;
use crate::server::Spec;

const MIB: f64 = 1024.0 * 1024.0;
/// Users the records are spread over (`user:u0` .. `user:u999`).
const ROOMS: usize = 1000;
const CONSUME_TIMEOUT: Duration = Duration::from_secs(180);

fn get(m: &Option<HashMap<String, f64>>, key: &str) -> Option<f64> {
    m.as_ref()?.get(key).copied()
}

pub fn parse_targets(text: &str) -> anyhow::Result<Vec<f64>> {
    let mut v = Vec::new();
    for t in text.split(',') {
        let x: f64 = t
            .trim()
            .parse()
            .with_context(|| format!("bad target {t:?} in --targets-mib"))?;
        if x.is_nan() || x <= 0.0 {
            bail!("targets must be > 0 MiB");
        }
        v.push(x);
    }
    v.sort_by(f64::total_cmp);
    Ok(v)
}

/// What the server held before the first record.
struct Baseline {
    rss_kib: u64,
    anon_kib: Option<u64>,
    consumed: f64,
}

/// Produces records in steps and waits until the server has read each step.
struct Filler<'a> {
    args: &'a ReplayMemoryArgs,
    metrics_url: String,
    /// Moved into the producing thread and back for each step.
    sink: Option<Sink>,
    counters: Arc<Counters>,
    produced: u64,
    consumed0: f64,
}

pub async fn run(args: &ReplayMemoryArgs, spec: Spec) -> anyhow::Result<Value> {
    let brokers = args.kafka.brokers("replay-memory")?;
    let targets = parse_targets(&args.targets_mib)?;
    let mut server = tokio::task::spawn_blocking(move || spec.start()).await??;
    let pid = server.pid;
    eprintln!(
        "roomcast pid {pid}, admin {}, ready after {:.2} s",
        server.admin,
        server.ready_after.as_secs_f64()
    );
    let metrics_url = server.metrics_url();
    let base = baseline(pid, &metrics_url).await?;
    let counters = Arc::new(Counters::new(ROOMS));
    let k = &args.kafka;
    let sink = producer::kafka_sink(brokers, &k.topic, &k.producer(), &counters)?;
    let mut filler = Filler {
        args,
        metrics_url,
        sink: Some(sink),
        counters,
        produced: 0,
        consumed0: base.consumed,
    };
    let started = Instant::now();
    let mut points = Vec::new();
    for target in &targets {
        filler.fill_to(target * MIB).await?;
        points.push(filler.sample(pid, *target, base.rss_kib).await);
    }
    drop(filler);
    let hwm = status_kib(pid, "VmHWM:");
    let _ = tokio::task::spawn_blocking(move || server.terminate()).await?;
    let marginal = marginal(&points);
    let report = json!({
        "tool": "roomcast-load",
        "mode": "replay-memory",
        "label": args.output.label,
        "target": "roomcast",
        "payload_bytes": args.payload_bytes,
        "users": ROOMS,
        "baseline_rss_kib": base.rss_kib,
        "baseline_rss_anon_kib": base.anon_kib,
        "peak_rss_kib": hwm,
        "seconds": round(started.elapsed().as_secs_f64(), 1),
        "points": points,
        "marginal": marginal,
    });
    print(&report);
    Ok(report)
}

/// The server's RSS and consumed count once it has settled, with its buffer empty.
async fn baseline(pid: u32, metrics_url: &str) -> anyhow::Result<Baseline> {
    tokio::time::sleep(Duration::from_secs(2)).await;
    let base = procstat::scrape(metrics_url);
    let rss_kib = status_kib(pid, "VmRSS:").context("cannot read the server's RSS")?;
    if get(&base, "roomcast_replay_buffer_records").unwrap_or(0.0) > 0.0 {
        bail!("the replay buffer is not empty at start: give the server a fresh topic");
    }
    eprintln!("baseline: RSS {rss_kib} KiB, buffer empty");
    Ok(Baseline {
        rss_kib,
        anon_kib: status_kib(pid, "RssAnon:"),
        consumed: get(&base, "roomcast_records_consumed_total").unwrap_or(0.0),
    })
}

impl Filler<'_> {
    /// Produces until the buffer accounts `goal` bytes, in steps sized by what a record
    /// has cost so far.
    async fn fill_to(&mut self, goal: f64) -> anyhow::Result<()> {
        loop {
            let m = procstat::scrape(&self.metrics_url);
            let bytes = get(&m, "roomcast_replay_buffer_bytes").unwrap_or(0.0);
            let held = get(&m, "roomcast_replay_buffer_records").unwrap_or(0.0);
            if bytes >= goal * 0.999 {
                return Ok(());
            }
            let cost = if held > 0.0 {
                bytes / held
            } else {
                self.args.payload_bytes as f64 + 300.0
            };
            self.produce(((goal - bytes) / cost).ceil().max(1.0) as u64)
                .await?;
            self.await_consumed().await?;
        }
    }

    /// Produces `records` as fast as the broker takes them.
    async fn produce(&mut self, records: u64) -> anyhow::Result<()> {
        let schedule = Schedule {
            dist: Dist::User,
            rooms: ROOMS,
            rate: 1e9,
            total: records,
            start: Instant::now(),
            start_us: crate::client::now_us(),
            payload_bytes: self.args.payload_bytes,
            stop: None,
        };
        let mut s: Sink = self.sink.take().context("the sink is gone")?;
        let c = self.counters.clone();
        let (s, outcome) = tokio::task::spawn_blocking(move || {
            let o = producer::run(&mut s, &schedule, &c);
            (s, o)
        })
        .await?;
        self.sink = Some(s);
        self.produced += outcome.attempted - outcome.refused;
        Ok(())
    }

    /// Waits until the server has read every record produced.
    async fn await_consumed(&self) -> anyhow::Result<()> {
        let deadline = Instant::now() + CONSUME_TIMEOUT;
        loop {
            let m = procstat::scrape(&self.metrics_url);
            let consumed = get(&m, "roomcast_records_consumed_total").unwrap_or(0.0);
            if consumed - self.consumed0 >= self.produced as f64 {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "the server read {} of {} records",
                    consumed - self.consumed0,
                    self.produced
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The buffer's and the process's memory at one target.
    async fn sample(&self, pid: u32, target: f64, rss0: u64) -> Value {
        // Let the consumer's queues empty and the allocator settle before sampling.
        tokio::time::sleep(Duration::from_secs(1)).await;
        let m = procstat::scrape(&self.metrics_url);
        let bytes = get(&m, "roomcast_replay_buffer_bytes").unwrap_or(0.0);
        let held = get(&m, "roomcast_replay_buffer_records").unwrap_or(0.0);
        let rss = status_kib(pid, "VmRSS:").unwrap_or(0);
        let raw = self.counters.bytes.load(Ordering::Relaxed) as f64;
        let growth = (rss as f64 - rss0 as f64) * 1024.0;
        eprintln!(
            "buffer {:.1} MiB accounted, {held} records, raw {:.1} MiB; RSS {rss} KiB (+{:.1} MiB)",
            bytes / MIB,
            raw / MIB,
            growth / MIB
        );
        json!({
            "target_mib": target,
            "records_produced": self.produced,
            "records_held": held,
            "evicted": self.produced as f64 - held,
            "raw_bytes": raw,
            "accounted_bytes": bytes,
            "accounted_per_record": round(bytes / held.max(1.0), 1),
            "raw_per_record": round(raw / held.max(1.0), 1),
            "accounted_per_raw": round(bytes / raw.max(1.0), 3),
            "rss_kib": rss,
            "rss_anon_kib": status_kib(pid, "RssAnon:"),
            "rss_growth_bytes": growth,
            "rss_growth_per_record": round(growth / held.max(1.0), 1),
            "rss_mib_per_raw_mib": round(growth / raw.max(1.0), 3),
            "rss_mib_per_accounted_mib": round(growth / bytes.max(1.0), 3),
        })
    }
}

/// Between consecutive targets: what one more MiB of window costs, start-up costs aside.
fn marginal(points: &[Value]) -> Vec<Value> {
    points
        .windows(2)
        .map(|w| {
            let d = |k: &str| w[1][k].as_f64().unwrap_or(0.0) - w[0][k].as_f64().unwrap_or(0.0);
            json!({
                "from_mib": w[0]["target_mib"],
                "to_mib": w[1]["target_mib"],
                "rss_mib_per_raw_mib": round(d("rss_growth_bytes") / d("raw_bytes").max(1.0), 3),
                "rss_mib_per_accounted_mib": round(d("rss_growth_bytes") / d("accounted_bytes").max(1.0), 3),
                "rss_per_record": round(d("rss_growth_bytes") / d("records_held").max(1.0), 1),
            })
        })
        .collect()
}

fn print(report: &Value) {
    eprintln!("== replay memory, {} byte values", report["payload_bytes"]);
    for p in report["points"].as_array().into_iter().flatten() {
        eprintln!(
            "{:>6} MiB accounted: RSS +{:.1} MiB = {} MiB per MiB of window, {} per accounted MiB; accounting {} x raw",
            p["target_mib"],
            p["rss_growth_bytes"].as_f64().unwrap_or(0.0) / MIB,
            p["rss_mib_per_raw_mib"],
            p["rss_mib_per_accounted_mib"],
            p["accounted_per_raw"]
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_targets() {
        assert_eq!(parse_targets("64, 16,32").unwrap(), vec![16.0, 32.0, 64.0]);
        assert!(parse_targets("16,x").is_err());
        assert!(parse_targets("0").is_err());
    }
}
