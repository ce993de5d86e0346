//! The client side: opens WebSocket connections, subscribes each to its room, and receives.
//!
//! Per connection there is one task, a 4 KiB read buffer and a bitmap of the records it got;
//! latency goes into a few shared HDR histograms. Nothing else is kept per connection.
//!
//! A "slow" connection (`--slow-fraction`) stops reading right after its subscribe `ok` and
//! holds the socket until the run ends, so the server's queue for it fills up. With
//! `--slow-keepalive` it still writes an unsolicited pong now and then (reading nothing), so
//! that the server's idle timeout does not close it before its queue is full.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures_util::{SinkExt, StreamExt};
use hdrhistogram::Histogram;
use memchr::memmem::Finder;
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::{mpsc, watch, Semaphore};
use tokio::time::timeout;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_tungstenite::{client_async_with_config, WebSocketStream};

use crate::wire::{self, Frame};

const HIST_SHARDS: usize = 16;
/// The worst latency is also kept per slot of this many µs of intended send time, so a tail
/// can be told apart as a few stalls or as a steady spread, and lined up with other logs.
pub const SLOT_US: u64 = 100_000;
/// Slots whose worst latency is above this count as stalls in the reports.
const STALL_US: u64 = 10_000;

/// The slot of a record sent at `sent`, for a window starting at `start` (`sent >= start`).
pub fn slot_of(sent: u64, start: u64) -> usize {
    ((sent - start) / SLOT_US) as usize
}

/// How many slots had a worst latency above `STALL_US`.
pub fn stalls(worst: &[u64]) -> usize {
    worst.iter().filter(|&&w| w > STALL_US).count()
}
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(15);

pub fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

pub fn new_histogram() -> Histogram<u64> {
    // 1 µs .. 1 h, 3 significant digits.
    Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("valid histogram bounds")
}

/// What every receiving task adds to.
pub struct Shared {
    hist: Vec<Mutex<Histogram<u64>>>,
    /// Latency is recorded for records whose intended send time is in [start, end).
    pub window_start_us: AtomicU64,
    pub window_end_us: AtomicU64,
    /// Event frames received, in total and while the receive time was in the window.
    pub received: AtomicU64,
    pub received_in_window: AtomicU64,
    pub event_bytes: AtomicU64,
    pub other_frames: AtomicU64,
    /// The worst latency (µs) of the records sent in each `SLOT_US` of the window.
    worst: Vec<AtomicU64>,
}

impl Shared {
    /// `window` is the measured window's length: one worst-latency slot per `SLOT_US` of it.
    pub fn new(window: Duration) -> Shared {
        let slots = (window.as_micros() as u64).div_ceil(SLOT_US) as usize;
        Shared {
            hist: (0..HIST_SHARDS)
                .map(|_| Mutex::new(new_histogram()))
                .collect(),
            window_start_us: AtomicU64::new(u64::MAX),
            window_end_us: AtomicU64::new(u64::MAX),
            received: AtomicU64::new(0),
            received_in_window: AtomicU64::new(0),
            event_bytes: AtomicU64::new(0),
            other_frames: AtomicU64::new(0),
            worst: (0..slots).map(|_| AtomicU64::new(0)).collect(),
        }
    }

    /// The worst latency of each slot of the window, in µs (0: nothing sent in it arrived).
    pub fn worst_per_slot(&self) -> Vec<u64> {
        self.worst
            .iter()
            .map(|w| w.load(Ordering::Relaxed))
            .collect()
    }

    fn record_worst(&self, sent: u64, start: u64, latency: u64) {
        // Every connection's receiver lands here: read first, so that the common case (not
        // a new worst) leaves the shared cache line alone.
        if let Some(w) = self.worst.get(slot_of(sent, start)) {
            if latency > w.load(Ordering::Relaxed) {
                w.fetch_max(latency, Ordering::Relaxed);
            }
        }
    }

    pub fn histogram(&self) -> Histogram<u64> {
        let mut all = new_histogram();
        for h in &self.hist {
            let h = h.lock().unwrap_or_else(|e| e.into_inner());
            all.add(&*h).expect("same bounds");
        }
        all
    }
}

/// Where to connect and how.
pub struct Target {
    pub url: String,
    pub addr: SocketAddr,
    /// Client source addresses, used in turn by blocks of connections.
    pub sources: Vec<IpAddr>,
    pub per_source: usize,
    pub read_buffer: usize,
    /// Rooms in the distribution: record `seq` is for room `seq % rooms`.
    pub rooms: usize,
    /// How often a slow connection sends an unsolicited pong (None: it stays silent).
    pub slow_keepalive: Option<Duration>,
}

/// One connection to open.
pub struct Plan {
    pub index: usize,
    pub room: usize,
    pub token: String,
    pub subscribe: Option<String>,
    /// Stops reading after the subscribe `ok` (or the welcome, with no room to join).
    pub slow: bool,
}

/// Whether connection `i` of a run is one of the slow ones: `fraction` of all connections,
/// spread evenly (0.01: every 100th, starting with the 100th), so every part of the
/// connect order and every source address has its share.
pub fn is_slow(i: usize, fraction: f64) -> bool {
    if fraction <= 0.0 {
        return false;
    }
    ((i + 1) as f64 * fraction).floor() > (i as f64 * fraction).floor()
}

/// `count` client source addresses from `first` upwards (127.0.0.1, 127.0.0.2, ...), enough
/// for `n` connections at `per_source` each, at most 250; all inside 127.0.0.0/8.
pub fn source_addresses(
    first: Ipv4Addr,
    n: usize,
    per_source: usize,
) -> Result<Vec<IpAddr>, String> {
    let count = n.div_ceil(per_source.max(1)).clamp(1, 250) as u32;
    let base = u32::from(first);
    (0..count)
        .map(|k| {
            let a = Ipv4Addr::from(base.saturating_add(k));
            if a.is_loopback() && a.octets()[3] != 0 && a.octets()[3] != 255 {
                Ok(IpAddr::V4(a))
            } else {
                Err(format!(
                    "{count} source addresses from {first} do not fit in 127.0.0.0/8 \
                     (the last octet must stay within 1..254)"
                ))
            }
        })
        .collect()
}

#[derive(Debug, Default, Clone)]
pub struct ConnStats {
    pub room: usize,
    pub connected: bool,
    /// Distinct records received.
    pub unique: u64,
    pub duplicates: u64,
    /// Records for a room this connection is not in.
    pub misrouted: u64,
    pub out_of_order: u64,
    /// Close code if the server ended the connection before the run did (1006: no close frame).
    pub closed_by_server: Option<u16>,
    /// Stopped reading after its `ok`: left out of every delivery count.
    pub slow: bool,
}

/// Outcome of one connection attempt, sent as soon as it is known.
pub type Ready = (usize, Result<(), String>);

/// Spawns one task per plan, paced at `per_second` with at most `concurrency` handshakes at
/// once. Every task reports on `ready` once connected (or failed), then receives until `stop`.
pub fn spawn_all(
    plans: Vec<Plan>,
    target: Arc<Target>,
    per_second: f64,
    concurrency: usize,
    shared: Arc<Shared>,
    ready: mpsc::UnboundedSender<Ready>,
    stop: watch::Receiver<bool>,
) -> tokio::task::JoinHandle<Vec<tokio::task::JoinHandle<ConnStats>>> {
    tokio::spawn(async move {
        let sem = Arc::new(Semaphore::new(concurrency.max(1)));
        let mut handles = Vec::with_capacity(plans.len());
        let start = tokio::time::Instant::now();
        for (n, plan) in plans.into_iter().enumerate() {
            if *stop.borrow() {
                break;
            }
            if per_second > 0.0 {
                let due = start + Duration::from_secs_f64(n as f64 / per_second);
                tokio::time::sleep_until(due).await;
            }
            let permit = sem.clone().acquire_owned().await.expect("never closed");
            let task = connection(
                plan,
                target.clone(),
                shared.clone(),
                ready.clone(),
                stop.clone(),
                permit,
            );
            handles.push(tokio::spawn(task));
        }
        handles
    })
}

async fn connection(
    plan: Plan,
    target: Arc<Target>,
    shared: Arc<Shared>,
    ready: mpsc::UnboundedSender<Ready>,
    mut stop: watch::Receiver<bool>,
    permit: tokio::sync::OwnedSemaphorePermit,
) -> ConnStats {
    let mut stats = ConnStats {
        room: plan.room,
        slow: plan.slow,
        ..Default::default()
    };
    let opened = timeout(HANDSHAKE_TIMEOUT, open(&plan, &target, &shared)).await;
    drop(permit);
    let mut conn = match opened {
        Ok(Ok(conn)) => conn,
        Ok(Err(e)) => {
            let _ = ready.send((plan.index, Err(e)));
            return stats;
        }
        Err(_) => {
            let _ = ready.send((plan.index, Err("handshake timed out".into())));
            return stats;
        }
    };
    stats.connected = true;
    let _ = ready.send((plan.index, Ok(())));
    drop(ready);
    if plan.slow {
        hold_unread(conn, stop, target.slow_keepalive).await;
        return stats;
    }
    let mut recv = Receiver {
        room: plan.room as u64,
        rooms: target.rooms as u64,
        bits: Vec::new(),
        last: None,
        shard: plan.index % HIST_SHARDS,
    };
    if *stop.borrow() {
        return stats;
    }
    stats.closed_by_server = loop {
        // One clock reading per read: every frame in it arrived by then.
        let mut batch = Batch::new(now_us(), &shared);
        let closed = loop {
            match conn.buffered() {
                Ok(Some(Frame::Text(t))) => recv.on_text(t, &mut batch, &shared, &mut stats),
                Ok(Some(Frame::Close(code))) => break Some(code),
                Ok(None) => break None,
                Err(_) => break Some(PROTOCOL_ERROR),
            }
        };
        batch.count(&shared);
        if closed.is_some() {
            break closed;
        }
        if conn.answer_pings().await.is_err() {
            break Some(ABNORMAL);
        }
        tokio::select! {
            biased;
            _ = stop.changed() => break None,
            read = conn.fill() => if !matches!(read, Ok(n) if n > 0) {
                break Some(ABNORMAL);
            },
        }
    };
    stats.unique = recv.bits.iter().map(|w| w.count_ones() as u64).sum();
    stats
}

/// The close code counted when the socket ended without a close frame.
const ABNORMAL: u16 = 1006;
/// The close code counted when the server sent something this side cannot parse.
const PROTOCOL_ERROR: u16 = 1002;

/// Keeps the socket open without ever reading it again (no reply to pings or to a close),
/// until the run ends: the kernel buffers fill, then the server's queue for this connection.
/// With `keepalive`, an unsolicited pong goes out that often: the server hears from the peer,
/// and owes it no answer (RFC 6455, 5.5.3).
async fn hold_unread(
    mut conn: wire::Conn,
    mut stop: watch::Receiver<bool>,
    keepalive: Option<Duration>,
) {
    let mut every = keepalive.unwrap_or(Duration::MAX);
    while !*stop.borrow_and_update() {
        tokio::select! {
            changed = stop.changed() => {
                if changed.is_err() {
                    break;
                }
            }
            _ = tokio::time::sleep(every) => {
                if !matches!(timeout(HANDSHAKE_TIMEOUT, conn.send_pong()).await, Ok(Ok(()))) {
                    // Closed by the server, most likely: hold the socket anyway, quietly.
                    every = Duration::MAX;
                }
            }
        }
    }
    drop(conn);
}

/// What the frames of one read add to the shared counters, added once per read: three
/// atomic additions per frame on lines both client threads write cost more than the parsing.
struct Batch {
    now: u64,
    /// The measured window, read once per read too.
    start: u64,
    end: u64,
    received: u64,
    bytes: u64,
    other: u64,
}

impl Batch {
    fn new(now: u64, shared: &Shared) -> Batch {
        let start = shared.window_start_us.load(Ordering::Relaxed);
        let end = shared.window_end_us.load(Ordering::Relaxed);
        Batch {
            now,
            start,
            end,
            received: 0,
            bytes: 0,
            other: 0,
        }
    }

    fn count(self, shared: &Shared) {
        if self.received > 0 {
            shared.received.fetch_add(self.received, Ordering::Relaxed);
            shared.event_bytes.fetch_add(self.bytes, Ordering::Relaxed);
            if self.now >= self.start && self.now < self.end {
                shared
                    .received_in_window
                    .fetch_add(self.received, Ordering::Relaxed);
            }
        }
        if self.other > 0 {
            shared.other_frames.fetch_add(self.other, Ordering::Relaxed);
        }
    }
}

struct Receiver {
    room: u64,
    rooms: u64,
    /// Bit k: record `room + k * rooms` was received.
    bits: Vec<u64>,
    last: Option<u64>,
    shard: usize,
}

impl Receiver {
    fn on_text(&mut self, text: &[u8], batch: &mut Batch, shared: &Shared, stats: &mut ConnStats) {
        if !text.starts_with(b"{\"type\":\"event\"") {
            batch.other += 1;
            return;
        }
        let (Some(seq), Some(sent)) = (number_with(text, &SEQ), number_with(text, &SENT)) else {
            batch.other += 1;
            return;
        };
        batch.received += 1;
        batch.bytes += text.len() as u64;
        if seq % self.rooms != self.room {
            stats.misrouted += 1;
            return;
        }
        let k = (seq / self.rooms) as usize;
        let (word, bit) = (k / 64, 1u64 << (k % 64));
        if word >= self.bits.len() {
            self.bits.resize(word + 1, 0);
        }
        if self.bits[word] & bit != 0 {
            stats.duplicates += 1;
            return;
        }
        self.bits[word] |= bit;
        if self.last.is_some_and(|l| seq < l) {
            stats.out_of_order += 1;
        }
        self.last = Some(seq);
        if sent >= batch.start && sent < batch.end {
            let latency = batch.now.saturating_sub(sent).max(1);
            self.shard_lock(shared).saturating_record(latency);
            shared.record_worst(sent, batch.start, latency);
        }
    }

    fn shard_lock<'a>(&self, shared: &'a Shared) -> std::sync::MutexGuard<'a, Histogram<u64>> {
        shared.hist[self.shard]
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }
}

static SEQ: LazyLock<Finder<'static>> = LazyLock::new(|| Finder::new(b"\"seq\":"));
static SENT: LazyLock<Finder<'static>> = LazyLock::new(|| Finder::new(b"\"sent_us\":"));

/// The unsigned integer right after `key` in `text` (a flat scan; keys are unique here).
pub fn number_after(text: &[u8], key: &[u8]) -> Option<u64> {
    digits_at(text, memchr::memmem::find(text, key)? + key.len())
}

/// `number_after` with a searcher built once, for the receive path.
fn number_with(text: &[u8], key: &Finder<'_>) -> Option<u64> {
    digits_at(text, key.find(text)? + key.needle().len())
}

fn digits_at(text: &[u8], at: usize) -> Option<u64> {
    let mut n: u64 = 0;
    let mut digits = 0;
    for &b in &text[at..] {
        if b.is_ascii_digit() {
            n = n.checked_mul(10)?.checked_add((b - b'0') as u64)?;
            digits += 1;
        } else if b == b' ' && digits == 0 {
            continue;
        } else {
            break;
        }
    }
    (digits > 0).then_some(n)
}

async fn open(plan: &Plan, target: &Target, shared: &Shared) -> Result<wire::Conn, String> {
    let source = target.sources[(plan.index / target.per_source.max(1)) % target.sources.len()];
    let tcp = connect(bound_socket(source)?, target.addr).await?;
    let seed = (plan.index as u32).wrapping_mul(0x9E37_79B9);
    let (mut conn, _welcome) =
        wire::upgrade(&target.url, tcp, &plan.token, target.read_buffer, seed).await?;
    if let Some(room) = &plan.subscribe {
        subscribe_on(&mut conn, room, &shared.other_frames).await?;
    }
    Ok(conn)
}

/// Joins `room` and waits for the `ok`; frames before it are counted in `other`.
pub async fn subscribe_on(
    conn: &mut wire::Conn,
    room: &str,
    other: &AtomicU64,
) -> Result<(), String> {
    conn.send_text(&subscribe_frame(room))
        .await
        .map_err(|e| format!("subscribe: {e}"))?;
    loop {
        match conn.next().await {
            Ok(Frame::Text(t)) if t.starts_with(b"{\"type\":\"ok\"") => return Ok(()),
            Ok(Frame::Text(t)) if t.starts_with(b"{\"type\":\"error\"") => {
                return Err(format!("subscribe refused: {}", String::from_utf8_lossy(t)))
            }
            Ok(Frame::Text(_)) => {
                other.fetch_add(1, Ordering::Relaxed);
            }
            other => return Err(format!("closed while subscribing: {other:?}")),
        }
    }
}

fn subscribe_frame(room: &str) -> String {
    format!(r#"{{"type":"subscribe","id":1,"rooms":["{room}"]}}"#)
}

/// Why a connection did not get as far as its welcome frame.
#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    /// This side could not make or bind its socket (out of files, or of ports at the address).
    #[error("socket {source_addr}: {error}")]
    Socket {
        source_addr: IpAddr,
        error: std::io::Error,
    },
    #[error("connect: {0}")]
    Connect(std::io::Error),
    /// The server answered the upgrade request with this status instead of 101.
    #[error("HTTP status {0}")]
    Status(u16),
    #[error("handshake: {0}")]
    WebSocket(tungstenite::Error),
    #[error("expected a welcome frame, got {0}")]
    NoWelcome(String),
    /// The server's answer is not a WebSocket upgrade this side can read.
    #[error("protocol: {0}")]
    Protocol(String),
}

impl From<HandshakeError> for String {
    fn from(e: HandshakeError) -> String {
        e.to_string()
    }
}

/// A TCP socket bound to `source` (port chosen by the kernel), not yet connected.
pub fn bound_socket(source: IpAddr) -> Result<TcpSocket, HandshakeError> {
    let socket_error = |error| HandshakeError::Socket {
        source_addr: source,
        error,
    };
    let sock = TcpSocket::new_v4().map_err(socket_error)?;
    sock.bind(SocketAddr::new(source, 0))
        .map_err(socket_error)?;
    Ok(sock)
}

/// Connects `sock` to `addr`.
pub async fn connect(sock: TcpSocket, addr: SocketAddr) -> Result<TcpStream, HandshakeError> {
    let tcp = sock.connect(addr).await.map_err(HandshakeError::Connect)?;
    tcp.set_nodelay(true).map_err(HandshakeError::Connect)?;
    Ok(tcp)
}

/// The WebSocket upgrade over `tcp` with the token in the subprotocol, then the welcome frame;
/// returns the stream with the welcome's text.
pub async fn upgrade(
    url: &str,
    tcp: TcpStream,
    token: &str,
    read_buffer: usize,
) -> Result<(WebSocketStream<TcpStream>, String), HandshakeError> {
    let mut req = url
        .into_client_request()
        .map_err(HandshakeError::WebSocket)?;
    let protocols = HeaderValue::from_str(&format!("roomcast.v1, bearer.{token}"))
        .map_err(|e| HandshakeError::NoWelcome(format!("a token unfit for a header: {e}")))?;
    req.headers_mut()
        .insert("Sec-WebSocket-Protocol", protocols);
    let config = WebSocketConfig::default()
        .read_buffer_size(read_buffer)
        .write_buffer_size(0);
    let (mut ws, _) = client_async_with_config(req, tcp, Some(config))
        .await
        .map_err(|e| match e {
            tungstenite::Error::Http(r) => HandshakeError::Status(r.status().as_u16()),
            e => HandshakeError::WebSocket(e),
        })?;
    match ws.next().await {
        Some(Ok(Message::Text(t))) if t.as_str().starts_with("{\"type\":\"welcome\"") => {
            Ok((ws, t.as_str().to_string()))
        }
        other => Err(HandshakeError::NoWelcome(format!("{other:?}"))),
    }
}

/// A WebSocket connection from `source` to `addr` with the token in the subprotocol; returns
/// it with the text of its welcome frame.
pub async fn handshake(
    url: &str,
    addr: SocketAddr,
    source: IpAddr,
    token: &str,
    read_buffer: usize,
) -> Result<(WebSocketStream<TcpStream>, String), HandshakeError> {
    let tcp = connect(bound_socket(source)?, addr).await?;
    upgrade(url, tcp, token, read_buffer).await
}

/// Joins `room` and waits for the `ok`; frames before it are counted in `other`.
pub async fn subscribe(
    ws: &mut WebSocketStream<TcpStream>,
    room: &str,
    other: &AtomicU64,
) -> Result<(), String> {
    ws.send(Message::text(subscribe_frame(room)))
        .await
        .map_err(|e| format!("subscribe: {e}"))?;
    loop {
        match ws.next().await {
            Some(Ok(Message::Text(t))) => {
                let t = t.as_str();
                if t.starts_with("{\"type\":\"ok\"") {
                    return Ok(());
                }
                if t.starts_with("{\"type\":\"error\"") {
                    return Err(format!("subscribe refused: {t}"));
                }
                other.fetch_add(1, Ordering::Relaxed);
            }
            Some(Ok(_)) => {}
            other => return Err(format!("closed while subscribing: {other:?}")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_numbers() {
        let f = br#"{"type":"event","pos":"t:0:9","payload":{"seq":123,"sent_us": 456,"x":"y"}}"#;
        assert_eq!(number_after(f, b"\"seq\":"), Some(123));
        assert_eq!(number_after(f, b"\"sent_us\":"), Some(456));
        assert_eq!(number_after(f, b"\"nope\":"), None);
    }

    #[test]
    fn worst_latency_is_kept_per_slot_of_send_time() {
        let shared = Shared::new(Duration::from_millis(250));
        let start = 1_000_000;
        shared.record_worst(start, start, 700);
        shared.record_worst(start + SLOT_US - 1, start, 300);
        shared.record_worst(start + 2 * SLOT_US + 5, start, 12_000);
        shared.record_worst(start + 2 * SLOT_US + 6, start, 9_000);
        // Past the window (a late drain): dropped, not a panic or a new slot.
        shared.record_worst(start + 3 * SLOT_US, start, 50_000);
        assert_eq!(shared.worst_per_slot(), vec![700, 0, 12_000]);
    }

    #[test]
    fn slow_ones_are_spread_evenly() {
        let slow: Vec<usize> = (0..1000).filter(|i| is_slow(*i, 0.01)).collect();
        assert_eq!(slow.len(), 10);
        assert_eq!(slow[0], 99);
        assert_eq!(slow[9], 999);
        assert_eq!((0..1000).filter(|i| is_slow(*i, 0.25)).count(), 250);
        assert!(!(0..1000).any(|i| is_slow(i, 0.0)));
        assert!((0..10).all(|i| is_slow(i, 1.0)));
    }

    #[test]
    fn source_addresses_count_up_and_stay_in_loopback() {
        let a = source_addresses(Ipv4Addr::new(127, 0, 2, 1), 19_000, 8000).unwrap();
        assert_eq!(a.len(), 3);
        assert_eq!(a[2], IpAddr::V4(Ipv4Addr::new(127, 0, 2, 3)));
        assert!(source_addresses(Ipv4Addr::new(127, 0, 2, 253), 19_000, 8000).is_err());
        assert_eq!(
            source_addresses(Ipv4Addr::new(127, 0, 0, 1), 0, 8000)
                .unwrap()
                .len(),
            1
        );
    }
}
