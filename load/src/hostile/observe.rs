//! The two witnesses of a hostile run, on a thread and runtime of their own so that the
//! attackers' tasks cannot delay them: the bystander (a connection of its own user in its own
//! room, receiving a record every 50 ms) and the `/healthz` probe (every 50 ms on the admin
//! listener). The bystander reconnects if its connection ends (a restarted server).

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::watch;
use tokio::time::timeout;

use super::tally::{Arrival, Probe};
use crate::client::{self, now_us};
use crate::wire::{self, Frame};

/// The bystander's room, which no attacker joins.
pub const ROOM: &str = "task:bystander";
/// The `taskId` of the bystander's records.
pub const TASK: &str = "bystander";
pub const PROBE_EVERY: Duration = Duration::from_millis(50);
/// A probe unanswered after this long has failed.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const RECONNECT_PAUSE: Duration = Duration::from_millis(100);

/// Where the server currently listens (it changes if the server is restarted).
#[derive(Debug, Clone, Copy)]
pub struct Targets {
    pub public: SocketAddr,
    pub admin: SocketAddr,
}

/// What the witnesses share with the run while it goes on.
#[derive(Default)]
pub struct Live {
    /// When the bystander last received a record (µs since the epoch; 0: never).
    pub last_arrival_us: AtomicU64,
    pub reconnects: AtomicU64,
    pub first_error: Mutex<Option<String>>,
}

/// Everything the witnesses saw, handed back when they stop.
pub struct Log {
    pub arrivals: Vec<Arrival>,
    pub probes: Vec<Probe>,
}

pub struct Witnesses {
    stop: watch::Sender<bool>,
    thread: std::thread::JoinHandle<Log>,
    pub live: Arc<Live>,
}

impl Witnesses {
    /// Starts both on a thread of their own.
    pub fn start(targets: watch::Receiver<Targets>, token: String) -> std::io::Result<Witnesses> {
        let (stop, stopped) = watch::channel(false);
        let live = Arc::new(Live::default());
        let shared = live.clone();
        let thread = std::thread::Builder::new()
            .name("witnesses".into())
            .spawn(move || {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("a runtime for the witnesses");
                runtime.block_on(async move {
                    let (arrivals, probes) = tokio::join!(
                        bystander(targets.clone(), token, shared, stopped.clone()),
                        probe(targets, stopped)
                    );
                    Log { arrivals, probes }
                })
            })?;
        Ok(Witnesses { stop, thread, live })
    }

    pub fn finish(self) -> Log {
        let _ = self.stop.send(true);
        self.thread.join().unwrap_or(Log {
            arrivals: Vec::new(),
            probes: Vec::new(),
        })
    }
}

async fn bystander(
    targets: watch::Receiver<Targets>,
    token: String,
    live: Arc<Live>,
    mut stop: watch::Receiver<bool>,
) -> Vec<Arrival> {
    let mut arrivals = Vec::new();
    let mut first = true;
    while !*stop.borrow() {
        if !first {
            live.reconnects.fetch_add(1, Ordering::Relaxed);
            tokio::time::sleep(RECONNECT_PAUSE).await;
        }
        first = false;
        let public = targets.borrow().public;
        let conn = timeout(CONNECT_TIMEOUT, open(public, &token)).await;
        let mut conn = match conn {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => {
                note(&live, format!("bystander: {e}"));
                continue;
            }
            Err(_) => {
                note(&live, "bystander: connect timed out".into());
                continue;
            }
        };
        tokio::select! {
            _ = stop.wait_for(|s| *s) => break,
            why = receive(&mut conn, &mut arrivals, &live) => note(&live, format!("bystander: {why}")),
        }
    }
    arrivals
}

fn note(live: &Live, e: String) {
    let mut first = live.first_error.lock().unwrap_or_else(|p| p.into_inner());
    first.get_or_insert(e);
}

async fn open(public: SocketAddr, token: &str) -> Result<wire::Conn, String> {
    let source = IpAddr::V4(Ipv4Addr::LOCALHOST);
    let tcp = client::connect(client::bound_socket(source)?, public).await?;
    let url = format!("ws://{public}/ws");
    let (mut conn, _) = wire::upgrade(&url, tcp, token, 16 * 1024, 0x5eed).await?;
    client::subscribe_on(&mut conn, ROOM, &AtomicU64::new(0)).await?;
    Ok(conn)
}

/// Reads events until the connection ends; returns why it ended.
async fn receive(conn: &mut wire::Conn, arrivals: &mut Vec<Arrival>, live: &Live) -> String {
    loop {
        match conn.next().await {
            Ok(Frame::Text(t)) => {
                let at_us = now_us();
                let seq = client::number_after(t, b"\"seq\":");
                let sent = client::number_after(t, b"\"sent_us\":");
                if let (true, Some(seq), Some(sent_us)) =
                    (t.starts_with(b"{\"type\":\"event\""), seq, sent)
                {
                    arrivals.push(Arrival {
                        seq,
                        sent_us,
                        at_us,
                    });
                    live.last_arrival_us.store(at_us, Ordering::Relaxed);
                }
            }
            Ok(Frame::Close(code)) => return format!("closed with {code}"),
            Err(e) => return e.to_string(),
        }
    }
}

async fn probe(targets: watch::Receiver<Targets>, stop: watch::Receiver<bool>) -> Vec<Probe> {
    let mut probes = Vec::new();
    let mut tick = tokio::time::interval(PROBE_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    while !*stop.borrow() {
        tick.tick().await;
        let admin = targets.borrow().admin;
        let start_us = now_us();
        let started = Instant::now();
        let ok = matches!(timeout(PROBE_TIMEOUT, healthz(admin)).await, Ok(Some(200)));
        probes.push(Probe {
            start_us,
            elapsed_us: started.elapsed().as_micros() as u64,
            ok,
        });
    }
    probes
}

/// The status of `GET /healthz`.
async fn healthz(admin: SocketAddr) -> Option<u16> {
    let mut s = tokio::net::TcpStream::connect(admin).await.ok()?;
    let request = format!("GET /healthz HTTP/1.1\r\nHost: {admin}\r\nConnection: close\r\n\r\n");
    s.write_all(request.as_bytes()).await.ok()?;
    let mut head = [0u8; 32];
    let mut n = 0;
    while n < 12 {
        let got = s.read(&mut head[n..]).await.ok()?;
        if got == 0 {
            break;
        }
        n += got;
    }
    let text = std::str::from_utf8(&head[..n]).ok()?;
    text.split_whitespace().nth(1)?.parse().ok()
}
