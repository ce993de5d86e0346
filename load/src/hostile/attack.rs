//! The attacks of a hostile run, each bounded in connections and in time: event filters that
//! backtrack, connections that never finish their request head, one subscribe with thousands
//! of rooms, a flood of pings, and a burst of connections with many rooms each.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinHandle;
use tokio::time::timeout;

use super::feed::Switches;
use crate::client;
use crate::frame;
use crate::wire::{self, Frame};

const CONNECT_TIMEOUT: Duration = Duration::from_secs(15);
const REPLY_TIMEOUT: Duration = Duration::from_secs(30);

/// What every attack needs to reach the server.
#[derive(Clone)]
pub struct Reach {
    pub public: SocketAddr,
    pub secret: String,
    pub ttl: u64,
}

impl Reach {
    fn url(&self) -> String {
        format!("ws://{}/ws", self.public)
    }

    /// A WebSocket of user `sub` (granted `task:*`) from `source`.
    async fn open(&self, sub: &str, source: IpAddr) -> Result<wire::Conn, String> {
        let token = crate::token(&self.secret, sub, self.ttl).map_err(|e| e.to_string())?;
        let attempt = async {
            let tcp = client::connect(client::bound_socket(source)?, self.public).await?;
            let seed = (sub.len() as u32).wrapping_mul(0x9E37_79B9) ^ u32::from(v4(source));
            let (conn, _) = wire::upgrade(&self.url(), tcp, &token, 16 * 1024, seed).await?;
            Ok::<_, String>(conn)
        };
        timeout(CONNECT_TIMEOUT, attempt)
            .await
            .map_err(|_| "upgrade timed out".to_string())?
    }
}

fn v4(ip: IpAddr) -> Ipv4Addr {
    match ip {
        IpAddr::V4(v) => v,
        IpAddr::V6(_) => Ipv4Addr::LOCALHOST,
    }
}

/// The source address of connection `i` of an attack: blocks of `per` connections from
/// `first`, `first + 1`, ... (all in 127.0.0.0/8).
pub fn source(first: Ipv4Addr, i: usize, per: usize) -> IpAddr {
    let n = u32::from(first) + (i / per.max(1)) as u32;
    IpAddr::V4(Ipv4Addr::from(
        n.min(u32::from(Ipv4Addr::new(127, 255, 255, 254))),
    ))
}

/// `n` in base 36, `width` digits at least.
pub fn base36(mut n: usize, width: usize) -> String {
    let mut digits = Vec::new();
    while n > 0 || digits.len() < width {
        digits.push(b"0123456789abcdefghijklmnopqrstuvwxyz"[n % 36]);
        n /= 36;
    }
    digits.reverse();
    String::from_utf8(digits).unwrap_or_default()
}

/// The final answer to a request, and the per-room errors before it.
#[derive(Debug, Default)]
pub struct Reply {
    pub ok_rooms: Option<usize>,
    pub room_errors: BTreeMap<String, u64>,
    /// The code of a final `error` (the whole request refused).
    pub refused: Option<String>,
    pub closed: Option<u16>,
}

/// Reads frames until the final answer to a request (or the end of the connection).
pub async fn reply(conn: &mut wire::Conn) -> Reply {
    let mut r = Reply::default();
    loop {
        match conn.next().await {
            Ok(Frame::Text(t)) if t.starts_with(b"{\"type\":\"ok\"") => {
                let v: Value = serde_json::from_slice(t).unwrap_or(Value::Null);
                r.ok_rooms = Some(v["rooms"].as_array().map_or(0, Vec::len));
                return r;
            }
            Ok(Frame::Text(t)) if t.starts_with(b"{\"type\":\"error\"") => {
                let v: Value = serde_json::from_slice(t).unwrap_or(Value::Null);
                let code = v["code"].as_str().unwrap_or("?").to_string();
                if v.get("room").is_none() {
                    r.refused = Some(code);
                    return r;
                }
                *r.room_errors.entry(code).or_default() += 1;
            }
            Ok(Frame::Text(_)) => {}
            Ok(Frame::Close(code)) => {
                r.closed = Some(code);
                return r;
            }
            Err(_) => {
                r.closed = Some(1002);
                return r;
            }
        }
    }
}

/// Counts of outcomes by name.
#[derive(Debug, Default)]
struct Tally(BTreeMap<String, u64>);

impl Tally {
    fn add(&mut self, what: impl Into<String>) {
        *self.0.entry(what.into()).or_default() += 1;
    }

    fn json(&self) -> Value {
        json!(self.0)
    }
}

/// Waits for every task; a task that panicked is left out.
async fn gather<T>(handles: Vec<JoinHandle<T>>) -> Vec<T> {
    let mut out = Vec::with_capacity(handles.len());
    for h in handles {
        if let Ok(v) = h.await {
            out.push(v);
        }
    }
    out
}

// ---- 1. event filters -------------------------------------------------------------------

/// One pattern of 21,000 `**` segments and `zzz` (63 KB): exponential for a backtracking
/// matcher against a three-segment event name.
pub fn long_filter() -> Vec<String> {
    vec![format!("{}zzz", "**.".repeat(21_000))]
}

/// Sixteen patterns of 30 `**` segments and `zzz` each: small enough for bounded filters.
pub fn many_filter() -> Vec<String> {
    (0..16)
        .map(|_| format!("{}zzz", "**.".repeat(30)))
        .collect()
}

pub fn filter_user(i: usize) -> String {
    format!("hf{i}")
}

/// `n` connections, each of its own user, subscribe their own user room with a hostile
/// filter (even ones the long one, odd ones the sixteen); then records for those rooms are
/// produced for `hold`, so that the filters are evaluated.
pub async fn filters(reach: &Reach, n: usize, hold: Duration, switches: &Switches) -> Value {
    let (stop_tx, stop) = watch::channel(false);
    let (replied_tx, mut replied) = tokio::sync::mpsc::unbounded_channel();
    let handles: Vec<_> = (0..n)
        .map(|i| {
            let (reach, stop, replied) = (reach.clone(), stop.clone(), replied_tx.clone());
            tokio::spawn(filter_conn(reach, i, stop, replied))
        })
        .collect();
    drop(replied_tx);
    let deadline = tokio::time::Instant::now() + REPLY_TIMEOUT;
    let mut answered = 0;
    while answered < n {
        match tokio::time::timeout_at(deadline, replied.recv()).await {
            Ok(Some(())) => answered += 1,
            _ => break,
        }
    }
    switches.attack.store(true, Ordering::Relaxed);
    tokio::time::sleep(hold).await;
    switches.attack.store(false, Ordering::Relaxed);
    let _ = stop_tx.send(true);
    let mut kinds: BTreeMap<&str, Tally> = BTreeMap::new();
    let mut events = 0u64;
    for (kind, outcome, got) in gather(handles).await {
        kinds.entry(kind).or_default().add(outcome);
        events += got;
    }
    json!({
        "connections": n,
        "long_filter": { "patterns": 1, "bytes": long_filter()[0].len(),
            "outcomes": kinds.get("long").map(Tally::json) },
        "many_filter": { "patterns": 16, "bytes_each": many_filter()[0].len(),
            "outcomes": kinds.get("many").map(Tally::json) },
        "attack_events_received": events,
    })
}

/// One filter attacker: (kind, outcome of its subscribe, events it received).
async fn filter_conn(
    reach: Reach,
    i: usize,
    mut stop: watch::Receiver<bool>,
    replied: tokio::sync::mpsc::UnboundedSender<()>,
) -> (&'static str, String, u64) {
    let (kind, events) = if i.is_multiple_of(2) {
        ("long", long_filter())
    } else {
        ("many", many_filter())
    };
    let user = filter_user(i);
    let from = source(Ipv4Addr::new(127, 0, 1, 1), i, 250);
    let mut conn = match reach.open(&user, from).await {
        Ok(c) => c,
        Err(e) => {
            let _ = replied.send(());
            return (kind, format!("not connected: {}", short(&e)), 0);
        }
    };
    let frame =
        json!({"type": "subscribe", "id": 1, "rooms": [format!("user:{user}")], "events": events});
    let sent = conn.send_text(&frame.to_string()).await;
    let r = match sent {
        Ok(()) => timeout(REPLY_TIMEOUT, reply(&mut conn)).await.ok(),
        Err(_) => None,
    };
    let _ = replied.send(());
    let outcome = match r {
        Some(Reply {
            ok_rooms: Some(_), ..
        }) => "accepted".to_string(),
        Some(Reply {
            refused: Some(code),
            ..
        }) => format!("refused: {code}"),
        Some(Reply {
            closed: Some(code), ..
        }) => format!("closed: {code}"),
        _ => "no answer".to_string(),
    };
    let mut got = 0;
    loop {
        tokio::select! {
            _ = stop.wait_for(|s| *s) => break,
            f = conn.next() => match f {
                Ok(Frame::Text(t)) if t.starts_with(b"{\"type\":\"event\"") => got += 1,
                Ok(Frame::Text(_)) => {}
                _ => break,
            },
        }
    }
    (kind, outcome, got)
}

fn short(e: &str) -> String {
    e.chars().take(80).collect()
}

// ---- 2. before the upgrade --------------------------------------------------------------

/// What a raw connection sends.
#[derive(Debug, Clone, Copy)]
enum Feed {
    Silent,
    /// One byte of an endless request head per second.
    Slowloris,
    /// This many bytes of a request head that never ends.
    Head(usize),
}

/// How a raw connection ended.
#[derive(Debug, Default)]
struct RawEnd {
    connected: bool,
    status: Option<u16>,
    closed_after_ms: Option<f64>,
    written: usize,
}

/// Silent connections, slowloris and unfinished heads, all at once; each is held until the
/// server closes it or `hold` ends. Reports how each kind ended and how fast.
pub async fn pre_upgrade(
    reach: &Reach,
    silent: usize,
    slow: usize,
    heads: usize,
    head_bytes: usize,
    per_source: usize,
    hold: Duration,
) -> Value {
    let deadline = Instant::now() + hold;
    let kinds = [
        ("silent", silent, Feed::Silent, Ipv4Addr::new(127, 0, 2, 1)),
        (
            "slowloris",
            slow,
            Feed::Slowloris,
            Ipv4Addr::new(127, 0, 3, 1),
        ),
        (
            "head",
            heads,
            Feed::Head(head_bytes),
            Ipv4Addr::new(127, 0, 4, 1),
        ),
    ];
    let mut handles = Vec::new();
    for (name, n, feed, first) in kinds {
        for i in 0..n {
            let from = source(first, i, per_source);
            let to = reach.public;
            handles.push(tokio::spawn(async move {
                (name, raw(from, to, feed, deadline).await)
            }));
        }
    }
    let ends = gather(handles).await;
    let mut report = serde_json::Map::new();
    for (name, n, feed, first) in kinds {
        let mine: Vec<&RawEnd> = ends
            .iter()
            .filter(|(k, _)| *k == name)
            .map(|(_, e)| e)
            .collect();
        report.insert(name.into(), raw_report(&mine, n, feed, first, per_source));
    }
    report.insert("hold_s".into(), json!(hold.as_secs_f64()));
    Value::Object(report)
}

fn raw_report(ends: &[&RawEnd], n: usize, feed: Feed, first: Ipv4Addr, per: usize) -> Value {
    let mut answers = Tally::default();
    let mut closes: Vec<f64> = Vec::new();
    for e in ends {
        match (e.connected, e.status, e.closed_after_ms) {
            (false, _, _) => answers.add("connect failed"),
            (true, Some(s), _) => answers.add(format!("answered {s}")),
            (true, None, Some(_)) => answers.add("closed without answer"),
            (true, None, None) => answers.add("open at the end"),
        }
        closes.extend(e.closed_after_ms);
    }
    closes.sort_by(f64::total_cmp);
    let q = |p: f64| {
        closes
            .get(((closes.len() as f64 - 1.0) * p).round() as usize)
            .copied()
    };
    json!({
        "connections": n,
        "feed": format!("{feed:?}"),
        "sources": format!("{} .. {}", first, source(first, n.saturating_sub(1), per)),
        "outcomes": answers.json(),
        "closed_by_server": closes.len(),
        "closed_after_ms": { "min": closes.first(), "p50": q(0.5), "max": closes.last() },
        "bytes_written_max": ends.iter().map(|e| e.written).max(),
    })
}

async fn raw(from: IpAddr, to: SocketAddr, feed: Feed, deadline: Instant) -> RawEnd {
    let mut end = RawEnd::default();
    let Ok(sock) = client::bound_socket(from) else {
        return end;
    };
    let started = Instant::now();
    let Ok(Ok(tcp)) = timeout(CONNECT_TIMEOUT, sock.connect(to)).await else {
        return end;
    };
    end.connected = true;
    let (mut rd, mut wr) = tcp.into_split();
    let reader = async {
        let mut buf = [0u8; 1024];
        let mut status = None;
        loop {
            match rd.read(&mut buf).await {
                Ok(0) | Err(_) => return status,
                Ok(n) if status.is_none() => status = http_status(&buf[..n]),
                Ok(_) => {}
            }
        }
    };
    let writer = async {
        let mut written = 0;
        match feed {
            Feed::Silent => std::future::pending::<()>().await,
            Feed::Slowloris => {
                let head = b"GET /ws HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ";
                for i in 0.. {
                    let byte = head.get(i).copied().unwrap_or(b'a');
                    if wr.write_all(&[byte]).await.is_err() {
                        break;
                    }
                    written += 1;
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
            Feed::Head(bytes) => {
                let mut head = b"GET /ws HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Pad: ".to_vec();
                head.resize(bytes, b'a');
                for chunk in head.chunks(16 * 1024) {
                    if wr.write_all(chunk).await.is_err() {
                        break;
                    }
                    written += chunk.len();
                }
            }
        }
        written
    };
    tokio::pin!(reader, writer);
    let limit = tokio::time::Instant::from_std(deadline);
    let mut writing = true;
    loop {
        tokio::select! {
            status = &mut reader => {
                end.status = status;
                end.closed_after_ms = Some(started.elapsed().as_secs_f64() * 1e3);
                break;
            }
            w = &mut writer, if writing => {
                end.written = w;
                writing = false;
            }
            _ = tokio::time::sleep_until(limit) => break,
        }
    }
    end
}

/// The status code of an HTTP response's first bytes.
fn http_status(bytes: &[u8]) -> Option<u16> {
    let text = std::str::from_utf8(bytes.get(..bytes.len().min(16))?).ok()?;
    let mut words = text.split_whitespace();
    words.next().filter(|w| w.starts_with("HTTP/"))?;
    words.next()?.parse().ok()
}

// ---- 3. rooms in one subscribe ----------------------------------------------------------

/// `rooms` rooms of connection `c`, each distinct across connections: `task:` and four base-36
/// digits, so that 5,000 of them fit one 64 KiB message.
pub fn many_rooms(c: usize, rooms: usize) -> Vec<String> {
    (0..rooms)
        .map(|j| format!("task:{}", base36(c * rooms + j, 4)))
        .collect()
}

/// Connections holding what their one big subscribe got them, until dropped.
pub struct Held {
    pub conns: Vec<wire::Conn>,
    pub report: Value,
}

/// `n` connections of their own users each send one subscribe with `rooms` rooms; they are
/// returned open, with what the server admitted.
pub async fn rooms(reach: &Reach, n: usize, rooms: usize) -> Held {
    let handles: Vec<_> = (0..n)
        .map(|c| {
            let reach = reach.clone();
            tokio::spawn(async move {
                let from = source(Ipv4Addr::new(127, 0, 5, 1), c, 250);
                subscribe_many(&reach, &format!("hr{c}"), from, many_rooms(c, rooms)).await
            })
        })
        .collect();
    let started = Instant::now();
    held(gather(handles).await, n, rooms, started)
}

/// Opens a connection and subscribes `rooms` in one message; the connection and the reply.
async fn subscribe_many(
    reach: &Reach,
    user: &str,
    from: IpAddr,
    rooms: Vec<String>,
) -> Result<(wire::Conn, Reply), String> {
    let mut conn = reach.open(user, from).await?;
    let frame = json!({"type": "subscribe", "id": 1, "rooms": rooms});
    conn.send_text(&frame.to_string())
        .await
        .map_err(|e| e.to_string())?;
    let r = timeout(REPLY_TIMEOUT, reply(&mut conn))
        .await
        .map_err(|_| "no reply".to_string())?;
    Ok((conn, r))
}

fn held(
    results: Vec<Result<(wire::Conn, Reply), String>>,
    n: usize,
    rooms: usize,
    started: Instant,
) -> Held {
    let mut conns = Vec::new();
    let (mut admitted, mut max_admitted) = (0usize, 0usize);
    let mut errors: BTreeMap<String, u64> = BTreeMap::new();
    let mut outcomes = Tally::default();
    for r in results {
        match r {
            Ok((conn, reply)) => {
                let ok = reply.ok_rooms.unwrap_or(0);
                admitted += ok;
                max_admitted = max_admitted.max(ok);
                for (code, k) in reply.room_errors {
                    *errors.entry(code).or_default() += k;
                }
                outcomes.add(match (&reply.ok_rooms, &reply.refused, reply.closed) {
                    (Some(_), _, _) => "ok".to_string(),
                    (_, Some(code), _) => format!("refused: {code}"),
                    (_, _, Some(code)) => format!("closed: {code}"),
                    _ => "no answer".into(),
                });
                conns.push(conn);
            }
            Err(e) => outcomes.add(format!("failed: {}", short(&e))),
        }
    }
    let report = json!({
        "connections": n,
        "rooms_per_subscribe": rooms,
        "outcomes": outcomes.json(),
        "rooms_admitted": admitted,
        "rooms_admitted_max_per_connection": max_admitted,
        "room_errors": errors,
        "seconds_to_answers": crate::round(started.elapsed().as_secs_f64(), 2),
    });
    Held { conns, report }
}

// ---- 9. a flood of pings ----------------------------------------------------------------

/// `n` clients send WebSocket pings and JSON pings as fast as they can for `hold`; a client
/// whose connection is closed opens another, as an attacker would.
pub async fn flood(reach: &Reach, n: usize, hold: Duration) -> Value {
    let deadline = tokio::time::Instant::now() + hold;
    let handles: Vec<_> = (0..n)
        .map(|i| {
            let reach = reach.clone();
            tokio::spawn(async move { flooder(&reach, i, deadline).await })
        })
        .collect();
    let mut total = Flooded::default();
    let (mut closes, mut failed) = (Tally::default(), Tally::default());
    let mut connections = 0u64;
    for (runs, errors) in gather(handles).await {
        for f in &runs {
            closes.add(f.close.map_or("open at the end".into(), |c| format!("{c}")));
            total.add(f);
        }
        connections += runs.len() as u64;
        for e in errors {
            failed.add(e);
        }
    }
    json!({
        "clients": n,
        "connections": connections,
        "not_connected": failed.json(),
        "frames_sent": total.sent,
        "ws_pongs": total.ws_pongs,
        "json_pongs": total.json_pongs,
        "rate_limited": total.rate_limited,
        "other_errors": total.other_errors,
        "answered_per_s": crate::round((total.ws_pongs + total.json_pongs) as f64 / hold.as_secs_f64(), 0),
        "close_codes": closes.json(),
        "first_close_after_ms": total.first_close_ms,
    })
}

/// One flooding client until `deadline`: what each of its connections got, and why the ones
/// that did not open failed.
async fn flooder(
    reach: &Reach,
    i: usize,
    deadline: tokio::time::Instant,
) -> (Vec<Flooded>, Vec<String>) {
    let from = source(Ipv4Addr::new(127, 0, 6, 1), i, 250);
    let (mut runs, mut errors) = (Vec::new(), Vec::new());
    while tokio::time::Instant::now() < deadline {
        match timeout_at_or(deadline, reach.open(&format!("hp{i}"), from)).await {
            Some(Ok(conn)) => {
                let f = flood_one(conn, deadline).await;
                let open_at_end = f.close.is_none();
                runs.push(f);
                if open_at_end {
                    break;
                }
            }
            Some(Err(e)) => errors.push(short(&e)),
            None => break,
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    (runs, errors)
}

async fn timeout_at_or<T>(
    deadline: tokio::time::Instant,
    f: impl std::future::Future<Output = T>,
) -> Option<T> {
    tokio::time::timeout_at(deadline, f).await.ok()
}

#[derive(Debug, Default)]
struct Flooded {
    sent: u64,
    ws_pongs: u64,
    json_pongs: u64,
    rate_limited: u64,
    other_errors: u64,
    close: Option<u16>,
    first_close_ms: Option<f64>,
}

impl Flooded {
    fn add(&mut self, f: &Flooded) {
        self.sent += f.sent;
        self.ws_pongs += f.ws_pongs;
        self.json_pongs += f.json_pongs;
        self.rate_limited += f.rate_limited;
        self.other_errors += f.other_errors;
        self.first_close_ms = match (self.first_close_ms, f.first_close_ms) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
    }
}

/// 32 WebSocket pings and 32 JSON pings, masked, ready to be written again and again.
fn ping_batch() -> Vec<u8> {
    let mut batch = Vec::new();
    for k in 0..32u8 {
        batch.extend(frame::masked(frame::PING, b"p", [k, 1, 2, 3]));
        batch.extend(frame::masked(
            frame::TEXT,
            br#"{"type":"ping","id":1}"#,
            [k, 4, 5, 6],
        ));
    }
    batch
}

/// Floods one connection until the server closes it or `deadline`. The writer is a task of its
/// own, so that it never keeps this side from reading what the server answers.
async fn flood_one(conn: wire::Conn, deadline: tokio::time::Instant) -> Flooded {
    let started = Instant::now();
    let (tcp, rest) = conn.into_parts();
    let (mut rd, mut wr) = tcp.into_split();
    let sent = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let counted = sent.clone();
    let writer = tokio::spawn(async move {
        let batch = ping_batch();
        while wr.write_all(&batch).await.is_ok() {
            counted.fetch_add(64, Ordering::Relaxed);
        }
    });
    let mut f = Flooded::default();
    let mut buf = rest;
    let mut chunk = vec![0u8; 64 * 1024];
    loop {
        let used = count_frames(&buf, &mut f);
        buf.drain(..used);
        if f.close.is_some() {
            break;
        }
        tokio::select! {
            read = rd.read(&mut chunk) => match read {
                Ok(0) | Err(_) => {
                    f.close = Some(1006);
                    break;
                }
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            },
            _ = tokio::time::sleep_until(deadline) => break,
        }
    }
    if f.close.is_some() {
        f.first_close_ms = Some(started.elapsed().as_secs_f64() * 1e3);
    }
    writer.abort();
    let _ = writer.await;
    f.sent = sent.load(Ordering::Relaxed);
    f
}

/// Counts the whole frames at the start of `buf`; returns the bytes they take.
fn count_frames(buf: &[u8], f: &mut Flooded) -> usize {
    let mut at = 0;
    while let Ok(Some((opcode, payload))) = wire::parse_frame(&buf[at..]) {
        let p = &buf[at + payload.start..at + payload.end];
        match opcode {
            frame::PONG => f.ws_pongs += 1,
            frame::TEXT if p.starts_with(b"{\"type\":\"pong\"") => f.json_pongs += 1,
            frame::TEXT if memchr::memmem::find(p, b"\"rate_limited\"").is_some() => {
                f.rate_limited += 1
            }
            frame::TEXT if p.starts_with(b"{\"type\":\"error\"") => f.other_errors += 1,
            frame::CLOSE => {
                f.close = Some(if p.len() >= 2 {
                    u16::from_be_bytes([p[0], p[1]])
                } else {
                    1005
                });
            }
            _ => {}
        }
        at += payload.end;
        if f.close.is_some() {
            break;
        }
    }
    at
}

// ---- 11. a burst of connections ---------------------------------------------------------

/// Rooms of a burst connection: 256 (or `rooms`) of a pool in which each room has about a
/// hundred members.
pub fn burst_rooms(c: usize, rooms: usize, pool: usize) -> Vec<String> {
    (0..rooms)
        .map(|j| format!("task:b{}", base36((c * rooms + j) % pool.max(1), 4)))
        .collect()
}

/// `n` connections of their own users, `in_flight` handshakes at a time, each subscribing
/// `rooms` rooms; returned open.
pub async fn burst(reach: &Reach, n: usize, rooms: usize, in_flight: usize) -> Held {
    let pool = (n * rooms / 100).max(rooms);
    let gate = Arc::new(Semaphore::new(in_flight.max(1)));
    let started = Instant::now();
    let handles: Vec<_> = (0..n)
        .map(|c| {
            let (reach, gate) = (reach.clone(), gate.clone());
            tokio::spawn(async move {
                let _permit = gate.acquire_owned().await.map_err(|e| e.to_string())?;
                let from = source(Ipv4Addr::new(127, 0, 7, 1), c, 2000);
                subscribe_many(&reach, &format!("hb{c}"), from, burst_rooms(c, rooms, pool)).await
            })
        })
        .collect();
    let mut h = held(gather(handles).await, n, rooms, started);
    h.report["room_pool"] = json!(pool);
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sources_count_up_in_blocks() {
        let first = Ipv4Addr::new(127, 0, 2, 1);
        assert_eq!(source(first, 0, 250), IpAddr::V4(first));
        assert_eq!(source(first, 249, 250), IpAddr::V4(first));
        assert_eq!(
            source(first, 250, 250),
            IpAddr::V4(Ipv4Addr::new(127, 0, 2, 2))
        );
        assert_eq!(
            source(first, 1999, 250),
            IpAddr::V4(Ipv4Addr::new(127, 0, 2, 8))
        );
    }

    #[test]
    fn five_thousand_rooms_fit_one_message() {
        assert_eq!(base36(0, 4), "0000");
        assert_eq!(base36(36 * 36 + 35, 4), "010z");
        let rooms = many_rooms(99, 5000);
        let frame = json!({"type": "subscribe", "id": 1, "rooms": rooms}).to_string();
        assert!(frame.len() < 64 * 1024, "{} bytes", frame.len());
        let mut all: Vec<String> = (0..100).flat_map(|c| many_rooms(c, 5000)).collect();
        all.sort();
        all.dedup();
        assert_eq!(all.len(), 500_000, "distinct across connections");
    }

    #[test]
    fn the_long_filter_fits_one_message() {
        let frame =
            json!({"type": "subscribe", "id": 1, "rooms": ["user:hf49"], "events": long_filter()});
        let len = frame.to_string().len();
        assert!(len > 63_000 && len < 64 * 1024, "{len} bytes");
        assert_eq!(many_filter().len(), 16);
        assert!(many_filter().iter().all(|p| p.split('.').count() == 31));
    }

    #[test]
    fn burst_rooms_are_shared_by_about_a_hundred() {
        let pool = 10_000 * 256 / 100;
        let mut members: BTreeMap<String, u32> = BTreeMap::new();
        for c in 0..10_000 {
            for r in burst_rooms(c, 256, pool) {
                *members.entry(r).or_default() += 1;
            }
        }
        assert_eq!(members.len(), pool);
        assert!(members.values().all(|&m| m == 100));
    }

    #[test]
    fn frames_are_counted_by_kind_and_a_close_ends_the_count() {
        let server = frame::unmasked;
        let mut buf = server(frame::PONG, b"p");
        buf.extend(server(frame::TEXT, br#"{"type":"pong","id":1}"#));
        buf.extend(server(
            frame::TEXT,
            br#"{"type":"error","code":"rate_limited","message":"x"}"#,
        ));
        buf.extend(server(
            frame::TEXT,
            br#"{"type":"error","code":"bad_request","message":"x"}"#,
        ));
        buf.extend(server(frame::CLOSE, &[0x0F, 0xBD]));
        buf.extend(server(frame::PONG, b"p"));
        let whole = buf.len();
        buf.extend([0x8A, 5, b'x']);
        let mut f = Flooded::default();
        let used = count_frames(&buf, &mut f);
        assert_eq!(
            (f.ws_pongs, f.json_pongs, f.rate_limited, f.other_errors),
            (1, 1, 1, 1)
        );
        assert_eq!(f.close, Some(4029));
        assert_eq!(used, whole - 3, "stops after the close");
    }

    #[test]
    fn statuses_are_read_from_the_first_bytes() {
        assert_eq!(
            http_status(b"HTTP/1.1 431 Request Header Fields Too Large\r\n"),
            Some(431)
        );
        assert_eq!(http_status(b"HTTP/1.1 503 "), Some(503));
        assert_eq!(http_status(b"garbage"), None);
    }
}
