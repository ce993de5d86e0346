//! roomcast-load: opens N WebSocket connections to roomcast (or to roomcast-floor), produces M
//! records/s open-loop, and measures end-to-end latency, deliveries/s, losses and duplicates,
//! and the server's CPU, write syscalls and memory over the measured window.
//!
//! Four modes start the server themselves (`--server-bin`, `--server-config`): the resume
//! storm (`--resume-storm`, see storm.rs), which restarts it under its clients, the replay
//! buffer's memory (`--replay-memory`, see replaymem.rs), the routing rate from a backlog
//! (`--route-backlog`, see backlog.rs), and hostile clients watched by a bystander
//! (`--hostile`, see hostile.rs). The connect storm (`--connect-storm`, see
//! connstorm.rs) starts every handshake at once against a running server.
//!
//! Only loopback addresses are accepted as targets.
//!
//! The library holds the scenarios and the client-side framing (`frame`), which the floor and
//! the service's raw-wire tests share; the binaries only parse arguments and run.

mod backlog;
mod client;
mod connstorm;
mod dist;
pub mod frame;
mod hostile;
mod kafkapath;
mod procstat;
mod producer;
mod replaymem;
mod server;
mod storm;
pub mod tail;
mod wire;

use std::collections::HashMap;
use std::io::BufWriter;
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context};
use clap::Parser;
use serde_json::{json, Value};
use tokio::sync::{mpsc, watch};

use client::{ConnStats, Plan, Shared, Target};
use dist::Dist;
use procstat::ProcSample;
use producer::{Counters, Schedule, Sink};

#[derive(Parser, Debug)]
#[command(
    name = "roomcast-load",
    version,
    about = "Load generator for roomcast: latency, fan-out rate, memory per connection"
)]
pub struct Args {
    /// WebSocket URL of the server (loopback only).
    #[arg(long, default_value = "ws://127.0.0.1:8080/ws")]
    url: String,
    /// Connections to open.
    #[arg(long, short = 'n', default_value_t = 1000)]
    connections: usize,
    /// Rooms: shared, groups:N, user, zipf:S[:ROOMS] (ROOMS defaults to connections/10).
    #[arg(long, default_value = "groups:10")]
    dist: String,
    /// Records per second, produced open-loop.
    #[arg(long, default_value_t = 1000.0)]
    rate: f64,
    /// Measured seconds (after the warm-up).
    #[arg(long, default_value_t = 30.0)]
    duration: f64,
    /// Seconds of production before the measured window.
    #[arg(long, default_value_t = 3.0)]
    warmup: f64,
    /// At most this many seconds to wait for the last deliveries after production ends.
    #[arg(long, default_value_t = 10.0)]
    drain: f64,
    /// Size of each record's JSON value in bytes.
    #[arg(long, default_value_t = 200)]
    payload_bytes: usize,
    /// Kafka bootstrap servers (produce to Kafka).
    #[arg(long)]
    brokers: Option<String>,
    #[arg(long, default_value = "bench-tasks")]
    topic: String,
    /// Producer linger.ms.
    #[arg(long, default_value_t = 0)]
    linger_ms: u32,
    /// More librdkafka properties for the producer, KEY=VALUE (repeatable).
    #[arg(long = "producer-set", value_parser = key_value)]
    producer_set: Vec<(String, String)>,
    /// Only create the topic (with --partitions) and exit.
    #[arg(long)]
    create_topic: bool,
    #[arg(long, default_value_t = 1)]
    partitions: i32,
    /// roomcast-floor's control address: send records there instead of Kafka.
    #[arg(long)]
    floor_control: Option<String>,
    /// The server at --url is roomcast-floor reading the topic from Kafka (its --brokers):
    /// records go to Kafka as for roomcast, and the run is labelled `floor-kafka`.
    #[arg(long)]
    floor_kafka: bool,
    /// HS256 secret the server verifies tokens with.
    #[arg(long, default_value = "bench-secret-0123456789")]
    secret: String,
    #[arg(long, default_value_t = 3600)]
    token_ttl: u64,
    /// Server process to sample (CPU, write syscalls, RSS).
    #[arg(long)]
    server_pid: Option<u32>,
    /// Kafka broker process to sample (CPU only), for context.
    #[arg(long)]
    broker_pid: Option<u32>,
    /// The server's Prometheus endpoint, e.g. http://127.0.0.1:9090/metrics.
    #[arg(long)]
    metrics_url: Option<String>,
    /// Connections opened per second.
    #[arg(long, default_value_t = 2000.0)]
    connect_rate: f64,
    /// Handshakes in flight at once.
    #[arg(long, default_value_t = 200)]
    connect_concurrency: usize,
    /// Connections per client source address (127.0.0.1, 127.0.0.2, ...).
    #[arg(long, default_value_t = 8000)]
    per_source: usize,
    /// First client source address; the next ones count up from it. Client processes that run
    /// at the same time need ranges of their own: an address has only the kernel's ephemeral
    /// ports to bind from (28,232 here), shared by every process.
    #[arg(long, default_value = "127.0.0.1")]
    first_source: Ipv4Addr,
    /// This fraction of the connections (spread evenly: 0.01 is every 100th) stops reading
    /// right after its subscribe `ok` and keeps the socket open: slow consumers. Latency,
    /// deliveries, losses and duplicates are counted over the other connections only.
    #[arg(long, default_value_t = 0.0)]
    slow_fraction: f64,
    /// Slow connections write an unsolicited pong every this many seconds (0: never), still
    /// reading nothing. roomcast closes a peer it has not heard from for
    /// websocket.idle_timeout_seconds (60) with 1001, long before a silent one's queue is full.
    #[arg(long, default_value_t = 0.0)]
    slow_keepalive: f64,
    /// Connect storm: every connection starts its handshake at the same instant, with no
    /// pacing and no limit; reports the time from then to each welcome frame, the failures
    /// by reason, and the server's CPU and memory over the storm. Produces no records.
    #[arg(long)]
    connect_storm: bool,
    /// Connect storm: a handshake not welcomed this many seconds after the start has failed
    /// (it is not retried).
    #[arg(long, default_value_t = 30.0)]
    welcome_timeout: f64,
    /// Client runtime worker threads.
    #[arg(long, default_value_t = 1)]
    pub threads: usize,
    /// Per-connection read buffer (bytes).
    #[arg(long, default_value_t = 4096)]
    read_buffer: usize,
    /// Only open the connections, hold them, and report the server's memory.
    #[arg(long)]
    idle: bool,
    /// Seconds to hold idle connections before the second memory sample.
    #[arg(long, default_value_t = 10.0)]
    hold: f64,
    /// Seed for zipf room draws.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Free-form name carried into the JSON line.
    #[arg(long, default_value = "")]
    label: String,
    /// Also append the JSON line to this file.
    #[arg(long)]
    pub json_out: Option<PathBuf>,
    /// Resume storm: connect, restart the server under the clients while producing, then
    /// reconnect them all at once with ?resume=1 and check what each gets. Needs --server-bin,
    /// --server-config and --brokers.
    #[arg(long)]
    resume_storm: bool,
    /// Replay buffer memory: no connections; produce until the buffer holds each of
    /// --targets-mib and sample the server's RSS. Needs --server-bin, --server-config and
    /// --brokers; the server must read a fresh topic and keep everything (big budget and age).
    #[arg(long)]
    replay_memory: bool,
    /// Route backlog: no connections; produce --records records (rooms from --dist over
    /// --connections) to a fresh topic as fast as the broker takes them, then start the server
    /// and measure how fast, and at what CPU, it reads them all back. Needs --server-bin,
    /// --server-config and --brokers; the server's replay window
    /// ([resume] buffer_max_age_seconds) must reach back to the first record.
    #[arg(long)]
    route_backlog: bool,
    /// Route backlog: records to produce.
    #[arg(long, default_value_t = 1_000_000)]
    records: u64,
    /// The roomcast binary, run as `BIN serve --config CONFIG` (storm, replay-memory and
    /// route-backlog modes).
    #[arg(long)]
    server_bin: Option<PathBuf>,
    #[arg(long)]
    server_config: Option<PathBuf>,
    /// Where the servers' stderr goes (appended).
    #[arg(long, default_value = "roomcast-server.log")]
    server_log: PathBuf,
    /// Written with the pid of each server started.
    #[arg(long)]
    server_pidfile: Option<PathBuf>,
    /// Storm: seconds of live production before the SIGTERM.
    #[arg(long, default_value_t = 10.0)]
    live_seconds: f64,
    /// Storm: seconds between the old server's exit and the new one's start.
    #[arg(long, default_value_t = 0.0)]
    down_seconds: f64,
    /// Storm: production goes on at least this long after the reconnect starts.
    #[arg(long, default_value_t = 5.0)]
    after_seconds: f64,
    /// Storm: give up on clients not caught up this many seconds after the reconnect starts.
    #[arg(long, default_value_t = 180.0)]
    storm_deadline: f64,
    /// Storm: reconnects in flight at once (0: all at once).
    #[arg(long, default_value_t = 0)]
    reconnect_concurrency: usize,
    /// Replay memory: buffer sizes (MiB, as the server accounts them) to sample at.
    #[arg(long, default_value = "16,32,64,128")]
    targets_mib: String,
    /// Kafka path: no server and no connections; produce at --rate to --topic and consume it
    /// with roomcast's consumer settings in this process, and report each record's age on
    /// arrival (from its intended send time). Needs --brokers.
    #[arg(long)]
    kafka_path: bool,
    /// Fan-out runs through Kafka: also read the topic in this process with roomcast's consumer
    /// settings and report each record's age on arrival there, beside the end-to-end latency.
    #[arg(long)]
    kafka_probe: bool,
    /// Hostile clients: a bystander receives a record every 50 ms through Kafka and /healthz
    /// is probed every 50 ms while the attacks of --hostile-phases run one after the other;
    /// reports the bystander's worst gap, losses, the probe's worst answer and the server's
    /// RSS per phase. Needs --server-bin, --server-config and --brokers; the server's route
    /// for --topic must be the bench's (`user:{userId}`, `task:{taskId}`).
    #[arg(long)]
    hostile: bool,
    /// Hostile: the attacks, in order: filter, pre-upgrade, rooms, flood, burst.
    #[arg(long, default_value = "filter,pre-upgrade,rooms,flood,burst")]
    hostile_phases: String,
    /// Hostile: connection counts are the (50 filters, 2,000 silent, 200 slowloris,
    /// 300 unfinished heads, 100 x 5,000 rooms, 20 floods, 10,000 x 256 rooms) times this.
    #[arg(long, default_value_t = 1.0)]
    hostile_scale: f64,
    /// Hostile: seconds each attack lasts (pre-upgrade 5 s more), and of quiet before the
    /// first.
    #[arg(long, default_value_t = 8.0)]
    phase_seconds: f64,
    /// Hostile: seconds after the burst's connections close, and at the end, before RSS is
    /// read.
    #[arg(long, default_value_t = 10.0)]
    settle_seconds: f64,
    /// Hostile: a server that neither answers /healthz nor delivers to the bystander this
    /// long after a phase is killed and replaced for the phases left.
    #[arg(long, default_value_t = 20.0)]
    recover_seconds: f64,
}

/// Parses `KEY=VALUE`.
fn key_value(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .ok_or_else(|| format!("{s:?} is not KEY=VALUE"))
}

impl Args {
    /// The producer's librdkafka settings: linger.ms, then every --producer-set.
    fn producer(&self) -> Vec<(String, String)> {
        let mut settings = vec![("linger.ms".to_string(), self.linger_ms.to_string())];
        settings.extend(self.producer_set.iter().cloned());
        settings
    }

    fn server_spec(&self) -> anyhow::Result<server::Spec> {
        Ok(server::Spec {
            bin: self
                .server_bin
                .clone()
                .context("this mode needs --server-bin")?,
            config: self
                .server_config
                .clone()
                .context("this mode needs --server-config")?,
            log: self.server_log.clone(),
            pidfile: self.server_pidfile.clone(),
        })
    }
}

/// The worst latency per `SLOT_US` of intended send time, with the window's start (µs since
/// the epoch) to line the slots up with other logs, and how many slots were worse than 10 ms.
fn worst_per_slot(shared: &Shared) -> serde_json::Value {
    let worst = shared.worst_per_slot();
    json!({
        "slot_us": client::SLOT_US,
        "window_start_us": shared.window_start_us.load(Ordering::Relaxed),
        "over_10ms": client::stalls(&worst),
        "worst_us": worst,
    })
}

fn loopback(addr: &SocketAddr) -> anyhow::Result<()> {
    if !addr.ip().is_loopback() {
        bail!("{addr} is not a loopback address: this tool only targets 127.0.0.0/8");
    }
    Ok(())
}

fn ws_addr(url: &str) -> anyhow::Result<SocketAddr> {
    let rest = url
        .strip_prefix("ws://")
        .context("the URL must start with ws://")?;
    let host = rest.split(['/', '?']).next().unwrap_or(rest);
    let addr: SocketAddr = host
        .parse()
        .with_context(|| format!("{host:?} is not an IP:port"))?;
    loopback(&addr)?;
    Ok(addr)
}

fn token(secret: &str, sub: &str, ttl: u64) -> anyhow::Result<String> {
    let exp = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs() + ttl;
    let claims = json!({ "sub": sub, "exp": exp, "rooms": ["task:*"] });
    Ok(jsonwebtoken::encode(
        &jsonwebtoken::Header::default(),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
    )?)
}

struct Samples {
    server: Option<ProcSample>,
    client: Option<ProcSample>,
    broker: Option<ProcSample>,
    metrics: Option<HashMap<String, f64>>,
    tcp_mem_pages: Option<u64>,
    mem_available_kib: Option<u64>,
    machine_busy_s: Option<f64>,
    at: Instant,
}

fn take(args: &Args) -> Samples {
    let pid = |p: Option<u32>| p.and_then(|p| procstat::sample(&p.to_string()));
    Samples {
        server: pid(args.server_pid),
        client: procstat::sample("self"),
        broker: pid(args.broker_pid),
        metrics: args.metrics_url.as_deref().and_then(procstat::scrape),
        tcp_mem_pages: procstat::tcp_mem_pages(),
        mem_available_kib: procstat::mem_available_kib(),
        machine_busy_s: procstat::machine_busy_s(),
        at: Instant::now(),
    }
}

fn proc_delta(a: Option<ProcSample>, b: Option<ProcSample>, wall: f64, deliveries: u64) -> Value {
    match (a, b) {
        (Some(a), Some(b)) => {
            let cpu = b.cpu_s - a.cpu_s;
            let syscw = match (a.syscw, b.syscw) {
                (Some(x), Some(y)) => Some(y.saturating_sub(x)),
                _ => None,
            };
            json!({
                "cpu_s": round(cpu, 3),
                "cpu_cores": round(cpu / wall.max(1e-9), 3),
                "cpu_us_per_delivery": (deliveries > 0).then(|| round(cpu * 1e6 / deliveries as f64, 3)),
                "write_syscalls": syscw,
                "write_syscalls_per_delivery": syscw.filter(|_| deliveries > 0).map(|s| round(s as f64 / deliveries as f64, 3)),
                "rss_start_kib": a.rss_kib,
                "rss_end_kib": b.rss_kib,
            })
        }
        _ => Value::Null,
    }
}

/// Busy cores of the whole machine in the window, and the part no sampled process used
/// (other work on the machine: noise for this run).
fn machine(a: &Samples, b: &Samples, wall: f64) -> Value {
    let cpu = |x: Option<ProcSample>, y: Option<ProcSample>| match (x, y) {
        (Some(x), Some(y)) => y.cpu_s - x.cpu_s,
        _ => 0.0,
    };
    let (Some(m0), Some(m1)) = (a.machine_busy_s, b.machine_busy_s) else {
        return Value::Null;
    };
    let busy = m1 - m0;
    let ours = cpu(a.server, b.server) + cpu(a.client, b.client) + cpu(a.broker, b.broker);
    json!({
        "cores": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "busy_cores": round(busy / wall.max(1e-9), 3),
        "other_busy_cores": round((busy - ours).max(0.0) / wall.max(1e-9), 3),
        "loadavg": std::fs::read_to_string("/proc/loadavg").ok().and_then(|l| l.split_whitespace().next().map(String::from)),
    })
}

/// roomcast's own latency histogram (Kafka timestamp to queued for recipients) over the
/// window: the upper bounds of the buckets holding p50, p99 and p99.9.
fn server_side_latency(a: &Samples, b: &Samples) -> Value {
    let (Some(ma), Some(mb)) = (&a.metrics, &b.metrics) else {
        return Value::Null;
    };
    match procstat::histogram_quantiles(
        ma,
        mb,
        "roomcast_record_latency_seconds",
        &[0.5, 0.99, 0.999],
    ) {
        Some(q) => json!({ "p50": q[0], "p99": q[1], "p999": q[2] }),
        None => Value::Null,
    }
}

fn metric_delta(a: &Samples, b: &Samples, name: &str) -> Option<f64> {
    Some(b.metrics.as_ref()?.get(name)? - a.metrics.as_ref()?.get(name).copied().unwrap_or(0.0))
}

/// A report's microseconds as milliseconds with `decimals` places, or `-` when absent.
fn us_as_ms(v: &Value, decimals: usize) -> String {
    v.as_f64()
        .map(|u| format!("{:.*} ms", decimals, u / 1000.0))
        .unwrap_or("-".into())
}

fn round(x: f64, digits: i32) -> f64 {
    let m = 10f64.powi(digits);
    (x * m).round() / m
}

/// Runs the scenario `args` asks for; its results as one JSON object.
pub async fn run(args: &Args) -> anyhow::Result<Value> {
    if args.resume_storm {
        return storm::run(args, args.server_spec()?).await;
    }
    if args.replay_memory {
        return replaymem::run(args, args.server_spec()?).await;
    }
    if args.route_backlog {
        return backlog::run(args, args.server_spec()?).await;
    }
    if args.hostile {
        return hostile::run(args, args.server_spec()?).await;
    }
    if args.connect_storm {
        return connstorm::run(args).await;
    }
    if args.kafka_path {
        let dist = Dist::parse(&args.dist).map_err(anyhow::Error::msg)?;
        return kafkapath::run(args, dist).await;
    }
    if !(0.0..1.0).contains(&args.slow_fraction) {
        bail!("--slow-fraction must be at least 0 and below 1");
    }
    if !(0.0..=3600.0).contains(&args.slow_keepalive) {
        bail!("--slow-keepalive must be 0 (off) to 3600 seconds");
    }
    let dist = Dist::parse(&args.dist).map_err(anyhow::Error::msg)?;
    if args.create_topic {
        let brokers = args
            .brokers
            .as_deref()
            .context("--create-topic needs --brokers")?;
        producer::create_topic(brokers, &args.topic, args.partitions).await?;
        eprintln!(
            "topic {} ready ({} partitions)",
            args.topic, args.partitions
        );
        return Ok(json!({ "topic": args.topic, "created": true }));
    }
    let nofile = procstat::raise_nofile();
    if (nofile as usize) < args.connections + 64 {
        bail!(
            "{} connections need more open files than the limit of {nofile}",
            args.connections
        );
    }
    let n = args.connections;
    let target_kind = match (&args.floor_control, args.floor_kafka) {
        (Some(_), _) => "floor",
        (None, true) => "floor-kafka",
        (None, false) => "roomcast",
    };
    let addr = ws_addr(&args.url)?;
    let rooms = dist.rooms(n);
    let assignment = dist.assign(n, args.seed);
    let per_source = args.per_source.max(1);
    let sources =
        client::source_addresses(args.first_source, n, per_source).map_err(anyhow::Error::msg)?;
    let source_count = sources.len();
    let target = Arc::new(Target {
        url: args.url.clone(),
        addr,
        sources,
        per_source,
        read_buffer: args.read_buffer,
        rooms,
        slow_keepalive: (args.slow_keepalive > 0.0)
            .then(|| Duration::from_secs_f64(args.slow_keepalive)),
    });
    let mut plans = Vec::with_capacity(n);
    for (i, room) in assignment.iter().copied().enumerate() {
        plans.push(Plan {
            index: i,
            room,
            token: token(&args.secret, &Dist::user(i), args.token_ttl)?,
            subscribe: dist.subscribe_room(room),
            slow: client::is_slow(i, args.slow_fraction),
        });
    }

    let baseline = take(args);
    let shared = Arc::new(Shared::new(Duration::from_secs_f64(args.duration)));
    let (stop_tx, stop_rx) = watch::channel(false);
    let (ready_tx, mut ready_rx) = mpsc::unbounded_channel();
    eprintln!(
        "opening {n} connections to {} ({target_kind}, {} source addresses from {}, {}/s)",
        args.url, source_count, args.first_source, args.connect_rate
    );
    let connect_started = Instant::now();
    let spawner = client::spawn_all(
        plans,
        target,
        args.connect_rate,
        args.connect_concurrency,
        shared.clone(),
        ready_tx,
        stop_rx,
    );
    let connect_deadline = tokio::time::Instant::now()
        + Duration::from_secs_f64(n as f64 / args.connect_rate.max(1.0) + 60.0);
    let (mut open, mut failed) = (0usize, 0usize);
    let mut first_error: Option<String> = None;
    let mut connected = vec![false; n];
    let mut last_report = Instant::now();
    while open + failed < n {
        match tokio::time::timeout_at(connect_deadline, ready_rx.recv()).await {
            Ok(Some((i, Ok(())))) => {
                open += 1;
                connected[i] = true;
            }
            Ok(Some((i, Err(e)))) => {
                failed += 1;
                first_error.get_or_insert(format!("connection {i}: {e}"));
            }
            Ok(None) | Err(_) => break,
        }
        if last_report.elapsed() > Duration::from_secs(5) {
            eprintln!("  {open} open, {failed} failed");
            last_report = Instant::now();
        }
    }
    let connect_seconds = connect_started.elapsed().as_secs_f64();
    let unanswered = n - open - failed;
    eprintln!("{open} open, {failed} failed, {unanswered} unanswered in {connect_seconds:.1} s");
    if let Some(e) = &first_error {
        eprintln!("first failure: {e}");
    }
    let connections = json!({
        "requested": n,
        "open": open,
        "failed": failed + unanswered,
        "first_error": first_error,
        "connect_seconds": round(connect_seconds, 2),
    });

    if args.idle {
        tokio::time::sleep(Duration::from_secs_f64(args.hold)).await;
        let after = take(args);
        let _ = stop_tx.send(true);
        let handles = spawner.await?;
        let mut closed = 0;
        for h in handles {
            if h.await
                .map(|s| s.closed_by_server.is_some())
                .unwrap_or(false)
            {
                closed += 1;
            }
        }
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
        let report = json!({
            "tool": "roomcast-load",
            "mode": "idle",
            "label": args.label,
            "target": target_kind,
            "dist": dist.to_string(),
            "connections": connections,
            "closed_by_server_during_hold": closed,
            "hold_s": args.hold,
            "server_rss_before_kib": s_rss(&baseline),
            "server_rss_after_kib": s_rss(&after),
            "server_rss_per_connection_bytes": per_conn(s_rss(&baseline), s_rss(&after)),
            "client_rss_per_connection_bytes": per_conn(c_rss(&baseline), c_rss(&after)),
            "tcp_mem_before_kib": tcp(&baseline),
            "tcp_mem_after_kib": tcp(&after),
            "tcp_mem_per_connection_bytes_both_ends": per_conn(tcp(&baseline), tcp(&after)),
            "server_connections_metric": after.metrics.as_ref().and_then(|m| m.get("roomcast_connections")),
            "first_source": args.first_source.to_string(),
            "source_addresses": source_count,
            // The whole machine's, kernel socket memory and this client included.
            "mem_available_before_kib": baseline.mem_available_kib,
            "mem_available_after_kib": after.mem_available_kib,
            "mem_available_drop_per_connection_bytes": per_conn(after.mem_available_kib, baseline.mem_available_kib),
        });
        print_idle(&report);
        return Ok(report);
    }

    // The producer: schedule fixed now, window known in advance.
    let counters = Arc::new(Counters::new(rooms));
    let sink = match (&args.floor_control, &args.brokers) {
        (Some(ctl), _) => {
            let a: SocketAddr = ctl.parse().context("--floor-control must be IP:port")?;
            loopback(&a)?;
            let s = TcpStream::connect(a).context("cannot reach the floor's control port")?;
            s.set_nodelay(true)?;
            Sink::Floor(BufWriter::with_capacity(256 * 1024, s))
        }
        (None, Some(brokers)) => {
            producer::kafka_sink(brokers, &args.topic, &args.producer(), &counters)?
        }
        (None, None) => bail!("give --brokers (Kafka) or --floor-control (floor)"),
    };
    // Let the producer connect before the clock starts.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let total = (args.rate * (args.warmup + args.duration)).round() as u64;
    let start = Instant::now() + Duration::from_millis(200);
    let start_us = client::now_us() + 200_000;
    let window_start_us = start_us + (args.warmup * 1e6) as u64;
    let window_end_us = window_start_us + (args.duration * 1e6) as u64;
    shared
        .window_start_us
        .store(window_start_us, Ordering::Relaxed);
    shared.window_end_us.store(window_end_us, Ordering::Relaxed);
    let schedule = Schedule {
        dist: dist.clone(),
        rooms,
        rate: args.rate,
        total,
        start,
        start_us,
        payload_bytes: args.payload_bytes,
        stop: None,
    };
    eprintln!(
        "producing {total} records at {}/s to {} rooms ({}s warm-up, {}s measured)",
        args.rate, rooms, args.warmup, args.duration
    );
    let probe = match (&args.brokers, args.kafka_probe) {
        (Some(brokers), true) => Some(kafkapath::Probe::start(
            brokers,
            &args.topic,
            (window_start_us, window_end_us),
        )?),
        _ => None,
    };
    let producer_counters = counters.clone();
    let producer = std::thread::Builder::new()
        .name("producer".into())
        .spawn(move || {
            let mut sink = sink;
            producer::run(&mut sink, &schedule, &producer_counters)
        })?;

    let window_start = start + Duration::from_secs_f64(args.warmup);
    let window_end = window_start + Duration::from_secs_f64(args.duration);
    tokio::time::sleep_until(window_start.into()).await;
    let perf = args
        .server_pid
        .and_then(|pid| procstat::perf_start(pid, args.duration));
    let a = take(args);
    tokio::time::sleep_until(window_end.into()).await;
    let b = take(args);
    let syscalls = match perf {
        Some(child) => tokio::task::spawn_blocking(move || procstat::perf_finish(child)).await?,
        None => None,
    };
    let wall = b.at.duration_since(a.at).as_secs_f64();
    let outcome = tokio::task::spawn_blocking(move || producer.join())
        .await?
        .map_err(|_| anyhow::anyhow!("the producer thread panicked"))?;

    // Wait for stragglers: every expected delivery, or the drain limit.
    // Slow connections are expected to get nothing: the server may close them at any time.
    let mut members = vec![0u64; rooms];
    for (i, r) in assignment.iter().enumerate() {
        if connected[i] && !client::is_slow(i, args.slow_fraction) {
            members[*r] += 1;
        }
    }
    let expected_now: u64 = (0..rooms).map(|r| counters.delivered(r) * members[r]).sum();
    let produced: u64 = (0..rooms).map(|r| counters.delivered(r)).sum();
    let drain_deadline = Instant::now() + Duration::from_secs_f64(args.drain);
    let consumed_base = baseline
        .metrics
        .as_ref()
        .and_then(|m| m.get("roomcast_records_consumed_total").copied());
    let mut caught_up_after: Option<f64> = None;
    while Instant::now() < drain_deadline {
        if n > 0 && shared.received.load(Ordering::Relaxed) >= expected_now {
            break;
        }
        if n == 0 {
            // route-only: wait until the server has consumed every record produced.
            let m = args.metrics_url.as_deref().and_then(procstat::scrape);
            let consumed = m
                .as_ref()
                .and_then(|m| m.get("roomcast_records_consumed_total").copied());
            match (consumed_base, consumed) {
                (Some(c0), Some(c)) if c - c0 >= produced as f64 => {
                    caught_up_after = Some(start.elapsed().as_secs_f64());
                    break;
                }
                (Some(_), Some(_)) => {}
                _ => break,
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let after_drain = take(args);
    let kafka_probe = probe.map(kafkapath::Probe::finish);
    let _ = stop_tx.send(true);
    let handles = spawner.await?;
    let mut stats: Vec<ConnStats> = Vec::with_capacity(handles.len());
    for h in handles {
        if let Ok(s) = h.await {
            stats.push(s);
        }
    }

    // Tally against what each open connection should have got.
    let (mut expected, mut unique, mut dups, mut misrouted, mut ooo) = (0u64, 0u64, 0, 0, 0);
    let mut lost = 0u64;
    let mut closed_codes: HashMap<u16, u64> = HashMap::new();
    for s in stats.iter().filter(|s| s.connected && !s.slow) {
        let want = counters.delivered(s.room);
        expected += want;
        unique += s.unique;
        lost += want.saturating_sub(s.unique);
        dups += s.duplicates;
        misrouted += s.misrouted;
        ooo += s.out_of_order;
        if let Some(c) = s.closed_by_server {
            *closed_codes.entry(c).or_default() += 1;
        }
    }
    let hist = shared.histogram();
    let q = |p: f64| hist.value_at_quantile(p);
    let in_window = shared.received_in_window.load(Ordering::Relaxed);
    let received = shared.received.load(Ordering::Relaxed);
    let avg_frame = if received > 0 {
        shared.event_bytes.load(Ordering::Relaxed) as f64 / received as f64
    } else {
        0.0
    };
    let fanout = if produced > 0 {
        expected as f64 / produced as f64
    } else {
        0.0
    };
    let consumed_window = metric_delta(&a, &b, "roomcast_records_consumed_total");
    let slow = slow_report(args, &stats, &baseline, &after_drain);
    let report = json!({
        "tool": "roomcast-load",
        "mode": "fanout",
        "label": args.label,
        "target": target_kind,
        "dist": dist.to_string(),
        "rooms": rooms,
        "connections": connections,
        "rate": args.rate,
        "warmup_s": args.warmup,
        "duration_s": args.duration,
        "payload_bytes": args.payload_bytes,
        "avg_event_frame_bytes": round(avg_frame, 1),
        "records": {
            "attempted": outcome.attempted,
            "refused": outcome.refused,
            "failed_after_send": counters.errors.load(Ordering::Relaxed),
            "delivered_to_sink": produced,
            "max_send_delay_us": outcome.max_send_delay_us,
            "producer_seconds": round(outcome.elapsed.as_secs_f64(), 2),
        },
        "deliveries": {
            "expected": expected,
            "unique": unique,
            "lost": lost,
            "duplicates": dups,
            "misrouted": misrouted,
            "out_of_order": ooo,
            "fanout": round(fanout, 2),
            "received_in_window": in_window,
            "per_s": round(in_window as f64 / args.duration, 1),
            "expected_per_s": round(args.rate * fanout, 1),
            "closed_by_server": closed_codes,
        },
        "latency_us": {
            "count": hist.len(),
            "p50": q(0.50),
            "p90": q(0.90),
            "p99": q(0.99),
            "p999": q(0.999),
            "max": hist.max(),
            "mean": round(hist.mean(), 1),
        },
        "worst_per_slot": worst_per_slot(&shared),
        "kafka_probe": kafka_probe,
        "window_s": round(wall, 3),
        "server": proc_delta(a.server, b.server, wall, in_window),
        "server_rss_after_drain_kib": after_drain.server.map(|s| s.rss_kib),
        "server_send_syscalls": syscalls.as_ref().map(|c| {
            let total: u64 = c.values().sum();
            json!({
                "by_call": c,
                "total": total,
                "per_delivery": (in_window > 0).then(|| round(total as f64 / in_window as f64, 3)),
            })
        }),
        "client": proc_delta(a.client, b.client, wall, in_window),
        "broker": proc_delta(a.broker, b.broker, wall, in_window),
        "metrics": {
            "records_consumed": consumed_window,
            "records_consumed_per_s": consumed_window.map(|c| round(c / wall, 1)),
            "deliveries": metric_delta(&a, &b, "roomcast_deliveries_total"),
            "frames_shed": metric_delta(&baseline, &after_drain, "roomcast_frames_shed_total"),
            "slow_consumer_closes": metric_delta(&baseline, &after_drain, "roomcast_slow_consumer_closes_total"),
            "record_latency_bucket_le_s": server_side_latency(&a, &b),
            "all_consumed_after_s": caught_up_after.map(|s| round(s, 2)),
            "all_consumed_per_s": caught_up_after.map(|s| round(produced as f64 / s, 1)),
        },
        "machine": machine(&a, &b, wall),
        "other_frames": shared.other_frames.load(Ordering::Relaxed),
        "slow_consumers": slow,
    });
    print_fanout(&report);
    Ok(report)
}

/// The slow connections of a run (Null without any): how many, and how many the server
/// closed as slow consumers (roomcast's counter; the floor has none and never closes them).
fn slow_report(args: &Args, stats: &[ConnStats], before: &Samples, after: &Samples) -> Value {
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
        "planned": (0..args.connections).filter(|i| client::is_slow(*i, args.slow_fraction)).count(),
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
