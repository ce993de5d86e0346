//! The storm's clients: each binds its socket before the start, then at the start connects,
//! upgrades and joins its room with no pacing and no limit on handshakes in flight; holds the
//! connection (answering pings) until told to close, and then sends a close frame and goes,
//! as a closing browser tab does.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::bail;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio::time::timeout_at;

use super::table::Reached;
use crate::client;
use crate::wire::{self, Frame};

/// How long to wait for every socket to be bound before the start.
const ARM_TIMEOUT: Duration = Duration::from_secs(60);
/// Close code of a client that goes away.
const GOING_AWAY: u16 = 1001;

/// One client: its index, token and the room it subscribes to (none: only its own rooms).
pub struct Plan {
    pub index: usize,
    pub token: String,
    pub room: Option<String>,
}

/// How far a client got, and when.
#[derive(Debug)]
pub struct Outcome {
    pub reached: Reached,
    /// From the start to the welcome, and to the subscribe's `ok`.
    pub welcomed_us: Option<u64>,
    pub joined_us: Option<u64>,
    /// Why it stopped short of its room.
    pub failure: Option<String>,
}

/// What every client shares.
pub struct Target {
    pub url: String,
    pub addr: SocketAddr,
    pub read_buffer: usize,
    /// A client not in its room this long after the start has failed.
    pub limit: Duration,
    /// Sockets bound (or failed to bind): the start waits for all of them.
    armed: AtomicUsize,
    other_frames: AtomicU64,
}

impl Target {
    pub fn new(url: String, addr: SocketAddr, read_buffer: usize, limit: Duration) -> Target {
        Target {
            url,
            addr,
            read_buffer,
            limit,
            armed: AtomicUsize::new(0),
            other_frames: AtomicU64::new(0),
        }
    }
}

/// The signals every client waits on: the start (its instant) and the close.
pub struct Signals {
    pub start: watch::Sender<Option<Instant>>,
    pub close: watch::Sender<bool>,
}

/// Spawns one task per plan (sources used in turn by blocks of `per_source`); each binds
/// its socket and waits for the start. Outcomes come on the receiver, in any order.
pub fn spawn(
    plans: Vec<Plan>,
    sources: &[IpAddr],
    per_source: usize,
    target: &Arc<Target>,
) -> (
    Signals,
    mpsc::UnboundedReceiver<(usize, Outcome)>,
    Vec<JoinHandle<()>>,
) {
    let (start, start_rx) = watch::channel(None);
    let (close, close_rx) = watch::channel(false);
    let (done, done_rx) = mpsc::unbounded_channel();
    let handles = plans
        .into_iter()
        .map(|plan| {
            let source = sources[(plan.index / per_source.max(1)) % sources.len()];
            tokio::spawn(client(
                plan,
                source,
                target.clone(),
                start_rx.clone(),
                close_rx.clone(),
                done.clone(),
            ))
        })
        .collect();
    (Signals { start, close }, done_rx, handles)
}

/// Waits until every client has bound its socket (or failed to), then a little more so that
/// all of them are parked on the start signal.
pub async fn arm(target: &Target, n: usize) -> anyhow::Result<()> {
    let deadline = Instant::now() + ARM_TIMEOUT;
    while target.armed.load(Ordering::Relaxed) < n {
        if Instant::now() > deadline {
            bail!(
                "only {} of {n} sockets bound after {ARM_TIMEOUT:?}",
                target.armed.load(Ordering::Relaxed)
            );
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    Ok(())
}

/// Every outcome in client order, each as it came before the deadline (None: none came).
pub async fn collect(
    n: usize,
    deadline: Instant,
    done: &mut mpsc::UnboundedReceiver<(usize, Outcome)>,
) -> Vec<Option<Outcome>> {
    let mut outcomes: Vec<Option<Outcome>> = (0..n).map(|_| None).collect();
    for _ in 0..n {
        match tokio::time::timeout_at(deadline.into(), done.recv()).await {
            Ok(Some((i, outcome))) => outcomes[i] = Some(outcome),
            _ => break,
        }
    }
    outcomes
}

/// Failures counted by reason.
pub fn failures(outcomes: &[Option<Outcome>]) -> BTreeMap<String, u64> {
    let mut counts = BTreeMap::new();
    for o in outcomes {
        let reason = match o {
            Some(Outcome {
                failure: Some(f), ..
            }) => f.clone(),
            Some(_) => continue,
            None => "no outcome".to_string(),
        };
        *counts.entry(reason).or_default() += 1;
    }
    counts
}

async fn client(
    plan: Plan,
    source: IpAddr,
    target: Arc<Target>,
    mut start: watch::Receiver<Option<Instant>>,
    mut close: watch::Receiver<bool>,
    done: mpsc::UnboundedSender<(usize, Outcome)>,
) {
    let sock = client::bound_socket(source);
    target.armed.fetch_add(1, Ordering::Relaxed);
    let t0 = match start.wait_for(Option::is_some).await {
        Ok(t) => t.expect("waited for Some"),
        Err(_) => return,
    };
    let mut outcome = Outcome {
        reached: Reached::Nothing,
        welcomed_us: None,
        joined_us: None,
        failure: None,
    };
    let attempt = timeout_at(
        (t0 + target.limit).into(),
        enter(&plan, sock, &target, t0, &mut outcome),
    )
    .await;
    let conn = match attempt {
        Ok(Ok(conn)) => Some(conn),
        Ok(Err(e)) => {
            outcome.failure = Some(e);
            None
        }
        Err(_) => {
            outcome.failure = Some(
                match outcome.reached {
                    Reached::Nothing => "timeout before the welcome",
                    _ => "timeout before the ok",
                }
                .into(),
            );
            None
        }
    };
    let _ = done.send((plan.index, outcome));
    drop(done);
    if let Some(conn) = conn {
        hold_then_close(conn, &mut close).await;
    }
}

/// Connects, upgrades and subscribes, noting in `outcome` how far it got and when.
async fn enter(
    plan: &Plan,
    sock: Result<tokio::net::TcpSocket, client::HandshakeError>,
    target: &Target,
    t0: Instant,
    outcome: &mut Outcome,
) -> Result<wire::Conn, String> {
    let us = || t0.elapsed().as_micros() as u64;
    let tcp = client::connect(sock.map_err(|e| class(&e))?, target.addr)
        .await
        .map_err(|e| class(&e))?;
    let seed = (plan.index as u32).wrapping_mul(0x9E37_79B9);
    let (mut conn, _welcome) =
        wire::upgrade(&target.url, tcp, &plan.token, target.read_buffer, seed)
            .await
            .map_err(|e| class(&e))?;
    outcome.reached = Reached::Welcomed;
    outcome.welcomed_us = Some(us());
    if let Some(room) = &plan.room {
        client::subscribe_on(&mut conn, room, &target.other_frames)
            .await
            .map_err(|e| e.split(':').next().unwrap_or_default().to_string())?;
    }
    outcome.reached = Reached::Joined;
    outcome.joined_us = Some(us());
    Ok(conn)
}

/// A failed handshake's class, for counting: the socket, the connect (by error kind), the
/// HTTP status, or the upgrade.
fn class(e: &client::HandshakeError) -> String {
    use client::HandshakeError as H;
    match e {
        H::Socket { error, .. } => format!("client socket: {:?}", error.kind()),
        H::Connect(error) => format!("connect: {:?}", error.kind()),
        H::Status(code) => format!("HTTP {code}"),
        H::WebSocket(_) | H::NoWelcome(_) | H::Protocol(_) => "upgrade".into(),
    }
}

/// Reads (answering pings) until told to close, then sends the close frame and drops the
/// socket without waiting for the server's; returns early if the server ends it first.
async fn hold_then_close(mut conn: wire::Conn, close: &mut watch::Receiver<bool>) {
    loop {
        tokio::select! {
            biased;
            changed = close.changed() => {
                if changed.is_err() || *close.borrow() {
                    break;
                }
            }
            read = conn.fill() => {
                if !matches!(read, Ok(n) if n > 0) {
                    return;
                }
                loop {
                    match conn.buffered() {
                        Ok(Some(Frame::Text(_))) => {}
                        Ok(None) => break,
                        Ok(Some(Frame::Close(_))) | Err(_) => return,
                    }
                }
                if conn.answer_pings().await.is_err() {
                    return;
                }
            }
        }
    }
    let _ = conn.send_close(GOING_AWAY).await;
}
