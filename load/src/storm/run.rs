//! The storm's steps, in order: connect every client to a first server, produce, restart the
//! server under them, send every client back with `?resume=1`, wait until all have caught
//! up, drain, and hand what each client saw to `report.rs`.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::bail;
use serde_json::Value;
use tokio::sync::{mpsc, watch, Semaphore};
use tokio::task::JoinHandle;

use super::report::{self, Expected};
use super::{
    client_task, rss_peak_sampler, sources, start_server, stop_server, Board, FirstTarget, Outcome,
    Phase, Reconnect,
};
use crate::cli::ResumeStormArgs;
use crate::client::{self, Plan};
use crate::dist::Dist;
use crate::procstat::{self, ProcSample};
use crate::producer::{self, Counters, Schedule};
use crate::server::{Server, Spec};

/// Who is in which room.
pub(super) struct Layout {
    pub dist: Dist,
    pub n: usize,
    pub rooms: usize,
    pub assignment: Vec<usize>,
    pub per_source: usize,
}

/// The first connections once each has reported.
pub(super) struct Connected {
    pub open: usize,
    pub failed: usize,
    pub first_error: Option<String>,
    pub seconds: f64,
}

/// The first server's life under load.
pub(super) struct Live {
    pub a: Option<ProcSample>,
    pub b: Option<ProcSample>,
    pub wall: f64,
    pub metrics: Option<HashMap<String, f64>>,
}

/// The restart: how long the old server took to go, and the new one to come.
pub(super) struct Restart {
    pub exit_took: Duration,
    pub s_term: u64,
    pub s_start: u64,
    pub startup_cpu: Option<f64>,
    pub listening: f64,
    pub ready: f64,
}

/// Samples of the processes, the machine and the server's metrics at one edge of the storm.
pub(super) struct Edge {
    pub server: Option<ProcSample>,
    pub client: Option<ProcSample>,
    pub broker: Option<ProcSample>,
    pub machine: Option<f64>,
    pub net: Option<BTreeMap<String, u64>>,
    pub metrics: Option<HashMap<String, f64>>,
}

impl Edge {
    fn take(server: &Server, broker_pid: Option<u32>) -> Edge {
        let pid = |p: u32| procstat::sample(&p.to_string());
        Edge {
            metrics: procstat::scrape(&server.metrics_url()),
            server: pid(server.pid),
            client: procstat::sample("self"),
            broker: broker_pid.and_then(pid),
            machine: procstat::machine_busy_s(),
            net: procstat::listen_counters(),
        }
    }
}

/// The reconnect, from t0 until every client caught up or the deadline.
pub(super) struct Storm {
    pub t0: Instant,
    pub s0: u64,
    pub start: Edge,
    pub end: Edge,
    pub rss_peak: u64,
    pub all_caught: Option<Duration>,
    pub wall: Duration,
}

/// After production stopped and the clients drained.
pub(super) struct Finish {
    pub outcome: producer::Outcome,
    /// What each room should have got, fixed once production stopped.
    pub expected: Expected,
    pub metrics: Option<HashMap<String, f64>>,
    pub rss_end: Option<u64>,
    pub outs: Vec<Outcome>,
}

/// The open-ended producer and how to stop it.
struct Producing {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<producer::Outcome>,
}

type Spawner = JoinHandle<Vec<JoinHandle<Outcome>>>;

pub async fn run(args: &ResumeStormArgs, spec: Spec) -> anyhow::Result<Value> {
    let layout = layout(args)?;
    let brokers = args.kafka.brokers("resume-storm")?;
    let server_a = start_first(&spec).await?;
    let board = Arc::new(Board::default());
    let (phase_tx, phase_rx) = watch::channel(Phase::First);
    let (spawner, connected) = connect_first(args, &layout, &server_a, &board, phase_rx).await?;
    let counters = Arc::new(Counters::new(layout.rooms));
    let producing = produce(args, brokers, &layout, &counters).await?;
    let live = live(args, &server_a).await;
    let restarted = restart(args, &spec, server_a, &counters, &board, connected.open).await;
    let (restart, server_b) = match restarted {
        Ok(r) => r,
        Err(e) => {
            producing.stop.store(true, Ordering::Relaxed);
            let _ = phase_tx.send(Phase::Stop);
            return Err(e);
        }
    };
    let storm = storm(
        args, &layout, &server_b, &counters, &board, &phase_tx, &connected, &restart,
    )
    .await;
    let finish = finish(
        args, &layout, producing, &counters, &board, &storm, phase_tx, spawner, server_b,
    )
    .await?;
    let r = report::build(&report::Parts {
        args,
        layout: &layout,
        connected: &connected,
        live: &live,
        restart: &restart,
        storm: &storm,
        finish: &finish,
        counters: &counters,
        board: &board,
    });
    report::print(&r);
    Ok(r)
}

fn layout(args: &ResumeStormArgs) -> anyhow::Result<Layout> {
    let dist = Dist::parse(&args.rooms.dist).map_err(anyhow::Error::msg)?;
    let n = args.rooms.connections;
    if n == 0 {
        bail!("resume-storm needs connections");
    }
    let nofile = procstat::raise_nofile();
    if (nofile as usize) < n + 64 {
        bail!("{n} connections need more open files than the limit of {nofile}");
    }
    Ok(Layout {
        rooms: dist.rooms(n),
        assignment: dist.assign(n, args.rooms.seed),
        dist,
        n,
        per_source: args.connecting.per_source.max(1),
    })
}

async fn start_first(spec: &Spec) -> anyhow::Result<Server> {
    eprintln!("starting the first server");
    let server = start_server(spec).await?;
    eprintln!(
        "roomcast at {} (admin {}), pid {}, ready after {:.2} s",
        server.public,
        server.admin,
        server.pid,
        server.ready_after.as_secs_f64()
    );
    Ok(server)
}

/// Connects everyone, paced like the other scenarios, and waits until each has reported.
async fn connect_first(
    args: &ResumeStormArgs,
    layout: &Layout,
    server: &Server,
    board: &Arc<Board>,
    phase_rx: watch::Receiver<Phase>,
) -> anyhow::Result<(Spawner, Connected)> {
    let (n, rate) = (layout.n, args.connecting.connect_rate);
    let url = format!("ws://{}/ws", server.public);
    let first = Arc::new(FirstTarget {
        url: url.clone(),
        addr: server.public,
        sources: sources(0, n, layout.per_source),
        per_source: layout.per_source,
        read_buffer: args.connecting.read_buffer,
        rooms: layout.rooms as u64,
    });
    eprintln!(
        "opening {n} connections to {url} ({} rooms, {rate}/s)",
        layout.rooms
    );
    let started = Instant::now();
    let plans = plans(args, layout)?;
    let sem = Arc::new(Semaphore::new(args.connecting.connect_concurrency.max(1)));
    let (ready_tx, ready_rx) = mpsc::unbounded_channel();
    let board = board.clone();
    let spawner = tokio::spawn(async move {
        let mut handles = Vec::with_capacity(plans.len());
        let start = tokio::time::Instant::now();
        for (k, plan) in plans.into_iter().enumerate() {
            if rate > 0.0 {
                tokio::time::sleep_until(start + Duration::from_secs_f64(k as f64 / rate)).await;
            }
            let permit = sem.clone().acquire_owned().await.expect("never closed");
            handles.push(tokio::spawn(client_task(
                plan,
                first.clone(),
                board.clone(),
                ready_tx.clone(),
                phase_rx.clone(),
                permit,
            )));
        }
        handles
    });
    let connected = await_first(n, rate, ready_rx, started).await;
    if connected.open == 0 {
        bail!("no connection opened: {:?}", connected.first_error);
    }
    Ok((spawner, connected))
}

fn plans(args: &ResumeStormArgs, layout: &Layout) -> anyhow::Result<Vec<Plan>> {
    let t = &args.tokens;
    let mut plans = Vec::with_capacity(layout.n);
    for (i, room) in layout.assignment.iter().copied().enumerate() {
        plans.push(Plan {
            index: i,
            room,
            token: crate::token(&t.secret, &Dist::user(i), t.token_ttl)?,
            subscribe: layout.dist.subscribe_room(room),
            slow: false,
        });
    }
    Ok(plans)
}

async fn await_first(
    n: usize,
    rate: f64,
    mut ready: mpsc::UnboundedReceiver<client::Ready>,
    started: Instant,
) -> Connected {
    let deadline =
        tokio::time::Instant::now() + Duration::from_secs_f64(n as f64 / rate.max(1.0) + 60.0);
    let (mut open, mut failed) = (0usize, 0usize);
    let mut first_error = None;
    while open + failed < n {
        match tokio::time::timeout_at(deadline, ready.recv()).await {
            Ok(Some((_, Ok(())))) => open += 1,
            Ok(Some((i, Err(e)))) => {
                failed += 1;
                first_error.get_or_insert(format!("connection {i}: {e}"));
            }
            Ok(None) | Err(_) => break,
        }
    }
    let seconds = started.elapsed().as_secs_f64();
    eprintln!("{open} open, {failed} failed in {seconds:.1} s");
    Connected {
        open,
        failed,
        first_error,
        seconds,
    }
}

/// Produces, open-ended, from now until told to stop.
async fn produce(
    args: &ResumeStormArgs,
    brokers: &str,
    layout: &Layout,
    counters: &Arc<Counters>,
) -> anyhow::Result<Producing> {
    let k = &args.kafka;
    let mut sink = producer::kafka_sink(brokers, &k.topic, &k.producer(), counters)?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let stop = Arc::new(AtomicBool::new(false));
    let schedule = Schedule {
        dist: layout.dist.clone(),
        rooms: layout.rooms,
        rate: args.production.rate,
        total: u64::MAX,
        start: Instant::now() + Duration::from_millis(100),
        start_us: client::now_us() + 100_000,
        payload_bytes: args.production.payload_bytes,
        stop: Some(stop.clone()),
    };
    let counters = counters.clone();
    let thread = std::thread::Builder::new()
        .name("producer".into())
        .spawn(move || producer::run(&mut sink, &schedule, &counters))?;
    eprintln!(
        "producing {}/s to {} rooms; live for {} s, then SIGTERM",
        args.production.rate, layout.rooms, args.live_seconds
    );
    Ok(Producing { stop, thread })
}

/// The first server under load for --live-seconds.
async fn live(args: &ResumeStormArgs, server: &Server) -> Live {
    let a = procstat::sample(&server.pid.to_string());
    let start = Instant::now();
    tokio::time::sleep(Duration::from_secs_f64(args.live_seconds)).await;
    let b = procstat::sample(&server.pid.to_string());
    Live {
        a,
        b,
        wall: start.elapsed().as_secs_f64(),
        metrics: procstat::scrape(&server.metrics_url()),
    }
}

/// SIGTERM, wait for the exit, (pause), start the new one.
async fn restart(
    args: &ResumeStormArgs,
    spec: &Spec,
    server_a: Server,
    counters: &Counters,
    board: &Board,
    open: usize,
) -> anyhow::Result<(Restart, Server)> {
    let s_term = counters.attempted.load(Ordering::Acquire);
    eprintln!(
        "SIGTERM to pid {} ({} records produced so far)",
        server_a.pid, s_term
    );
    let exit_took = stop_server(server_a).await?;
    eprintln!(
        "exited after {:.2} s; {} of {open} clients saw their connection end",
        exit_took.as_secs_f64(),
        board.first_closed.load(Ordering::Relaxed)
    );
    tokio::time::sleep(Duration::from_secs_f64(args.down_seconds)).await;
    let s_start = counters.attempted.load(Ordering::Acquire);
    let server = start_server(spec)
        .await
        .map_err(|e| e.context("the second server did not start"))?;
    eprintln!(
        "new roomcast at {} (admin {}), pid {}: listening after {:.2} s, ready after {:.2} s",
        server.public,
        server.admin,
        server.pid,
        server.listening_after.as_secs_f64(),
        server.ready_after.as_secs_f64()
    );
    let restart = Restart {
        exit_took,
        s_term,
        s_start,
        startup_cpu: procstat::sample(&server.pid.to_string()).map(|s| s.cpu_s),
        listening: server.listening_after.as_secs_f64(),
        ready: server.ready_after.as_secs_f64(),
    };
    Ok((restart, server))
}

/// Sends every client back with ?resume=1 and waits until all have caught up, or the
/// deadline.
#[allow(clippy::too_many_arguments)]
async fn storm(
    args: &ResumeStormArgs,
    layout: &Layout,
    server: &Server,
    counters: &Counters,
    board: &Board,
    phase_tx: &watch::Sender<Phase>,
    connected: &Connected,
    restart: &Restart,
) -> Storm {
    let open = connected.open;
    let start = Edge::take(server, args.broker_pid);
    let peak_stop = Arc::new(AtomicBool::new(false));
    let peak = rss_peak_sampler(server.pid, peak_stop.clone());
    let t0 = Instant::now();
    let s0 = counters.attempted.load(Ordering::Acquire);
    let reconnect = reconnect(args, layout, server, counters, s0, t0);
    let pace = match args.reconnect_concurrency {
        0 => "all at once".to_string(),
        k => format!("at most {k} handshakes in flight"),
    };
    eprintln!(
        "reconnecting {open} clients with ?resume=1, {pace} ({} records produced since SIGTERM)",
        s0 - restart.s_term
    );
    let _ = phase_tx.send(Phase::Reconnect(reconnect));
    let deadline = t0 + Duration::from_secs_f64(args.storm_deadline);
    let all_caught = await_caught_up(board, open, t0, deadline).await;
    let wall = t0.elapsed();
    let end = Edge::take(server, args.broker_pid);
    peak_stop.store(true, Ordering::Relaxed);
    let rss_peak = peak
        .await
        .unwrap_or(0)
        .max(end.server.map_or(0, |s| s.rss_kib));
    match all_caught {
        Some(d) => eprintln!(
            "all {open} caught up {:.2} s after the reconnect began",
            d.as_secs_f64()
        ),
        None => eprintln!(
            "storm deadline: {} of {open} caught up in {:.1} s",
            board.caught.load(Ordering::Relaxed),
            wall.as_secs_f64()
        ),
    }
    Storm {
        t0,
        s0,
        start,
        end,
        rss_peak,
        all_caught,
        wall,
    }
}

fn reconnect(
    args: &ResumeStormArgs,
    layout: &Layout,
    server: &Server,
    counters: &Counters,
    s0: u64,
    t0: Instant,
) -> Arc<Reconnect> {
    let lost_below: Vec<u64> = counters.lost().into_iter().filter(|s| *s < s0).collect();
    Arc::new(Reconnect {
        url: format!("ws://{}/ws?resume=1", server.public),
        addr: server.public,
        sources: sources(1, layout.n, layout.per_source),
        per_source: layout.per_source,
        s0,
        lost: Arc::new(lost_below),
        t0,
        deadline: t0 + Duration::from_secs_f64(args.storm_deadline),
        limit: (args.reconnect_concurrency > 0)
            .then(|| Arc::new(Semaphore::new(args.reconnect_concurrency))),
    })
}

/// Watches the board until `open` clients have caught up (their time from t0) or the
/// deadline, with progress every 2 s.
async fn await_caught_up(
    board: &Board,
    open: usize,
    t0: Instant,
    deadline: Instant,
) -> Option<Duration> {
    let mut last_report = Instant::now();
    loop {
        let caught = board.caught.load(Ordering::Relaxed);
        if caught >= open {
            return Some(t0.elapsed());
        }
        if Instant::now() > deadline {
            return None;
        }
        if last_report.elapsed() > Duration::from_secs(2) {
            eprintln!(
                "  {:.1} s: {} welcomed, {} ok, {} caught up",
                t0.elapsed().as_secs_f64(),
                board.welcomed.load(Ordering::Relaxed),
                board.oks.load(Ordering::Relaxed),
                caught
            );
            last_report = Instant::now();
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Keeps producing a little after the storm (live after the seam), then stops, drains
/// until every client has what it should or the drain limit, and stops the clients and the
/// server.
#[allow(clippy::too_many_arguments)]
async fn finish(
    args: &ResumeStormArgs,
    layout: &Layout,
    producing: Producing,
    counters: &Counters,
    board: &Board,
    storm: &Storm,
    phase_tx: watch::Sender<Phase>,
    spawner: Spawner,
    server: Server,
) -> anyhow::Result<Finish> {
    let after = storm.t0 + Duration::from_secs_f64(args.after_seconds);
    if Instant::now() < after {
        tokio::time::sleep_until(after.into()).await;
    }
    producing.stop.store(true, Ordering::Relaxed);
    let thread = producing.thread;
    let outcome = tokio::task::spawn_blocking(move || thread.join())
        .await?
        .map_err(|_| anyhow::anyhow!("the producer thread panicked"))?;
    let expected = Expected::new(counters, layout.rooms);
    let if_all = expected.if_all(&layout.assignment);
    let deadline = Instant::now() + Duration::from_secs_f64(args.production.drain);
    while Instant::now() < deadline && board.unique.load(Ordering::Relaxed) < if_all {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let metrics = procstat::scrape(&server.metrics_url());
    let rss_end = procstat::sample(&server.pid.to_string()).map(|s| s.rss_kib);
    let _ = phase_tx.send(Phase::Stop);
    let mut outs = Vec::new();
    for h in spawner.await? {
        if let Ok(o) = h.await {
            outs.push(o);
        }
    }
    let _ = stop_server(server).await;
    Ok(Finish {
        outcome,
        expected,
        metrics,
        rss_end,
        outs,
    })
}
