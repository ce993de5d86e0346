//! The resume storm: N clients connect and keep their position maps; the server is stopped
//! with SIGTERM and a new one started on the same config while records keep being produced;
//! then every client reconnects at the same moment with `?resume=1` and `resume`.
//!
//! Each client knows exactly which records it must have (record `seq` is for room
//! `seq % rooms`) and checks what it gets: nothing lost, nothing twice, and every event's
//! offset past the client's position for its partition (so in partition order, with no
//! overlap at the seam). The clock starts when the reconnect signal goes out (t0); a client
//! has caught up when it has its `ok` and every record of its rooms produced before t0.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::bail;
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, watch, OwnedSemaphorePermit, Semaphore};
use tokio::time::timeout;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

use crate::cli::ResumeStormArgs;
use crate::client::{self, number_after, Plan};
use crate::dist::Dist;
use crate::procstat;
use crate::producer::{self, Counters, Schedule};
use crate::round;
use crate::server::{Server, Spec};

const FIRST_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(15);
/// A reconnect in a storm waits longer: SYNs beyond the listen backlog are retried by the
/// kernel after 1 s, 3 s, 7 s...
const RECONNECT_TIMEOUT: Duration = Duration::from_secs(30);
/// After a close frame, how long to keep reading for the server to end the TCP connection.
const CLOSE_READ: Duration = Duration::from_secs(3);

/// What every client is told to do.
#[derive(Clone)]
enum Phase {
    /// Connected to the first server (or trying to).
    First,
    Reconnect(Arc<Reconnect>),
    Stop,
}

struct Reconnect {
    url: String,
    addr: SocketAddr,
    sources: Vec<IpAddr>,
    per_source: usize,
    /// Every record with `seq < s0` was handed to Kafka before t0: a client has caught up when
    /// it holds all of its rooms' ones (less `lost`, which never reached Kafka).
    s0: u64,
    lost: Arc<Vec<u64>>,
    t0: Instant,
    /// No new attempt after this.
    deadline: Instant,
    /// Reconnects in flight at once; None: all at once.
    limit: Option<Arc<Semaphore>>,
}

struct FirstTarget {
    url: String,
    addr: SocketAddr,
    sources: Vec<IpAddr>,
    per_source: usize,
    read_buffer: usize,
    rooms: u64,
}

/// Progress counters, read by the main task while the storm runs.
#[derive(Default)]
struct Board {
    first_closed: AtomicUsize,
    welcomed: AtomicUsize,
    oks: AtomicUsize,
    caught: AtomicUsize,
    /// Distinct records received by all clients, both connections.
    unique: AtomicU64,
    other_frames: AtomicU64,
}

/// One client's record of the run.
#[derive(Debug, Default, Clone)]
pub struct Outcome {
    pub room: usize,
    pub first_connected: bool,
    pub first_close: Option<u16>,
    /// Reconnect attempts (handshakes tried) and successful ones.
    pub attempts: u32,
    pub connections: u32,
    pub last_error: Option<String>,
    /// Microseconds after t0.
    pub welcome_us: Option<u64>,
    pub ok_us: Option<u64>,
    pub caught_us: Option<u64>,
    pub resume_to_ok_us: Option<u64>,
    pub replayed: Option<u64>,
    pub source: Option<String>,
    /// Events received on the resumed connection before its `ok`, and the offsets between
    /// the client's position and the cut (the range the server looked through).
    pub replay_events: u64,
    pub gap_offsets: Option<i64>,
    pub second_close: Option<u16>,
    pub bits: Vec<u64>,
    pub unique: u64,
    pub duplicates: u64,
    pub misrouted: u64,
    pub out_of_order: u64,
    pub positions_backwards: u64,
    pub resyncs: u64,
}

/// A client's state across both connections.
struct Client {
    room: u64,
    rooms: u64,
    /// `topic:partition` -> last offset covered.
    positions: Vec<(String, i64)>,
    /// Catch-up target: every `k < need_k` except lost ones; `have` of them are in.
    need_k: u64,
    need: u64,
    have: u64,
    out: Outcome,
}

enum Kind {
    Event,
    Positions,
    Ok,
    Other,
}

impl Client {
    fn position(&self, key: &str) -> Option<i64> {
        self.positions
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| *v)
    }

    /// Moves `key` forward to `offset`; false if that would move it back.
    fn advance(&mut self, key: &str, offset: i64) -> bool {
        match self.positions.iter_mut().find(|(k, _)| k == key) {
            Some((_, v)) if *v > offset => false,
            Some((_, v)) => {
                *v = offset;
                true
            }
            None => {
                self.positions.push((key.to_string(), offset));
                true
            }
        }
    }

    fn merge_positions(&mut self, text: &str) -> Result<(), String> {
        let v: Value = serde_json::from_str(text).map_err(|e| format!("bad frame: {e}"))?;
        let Some(map) = v.get("positions").and_then(Value::as_object) else {
            return Err(format!("no positions in {text}"));
        };
        for (k, o) in map {
            let o = o
                .as_i64()
                .ok_or_else(|| format!("bad position in {text}"))?;
            if !self.advance(k, o) {
                self.out.positions_backwards += 1;
            }
        }
        Ok(())
    }

    fn position_sum(&self) -> i64 {
        self.positions.iter().map(|(_, v)| *v).sum()
    }

    fn resume_frame(&self, room: &Option<String>) -> String {
        let positions: BTreeMap<&str, i64> = self
            .positions
            .iter()
            .map(|(k, v)| (k.as_str(), *v))
            .collect();
        let rooms: Vec<&str> = room.iter().map(String::as_str).collect();
        json!({"type": "resume", "id": 1, "positions": positions, "rooms": rooms}).to_string()
    }

    /// Sets the catch-up target from the reconnect signal.
    fn set_target(&mut self, s0: u64, lost: &[u64]) {
        let kmax = if s0 > self.room {
            (s0 - self.room).div_ceil(self.rooms)
        } else {
            0
        };
        let lost_here = lost
            .iter()
            .filter(|s| **s % self.rooms == self.room)
            .count() as u64;
        self.need_k = kmax;
        self.need = kmax.saturating_sub(lost_here);
        let bits = &self.out.bits;
        let full = (kmax / 64) as usize;
        let mut have: u64 = bits.iter().take(full).map(|w| w.count_ones() as u64).sum();
        if let Some(w) = bits.get(full) {
            let mask = (1u64 << (kmax % 64)).wrapping_sub(1);
            have += (w & mask).count_ones() as u64;
        }
        self.have = have;
    }

    fn on_text(&mut self, text: &str, board: &Board) -> Kind {
        let b = text.as_bytes();
        if b.starts_with(b"{\"type\":\"event\"") {
            self.on_event(b, board);
            Kind::Event
        } else if b.starts_with(b"{\"type\":\"positions\"") {
            if self.merge_positions(text).is_err() {
                board.other_frames.fetch_add(1, Ordering::Relaxed);
            }
            Kind::Positions
        } else if b.starts_with(b"{\"type\":\"ok\"") {
            Kind::Ok
        } else {
            if b.starts_with(b"{\"type\":\"resync\"") {
                self.out.resyncs += 1;
            }
            board.other_frames.fetch_add(1, Ordering::Relaxed);
            Kind::Other
        }
    }

    fn on_event(&mut self, b: &[u8], board: &Board) {
        match pos(b) {
            Some((key, offset)) => {
                if self.position(key).is_some_and(|p| offset <= p) {
                    self.out.out_of_order += 1;
                } else {
                    self.advance(key, offset);
                }
            }
            None => self.out.out_of_order += 1,
        }
        let Some(seq) = number_after(b, b"\"seq\":") else {
            board.other_frames.fetch_add(1, Ordering::Relaxed);
            return;
        };
        if seq % self.rooms != self.room {
            self.out.misrouted += 1;
            return;
        }
        let k = seq / self.rooms;
        let (word, bit) = ((k / 64) as usize, 1u64 << (k % 64));
        let bits = &mut self.out.bits;
        if word >= bits.len() {
            bits.resize(word + 1, 0);
        }
        if bits[word] & bit != 0 {
            self.out.duplicates += 1;
            return;
        }
        bits[word] |= bit;
        self.out.unique += 1;
        board.unique.fetch_add(1, Ordering::Relaxed);
        if k < self.need_k {
            self.have += 1;
        }
    }

    fn caught_up(&self) -> bool {
        self.out.ok_us.is_some() && self.have >= self.need
    }
}

/// `"pos":"topic:partition:offset"` -> ("topic:partition", offset).
fn pos(b: &[u8]) -> Option<(&str, i64)> {
    const KEY: &[u8] = b"\"pos\":\"";
    let at = memchr::memmem::find(b, KEY)? + KEY.len();
    let len = memchr::memchr(b'"', &b[at..])?;
    let p = std::str::from_utf8(&b[at..at + len]).ok()?;
    let (key, offset) = p.rsplit_once(':')?;
    Some((key, offset.parse().ok()?))
}

/// The string after `"key":"` in a frame.
fn string_after<'a>(text: &'a str, key: &str) -> Option<&'a str> {
    let pat = format!("\"{key}\":\"");
    let at = text.find(&pat)? + pat.len();
    let end = text[at..].find('"')? + at;
    Some(&text[at..end])
}

fn us(d: Duration) -> u64 {
    d.as_micros() as u64
}

type Ws = WebSocketStream<TcpStream>;

/// The code of a close frame; 1005 (no status) when it carried none.
fn close_code(frame: Option<CloseFrame>) -> u16 {
    frame.map_or(1005, |f| u16::from(f.code))
}

/// Reads until the peer ends the connection (so the close reply gets out), bounded.
async fn finish_close(ws: &mut Ws) {
    let _ = timeout(CLOSE_READ, async {
        while let Some(Ok(_)) = ws.next().await {}
    })
    .await;
}

async fn client_task(
    plan: Plan,
    first: Arc<FirstTarget>,
    board: Arc<Board>,
    ready: mpsc::UnboundedSender<client::Ready>,
    mut phase: watch::Receiver<Phase>,
    permit: OwnedSemaphorePermit,
) -> Outcome {
    let mut c = Client {
        room: plan.room as u64,
        rooms: first.rooms,
        positions: Vec::new(),
        need_k: 0,
        need: u64::MAX,
        have: 0,
        out: Outcome {
            room: plan.room,
            ..Outcome::default()
        },
    };
    // 1. The first connection: welcome positions, the group's room, then live events.
    let source = first.sources[(plan.index / first.per_source.max(1)) % first.sources.len()];
    let opened = timeout(FIRST_HANDSHAKE_TIMEOUT, async {
        let (mut ws, welcome) = client::handshake(
            &first.url,
            first.addr,
            source,
            &plan.token,
            first.read_buffer,
        )
        .await?;
        c.merge_positions(&welcome)?;
        if let Some(room) = &plan.subscribe {
            client::subscribe(&mut ws, room, &board.other_frames).await?;
        }
        Ok::<Ws, String>(ws)
    })
    .await;
    drop(permit);
    let mut ws = match opened {
        Ok(Ok(ws)) => ws,
        Ok(Err(e)) => {
            let _ = ready.send((plan.index, Err(e)));
            return c.out;
        }
        Err(_) => {
            let _ = ready.send((plan.index, Err("handshake timed out".into())));
            return c.out;
        }
    };
    c.out.first_connected = true;
    let _ = ready.send((plan.index, Ok(())));
    drop(ready);
    loop {
        tokio::select! {
            biased;
            changed = phase.changed() => {
                if changed.is_err() || !matches!(*phase.borrow(), Phase::First) {
                    break;
                }
            }
            m = ws.next() => match m {
                Some(Ok(Message::Text(t))) => {
                    c.on_text(t.as_str(), &board);
                }
                Some(Ok(Message::Close(f))) => {
                    c.out.first_close = Some(close_code(f));
                    finish_close(&mut ws).await;
                    break;
                }
                Some(Ok(_)) => {}
                Some(Err(_)) | None => {
                    c.out.first_close = Some(1006);
                    break;
                }
            },
        }
    }
    drop(ws);
    board.first_closed.fetch_add(1, Ordering::Relaxed);

    // 2. Wait for the signal to reconnect, keeping the map.
    let rc = loop {
        let p = phase.borrow_and_update().clone();
        match p {
            Phase::Reconnect(rc) => break rc,
            Phase::Stop => return c.out,
            Phase::First => {
                if phase.changed().await.is_err() {
                    return c.out;
                }
            }
        }
    };
    c.set_target(rc.s0, &rc.lost);

    // 3. Reconnect with ?resume=1 and resume; again if the server closes the connection.
    let source = rc.sources[(plan.index / rc.per_source.max(1)) % rc.sources.len()];
    let mut backoff = Duration::from_millis(100);
    'connect: loop {
        if Instant::now() > rc.deadline {
            break;
        }
        let limit = match &rc.limit {
            Some(s) => s.clone().acquire_owned().await.ok(),
            None => None,
        };
        c.out.attempts += 1;
        let mut sent_at = Instant::now();
        let attempt = timeout(RECONNECT_TIMEOUT, async {
            let (mut ws, _welcome) =
                client::handshake(&rc.url, rc.addr, source, &plan.token, first.read_buffer).await?;
            let welcomed = rc.t0.elapsed();
            let frame = c.resume_frame(&plan.subscribe);
            sent_at = Instant::now();
            ws.send(Message::text(frame))
                .await
                .map_err(|e| format!("resume: {e}"))?;
            Ok::<(Ws, Duration), String>((ws, welcomed))
        })
        .await;
        drop(limit);
        let mut ws = match attempt {
            Ok(Ok((ws, welcomed))) => {
                if c.out.welcome_us.is_none() {
                    c.out.welcome_us = Some(us(welcomed));
                    board.welcomed.fetch_add(1, Ordering::Relaxed);
                }
                ws
            }
            Ok(Err(e)) => {
                c.out.last_error = Some(e);
                retry_pause(&mut backoff, plan.index).await;
                continue;
            }
            Err(_) => {
                c.out.last_error = Some("reconnect timed out".into());
                retry_pause(&mut backoff, plan.index).await;
                continue;
            }
        };
        c.out.connections += 1;
        let first_resume = c.out.connections == 1;
        let at_resume = c.position_sum();
        let mut got_ok = false;
        loop {
            tokio::select! {
                biased;
                changed = phase.changed() => {
                    if changed.is_err() || matches!(*phase.borrow(), Phase::Stop) {
                        break 'connect;
                    }
                }
                m = ws.next() => match m {
                    Some(Ok(Message::Text(t))) => {
                        let text = t.as_str();
                        match c.on_text(text, &board) {
                            Kind::Event if !got_ok && first_resume => c.out.replay_events += 1,
                            Kind::Ok if !got_ok => {
                                got_ok = true;
                                if c.out.ok_us.is_none() {
                                    c.out.ok_us = Some(us(rc.t0.elapsed()));
                                    c.out.resume_to_ok_us = Some(us(sent_at.elapsed()));
                                    c.out.replayed = number_after(text.as_bytes(), b"\"replayed\":");
                                    c.out.source = string_after(text, "source").map(String::from);
                                    c.out.gap_offsets = Some(c.position_sum() - at_resume);
                                    board.oks.fetch_add(1, Ordering::Relaxed);
                                }
                            }
                            _ => {}
                        }
                        if c.out.caught_us.is_none() && c.caught_up() {
                            c.out.caught_us = Some(us(rc.t0.elapsed()));
                            board.caught.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    Some(Ok(Message::Close(f))) => {
                        c.out.second_close = Some(close_code(f));
                        finish_close(&mut ws).await;
                        break;
                    }
                    Some(Ok(_)) => {}
                    Some(Err(_)) | None => {
                        c.out.second_close = Some(1006);
                        break;
                    }
                },
            }
        }
        // Closed by the server: resume again from the map.
        retry_pause(&mut backoff, plan.index).await;
    }
    c.out
}

/// Backs off 100 ms, 200 ms, ... up to 2 s, spread by the client's index.
async fn retry_pause(backoff: &mut Duration, index: usize) {
    let jitter = Duration::from_millis((index as u64 * 7919) % 100);
    tokio::time::sleep(*backoff + jitter).await;
    *backoff = (*backoff * 2).min(Duration::from_secs(2));
}

fn sources(third: u8, n: usize, per_source: usize) -> Vec<IpAddr> {
    let count = n.div_ceil(per_source.max(1)).clamp(1, 250);
    (1..=count)
        .map(|i| IpAddr::V4(Ipv4Addr::new(127, 0, third, i as u8)))
        .collect()
}

/// p-quantiles of a sample (nearest rank), None when empty.
pub(crate) fn quantiles(v: &mut [u64]) -> Value {
    if v.is_empty() {
        return Value::Null;
    }
    v.sort_unstable();
    let q = |p: f64| v[((p * v.len() as f64).ceil() as usize).clamp(1, v.len()) - 1];
    json!({
        "count": v.len(),
        "p50": q(0.50),
        "p90": q(0.90),
        "p99": q(0.99),
        "max": v[v.len() - 1],
        "mean": round(v.iter().sum::<u64>() as f64 / v.len() as f64, 1),
    })
}

/// Samples a process's RSS every 100 ms until stopped; returns the peak (KiB).
pub(crate) fn rss_peak_sampler(pid: u32, stop: Arc<AtomicBool>) -> tokio::task::JoinHandle<u64> {
    tokio::spawn(async move {
        let mut peak = 0;
        while !stop.load(Ordering::Relaxed) {
            if let Some(s) = procstat::sample(&pid.to_string()) {
                peak = peak.max(s.rss_kib);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        peak
    })
}

pub(crate) fn delta(
    a: &Option<std::collections::HashMap<String, f64>>,
    b: &Option<std::collections::HashMap<String, f64>>,
    key: &str,
) -> Option<f64> {
    let b = b.as_ref()?.get(key)?;
    Some(b - a.as_ref().and_then(|a| a.get(key)).copied().unwrap_or(0.0))
}

pub(crate) fn gauge(m: &Option<std::collections::HashMap<String, f64>>, key: &str) -> Option<f64> {
    m.as_ref()?.get(key).copied()
}

async fn start_server(spec: &Spec) -> anyhow::Result<Server> {
    let spec = spec.clone();
    tokio::task::spawn_blocking(move || spec.start()).await?
}

async fn stop_server(mut server: Server) -> anyhow::Result<Duration> {
    tokio::task::spawn_blocking(move || server.terminate()).await?
}

pub async fn run(args: &ResumeStormArgs, spec: Spec) -> anyhow::Result<Value> {
    let dist = Dist::parse(&args.rooms.dist).map_err(anyhow::Error::msg)?;
    let brokers = args.kafka.brokers("resume-storm")?;
    let n = args.rooms.connections;
    if n == 0 {
        bail!("resume-storm needs connections");
    }
    let nofile = procstat::raise_nofile();
    if (nofile as usize) < n + 64 {
        bail!("{n} connections need more open files than the limit of {nofile}");
    }
    let rooms = dist.rooms(n);
    let assignment = dist.assign(n, args.rooms.seed);

    // The first server.
    eprintln!("starting the first server");
    let server_a = start_server(&spec).await?;
    eprintln!(
        "roomcast at {} (admin {}), pid {}, ready after {:.2} s",
        server_a.public,
        server_a.admin,
        server_a.pid,
        server_a.ready_after.as_secs_f64()
    );
    let url_a = format!("ws://{}/ws", server_a.public);
    let per_source = args.connecting.per_source.max(1);
    let first = Arc::new(FirstTarget {
        url: url_a.clone(),
        addr: server_a.public,
        sources: sources(0, n, per_source),
        per_source,
        read_buffer: args.connecting.read_buffer,
        rooms: rooms as u64,
    });
    let board = Arc::new(Board::default());
    let (phase_tx, phase_rx) = watch::channel(Phase::First);
    let (ready_tx, mut ready_rx) = mpsc::unbounded_channel();

    // Connect everyone, paced like the other scenarios.
    eprintln!(
        "opening {n} connections to {url_a} ({} rooms, {}/s)",
        rooms, args.connecting.connect_rate
    );
    let connect_started = Instant::now();
    let spawner = {
        let board = board.clone();
        let first = first.clone();
        let rate = args.connecting.connect_rate;
        let sem = Arc::new(Semaphore::new(args.connecting.connect_concurrency.max(1)));
        let mut plans = Vec::with_capacity(n);
        for (i, room) in assignment.iter().copied().enumerate() {
            plans.push(Plan {
                index: i,
                room,
                token: crate::token(&args.tokens.secret, &Dist::user(i), args.tokens.token_ttl)?,
                subscribe: dist.subscribe_room(room),
                slow: false,
            });
        }
        tokio::spawn(async move {
            let mut handles = Vec::with_capacity(plans.len());
            let start = tokio::time::Instant::now();
            for (k, plan) in plans.into_iter().enumerate() {
                if rate > 0.0 {
                    tokio::time::sleep_until(start + Duration::from_secs_f64(k as f64 / rate))
                        .await;
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
        })
    };
    let connect_deadline = tokio::time::Instant::now()
        + Duration::from_secs_f64(n as f64 / args.connecting.connect_rate.max(1.0) + 60.0);
    let (mut open, mut failed) = (0usize, 0usize);
    let mut first_error = None;
    while open + failed < n {
        match tokio::time::timeout_at(connect_deadline, ready_rx.recv()).await {
            Ok(Some((_, Ok(())))) => open += 1,
            Ok(Some((i, Err(e)))) => {
                failed += 1;
                first_error.get_or_insert(format!("connection {i}: {e}"));
            }
            Ok(None) | Err(_) => break,
        }
    }
    let connect_seconds = connect_started.elapsed().as_secs_f64();
    eprintln!("{open} open, {failed} failed in {connect_seconds:.1} s");
    if open == 0 {
        bail!("no connection opened: {first_error:?}");
    }

    // Produce, open-ended, from now until told to stop.
    let counters = Arc::new(Counters::new(rooms));
    let mut sink = producer::kafka_sink(
        brokers,
        &args.kafka.topic,
        &args.kafka.producer(),
        &counters,
    )?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let stop_producing = Arc::new(AtomicBool::new(false));
    let schedule = Schedule {
        dist: dist.clone(),
        rooms,
        rate: args.production.rate,
        total: u64::MAX,
        start: Instant::now() + Duration::from_millis(100),
        start_us: client::now_us() + 100_000,
        payload_bytes: args.production.payload_bytes,
        stop: Some(stop_producing.clone()),
    };
    let producer_counters = counters.clone();
    let producer = std::thread::Builder::new()
        .name("producer".into())
        .spawn(move || producer::run(&mut sink, &schedule, &producer_counters))?;
    eprintln!(
        "producing {}/s to {rooms} rooms; live for {} s, then SIGTERM",
        args.production.rate, args.live_seconds
    );
    let live_a = procstat::sample(&server_a.pid.to_string());
    let live_start = Instant::now();
    tokio::time::sleep(Duration::from_secs_f64(args.live_seconds)).await;
    let live_b = procstat::sample(&server_a.pid.to_string());
    let live_wall = live_start.elapsed().as_secs_f64();
    let metrics_a = procstat::scrape(&server_a.metrics_url());

    // Restart: SIGTERM, wait for the exit, (pause), start the new one.
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
    let server_b = match start_server(&spec).await {
        Ok(s) => s,
        Err(e) => {
            stop_producing.store(true, Ordering::Relaxed);
            let _ = phase_tx.send(Phase::Stop);
            return Err(e.context("the second server did not start"));
        }
    };
    eprintln!(
        "new roomcast at {} (admin {}), pid {}: listening after {:.2} s, ready after {:.2} s",
        server_b.public,
        server_b.admin,
        server_b.pid,
        server_b.listening_after.as_secs_f64(),
        server_b.ready_after.as_secs_f64()
    );
    let startup_cpu = procstat::sample(&server_b.pid.to_string()).map(|s| s.cpu_s);
    let (b_listening, b_ready) = (
        server_b.listening_after.as_secs_f64(),
        server_b.ready_after.as_secs_f64(),
    );

    // The storm.
    let metrics_url = server_b.metrics_url();
    let m0 = procstat::scrape(&metrics_url);
    let b0 = procstat::sample(&server_b.pid.to_string());
    let c0 = procstat::sample("self");
    let k0 = args
        .broker_pid
        .and_then(|p| procstat::sample(&p.to_string()));
    let mach0 = procstat::machine_busy_s();
    let net0 = procstat::listen_counters();
    let peak_stop = Arc::new(AtomicBool::new(false));
    let peak = rss_peak_sampler(server_b.pid, peak_stop.clone());
    let t0 = Instant::now();
    let s0 = counters.attempted.load(Ordering::Acquire);
    let lost_below: Vec<u64> = counters.lost().into_iter().filter(|s| *s < s0).collect();
    let reconnect = Arc::new(Reconnect {
        url: format!("ws://{}/ws?resume=1", server_b.public),
        addr: server_b.public,
        sources: sources(1, n, per_source),
        per_source,
        s0,
        lost: Arc::new(lost_below),
        t0,
        deadline: t0 + Duration::from_secs_f64(args.storm_deadline),
        limit: (args.reconnect_concurrency > 0)
            .then(|| Arc::new(Semaphore::new(args.reconnect_concurrency))),
    });
    let pace = match args.reconnect_concurrency {
        0 => "all at once".to_string(),
        k => format!("at most {k} handshakes in flight"),
    };
    eprintln!(
        "reconnecting {open} clients with ?resume=1, {pace} ({} records produced since SIGTERM)",
        s0 - s_term
    );
    let _ = phase_tx.send(Phase::Reconnect(reconnect.clone()));
    let storm_deadline = t0 + Duration::from_secs_f64(args.storm_deadline);
    let mut last_report = Instant::now();
    let mut all_caught: Option<Duration> = None;
    loop {
        let caught = board.caught.load(Ordering::Relaxed);
        if caught >= open {
            all_caught = Some(t0.elapsed());
            break;
        }
        if Instant::now() > storm_deadline {
            break;
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
    let storm_wall = t0.elapsed();
    let b1 = procstat::sample(&server_b.pid.to_string());
    let c1 = procstat::sample("self");
    let k1 = args
        .broker_pid
        .and_then(|p| procstat::sample(&p.to_string()));
    let mach1 = procstat::machine_busy_s();
    let net1 = procstat::listen_counters();
    let m1 = procstat::scrape(&metrics_url);
    peak_stop.store(true, Ordering::Relaxed);
    let rss_peak = peak.await.unwrap_or(0).max(b1.map_or(0, |s| s.rss_kib));
    match all_caught {
        Some(d) => eprintln!(
            "all {open} caught up {:.2} s after the reconnect began",
            d.as_secs_f64()
        ),
        None => eprintln!(
            "storm deadline: {} of {open} caught up in {:.1} s",
            board.caught.load(Ordering::Relaxed),
            storm_wall.as_secs_f64()
        ),
    }

    // Keep producing a little after the storm (live after the seam), then stop and drain.
    let after = t0 + Duration::from_secs_f64(args.after_seconds);
    if Instant::now() < after {
        tokio::time::sleep_until(after.into()).await;
    }
    stop_producing.store(true, Ordering::Relaxed);
    let outcome = tokio::task::spawn_blocking(move || producer.join())
        .await?
        .map_err(|_| anyhow::anyhow!("the producer thread panicked"))?;
    let total = counters.attempted.load(Ordering::Acquire);
    let lost = counters.lost();
    let expected_for = |room: usize| -> u64 {
        let r = room as u64;
        let all = if total > r {
            (total - r).div_ceil(rooms as u64)
        } else {
            0
        };
        all - lost.iter().filter(|s| **s % rooms as u64 == r).count() as u64
    };
    let mut members = vec![0u64; rooms];
    // Every client that had a first connection takes part; the count is known from `open`.
    for r in assignment.iter() {
        members[*r] += 1;
    }
    let expected_if_all: u64 = (0..rooms).map(|r| expected_for(r) * members[r]).sum();
    let drain_deadline = Instant::now() + Duration::from_secs_f64(args.production.drain);
    while Instant::now() < drain_deadline && board.unique.load(Ordering::Relaxed) < expected_if_all
    {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let m2 = procstat::scrape(&metrics_url);
    let rss_end = procstat::sample(&server_b.pid.to_string()).map(|s| s.rss_kib);
    let _ = phase_tx.send(Phase::Stop);
    let handles = spawner.await?;
    let mut outs = Vec::with_capacity(handles.len());
    for h in handles {
        if let Ok(o) = h.await {
            outs.push(o);
        }
    }
    let _ = stop_server(server_b).await;

    // Tally.
    let part: Vec<&Outcome> = outs.iter().filter(|o| o.first_connected).collect();
    let (mut expected, mut have, mut missing) = (0u64, 0u64, 0u64);
    let (mut dups, mut misrouted, mut ooo, mut back, mut resyncs) = (0u64, 0u64, 0u64, 0u64, 0u64);
    let mut incomplete = 0usize;
    // The `replayed` count of an `ok` against the events that came before it.
    let mut replayed_mismatch = 0usize;
    let mut sources_seen: BTreeMap<String, u64> = BTreeMap::new();
    let mut first_close: BTreeMap<String, u64> = BTreeMap::new();
    let mut second_close: BTreeMap<String, u64> = BTreeMap::new();
    let (mut welcome, mut ok, mut caught, mut to_ok) = (vec![], vec![], vec![], vec![]);
    let (mut replayed, mut gaps, mut replay_events) = (vec![], vec![], vec![]);
    let (mut attempts, mut retried, mut reconnects) = (0u64, 0usize, 0usize);
    let mut last_error = None;
    for o in &part {
        let want = expected_for(o.room);
        expected += want;
        // Records of the room with seq < total that never reached Kafka are not expected.
        let r = o.room as u64;
        let lost_here: Vec<u64> = lost
            .iter()
            .filter(|s| **s % rooms as u64 == r)
            .map(|s| s / rooms as u64)
            .collect();
        let kmax = if total > r {
            (total - r).div_ceil(rooms as u64)
        } else {
            0
        };
        let mut got = 0;
        for k in 0..kmax {
            let set = o
                .bits
                .get((k / 64) as usize)
                .is_some_and(|w| w & (1 << (k % 64)) != 0);
            if set && !lost_here.contains(&k) {
                got += 1;
            }
        }
        have += got;
        missing += want - got.min(want);
        if got < want {
            incomplete += 1;
        }
        dups += o.duplicates;
        misrouted += o.misrouted;
        ooo += o.out_of_order;
        back += o.positions_backwards;
        resyncs += o.resyncs;
        if o.replayed.is_some_and(|r| r != o.replay_events) {
            replayed_mismatch += 1;
        }
        *sources_seen
            .entry(o.source.clone().unwrap_or_else(|| "no ok".into()))
            .or_default() += 1;
        *first_close
            .entry(o.first_close.map_or("open".into(), |c| c.to_string()))
            .or_default() += 1;
        if let Some(c) = o.second_close {
            *second_close.entry(c.to_string()).or_default() += 1;
        }
        welcome.extend(o.welcome_us);
        ok.extend(o.ok_us);
        caught.extend(o.caught_us);
        to_ok.extend(o.resume_to_ok_us);
        replayed.extend(o.replayed);
        replay_events.push(o.replay_events);
        gaps.extend(o.gap_offsets.map(|g| g.max(0) as u64));
        attempts += o.attempts as u64;
        if o.attempts > 1 {
            retried += 1;
        }
        if o.connections > 1 {
            reconnects += 1;
        }
        if o.last_error.is_some() {
            last_error = o.last_error.clone();
        }
    }
    let caught_n = caught.len();
    let storm_s = storm_wall.as_secs_f64();
    let cpu = |a: Option<procstat::ProcSample>, b: Option<procstat::ProcSample>| match (a, b) {
        (Some(a), Some(b)) => Some(b.cpu_s - a.cpu_s),
        _ => None,
    };
    let server_cpu = cpu(b0, b1);
    let by_source = |m: &Option<std::collections::HashMap<String, f64>>, name: &str| -> Value {
        let mut o = serde_json::Map::new();
        for s in ["memory", "kafka", "nothing", "resync"] {
            if let Some(v) = delta(&m0, m, &format!("{name}{{source=\"{s}\"}}")) {
                o.insert(s.into(), json!(v));
            }
        }
        Value::Object(o)
    };
    let report = json!({
        "tool": "roomcast-load",
        "mode": "resume-storm",
        "label": args.output.label,
        "target": "roomcast",
        "dist": dist.to_string(),
        "rooms": rooms,
        "rate": args.production.rate,
        "payload_bytes": args.production.payload_bytes,
        "connections": {
            "requested": n,
            "open": open,
            "failed": failed + (n - open - failed),
            "first_error": first_error,
            "connect_seconds": round(connect_seconds, 2),
        },
        "restart": {
            "live_seconds": round(live_wall, 2),
            "sigterm_to_exit_s": round(exit_took.as_secs_f64(), 3),
            "pause_s": args.down_seconds,
            "start_to_listening_s": round(b_listening, 3),
            "start_to_ready_s": round(b_ready, 3),
            "records_at_sigterm": s_term,
            "records_at_new_start": s_start,
            "records_at_reconnect": s0,
            "first_connection_close_codes": first_close,
        },
        "storm": {
            "all_caught_up_s": all_caught.map(|d| round(d.as_secs_f64(), 3)),
            "wall_s": round(storm_s, 3),
            "clients": part.len(),
            "caught_up": caught_n,
            "welcome_us": quantiles(&mut welcome),
            "ok_us": quantiles(&mut ok),
            "caught_up_us": quantiles(&mut caught),
            "resume_to_ok_us": quantiles(&mut to_ok),
            "handshake_attempts": attempts,
            "clients_that_retried": retried,
            "clients_resumed_more_than_once": reconnects,
            "last_error": last_error,
            "second_connection_close_codes": second_close,
            "kernel_tcp": match (&net0, &net1) {
                (Some(a), Some(b)) => json!(b
                    .iter()
                    .map(|(k, v)| (k.clone(), v.saturating_sub(a.get(k).copied().unwrap_or(0))))
                    .collect::<BTreeMap<_, _>>()),
                _ => Value::Null,
            },
        },
        "replay": {
            "replayed_per_client": quantiles(&mut replayed),
            "events_before_ok_per_client": quantiles(&mut replay_events),
            "gap_offsets_per_client": quantiles(&mut gaps),
            "sources_by_ok": sources_seen,
            "resync_frames": resyncs,
        },
        "server_metrics": {
            "resumes_by_source": by_source(&m1, "roomcast_resumes_total"),
            "replayed_records_by_source": by_source(&m1, "roomcast_replayed_records_total"),
            "replay_buffer_bytes": gauge(&m1, "roomcast_replay_buffer_bytes"),
            "replay_buffer_records": gauge(&m1, "roomcast_replay_buffer_records"),
            "slow_consumer_closes": delta(&m0, &m2, "roomcast_slow_consumer_closes_total"),
            "handshake_failures": delta(&m0, &m2, "roomcast_handshake_failures_total"),
            "connections_at_end": gauge(&m2, "roomcast_connections"),
            // Kafka timestamp to queued, for live records during the storm: whether the
            // consumer loop kept up while the resumes ran.
            "record_latency_bucket_le_s": match (&m0, &m1) {
                (Some(a), Some(b)) => procstat::histogram_quantiles(
                    a,
                    b,
                    "roomcast_record_latency_seconds",
                    &[0.5, 0.99, 1.0],
                )
                .map(|q| json!({ "p50": q[0], "p99": q[1], "max": q[2] }))
                .unwrap_or(Value::Null),
                _ => Value::Null,
            },
        },
        "server": {
            "first_rss_end_of_live_kib": live_b.map(|s| s.rss_kib),
            "first_cpu_cores_live": match (live_a, live_b) {
                (Some(a), Some(b)) => Some(round((b.cpu_s - a.cpu_s) / live_wall.max(1e-9), 3)),
                _ => None,
            },
            "first_replay_buffer_bytes": gauge(&metrics_a, "roomcast_replay_buffer_bytes"),
            "startup_cpu_s": startup_cpu.map(|c| round(c, 3)),
            "storm_cpu_s": server_cpu.map(|c| round(c, 3)),
            "storm_cpu_cores": server_cpu.map(|c| round(c / storm_s.max(1e-9), 3)),
            "rss_at_reconnect_kib": b0.map(|s| s.rss_kib),
            "rss_peak_kib": rss_peak,
            "rss_caught_up_kib": b1.map(|s| s.rss_kib),
            "rss_end_kib": rss_end,
        },
        "client": {
            "storm_cpu_cores": cpu(c0, c1).map(|c| round(c / storm_s.max(1e-9), 3)),
            "rss_end_kib": c1.map(|s| s.rss_kib),
        },
        "broker": { "storm_cpu_cores": cpu(k0, k1).map(|c| round(c / storm_s.max(1e-9), 3)) },
        "machine": match (mach0, mach1) {
            (Some(a), Some(b)) => {
                let ours = server_cpu.unwrap_or(0.0) + cpu(c0, c1).unwrap_or(0.0) + cpu(k0, k1).unwrap_or(0.0);
                json!({
                    "cores": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
                    "busy_cores": round((b - a) / storm_s.max(1e-9), 3),
                    "other_busy_cores": round(((b - a) - ours).max(0.0) / storm_s.max(1e-9), 3),
                })
            }
            _ => Value::Null,
        },
        "records": {
            "attempted": total,
            "refused": outcome.refused,
            "failed_after_send": counters.errors.load(Ordering::Relaxed),
            "max_send_delay_us": outcome.max_send_delay_us,
            "producer_seconds": round(outcome.elapsed.as_secs_f64(), 2),
        },
        "verification": {
            "expected": expected,
            "received": have,
            "lost": missing,
            "duplicates": dups,
            "out_of_order": ooo,
            "misrouted": misrouted,
            "positions_backwards": back,
            "clients_incomplete": incomplete,
            "replayed_count_mismatch": replayed_mismatch,
        },
        "other_frames": board.other_frames.load(Ordering::Relaxed),
    });
    print(&report);
    Ok(report)
}

fn print(r: &Value) {
    let s = &r["storm"];
    let ms = |v: &Value| crate::us_as_ms(v, 0);
    let dist = |name: &str| {
        let d = &s[name];
        format!(
            "p50 {}  p99 {}  max {}",
            ms(&d["p50"]),
            ms(&d["p99"]),
            ms(&d["max"])
        )
    };
    eprintln!("== resume storm {} ({})", r["dist"], r["label"]);
    eprintln!(
        "clients: {} resumed of {} connected; all caught up after {} s",
        s["caught_up"], s["clients"], s["all_caught_up_s"]
    );
    eprintln!("welcome   {}", dist("welcome_us"));
    eprintln!("ok        {}", dist("ok_us"));
    eprintln!("caught up {}", dist("caught_up_us"));
    eprintln!(
        "replayed per client: {}; sources {}",
        r["replay"]["replayed_per_client"], r["replay"]["sources_by_ok"]
    );
    eprintln!("server: {} ; metrics {}", r["server"], r["server_metrics"]);
    eprintln!("verification: {}", r["verification"]);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn client(room: u64, rooms: u64) -> Client {
        Client {
            room,
            rooms,
            positions: Vec::new(),
            need_k: 0,
            need: u64::MAX,
            have: 0,
            out: Outcome::default(),
        }
    }

    fn event(offset: i64, seq: u64) -> String {
        format!(
            r#"{{"type":"event","event":"e","pos":"t:0:{offset}","payload":{{"taskId":"g","seq":{seq},"sent_us":1}}}}"#
        )
    }

    #[test]
    fn keeps_positions_and_checks_order() {
        let board = Board::default();
        let mut c = client(1, 4);
        c.merge_positions(r#"{"type":"welcome","positions":{"t:0":-1}}"#)
            .unwrap();
        c.on_text(&event(0, 1), &board);
        c.on_text(&event(3, 5), &board);
        assert_eq!(c.position("t:0"), Some(3));
        c.on_text(r#"{"type":"positions","positions":{"t:0":9}}"#, &board);
        assert_eq!(c.position("t:0"), Some(9));
        c.on_text(&event(8, 9), &board); // behind the watermark
        assert_eq!(c.out.out_of_order, 1);
        c.on_text(&event(10, 5), &board); // seq 5 again
        assert_eq!(c.out.duplicates, 1);
        c.on_text(&event(11, 2), &board); // room 2
        assert_eq!(c.out.misrouted, 1);
        c.on_text(r#"{"type":"positions","positions":{"t:0":4}}"#, &board);
        assert_eq!(c.out.positions_backwards, 1);
        assert_eq!(c.out.unique, 3);
        let f: Value = serde_json::from_str(&c.resume_frame(&Some("task:g1".into()))).unwrap();
        assert_eq!(f["positions"]["t:0"], 11);
        assert_eq!(f["rooms"][0], "task:g1");
    }

    #[test]
    fn catch_up_target_counts_what_is_already_in() {
        let board = Board::default();
        let mut c = client(1, 4);
        // Records 1, 5, 9 (k = 0, 1, 2) in; 13 and 17 produced before t0; 13 never reached Kafka.
        for (o, s) in [(0, 1), (1, 5), (2, 9)] {
            c.on_text(&event(o, s), &board);
        }
        c.set_target(18, &[13]);
        assert_eq!((c.need_k, c.need, c.have), (5, 4, 3));
        c.out.ok_us = Some(1);
        assert!(!c.caught_up());
        c.on_text(&event(5, 17), &board);
        assert!(c.caught_up());
        assert_eq!(pos(event(42, 1).as_bytes()), Some(("t:0", 42)));
        assert_eq!(
            string_after(r#"{"type":"ok","replayed":3,"source":"memory"}"#, "source"),
            Some("memory")
        );
    }

    #[test]
    fn quantiles_by_nearest_rank() {
        let mut v: Vec<u64> = (1..=100).collect();
        let q = quantiles(&mut v);
        assert_eq!(q["p50"], 50);
        assert_eq!(q["p99"], 99);
        assert_eq!(q["max"], 100);
    }
}
