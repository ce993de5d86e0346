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

pub async fn run(args: &ReplayMemoryArgs, spec: Spec) -> anyhow::Result<Value> {
    let brokers = args.kafka.brokers("replay-memory")?;
    let targets = parse_targets(&args.targets_mib)?;
    let server = {
        let spec = spec.clone();
        tokio::task::spawn_blocking(move || spec.start()).await??
    };
    let pid = server.pid;
    eprintln!(
        "roomcast pid {pid}, admin {}, ready after {:.2} s",
        server.admin,
        server.ready_after.as_secs_f64()
    );
    let url = server.metrics_url();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let base = procstat::scrape(&url);
    let rss0 = status_kib(pid, "VmRSS:").context("cannot read the server's RSS")?;
    let anon0 = status_kib(pid, "RssAnon:");
    let consumed0 = get(&base, "roomcast_records_consumed_total").unwrap_or(0.0);
    if get(&base, "roomcast_replay_buffer_records").unwrap_or(0.0) > 0.0 {
        bail!("the replay buffer is not empty at start: give the server a fresh topic");
    }
    eprintln!("baseline: RSS {rss0} KiB, buffer empty");

    let counters = Arc::new(Counters::new(ROOMS));
    let mut sink = Some(producer::kafka_sink(
        brokers,
        &args.kafka.topic,
        &args.kafka.producer(),
        &counters,
    )?);
    let mut produced: u64 = 0;
    let mut points = Vec::new();
    let started = Instant::now();
    for target in &targets {
        let goal = target * MIB;
        loop {
            let m = procstat::scrape(&url);
            let bytes = get(&m, "roomcast_replay_buffer_bytes").unwrap_or(0.0);
            let held = get(&m, "roomcast_replay_buffer_records").unwrap_or(0.0);
            if bytes >= goal * 0.999 {
                break;
            }
            let cost = if held > 0.0 {
                bytes / held
            } else {
                args.payload_bytes as f64 + 300.0
            };
            let need = ((goal - bytes) / cost).ceil().max(1.0) as u64;
            let schedule = Schedule {
                dist: Dist::User,
                rooms: ROOMS,
                rate: 1e9,
                total: need,
                start: Instant::now(),
                start_us: crate::client::now_us(),
                payload_bytes: args.payload_bytes,
                stop: None,
            };
            let mut s: Sink = sink.take().context("the sink is gone")?;
            let c = counters.clone();
            let (s, outcome) = tokio::task::spawn_blocking(move || {
                let o = producer::run(&mut s, &schedule, &c);
                (s, o)
            })
            .await?;
            sink = Some(s);
            produced += outcome.attempted - outcome.refused;
            // Wait until the server has read all of it.
            let deadline = Instant::now() + CONSUME_TIMEOUT;
            loop {
                let m = procstat::scrape(&url);
                let consumed = get(&m, "roomcast_records_consumed_total").unwrap_or(0.0);
                if consumed - consumed0 >= produced as f64 {
                    break;
                }
                if Instant::now() > deadline {
                    bail!(
                        "the server read {} of {produced} records",
                        consumed - consumed0
                    );
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        // Let the consumer's queues empty and the allocator settle before sampling.
        tokio::time::sleep(Duration::from_secs(1)).await;
        let m = procstat::scrape(&url);
        let bytes = get(&m, "roomcast_replay_buffer_bytes").unwrap_or(0.0);
        let held = get(&m, "roomcast_replay_buffer_records").unwrap_or(0.0);
        let rss = status_kib(pid, "VmRSS:").unwrap_or(0);
        let anon = status_kib(pid, "RssAnon:");
        let raw = counters.bytes.load(Ordering::Relaxed) as f64;
        let growth = (rss as f64 - rss0 as f64) * 1024.0;
        eprintln!(
            "buffer {:.1} MiB accounted, {held} records, raw {:.1} MiB; RSS {rss} KiB (+{:.1} MiB)",
            bytes / MIB,
            raw / MIB,
            growth / MIB
        );
        points.push(json!({
            "target_mib": target,
            "records_produced": produced,
            "records_held": held,
            "evicted": produced as f64 - held,
            "raw_bytes": raw,
            "accounted_bytes": bytes,
            "accounted_per_record": round(bytes / held.max(1.0), 1),
            "raw_per_record": round(raw / held.max(1.0), 1),
            "accounted_per_raw": round(bytes / raw.max(1.0), 3),
            "rss_kib": rss,
            "rss_anon_kib": anon,
            "rss_growth_bytes": growth,
            "rss_growth_per_record": round(growth / held.max(1.0), 1),
            "rss_mib_per_raw_mib": round(growth / raw.max(1.0), 3),
            "rss_mib_per_accounted_mib": round(growth / bytes.max(1.0), 3),
        }));
    }
    drop(sink);
    let hwm = status_kib(pid, "VmHWM:");
    // Between consecutive targets: what one more MiB of window costs, start-up costs aside.
    let mut marginal = Vec::new();
    for w in points.windows(2) {
        let d = |k: &str| w[1][k].as_f64().unwrap_or(0.0) - w[0][k].as_f64().unwrap_or(0.0);
        marginal.push(json!({
            "from_mib": w[0]["target_mib"],
            "to_mib": w[1]["target_mib"],
            "rss_mib_per_raw_mib": round(d("rss_growth_bytes") / d("raw_bytes").max(1.0), 3),
            "rss_mib_per_accounted_mib": round(d("rss_growth_bytes") / d("accounted_bytes").max(1.0), 3),
            "rss_per_record": round(d("rss_growth_bytes") / d("records_held").max(1.0), 1),
        }));
    }
    let mut server = server;
    let _ = tokio::task::spawn_blocking(move || server.terminate()).await?;
    let report = json!({
        "tool": "roomcast-load",
        "mode": "replay-memory",
        "label": args.output.label,
        "target": "roomcast",
        "payload_bytes": args.payload_bytes,
        "users": ROOMS,
        "baseline_rss_kib": rss0,
        "baseline_rss_anon_kib": anon0,
        "peak_rss_kib": hwm,
        "seconds": round(started.elapsed().as_secs_f64(), 1),
        "points": points,
        "marginal": marginal,
    });
    eprintln!("== replay memory, {} byte values", args.payload_bytes);
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
    Ok(report)
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
