//! The connections of a fan-out or idle run: planned (room, token, slow or not), opened at
//! the paced rate against the running server, and counted as they report in.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::bail;
use serde_json::{json, Value};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use crate::cli::{Connecting, Rooms, Served, Tokens};
use crate::client::{self, ConnStats, Plan, Ready, Shared, Target};
use crate::dist::Dist;
use crate::samples::{self, Samples};
use crate::{procstat, round, token, ws_addr};

/// The flags a run's connections are made from.
pub struct Spec<'a> {
    pub rooms: &'a Rooms,
    pub tokens: &'a Tokens,
    pub connecting: &'a Connecting,
    pub served: &'a Served,
    pub slow_fraction: f64,
    pub slow_keepalive: f64,
    /// The measured window's length (zero when nothing is measured).
    pub window: Duration,
}

/// The connections once every one has reported (or the wait ran out), still receiving.
pub struct Opened {
    pub dist: Dist,
    pub rooms: usize,
    /// The room of each connection.
    pub assignment: Vec<usize>,
    pub connected: Vec<bool>,
    pub open: usize,
    pub source_count: usize,
    pub shared: Arc<Shared>,
    /// Taken before the first connection.
    pub baseline: Samples,
    /// The `connections` object of the JSON line.
    pub report: Value,
    stop: watch::Sender<bool>,
    /// None once stopped.
    spawner: Option<JoinHandle<Vec<JoinHandle<ConnStats>>>>,
}

impl Opened {
    /// Stops every connection; what each saw.
    pub async fn stop(&mut self) -> anyhow::Result<Vec<ConnStats>> {
        let _ = self.stop.send(true);
        let Some(spawner) = self.spawner.take() else {
            return Ok(Vec::new());
        };
        let mut stats = Vec::new();
        for h in spawner.await? {
            if let Ok(s) = h.await {
                stats.push(s);
            }
        }
        Ok(stats)
    }
}

/// Opens the connections `spec` describes and waits until each is open or failed.
pub async fn open(spec: &Spec<'_>) -> anyhow::Result<Opened> {
    let n = spec.rooms.connections;
    let nofile = procstat::raise_nofile();
    if (nofile as usize) < n + 64 {
        bail!("{n} connections need more open files than the limit of {nofile}");
    }
    let dist = Dist::parse(&spec.rooms.dist).map_err(anyhow::Error::msg)?;
    let rooms = dist.rooms(n);
    let assignment = dist.assign(n, spec.rooms.seed);
    let target = target(spec, rooms)?;
    let source_count = target.sources.len();
    let plans = plans(spec, &dist, &assignment)?;
    let baseline = samples::take(spec.served);
    let shared = Arc::new(Shared::new(spec.window));
    let (stop, stop_rx) = watch::channel(false);
    let (ready_tx, ready_rx) = mpsc::unbounded_channel();
    let c = spec.connecting;
    eprintln!(
        "opening {n} connections to {} ({}, {} source addresses from {}, {}/s)",
        spec.served.url,
        spec.served.target_kind(),
        source_count,
        c.first_source,
        c.connect_rate
    );
    let spawner = client::spawn_all(
        plans,
        Arc::new(target),
        c.connect_rate,
        c.connect_concurrency,
        shared.clone(),
        ready_tx,
        stop_rx,
    );
    let tally = await_ready(n, c.connect_rate, ready_rx).await;
    Ok(Opened {
        dist,
        rooms,
        assignment,
        open: tally.open,
        report: tally.report(n),
        connected: tally.connected,
        source_count,
        shared,
        baseline,
        stop,
        spawner: Some(spawner),
    })
}

fn target(spec: &Spec<'_>, rooms: usize) -> anyhow::Result<Target> {
    let c = spec.connecting;
    let per_source = c.per_source.max(1);
    let sources = client::source_addresses(c.first_source, spec.rooms.connections, per_source)
        .map_err(anyhow::Error::msg)?;
    Ok(Target {
        url: spec.served.url.clone(),
        addr: ws_addr(&spec.served.url)?,
        sources,
        per_source,
        read_buffer: c.read_buffer,
        rooms,
        slow_keepalive: (spec.slow_keepalive > 0.0)
            .then(|| Duration::from_secs_f64(spec.slow_keepalive)),
    })
}

fn plans(spec: &Spec<'_>, dist: &Dist, assignment: &[usize]) -> anyhow::Result<Vec<Plan>> {
    let mut plans = Vec::with_capacity(assignment.len());
    for (i, room) in assignment.iter().copied().enumerate() {
        plans.push(Plan {
            index: i,
            room,
            token: token(&spec.tokens.secret, &Dist::user(i), spec.tokens.token_ttl)?,
            subscribe: dist.subscribe_room(room),
            slow: client::is_slow(i, spec.slow_fraction),
        });
    }
    Ok(plans)
}

/// How the connection attempts ended.
struct Tally {
    open: usize,
    failed: usize,
    first_error: Option<String>,
    connected: Vec<bool>,
    seconds: f64,
}

impl Tally {
    fn report(&self, n: usize) -> Value {
        json!({
            "requested": n,
            "open": self.open,
            "failed": n - self.open,
            "first_error": self.first_error,
            "connect_seconds": round(self.seconds, 2),
        })
    }
}

/// Counts the attempts as they report, with progress every 5 s, until all have or the time
/// they could take at the connect rate (and a minute more) is over.
async fn await_ready(n: usize, rate: f64, mut ready: mpsc::UnboundedReceiver<Ready>) -> Tally {
    let started = Instant::now();
    let deadline =
        tokio::time::Instant::now() + Duration::from_secs_f64(n as f64 / rate.max(1.0) + 60.0);
    let mut t = Tally {
        open: 0,
        failed: 0,
        first_error: None,
        connected: vec![false; n],
        seconds: 0.0,
    };
    let mut last_report = Instant::now();
    while t.open + t.failed < n {
        match tokio::time::timeout_at(deadline, ready.recv()).await {
            Ok(Some((i, Ok(())))) => {
                t.open += 1;
                t.connected[i] = true;
            }
            Ok(Some((i, Err(e)))) => {
                t.failed += 1;
                t.first_error.get_or_insert(format!("connection {i}: {e}"));
            }
            Ok(None) | Err(_) => break,
        }
        if last_report.elapsed() > Duration::from_secs(5) {
            eprintln!("  {} open, {} failed", t.open, t.failed);
            last_report = Instant::now();
        }
    }
    t.seconds = started.elapsed().as_secs_f64();
    let unanswered = n - t.open - t.failed;
    eprintln!(
        "{} open, {} failed, {unanswered} unanswered in {:.1} s",
        t.open, t.failed, t.seconds
    );
    if let Some(e) = &t.first_error {
        eprintln!("first failure: {e}");
    }
    t
}
