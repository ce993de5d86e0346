//! The fan-out scenario (records produced open-loop to connections that receive them, against
//! roomcast or the floor) and the idle one (connections opened and held, nothing produced):
//! each a sequence of named steps over the connections `connections.rs` opens.

use std::collections::HashMap;
use std::io::BufWriter;
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde_json::{json, Value};

use crate::cli::{FanoutArgs, IdleArgs};
use crate::client::{self, ConnStats, Shared};
use crate::connections::{self, Opened};
use crate::kafkapath;
use crate::procstat;
use crate::producer::{self, Counters, Outcome, Schedule, Sink};
use crate::samples::{self, machine, metric_delta, proc_delta, server_side_latency, Samples};
use crate::{loopback, round, us_as_ms};

/// Opens the connections, holds them, and reports the server's memory per connection.
pub async fn idle(args: &IdleArgs) -> anyhow::Result<Value> {
    let mut opened = connections::open(&connections::Spec {
        rooms: &args.rooms,
        tokens: &args.tokens,
        connecting: &args.connecting,
        served: &args.served,
        slow_fraction: 0.0,
        slow_keepalive: 0.0,
        window: Duration::ZERO,
    })
    .await?;
    tokio::time::sleep(Duration::from_secs_f64(args.hold)).await;
    let after = samples::take(&args.served);
    let stats = opened.stop().await?;
    let closed = stats.iter().filter(|s| s.closed_by_server.is_some());
    let report = idle_report(args, &opened, &after, closed.count());
    print_idle(&report);
    Ok(report)
}

fn idle_report(args: &IdleArgs, o: &Opened, after: &Samples, closed: usize) -> Value {
    let open = o.open;
    let per_conn = |a: Option<u64>, b: Option<u64>| match (a, b) {
        (Some(a), Some(b)) if open > 0 => {
            Some(round((b as f64 - a as f64) * 1024.0 / open as f64, 0))
        }
        _ => None,
    };
    let s_rss = |s: &Samples| s.server.map(|p| p.rss_kib);
    let c_rss = |s: &Samples| s.client.map(|p| p.rss_kib);
    let page_kib = procstat::page_size() / 1024;
    let tcp = |s: &Samples| s.tcp_mem_pages.map(|p| p * page_kib);
    let baseline = &o.baseline;
    json!({
        "tool": "roomcast-load",
        "mode": "idle",
        "label": args.output.label,
        "target": args.served.target_kind(),
        "dist": o.dist.to_string(),
        "connections": o.report,
        "closed_by_server_during_hold": closed,
        "hold_s": args.hold,
        "server_rss_before_kib": s_rss(baseline),
        "server_rss_after_kib": s_rss(after),
        "server_rss_per_connection_bytes": per_conn(s_rss(baseline), s_rss(after)),
        "client_rss_per_connection_bytes": per_conn(c_rss(baseline), c_rss(after)),
        "tcp_mem_before_kib": tcp(baseline),
        "tcp_mem_after_kib": tcp(after),
        "tcp_mem_per_connection_bytes_both_ends": per_conn(tcp(baseline), tcp(after)),
        "server_connections_metric": after.metrics.as_ref().and_then(|m| m.get("roomcast_connections")),
        "first_source": args.connecting.first_source.to_string(),
        "source_addresses": o.source_count,
        // The whole machine's, kernel socket memory and this client included.
        "mem_available_before_kib": baseline.mem_available_kib,
        "mem_available_after_kib": after.mem_available_kib,
        "mem_available_drop_per_connection_bytes": per_conn(after.mem_available_kib, baseline.mem_available_kib),
    })
}

/// When production starts and where the measured window lies, fixed before the first record.
struct Clock {
    start: Instant,
    start_us: u64,
    window_start: Instant,
    window_end: Instant,
    window_us: (u64, u64),
    total: u64,
}

impl Clock {
    fn new(args: &FanoutArgs) -> Clock {
        let w = &args.window;
        let start = Instant::now() + Duration::from_millis(200);
        let start_us = client::now_us() + 200_000;
        let window_start_us = start_us + (w.warmup * 1e6) as u64;
        let window_start = start + Duration::from_secs_f64(w.warmup);
        Clock {
            start,
            start_us,
            window_start,
            window_end: window_start + Duration::from_secs_f64(w.duration),
            window_us: (window_start_us, window_start_us + (w.duration * 1e6) as u64),
            total: (args.production.rate * (w.warmup + w.duration)).round() as u64,
        }
    }
}

/// The samples at the window's edges, the send syscalls counted in it, its length.
struct Window {
    a: Samples,
    b: Samples,
    syscalls: Option<std::collections::BTreeMap<String, u64>>,
    wall: f64,
}

/// Produces at the rate to the open connections and measures what they receive.
pub async fn fanout(args: &FanoutArgs) -> anyhow::Result<Value> {
    check_slow(args)?;
    let mut opened = connections::open(&connections::Spec {
        rooms: &args.rooms,
        tokens: &args.tokens,
        connecting: &args.connecting,
        served: &args.served,
        slow_fraction: args.slow_fraction,
        slow_keepalive: args.slow_keepalive,
        window: Duration::from_secs_f64(args.window.duration),
    })
    .await?;
    let counters = Arc::new(Counters::new(opened.rooms));
    let sink = sink(args, &counters)?;
    // Let the producer connect before the clock starts.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let clock = Clock::new(args);
    let (shared, rooms) = (&opened.shared, opened.rooms);
    shared
        .window_start_us
        .store(clock.window_us.0, Ordering::Relaxed);
    shared
        .window_end_us
        .store(clock.window_us.1, Ordering::Relaxed);
    eprintln!(
        "producing {} records at {}/s to {} rooms ({}s warm-up, {}s measured)",
        clock.total, args.production.rate, rooms, args.window.warmup, args.window.duration
    );
    let probe = match (&args.kafka.brokers, args.kafka_probe) {
        (Some(brokers), true) => Some(kafkapath::Probe::start(
            brokers,
            &args.kafka.topic,
            clock.window_us,
        )?),
        _ => None,
    };
    let producer = spawn_producer(args, &opened, &clock, sink, &counters)?;
    let window = measure(args, &clock).await?;
    let outcome = tokio::task::spawn_blocking(move || producer.join())
        .await?
        .map_err(|_| anyhow::anyhow!("the producer thread panicked"))?;
    let caught_up_after = drain(args, &opened, &counters, clock.start).await;
    let after_drain = samples::take(&args.served);
    let kafka_probe = probe.map(kafkapath::Probe::finish);
    let run = Run {
        args,
        window,
        outcome,
        caught_up_after,
        after_drain,
        kafka_probe,
    };
    let stats = opened.stop().await?;
    let report = fanout_report(&run, &opened, &stats, &counters);
    print_fanout(&report);
    Ok(report)
}

fn check_slow(args: &FanoutArgs) -> anyhow::Result<()> {
    if !(0.0..1.0).contains(&args.slow_fraction) {
        bail!("--slow-fraction must be at least 0 and below 1");
    }
    if !(0.0..=3600.0).contains(&args.slow_keepalive) {
        bail!("--slow-keepalive must be 0 (off) to 3600 seconds");
    }
    Ok(())
}

/// Where the records go: the floor's control socket, or Kafka.
fn sink(args: &FanoutArgs, counters: &Arc<Counters>) -> anyhow::Result<Sink> {
    Ok(match (&args.served.floor_control, &args.kafka.brokers) {
        (Some(ctl), _) => {
            let a: SocketAddr = ctl.parse().context("--floor-control must be IP:port")?;
            loopback(&a)?;
            let s = TcpStream::connect(a).context("cannot reach the floor's control port")?;
            s.set_nodelay(true)?;
            Sink::Floor(BufWriter::with_capacity(256 * 1024, s))
        }
        (None, Some(brokers)) => {
            producer::kafka_sink(brokers, &args.kafka.topic, &args.kafka.producer(), counters)?
        }
        (None, None) => bail!("give --brokers (Kafka) or --floor-control (floor)"),
    })
}

fn spawn_producer(
    args: &FanoutArgs,
    opened: &Opened,
    clock: &Clock,
    mut sink: Sink,
    counters: &Arc<Counters>,
) -> anyhow::Result<std::thread::JoinHandle<Outcome>> {
    let schedule = Schedule {
        dist: opened.dist.clone(),
        rooms: opened.rooms,
        rate: args.production.rate,
        total: clock.total,
        start: clock.start,
        start_us: clock.start_us,
        payload_bytes: args.production.payload_bytes,
        stop: None,
    };
    let counters = counters.clone();
    Ok(std::thread::Builder::new()
        .name("producer".into())
        .spawn(move || producer::run(&mut sink, &schedule, &counters))?)
}

/// Samples at the window's edges, with the server's send syscalls counted in between.
async fn measure(args: &FanoutArgs, clock: &Clock) -> anyhow::Result<Window> {
    tokio::time::sleep_until(clock.window_start.into()).await;
    let perf = args
        .served
        .server_pid
        .and_then(|pid| procstat::perf_start(pid, args.window.duration));
    let a = samples::take(&args.served);
    tokio::time::sleep_until(clock.window_end.into()).await;
    let b = samples::take(&args.served);
    let syscalls = match perf {
        Some(child) => tokio::task::spawn_blocking(move || procstat::perf_finish(child)).await?,
        None => None,
    };
    let wall = b.at.duration_since(a.at).as_secs_f64();
    Ok(Window {
        a,
        b,
        syscalls,
        wall,
    })
}

/// Waits for stragglers: every expected delivery (with no connections, every record
/// consumed by the server), or the drain limit. Slow connections are expected to get
/// nothing: the server may close them at any time. Returns when the server had consumed
/// everything, in seconds from the start of production, if that was what it waited for.
async fn drain(
    args: &FanoutArgs,
    opened: &Opened,
    counters: &Counters,
    start: Instant,
) -> Option<f64> {
    let rooms = opened.rooms;
    let mut members = vec![0u64; rooms];
    for (i, r) in opened.assignment.iter().enumerate() {
        if opened.connected[i] && !client::is_slow(i, args.slow_fraction) {
            members[*r] += 1;
        }
    }
    let expected_now: u64 = (0..rooms).map(|r| counters.delivered(r) * members[r]).sum();
    let produced: u64 = (0..rooms).map(|r| counters.delivered(r)).sum();
    let deadline = Instant::now() + Duration::from_secs_f64(args.production.drain);
    let consumed_base = consumed(opened.baseline.metrics.as_ref());
    let n = args.rooms.connections;
    while Instant::now() < deadline {
        if n > 0 && opened.shared.received.load(Ordering::Relaxed) >= expected_now {
            return None;
        }
        if n == 0 {
            // route-only: wait until the server has consumed every record produced.
            let m = args
                .served
                .metrics_url
                .as_deref()
                .and_then(procstat::scrape);
            match (consumed_base, consumed(m.as_ref())) {
                (Some(c0), Some(c)) if c - c0 >= produced as f64 => {
                    return Some(start.elapsed().as_secs_f64());
                }
                (Some(_), Some(_)) => {}
                _ => return None,
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    None
}

fn consumed(metrics: Option<&HashMap<String, f64>>) -> Option<f64> {
    metrics.and_then(|m| m.get("roomcast_records_consumed_total").copied())
}

/// What the run measured, beside the connections.
struct Run<'a> {
    args: &'a FanoutArgs,
    window: Window,
    outcome: Outcome,
    caught_up_after: Option<f64>,
    after_drain: Samples,
    kafka_probe: Option<Value>,
}

/// Every open connection's count against what it should have got.
#[derive(Default)]
struct Tally {
    expected: u64,
    unique: u64,
    lost: u64,
    dups: u64,
    misrouted: u64,
    ooo: u64,
    closed_codes: HashMap<u16, u64>,
}

impl Tally {
    fn of(stats: &[ConnStats], counters: &Counters) -> Tally {
        let mut t = Tally::default();
        for s in stats.iter().filter(|s| s.connected && !s.slow) {
            let want = counters.delivered(s.room);
            t.expected += want;
            t.unique += s.unique;
            t.lost += want.saturating_sub(s.unique);
            t.dups += s.duplicates;
            t.misrouted += s.misrouted;
            t.ooo += s.out_of_order;
            if let Some(c) = s.closed_by_server {
                *t.closed_codes.entry(c).or_default() += 1;
            }
        }
        t
    }
}

fn fanout_report(run: &Run<'_>, o: &Opened, stats: &[ConnStats], counters: &Counters) -> Value {
    let args = run.args;
    let produced: u64 = (0..o.rooms).map(|r| counters.delivered(r)).sum();
    let tally = Tally::of(stats, counters);
    let fanout = if produced > 0 {
        tally.expected as f64 / produced as f64
    } else {
        0.0
    };
    let received = o.shared.received.load(Ordering::Relaxed);
    let avg_frame = if received > 0 {
        o.shared.event_bytes.load(Ordering::Relaxed) as f64 / received as f64
    } else {
        0.0
    };
    let (w, in_window) = (
        &run.window,
        o.shared.received_in_window.load(Ordering::Relaxed),
    );
    json!({
        "tool": "roomcast-load",
        "mode": "fanout",
        "label": args.output.label,
        "target": args.served.target_kind(),
        "dist": o.dist.to_string(),
        "rooms": o.rooms,
        "connections": o.report,
        "rate": args.production.rate,
        "warmup_s": args.window.warmup,
        "duration_s": args.window.duration,
        "payload_bytes": args.production.payload_bytes,
        "avg_event_frame_bytes": round(avg_frame, 1),
        "records": records_report(run, counters, produced),
        "deliveries": deliveries_report(args, &tally, fanout, in_window),
        "latency_us": latency_report(&o.shared),
        "worst_per_slot": worst_per_slot(&o.shared),
        "kafka_probe": run.kafka_probe,
        "window_s": round(w.wall, 3),
        "server": proc_delta(w.a.server, w.b.server, w.wall, in_window),
        "server_rss_after_drain_kib": run.after_drain.server.map(|s| s.rss_kib),
        "server_send_syscalls": syscalls_report(w, in_window),
        "client": proc_delta(w.a.client, w.b.client, w.wall, in_window),
        "broker": proc_delta(w.a.broker, w.b.broker, w.wall, in_window),
        "metrics": metrics_report(run, &o.baseline, produced),
        "machine": machine(&w.a, &w.b, w.wall),
        "other_frames": o.shared.other_frames.load(Ordering::Relaxed),
        "slow_consumers": slow_report(args, stats, &o.baseline, &run.after_drain),
    })
}

fn records_report(run: &Run<'_>, counters: &Counters, produced: u64) -> Value {
    let o = &run.outcome;
    json!({
        "attempted": o.attempted,
        "refused": o.refused,
        "failed_after_send": counters.errors.load(Ordering::Relaxed),
        "delivered_to_sink": produced,
        "max_send_delay_us": o.max_send_delay_us,
        "producer_seconds": round(o.elapsed.as_secs_f64(), 2),
    })
}

fn deliveries_report(args: &FanoutArgs, t: &Tally, fanout: f64, in_window: u64) -> Value {
    json!({
        "expected": t.expected,
        "unique": t.unique,
        "lost": t.lost,
        "duplicates": t.dups,
        "misrouted": t.misrouted,
        "out_of_order": t.ooo,
        "fanout": round(fanout, 2),
        "received_in_window": in_window,
        "per_s": round(in_window as f64 / args.window.duration, 1),
        "expected_per_s": round(args.production.rate * fanout, 1),
        "closed_by_server": t.closed_codes,
    })
}

fn latency_report(shared: &Shared) -> Value {
    let hist = shared.histogram();
    let q = |p: f64| hist.value_at_quantile(p);
    json!({
        "count": hist.len(),
        "p50": q(0.50),
        "p90": q(0.90),
        "p99": q(0.99),
        "p999": q(0.999),
        "max": hist.max(),
        "mean": round(hist.mean(), 1),
    })
}

fn syscalls_report(w: &Window, in_window: u64) -> Option<Value> {
    w.syscalls.as_ref().map(|c| {
        let total: u64 = c.values().sum();
        json!({
            "by_call": c,
            "total": total,
            "per_delivery": (in_window > 0).then(|| round(total as f64 / in_window as f64, 3)),
        })
    })
}

fn metrics_report(run: &Run<'_>, baseline: &Samples, produced: u64) -> Value {
    let (a, b, wall) = (&run.window.a, &run.window.b, run.window.wall);
    let after = &run.after_drain;
    let consumed_window = metric_delta(a, b, "roomcast_records_consumed_total");
    json!({
        "records_consumed": consumed_window,
        "records_consumed_per_s": consumed_window.map(|c| round(c / wall, 1)),
        "deliveries": metric_delta(a, b, "roomcast_deliveries_total"),
        "frames_shed": metric_delta(baseline, after, "roomcast_frames_shed_total"),
        "slow_consumer_closes": metric_delta(baseline, after, "roomcast_slow_consumer_closes_total"),
        "record_latency_bucket_le_s": server_side_latency(a, b),
        "all_consumed_after_s": run.caught_up_after.map(|s| round(s, 2)),
        "all_consumed_per_s": run.caught_up_after.map(|s| round(produced as f64 / s, 1)),
    })
}

/// The worst latency per `SLOT_US` of intended send time, with the window's start (µs since
/// the epoch) to line the slots up with other logs, and how many slots were worse than 10 ms.
fn worst_per_slot(shared: &Shared) -> Value {
    let worst = shared.worst_per_slot();
    json!({
        "slot_us": client::SLOT_US,
        "window_start_us": shared.window_start_us.load(Ordering::Relaxed),
        "over_10ms": client::stalls(&worst),
        "worst_us": worst,
    })
}

/// The slow connections of a run (Null without any): how many, and how many the server
/// closed as slow consumers (roomcast's counter; the floor has none and never closes them).
fn slow_report(args: &FanoutArgs, stats: &[ConnStats], before: &Samples, after: &Samples) -> Value {
    if args.slow_fraction <= 0.0 {
        return Value::Null;
    }
    let connected = |slow: bool| {
        stats
            .iter()
            .filter(|s| s.connected && s.slow == slow)
            .count()
    };
    json!({
        "fraction": args.slow_fraction,
        "keepalive_s": args.slow_keepalive,
        "planned": (0..args.rooms.connections).filter(|i| client::is_slow(*i, args.slow_fraction)).count(),
        "slow_connected": connected(true),
        "fast_connected": connected(false),
        "server_slow_consumer_closes": metric_delta(before, after, "roomcast_slow_consumer_closes_total"),
        "server_frames_shed": metric_delta(before, after, "roomcast_frames_shed_total"),
    })
}

fn print_idle(r: &Value) {
    let c = &r["connections"];
    eprintln!("== idle ({}) {}", r["target"], r["label"]);
    eprintln!(
        "connections: {} open of {} ({} failed) in {} s",
        c["open"], c["requested"], c["failed"], c["connect_seconds"]
    );
    eprintln!(
        "server RSS: {} KiB before, {} KiB after {} s: {} bytes per connection",
        r["server_rss_before_kib"],
        r["server_rss_after_kib"],
        r["hold_s"],
        r["server_rss_per_connection_bytes"]
    );
    eprintln!(
        "kernel TCP memory (both ends): {} bytes per connection; client RSS: {} bytes per connection",
        r["tcp_mem_per_connection_bytes_both_ends"], r["client_rss_per_connection_bytes"]
    );
    eprintln!(
        "machine MemAvailable: {} KiB before, {} KiB after: {} bytes per connection (both ends)",
        r["mem_available_before_kib"],
        r["mem_available_after_kib"],
        r["mem_available_drop_per_connection_bytes"]
    );
}

fn print_fanout(r: &Value) {
    let c = &r["connections"];
    let d = &r["deliveries"];
    let l = &r["latency_us"];
    let ms = |v: &Value| us_as_ms(v, 2);
    eprintln!("== {} ({}) {}", r["dist"], r["target"], r["label"]);
    eprintln!(
        "connections: {} open of {} ({} failed); {} rooms; {} records/s of {} bytes; fan-out {}",
        c["open"],
        c["requested"],
        c["failed"],
        r["rooms"],
        r["rate"],
        r["payload_bytes"],
        d["fanout"]
    );
    eprintln!(
        "latency: p50 {}  p90 {}  p99 {}  p99.9 {}  max {}  ({} samples)",
        ms(&l["p50"]),
        ms(&l["p90"]),
        ms(&l["p99"]),
        ms(&l["p999"]),
        ms(&l["max"]),
        l["count"]
    );
    eprintln!(
        "deliveries: {}/s (expected {}/s); lost {} of {}; duplicates {}; misrouted {}; out of order {}; closed by server {}",
        d["per_s"], d["expected_per_s"], d["lost"], d["expected"], d["duplicates"], d["misrouted"], d["out_of_order"], d["closed_by_server"]
    );
    let s = &r["server"];
    if !s.is_null() {
        eprintln!(
            "server: {} cores, {} µs CPU and {} send/write syscalls per delivery, RSS {} KiB",
            s["cpu_cores"],
            s["cpu_us_per_delivery"],
            r["server_send_syscalls"]["per_delivery"],
            s["rss_end_kib"]
        );
    }
    eprintln!(
        "client: {} cores; broker: {} cores; producer worst send delay {} µs",
        r["client"]["cpu_cores"], r["broker"]["cpu_cores"], r["records"]["max_send_delay_us"]
    );
    let slow = &r["slow_consumers"];
    if !slow.is_null() {
        eprintln!(
            "slow consumers: {} connections stopped reading after their ok (left out of the \
             figures above, which are over the {} fast ones); the server closed {} as slow \
             consumers (4008)",
            slow["slow_connected"], slow["fast_connected"], slow["server_slow_consumer_closes"]
        );
    }
}
