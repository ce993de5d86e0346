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

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, watch, OwnedSemaphorePermit, Semaphore};
use tokio::time::timeout;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

use crate::client::{self, number_after, Plan};
use crate::procstat;
use crate::round;
use crate::server::{Server, Spec};

mod report;
mod run;

pub use run::run;

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
    let opened = open_first(&mut c, &plan, &first, &board, permit).await;
    let ws = match opened {
        Ok(ws) => ws,
        Err(e) => {
            let _ = ready.send((plan.index, Err(e)));
            return c.out;
        }
    };
    c.out.first_connected = true;
    let _ = ready.send((plan.index, Ok(())));
    drop(ready);
    live_on_first(&mut c, ws, &mut phase, &board).await;
    board.first_closed.fetch_add(1, Ordering::Relaxed);
    let Some(rc) = await_reconnect(&mut phase).await else {
        return c.out;
    };
    c.set_target(rc.s0, &rc.lost);
    resume_until_stopped(&mut c, &plan, first.read_buffer, &rc, &mut phase, &board).await;
    c.out
}

/// The first connection: welcome positions, then the group's room.
async fn open_first(
    c: &mut Client,
    plan: &Plan,
    first: &FirstTarget,
    board: &Board,
    permit: OwnedSemaphorePermit,
) -> Result<Ws, String> {
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
    opened.unwrap_or_else(|_| Err("handshake timed out".into()))
}

/// Live events on the first connection, until the server closes it or the phase moves on.
async fn live_on_first(
    c: &mut Client,
    mut ws: Ws,
    phase: &mut watch::Receiver<Phase>,
    board: &Board,
) {
    loop {
        tokio::select! {
            biased;
            changed = phase.changed() => {
                if changed.is_err() || !matches!(*phase.borrow(), Phase::First) {
                    return;
                }
            }
            m = ws.next() => match m {
                Some(Ok(Message::Text(t))) => {
                    c.on_text(t.as_str(), board);
                }
                Some(Ok(Message::Close(f))) => {
                    c.out.first_close = Some(close_code(f));
                    finish_close(&mut ws).await;
                    return;
                }
                Some(Ok(_)) => {}
                Some(Err(_)) | None => {
                    c.out.first_close = Some(1006);
                    return;
                }
            },
        }
    }
}

/// Waits for the signal to reconnect, keeping the map; None when told to stop instead.
async fn await_reconnect(phase: &mut watch::Receiver<Phase>) -> Option<Arc<Reconnect>> {
    loop {
        let p = phase.borrow_and_update().clone();
        match p {
            Phase::Reconnect(rc) => return Some(rc),
            Phase::Stop => return None,
            Phase::First => phase.changed().await.ok()?,
        }
    }
}

/// Reconnects with ?resume=1 and resumes; again whenever the server closes the connection,
/// until told to stop or past the deadline.
async fn resume_until_stopped(
    c: &mut Client,
    plan: &Plan,
    read_buffer: usize,
    rc: &Reconnect,
    phase: &mut watch::Receiver<Phase>,
    board: &Board,
) {
    let source = rc.sources[(plan.index / rc.per_source.max(1)) % rc.sources.len()];
    let mut backoff = Duration::from_millis(100);
    while Instant::now() <= rc.deadline {
        let limit = match &rc.limit {
            Some(s) => s.clone().acquire_owned().await.ok(),
            None => None,
        };
        c.out.attempts += 1;
        let attempt = timeout(
            RECONNECT_TIMEOUT,
            resume_attempt(c, plan, read_buffer, rc, source),
        )
        .await;
        drop(limit);
        let (ws, sent_at) = match attempt {
            Ok(Ok((ws, welcomed, sent_at))) => {
                if c.out.welcome_us.is_none() {
                    c.out.welcome_us = Some(us(welcomed));
                    board.welcomed.fetch_add(1, Ordering::Relaxed);
                }
                (ws, sent_at)
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
        if receive_resumed(c, ws, rc, sent_at, phase, board).await == Resumed::Stopped {
            return;
        }
        // Closed by the server: resume again from the map.
        retry_pause(&mut backoff, plan.index).await;
    }
}

/// One handshake and `resume`: the connection, its welcome's time after t0, and when the
/// `resume` went out.
async fn resume_attempt(
    c: &Client,
    plan: &Plan,
    read_buffer: usize,
    rc: &Reconnect,
    source: IpAddr,
) -> Result<(Ws, Duration, Instant), String> {
    let (mut ws, _welcome) =
        client::handshake(&rc.url, rc.addr, source, &plan.token, read_buffer).await?;
    let welcomed = rc.t0.elapsed();
    let frame = c.resume_frame(&plan.subscribe);
    let sent_at = Instant::now();
    ws.send(Message::text(frame))
        .await
        .map_err(|e| format!("resume: {e}"))?;
    Ok((ws, welcomed, sent_at))
}

/// How a resumed connection ended.
#[derive(PartialEq, Eq)]
enum Resumed {
    /// The run told every client to stop.
    Stopped,
    /// The server closed it (or it broke).
    Closed,
}

/// The resumed connection's frames: the replay, the `ok`, then live events.
async fn receive_resumed(
    c: &mut Client,
    mut ws: Ws,
    rc: &Reconnect,
    sent_at: Instant,
    phase: &mut watch::Receiver<Phase>,
    board: &Board,
) -> Resumed {
    let first_resume = c.out.connections == 1;
    let at_resume = c.position_sum();
    let mut got_ok = false;
    loop {
        tokio::select! {
            biased;
            changed = phase.changed() => {
                if changed.is_err() || matches!(*phase.borrow(), Phase::Stop) {
                    return Resumed::Stopped;
                }
            }
            m = ws.next() => match m {
                Some(Ok(Message::Text(t))) => {
                    let text = t.as_str();
                    match c.on_text(text, board) {
                        Kind::Event if !got_ok && first_resume => c.out.replay_events += 1,
                        Kind::Ok if !got_ok => {
                            got_ok = true;
                            c.on_ok(text, rc, sent_at, at_resume, board);
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
                    return Resumed::Closed;
                }
                Some(Ok(_)) => {}
                Some(Err(_)) | None => {
                    c.out.second_close = Some(1006);
                    return Resumed::Closed;
                }
            },
        }
    }
}

impl Client {
    /// The first `ok` of the run: its timing, `replayed` count, `source`, and the offsets
    /// between the position resumed from and the cut.
    fn on_ok(
        &mut self,
        text: &str,
        rc: &Reconnect,
        sent_at: Instant,
        at_resume: i64,
        board: &Board,
    ) {
        if self.out.ok_us.is_some() {
            return;
        }
        self.out.ok_us = Some(us(rc.t0.elapsed()));
        self.out.resume_to_ok_us = Some(us(sent_at.elapsed()));
        self.out.replayed = number_after(text.as_bytes(), b"\"replayed\":");
        self.out.source = string_after(text, "source").map(String::from);
        self.out.gap_offsets = Some(self.position_sum() - at_resume);
        board.oks.fetch_add(1, Ordering::Relaxed);
    }
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
