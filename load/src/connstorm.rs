//! The connect storm: N clients, each with a token of its own, start their WebSocket
//! handshakes at the same instant (t0), with no pacing and no limit on handshakes in flight,
//! and each measures the time from t0 to its welcome frame. A client not welcomed within
//! `--welcome-timeout` has failed; nothing is retried. Around it: the server's CPU and RSS,
//! and the kernel's accept-queue counters.
//!
//! Every socket is made and bound to its source address before t0, so what starts at t0 is
//! the connect() itself. Welcomed clients stay connected (reading, so pings get their pongs)
//! until every client has an outcome: the server holds all of them at the end, as it would.

use std::collections::BTreeMap;
use std::io::ErrorKind;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use futures_util::StreamExt;
use serde_json::{json, Value};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio::time::{timeout, timeout_at};
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_tungstenite::WebSocketStream;

use crate::cli::ConnectStormArgs;
use crate::client::{self, HandshakeError, Plan};
use crate::dist::Dist;
use crate::procstat::{self, ProcSample};
use crate::round;
use crate::storm::{delta, gauge, quantiles, rss_peak_sampler};

/// Time allowed, after the last client's own limit, for outcomes still on their way.
const SETTLE: Duration = Duration::from_secs(10);
/// How long to wait for every socket to be bound before t0.
const ARM_TIMEOUT: Duration = Duration::from_secs(60);

/// What every client shares.
struct Storm {
    url: String,
    addr: SocketAddr,
    read_buffer: usize,
    limit: Duration,
    /// Sockets bound (or failed to bind): t0 waits for all of them.
    armed: AtomicUsize,
    other_frames: AtomicU64,
}

/// How one client's handshake ended.
#[derive(Debug)]
enum Outcome {
    /// Microseconds from t0 to the welcome frame.
    Welcomed(u64),
    /// A reason from a short fixed list (for counting), and the error itself.
    Failed { reason: String, detail: String },
}

/// What a client knows after the storm, once told to stop.
#[derive(Debug, Default)]
struct After {
    subscribe_failed: bool,
    /// Close code if the server ended the connection after the welcome (1006: no close frame).
    closed_by_server: Option<u16>,
}

type Ws = WebSocketStream<TcpStream>;

/// Counting classes for a failed handshake: refused, HTTP status, reset, ...
fn reason(e: &HandshakeError) -> String {
    let io_kind = |e: &std::io::Error| match e.kind() {
        ErrorKind::ConnectionRefused => "refused".to_string(),
        ErrorKind::ConnectionReset => "reset".to_string(),
        k => format!("{k:?}"),
    };
    match e {
        HandshakeError::Socket { error, .. } => format!("client socket: {:?}", error.kind()),
        HandshakeError::Connect(e) => io_kind(e),
        HandshakeError::Status(code) => format!("HTTP {code}"),
        HandshakeError::WebSocket(tungstenite::Error::Io(e)) => {
            format!("{} during upgrade", io_kind(e))
        }
        HandshakeError::WebSocket(_) | HandshakeError::Protocol(_) => {
            "upgrade protocol error".into()
        }
        HandshakeError::NoWelcome(_) => "no welcome".into(),
    }
}

fn failed(reason: &str, detail: impl ToString) -> Outcome {
    Outcome::Failed {
        reason: reason.to_string(),
        detail: detail.to_string(),
    }
}

/// Binds, waits for t0, then connects and upgrades within the limit; returns the stream and
/// the microseconds from t0 to its welcome.
async fn handshake_at_t0(
    plan: &Plan,
    source: IpAddr,
    storm: &Storm,
    go: &mut watch::Receiver<Option<Instant>>,
) -> Result<(Ws, u64), Outcome> {
    let sock = client::bound_socket(source);
    storm.armed.fetch_add(1, Ordering::Relaxed);
    let sock = sock.map_err(|e| failed(&reason(&e), e))?;
    let t0 = match go.wait_for(Option::is_some).await {
        Ok(t) => t.expect("waited for Some"),
        Err(_) => return Err(failed("not started", "the storm was called off")),
    };
    // Which step a timeout interrupted: a SYN the server never took, or a slow upgrade.
    let mut connected = false;
    let attempt = timeout_at((t0 + storm.limit).into(), async {
        let tcp = client::connect(sock, storm.addr).await?;
        connected = true;
        client::upgrade(&storm.url, tcp, &plan.token, storm.read_buffer).await
    })
    .await;
    match attempt {
        Ok(Ok((ws, _welcome))) => Ok((ws, t0.elapsed().as_micros() as u64)),
        Ok(Err(e)) => Err(failed(&reason(&e), e)),
        Err(_) if connected => Err(failed("timeout after connect", "no welcome in time")),
        Err(_) => Err(failed(
            "timeout connecting",
            "TCP connection not accepted in time",
        )),
    }
}

async fn client_task(
    plan: Plan,
    source: IpAddr,
    storm: Arc<Storm>,
    mut go: watch::Receiver<Option<Instant>>,
    done: mpsc::UnboundedSender<(usize, Outcome)>,
    stop: watch::Receiver<bool>,
) -> After {
    let mut ws = match handshake_at_t0(&plan, source, &storm, &mut go).await {
        Ok((ws, us)) => {
            let _ = done.send((plan.index, Outcome::Welcomed(us)));
            ws
        }
        Err(outcome) => {
            let _ = done.send((plan.index, outcome));
            return After::default();
        }
    };
    drop(done);
    let mut after = After::default();
    if let Some(room) = &plan.subscribe {
        // Bounded, so that a missing `ok` cannot keep the run from ending.
        let joined = timeout(
            storm.limit,
            client::subscribe(&mut ws, room, &storm.other_frames),
        );
        if !matches!(joined.await, Ok(Ok(()))) {
            after.subscribe_failed = true;
            return after;
        }
    }
    after.closed_by_server = hold(&mut ws, stop).await;
    after
}

/// Reads (and drops) whatever comes until told to stop; the close code if the server ends
/// the connection first.
async fn hold(ws: &mut Ws, mut stop: watch::Receiver<bool>) -> Option<u16> {
    loop {
        tokio::select! {
            biased;
            changed = stop.changed() => {
                if changed.is_err() || *stop.borrow() {
                    return None;
                }
            }
            m = ws.next() => match m {
                Some(Ok(Message::Close(f))) => {
                    return Some(f.map(|f| u16::from(f.code)).unwrap_or(1005));
                }
                Some(Ok(_)) => {}
                Some(Err(_)) | None => return Some(1006),
            },
        }
    }
}

/// The processes and counters sampled at t0 and when every client has an outcome.
struct Snapshot {
    server: Option<ProcSample>,
    client: Option<ProcSample>,
    broker: Option<ProcSample>,
    machine_busy_s: Option<f64>,
    listen: Option<BTreeMap<String, u64>>,
    metrics: Option<std::collections::HashMap<String, f64>>,
}

fn snapshot(args: &ConnectStormArgs) -> Snapshot {
    let pid = |p: Option<u32>| p.and_then(|p| procstat::sample(&p.to_string()));
    Snapshot {
        server: pid(args.served.server_pid),
        client: procstat::sample("self"),
        broker: pid(args.served.broker_pid),
        machine_busy_s: procstat::machine_busy_s(),
        listen: procstat::listen_counters(),
        metrics: args
            .served
            .metrics_url
            .as_deref()
            .and_then(procstat::scrape),
    }
}

fn plans(args: &ConnectStormArgs, dist: &Dist) -> anyhow::Result<Vec<Plan>> {
    let assignment = dist.assign(args.rooms.connections, args.rooms.seed);
    assignment
        .into_iter()
        .enumerate()
        .map(|(i, room)| {
            Ok(Plan {
                index: i,
                room,
                token: crate::token(&args.tokens.secret, &Dist::user(i), args.tokens.token_ttl)?,
                subscribe: dist.subscribe_room(room),
                slow: false,
            })
        })
        .collect()
}

/// Spawns one task per plan; each binds its socket and waits for t0.
fn spawn_clients(
    plans: Vec<Plan>,
    sources: &[IpAddr],
    per_source: usize,
    storm: &Arc<Storm>,
    go: &watch::Receiver<Option<Instant>>,
    done: &mpsc::UnboundedSender<(usize, Outcome)>,
    stop: &watch::Receiver<bool>,
) -> Vec<JoinHandle<After>> {
    plans
        .into_iter()
        .map(|plan| {
            let source = sources[(plan.index / per_source) % sources.len()];
            tokio::spawn(client_task(
                plan,
                source,
                storm.clone(),
                go.clone(),
                done.clone(),
                stop.clone(),
            ))
        })
        .collect()
}

/// Every outcome, in client order (None: none came before the deadline).
async fn collect(
    n: usize,
    t0: Instant,
    deadline: Instant,
    done: &mut mpsc::UnboundedReceiver<(usize, Outcome)>,
) -> Vec<Option<Outcome>> {
    let mut outcomes: Vec<Option<Outcome>> = (0..n).map(|_| None).collect();
    let (mut got, mut welcomed) = (0usize, 0usize);
    let mut last_report = Instant::now();
    while got < n {
        let next = tokio::time::timeout_at(deadline.into(), done.recv()).await;
        let Ok(Some((i, outcome))) = next else { break };
        if matches!(outcome, Outcome::Welcomed(_)) {
            welcomed += 1;
        }
        outcomes[i] = Some(outcome);
        got += 1;
        if last_report.elapsed() > Duration::from_secs(2) {
            eprintln!(
                "  {:.1} s: {welcomed} welcomed, {} failed",
                t0.elapsed().as_secs_f64(),
                got - welcomed
            );
            last_report = Instant::now();
        }
    }
    outcomes
}

pub async fn run(args: &ConnectStormArgs) -> anyhow::Result<Value> {
    let dist = Dist::parse(&args.rooms.dist).map_err(anyhow::Error::msg)?;
    let n = args.rooms.connections;
    if n == 0 {
        bail!("connect-storm needs connections (-n)");
    }
    if !args.welcome_timeout.is_finite() || args.welcome_timeout <= 0.0 {
        bail!("--welcome-timeout must be a number of seconds above 0");
    }
    let nofile = procstat::raise_nofile();
    if (nofile as usize) < n + 64 {
        bail!("{n} connections need more open files than the limit of {nofile}");
    }
    let addr = crate::ws_addr(&args.served.url)?;
    let per_source = args.connecting.per_source.max(1);
    let sources = client::source_addresses(args.connecting.first_source, n, per_source)
        .map_err(anyhow::Error::msg)?;
    let target_kind = if args.served.floor_control.is_some() {
        "floor"
    } else {
        "roomcast"
    };
    let limit = Duration::from_secs_f64(args.welcome_timeout);
    let storm = Arc::new(Storm {
        url: args.served.url.clone(),
        addr,
        read_buffer: args.connecting.read_buffer,
        limit,
        armed: AtomicUsize::new(0),
        other_frames: AtomicU64::new(0),
    });
    let (go_tx, go_rx) = watch::channel(None);
    let (stop_tx, stop_rx) = watch::channel(false);
    let (done_tx, mut done_rx) = mpsc::unbounded_channel();
    let handles = spawn_clients(
        plans(args, &dist)?,
        &sources,
        per_source,
        &storm,
        &go_rx,
        &done_tx,
        &stop_rx,
    );
    drop(done_tx);
    arm(&storm, n).await?;

    eprintln!(
        "connect storm: {n} clients to {} ({target_kind}, {} source addresses from {}), all at once",
        args.served.url,
        sources.len(),
        args.connecting.first_source
    );
    let before = snapshot(args);
    let peak_stop = Arc::new(AtomicBool::new(false));
    let peak = args
        .served
        .server_pid
        .map(|pid| rss_peak_sampler(pid, peak_stop.clone()));
    let t0 = Instant::now();
    go_tx.send(Some(t0)).context("every client is gone")?;
    let outcomes = collect(n, t0, t0 + limit + SETTLE, &mut done_rx).await;
    let wall = t0.elapsed().as_secs_f64();
    let after = snapshot(args);
    peak_stop.store(true, Ordering::Relaxed);
    let rss_peak = match peak {
        Some(p) => Some(p.await.unwrap_or(0)),
        None => None,
    };

    let _ = stop_tx.send(true);
    let mut afters = Vec::with_capacity(handles.len());
    for h in handles {
        afters.push(h.await.unwrap_or_default());
    }
    let mut report = report(args, &dist, target_kind, &outcomes, &afters, wall);
    add_costs(&mut report, &before, &after, rss_peak, wall);
    print(&report);
    Ok(report)
}

/// Waits until every client has bound its socket (or failed to), then a little more so that
/// all of them are parked on the start signal.
async fn arm(storm: &Storm, n: usize) -> anyhow::Result<()> {
    let deadline = Instant::now() + ARM_TIMEOUT;
    while storm.armed.load(Ordering::Relaxed) < n {
        if Instant::now() > deadline {
            bail!(
                "only {} of {n} sockets bound after {ARM_TIMEOUT:?}",
                storm.armed.load(Ordering::Relaxed)
            );
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    Ok(())
}

/// The clients' side of the report.
fn report(
    args: &ConnectStormArgs,
    dist: &Dist,
    target_kind: &str,
    outcomes: &[Option<Outcome>],
    afters: &[After],
    wall: f64,
) -> Value {
    let mut welcome: Vec<u64> = Vec::with_capacity(outcomes.len());
    let mut reasons: BTreeMap<String, u64> = BTreeMap::new();
    let mut examples: BTreeMap<String, String> = BTreeMap::new();
    for o in outcomes {
        match o {
            Some(Outcome::Welcomed(us)) => welcome.push(*us),
            Some(Outcome::Failed { reason, detail }) => {
                *reasons.entry(reason.clone()).or_default() += 1;
                examples
                    .entry(reason.clone())
                    .or_insert_with(|| detail.clone());
            }
            None => *reasons.entry("no outcome".into()).or_default() += 1,
        }
    }
    let n = outcomes.len();
    let welcomed = welcome.len();
    let last_welcome = welcome.iter().max().copied();
    let mut closes: BTreeMap<String, u64> = BTreeMap::new();
    for code in afters.iter().filter_map(|a| a.closed_by_server) {
        *closes.entry(code.to_string()).or_default() += 1;
    }
    json!({
        "tool": "roomcast-load",
        "mode": "connect-storm",
        "label": args.output.label,
        "target": target_kind,
        "dist": dist.to_string(),
        "clients": n,
        "welcomed": welcomed,
        "failed": n - welcomed,
        "failures": reasons,
        "failure_examples": examples,
        "welcome_timeout_s": args.welcome_timeout,
        "welcome_us": quantiles(&mut welcome),
        "all_welcomed_s": (welcomed == n).then(|| last_welcome.map(|us| round(us as f64 / 1e6, 3))).flatten(),
        "last_welcome_s": last_welcome.map(|us| round(us as f64 / 1e6, 3)),
        "storm_wall_s": round(wall, 3),
        "subscribe_failures": afters.iter().filter(|a| a.subscribe_failed).count(),
        "closed_by_server_after_welcome": closes,
        "first_source": args.connecting.first_source.to_string(),
    })
}

/// Adds the server's, client's, broker's and kernel's figures from t0 to the last outcome.
fn add_costs(r: &mut Value, a: &Snapshot, b: &Snapshot, rss_peak: Option<u64>, wall: f64) {
    let cpu = |x: Option<ProcSample>, y: Option<ProcSample>| Some(y?.cpu_s - x?.cpu_s);
    let cores = |c: Option<f64>| c.map(|c| round(c / wall.max(1e-9), 3));
    let server_cpu = cpu(a.server, b.server);
    let client_cpu = cpu(a.client, b.client);
    let broker_cpu = cpu(a.broker, b.broker);
    let kernel = match (&a.listen, &b.listen) {
        (Some(x), Some(y)) => json!(y
            .iter()
            .map(|(k, v)| (k.clone(), v.saturating_sub(x.get(k).copied().unwrap_or(0))))
            .collect::<BTreeMap<_, _>>()),
        _ => Value::Null,
    };
    let machine = match (a.machine_busy_s, b.machine_busy_s) {
        (Some(x), Some(y)) => {
            let ours =
                server_cpu.unwrap_or(0.0) + client_cpu.unwrap_or(0.0) + broker_cpu.unwrap_or(0.0);
            json!({
                "cores": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
                "busy_cores": round((y - x) / wall.max(1e-9), 3),
                "other_busy_cores": round(((y - x) - ours).max(0.0) / wall.max(1e-9), 3),
            })
        }
        _ => Value::Null,
    };
    r["server"] = json!({
            "cpu_s": server_cpu.map(|c| round(c, 3)),
            "cpu_cores": cores(server_cpu),
            "rss_t0_kib": a.server.map(|s| s.rss_kib),
            "rss_peak_kib": rss_peak.map(|p| p.max(b.server.map_or(0, |s| s.rss_kib))),
            "rss_end_kib": b.server.map(|s| s.rss_kib),
    });
    r["server_metrics"] = json!({
        "handshake_failures": delta(&a.metrics, &b.metrics, "roomcast_handshake_failures_total"),
        "connections_at_end": gauge(&b.metrics, "roomcast_connections"),
    });
    r["client"] = json!({
        "cpu_s": client_cpu.map(|c| round(c, 3)),
        "cpu_cores": cores(client_cpu),
        "rss_end_kib": b.client.map(|s| s.rss_kib),
    });
    r["broker"] = json!({ "cpu_cores": cores(broker_cpu) });
    r["kernel_tcp"] = kernel;
    r["machine"] = machine;
}

fn print(r: &Value) {
    let ms = |v: &Value| crate::us_as_ms(v, 1);
    let w = &r["welcome_us"];
    eprintln!("== connect storm ({}) {}", r["target"], r["label"]);
    eprintln!(
        "clients: {} welcomed of {}, {} failed {}; all welcomed after {} s (last welcome {} s)",
        r["welcomed"],
        r["clients"],
        r["failed"],
        r["failures"],
        r["all_welcomed_s"],
        r["last_welcome_s"]
    );
    eprintln!(
        "time to welcome: p50 {}  p90 {}  p99 {}  max {}",
        ms(&w["p50"]),
        ms(&w["p90"]),
        ms(&w["p99"]),
        ms(&w["max"])
    );
    let s = &r["server"];
    eprintln!(
        "server: {} CPU s ({} cores), RSS {} -> peak {} -> {} KiB; kernel {}",
        s["cpu_s"],
        s["cpu_cores"],
        s["rss_t0_kib"],
        s["rss_peak_kib"],
        s["rss_end_kib"],
        r["kernel_tcp"]
    );
}
