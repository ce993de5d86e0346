//! roomcast-floor: the least a fan-out server has to do on this machine, to compare roomcast
//! against. It speaks just enough WebSocket for roomcast-load (upgrade, welcome, subscribe/ok,
//! ping/pong, close), does its own framing, and writes the same event frames roomcast writes:
//! `{"type":"event","event":..,"pos":..,"ts":..,"payload":<record value>}`, encoded once per
//! record and shared by all recipients.
//!
//! Records come from roomcast-load over a plain TCP control socket, one line each:
//! `<room>\t<record value JSON>\n`, instead of from Kafka. Each connection has the same
//! structure as in roomcast: a bounded queue (1024 frames) drained by a writer task that sends
//! everything queued in one write. Unlike roomcast, a full queue never closes the connection:
//! the frame is dropped for that connection (counted, and printed at exit) and the connection
//! stays. What the floor leaves out: Kafka, routing (the room is
//! given), token verification (the subject is read, the signature is not checked), tungstenite,
//! heartbeats, metrics.
//!
//! Only loopback addresses can be bound. It stops by itself after --max-seconds.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context};
use base64::Engine;
use bytes::{Buf, Bytes, BytesMut};
use clap::Parser;
use roomcast_load::frame;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::tcp::OwnedWriteHalf;
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::mpsc;

#[derive(Parser, Debug)]
#[command(
    name = "roomcast-floor",
    version,
    about = "Minimal WebSocket fan-out, the floor roomcast is compared to"
)]
struct Args {
    /// WebSocket listener (loopback only).
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: String,
    /// Control listener for records (loopback only).
    #[arg(long, default_value = "127.0.0.1:0")]
    control: String,
    /// Frames each connection's queue holds before frames are dropped.
    #[arg(long, default_value_t = 1024)]
    queue_frames: usize,
    /// Frames one write takes from the queue.
    #[arg(long, default_value_t = 256)]
    batch: usize,
    /// Accept backlog of the WebSocket listener; roomcast's is 4096, so that a connect storm
    /// meets the same accept queue on both.
    #[arg(long, default_value_t = 4096)]
    backlog: u32,
    /// Runtime worker threads (0: one per core, as roomcast).
    #[arg(long, default_value_t = 0)]
    threads: usize,
    /// Topic and event names written into the frames (sizes match roomcast's).
    #[arg(long, default_value = "bench-tasks")]
    topic: String,
    #[arg(long, default_value = "task:update")]
    event: String,
    /// Exit after this many seconds whatever happens.
    #[arg(long, default_value_t = 3600)]
    max_seconds: u64,
    /// Read records from --topic on these Kafka brokers, with roomcast's consumer settings,
    /// instead of from the control socket: a floor with Kafka's path in it. A record's room
    /// is named by the first field of its value (`userId` → user:ID, else task:ID).
    #[arg(long)]
    brokers: Option<String>,
}

type Members = HashMap<u64, mpsc::Sender<Bytes>>;

struct Hub {
    rooms: Mutex<HashMap<String, Members>>,
    next_id: AtomicU64,
    records: AtomicU64,
    deliveries: AtomicU64,
    dropped: AtomicU64,
    queue_frames: usize,
    batch: usize,
}

impl Hub {
    fn join(&self, room: &str, id: u64, tx: &mpsc::Sender<Bytes>) {
        let mut rooms = self.rooms.lock().unwrap_or_else(|e| e.into_inner());
        rooms
            .entry(room.to_string())
            .or_default()
            .insert(id, tx.clone());
    }

    fn leave_all(&self, id: u64, joined: &[String]) {
        let mut rooms = self.rooms.lock().unwrap_or_else(|e| e.into_inner());
        for room in joined {
            if let Some(m) = rooms.get_mut(room) {
                m.remove(&id);
                if m.is_empty() {
                    rooms.remove(room);
                }
            }
        }
    }

    fn publish(&self, targets: &[&str], frame: &Bytes) {
        let rooms = self.rooms.lock().unwrap_or_else(|e| e.into_inner());
        let mut seen: Vec<u64> = Vec::new();
        let (mut queued, mut dropped) = (0u64, 0u64);
        for room in targets {
            let Some(members) = rooms.get(*room) else {
                continue;
            };
            for (id, tx) in members {
                if targets.len() > 1 {
                    if seen.contains(id) {
                        continue;
                    }
                    seen.push(*id);
                }
                match tx.try_send(frame.clone()) {
                    Ok(()) => queued += 1,
                    Err(mpsc::error::TrySendError::Full(_)) => dropped += 1,
                    Err(mpsc::error::TrySendError::Closed(_)) => {}
                }
            }
        }
        drop(rooms);
        self.records.fetch_add(1, Ordering::Relaxed);
        self.deliveries.fetch_add(queued, Ordering::Relaxed);
        self.dropped.fetch_add(dropped, Ordering::Relaxed);
    }
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if args.threads > 0 {
        builder.worker_threads(args.threads);
    }
    let runtime = builder.enable_all().build()?;
    runtime.block_on(run(args))
}

fn bind(addr: &str, backlog: u32) -> anyhow::Result<(TcpListener, SocketAddr)> {
    let a: SocketAddr = addr
        .parse()
        .with_context(|| format!("{addr:?} is not IP:port"))?;
    if !a.ip().is_loopback() {
        bail!("{a} is not a loopback address");
    }
    let socket = if a.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(a)?;
    let l = socket.listen(backlog)?;
    let local = l.local_addr()?;
    Ok((l, local))
}

async fn run(args: Args) -> anyhow::Result<()> {
    raise_nofile();
    let (public, public_addr) = bind(&args.listen, args.backlog)?;
    let (control, control_addr) = bind(&args.control, 16)?;
    let hub = Arc::new(Hub {
        rooms: Mutex::new(HashMap::new()),
        next_id: AtomicU64::new(1),
        records: AtomicU64::new(0),
        deliveries: AtomicU64::new(0),
        dropped: AtomicU64::new(0),
        queue_frames: args.queue_frames.max(1),
        batch: args.batch.max(1),
    });
    println!("roomcast-floor listening public={public_addr} control={control_addr}");
    let h = hub.clone();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = public.accept().await else {
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            };
            let h = h.clone();
            tokio::spawn(async move {
                let _ = session(h, stream).await;
            });
        }
    });
    if let Some(brokers) = &args.brokers {
        let consumer = kafka::consumer(brokers, &args.topic)?;
        let (h, topic, event) = (hub.clone(), args.topic.clone(), args.event.clone());
        std::thread::Builder::new()
            .name("floor-kafka".into())
            .spawn(move || kafka::run(&consumer, &h, &topic, &event))?;
    }
    let h = hub.clone();
    let (topic, event) = (args.topic.clone(), args.event.clone());
    tokio::spawn(async move {
        // One control connection at a time, in order.
        while let Ok((stream, _)) = control.accept().await {
            let _ = control_loop(&h, stream, &topic, &event).await;
        }
    });
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
        _ = tokio::time::sleep(Duration::from_secs(args.max_seconds)) => {}
    }
    eprintln!(
        "roomcast-floor: {} records, {} deliveries queued, {} dropped (queue full)",
        hub.records.load(Ordering::Relaxed),
        hub.deliveries.load(Ordering::Relaxed),
        hub.dropped.load(Ordering::Relaxed)
    );
    Ok(())
}

fn raise_nofile() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain syscalls on a stack value.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

async fn control_loop(
    hub: &Hub,
    stream: TcpStream,
    topic: &str,
    event: &str,
) -> std::io::Result<()> {
    let mut r = BufReader::with_capacity(256 * 1024, stream);
    let mut line = Vec::with_capacity(4096);
    let mut offset: u64 = 0;
    let event = serde_json::Value::from(event).to_string();
    loop {
        line.clear();
        if r.read_until(b'\n', &mut line).await? == 0 {
            return Ok(());
        }
        let Ok(text) = std::str::from_utf8(&line) else {
            continue;
        };
        let Some((rooms, value)) = text.trim_end().split_once('\t') else {
            continue;
        };
        let targets: Vec<&str> = rooms.split(' ').filter(|r| !r.is_empty()).collect();
        let frame = event_frame(&event, topic, 0, offset, now_ms(), value.trim().as_bytes());
        offset += 1;
        hub.publish(&targets, &frame);
    }
}

/// Byte for byte the shape of roomcast's event frame; `event` is already a JSON string.
fn event_frame(
    event: &str,
    topic: &str,
    partition: i32,
    offset: u64,
    ts: u64,
    value: &[u8],
) -> Bytes {
    let mut json = format!(
        r#"{{"type":"event","event":{event},"pos":"{topic}:{partition}:{offset}","ts":{ts},"payload":"#
    )
    .into_bytes();
    json.extend_from_slice(value);
    json.push(b'}');
    text_frame(&json)
}

/// The floor fed by Kafka: one thread polls the topic and publishes each record.
mod kafka {
    use std::time::Duration;

    use rdkafka::consumer::BaseConsumer;
    use rdkafka::Message;

    use super::Hub;

    pub fn consumer(brokers: &str, topic: &str) -> anyhow::Result<BaseConsumer> {
        roomcast_load::tail::from_end(brokers, topic, "roomcast-floor")
    }

    pub fn run(consumer: &BaseConsumer, hub: &Hub, topic: &str, event: &str) {
        let event = serde_json::Value::from(event).to_string();
        loop {
            let Some(Ok(m)) = consumer.poll(Duration::from_millis(100)) else {
                continue;
            };
            let Some(value) = m.payload() else { continue };
            let Some(room) = room_of(value) else { continue };
            let ts = m.timestamp().to_millis().unwrap_or(0).max(0) as u64;
            let offset = m.offset().max(0) as u64;
            let frame = super::event_frame(&event, topic, m.partition(), offset, ts, value);
            hub.publish(&[room.as_str()], &frame);
        }
    }

    /// `{"userId":"u7",...}` → `user:u7`; `{"taskId":"g3",...}` → `task:g3`.
    pub fn room_of(value: &[u8]) -> Option<String> {
        let text = std::str::from_utf8(value).ok()?;
        let rest = text.strip_prefix("{\"")?;
        let (key, rest) = rest.split_once("\":\"")?;
        let (id, _) = rest.split_once('"')?;
        let kind = if key == "userId" { "user" } else { "task" };
        Some(format!("{kind}:{id}"))
    }
}

/// A server-to-client (unmasked) frame.
fn server_frame(opcode: u8, payload: &[u8]) -> Bytes {
    Bytes::from(frame::unmasked(opcode, payload))
}

fn text_frame(payload: &[u8]) -> Bytes {
    server_frame(frame::TEXT, payload)
}

/// One complete client frame (opcode, unmasked payload) from the front of `buf`, if there.
fn next_frame(buf: &mut BytesMut) -> Option<(u8, Vec<u8>)> {
    let head = frame::head(buf)?;
    let mut payload = buf[head.payload.clone()].to_vec();
    if let Some(key) = head.mask {
        frame::unmask(&mut payload, key);
    }
    buf.advance(head.end());
    Some((head.opcode(), payload))
}

/// The `sub` of a bearer token offered as a subprotocol; the signature is not checked.
fn subject(protocols: &str) -> Option<String> {
    let token = protocols
        .split(',')
        .map(str::trim)
        .find_map(|p| p.strip_prefix("bearer."))?;
    let payload = token.split('.').nth(1)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload)
        .ok()?;
    let claims: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    claims.get("sub")?.as_str().map(str::to_string)
}

async fn session(hub: Arc<Hub>, stream: TcpStream) -> std::io::Result<()> {
    stream.set_nodelay(true)?;
    let (mut rd, mut wr) = stream.into_split();
    let mut buf = BytesMut::with_capacity(4096);
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        if buf.len() > 16 * 1024 || rd.read_buf(&mut buf).await? == 0 {
            return Ok(());
        }
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    buf.advance(head_end);
    let key = frame::header_value(&head, "sec-websocket-key");
    let user = frame::header_value(&head, "sec-websocket-protocol").and_then(subject);
    let (Some(key), Some(user)) = (key, user) else {
        wr.write_all(
            b"HTTP/1.1 401 Unauthorized\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
        )
        .await?;
        return Ok(());
    };
    let accept = frame::accept_key(key.as_bytes());
    let response = format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Accept: {accept}\r\nSec-WebSocket-Protocol: roomcast.v1\r\n\r\n"
    );
    wr.write_all(response.as_bytes()).await?;

    let id = hub.next_id.fetch_add(1, Ordering::Relaxed);
    let (tx, rx) = mpsc::channel(hub.queue_frames);
    let own = format!("user:{user}");
    let welcome = serde_json::json!({
        "type": "welcome", "connection": id, "user": user, "rooms": [own], "server": "floor",
    });
    let _ = tx.try_send(text_frame(welcome.to_string().as_bytes()));
    let mut joined = vec![own.clone()];
    hub.join(&own, id, &tx);
    let writer = tokio::spawn(write_loop(wr, rx, hub.batch));

    let result = read_loop(&hub, id, &tx, &mut rd, &mut buf, &mut joined).await;
    hub.leave_all(id, &joined);
    drop(tx);
    let _ = writer.await;
    result
}

async fn read_loop(
    hub: &Hub,
    id: u64,
    tx: &mpsc::Sender<Bytes>,
    rd: &mut tokio::net::tcp::OwnedReadHalf,
    buf: &mut BytesMut,
    joined: &mut Vec<String>,
) -> std::io::Result<()> {
    loop {
        while let Some((opcode, payload)) = next_frame(buf) {
            match opcode {
                frame::TEXT => {
                    let Ok(v) = serde_json::from_slice::<serde_json::Value>(&payload) else {
                        continue;
                    };
                    if v.get("type").and_then(|t| t.as_str()) != Some("subscribe") {
                        continue;
                    }
                    let rooms: Vec<String> = v
                        .get("rooms")
                        .and_then(|r| r.as_array())
                        .map(|a| {
                            a.iter()
                                .filter_map(|r| r.as_str().map(String::from))
                                .collect()
                        })
                        .unwrap_or_default();
                    for room in &rooms {
                        if !joined.contains(room) {
                            hub.join(room, id, tx);
                            joined.push(room.clone());
                        }
                    }
                    let ok = serde_json::json!({
                        "type": "ok", "id": v.get("id").cloned().unwrap_or_default(), "rooms": rooms,
                    });
                    let _ = tx.try_send(text_frame(ok.to_string().as_bytes()));
                }
                frame::CLOSE => {
                    let _ = tx.try_send(server_frame(frame::CLOSE, &1000u16.to_be_bytes()));
                    return Ok(());
                }
                frame::PING => {
                    let _ = tx.try_send(server_frame(frame::PONG, &payload));
                }
                _ => {}
            }
        }
        if rd.read_buf(buf).await? == 0 {
            return Ok(());
        }
    }
}

async fn write_loop(mut wr: OwnedWriteHalf, mut rx: mpsc::Receiver<Bytes>, batch_max: usize) {
    let mut batch: Vec<Bytes> = Vec::with_capacity(16);
    let mut out: Vec<u8> = Vec::new();
    while rx.recv_many(&mut batch, batch_max).await > 0 {
        let result = if batch.len() == 1 {
            wr.write_all(&batch[0]).await
        } else {
            out.clear();
            for f in &batch {
                out.extend_from_slice(f);
            }
            wr.write_all(&out).await
        };
        batch.clear();
        if result.is_err() {
            return;
        }
    }
    let _ = wr.shutdown().await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_with_a_mask() {
        let mut buf = BytesMut::new();
        let payload = b"{\"type\":\"subscribe\"}";
        buf.extend_from_slice(&[0x81, 0x80 | payload.len() as u8, 1, 2, 3, 4]);
        buf.extend(
            payload
                .iter()
                .enumerate()
                .map(|(i, b)| b ^ [1, 2, 3, 4][i % 4]),
        );
        buf.extend_from_slice(&[0x8A]);
        assert_eq!(next_frame(&mut buf), Some((1, payload.to_vec())));
        assert_eq!(next_frame(&mut buf), None);
        assert_eq!(buf.len(), 1);
        let f = text_frame(&[b'x'; 300]);
        assert_eq!(&f[..4], &[0x81, 126, 1, 44]);
    }

    #[test]
    fn a_kafka_record_names_its_room_in_its_first_field() {
        assert_eq!(
            kafka::room_of(br#"{"userId":"u7","seq":1}"#).as_deref(),
            Some("user:u7")
        );
        assert_eq!(
            kafka::room_of(br#"{"taskId":"g3","seq":1}"#).as_deref(),
            Some("task:g3")
        );
        assert_eq!(kafka::room_of(b"not json"), None);
        let f = event_frame("\"e\"", "t", 2, 9, 5, br#"{"a":1}"#);
        assert_eq!(
            &f[2..],
            br#"{"type":"event","event":"e","pos":"t:2:9","ts":5,"payload":{"a":1}}"#
        );
    }

    #[test]
    fn reads_the_subject() {
        let claims = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(br#"{"sub":"u7"}"#);
        assert_eq!(
            subject(&format!("roomcast.v1, bearer.h.{claims}.s")).as_deref(),
            Some("u7")
        );
    }
}
