//! "Only one party writes to a socket at a time", checked under load: a writer pinging as
//! often as it can, a consumer delivering frames of every size straight to a socket whose
//! buffers are small (so most direct writes are partial), closes landing among them, and a
//! client that parses every byte it gets as RFC 6455 server frames. One frame written into
//! the middle of another shows as a malformed frame or a text frame not as delivered.

use std::io::Read;
use std::net::TcpStream as StdStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::net::{TcpSocket, TcpStream};

use super::outbox::{Delivery, Handover, Limits, Peer};
use super::protocol::close;
use super::{writer, Hub};
use crate::config::Config;
use crate::frame::Frame;
use crate::metrics::Metrics;
use crate::position::PartitionTable;
use crate::route::Priority;
use crate::setup::Setup;

/// Kernel buffer sizes asked for on both ends (the kernel's floor is a little higher).
const SMALL_BUFFER: u32 = 4096;
/// Text frames are this long at most: most are larger than the whole send buffer.
const LARGEST: usize = 24_000;
/// Digits of a text frame's sequence number, at its start; the rest is `FILL`.
const SEQ_DIGITS: usize = 10;
const FILL: u8 = b'.';
/// How long the writer lingers right after taking its queue. A race there took 4 to 27 s
/// (and more than 30 s one run in three) to show without it.
const LINGER_AFTER_TAKE: Duration = Duration::from_micros(20);

fn hub() -> Arc<Hub> {
    let mut config = Config::default();
    config.auth.secret = Some("one-writer-test-secret-0123456789".into());
    let setup = Setup::build(config).unwrap();
    let metrics = Arc::new(Metrics::new());
    let partitions = Arc::new(PartitionTable::default());
    let parts = crate::hub_parts(&setup, metrics, partitions);
    Arc::new(Hub::new(setup, parts))
}

/// A loopback pair with small buffers on both ends: the server's end for the writer and
/// `deliver`, the client's as a blocking socket for a thread of its own.
async fn small_pair() -> (Arc<TcpStream>, StdStream) {
    let listener = TcpSocket::new_v4().unwrap();
    listener.set_send_buffer_size(SMALL_BUFFER).unwrap();
    listener.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let listener = listener.listen(16).unwrap();
    let client = TcpSocket::new_v4().unwrap();
    client.set_recv_buffer_size(SMALL_BUFFER).unwrap();
    let client = client
        .connect(listener.local_addr().unwrap())
        .await
        .unwrap();
    let (server, _) = listener.accept().await.unwrap();
    server.set_nodelay(true).unwrap();
    // Seen writable once, so that `deliver` may write to it directly from the start.
    server.writable().await.unwrap();
    let client = client.into_std().unwrap();
    client.set_nonblocking(false).unwrap();
    client
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    (Arc::new(server), client)
}

/// The `seq`th text frame a round delivers, `len` bytes of text.
fn text(seq: u64, len: usize) -> Frame {
    let mut s = format!("{seq:0width$}", width = SEQ_DIGITS);
    s.extend(std::iter::repeat_n(
        FILL as char,
        len.saturating_sub(SEQ_DIGITS),
    ));
    Frame::from(s)
}

/// A small, fixed pseudo-random sequence: every run tries the same interleavings' inputs.
struct Lcg(u64);

impl Lcg {
    fn below(&mut self, n: u64) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        (self.0 >> 33) % n
    }
}

/// What a client read from one connection, up to and including the close frame.
#[derive(Debug, Default)]
struct Seen {
    texts: u64,
    pings: u64,
    close_code: u16,
}

/// Reads server frames until the close frame. Anything a server must not send (fragments,
/// reserved bits or opcodes, a mask, a length not in its shortest form, a long control
/// frame), or a text frame other than the next one delivered, is an error.
fn read_stream(client: StdStream) -> Result<Seen, String> {
    let mut stream = std::io::BufReader::with_capacity(1024, client);
    let mut read = |buf: &mut [u8], what: &str| {
        stream
            .read_exact(buf)
            .map_err(|e| format!("reading {what}: {e}"))
    };
    let mut seen = Seen::default();
    loop {
        let at = format!("frame {}", seen.texts + seen.pings);
        let mut head = [0u8; 2];
        read(&mut head, &at)?;
        let (fin, rsv, op) = (head[0] & 0x80, head[0] & 0x70, head[0] & 0x0f);
        if fin == 0 || rsv != 0 || head[1] & 0x80 != 0 {
            return Err(format!("{at}: header {head:02x?}"));
        }
        let len = match head[1] & 0x7f {
            126 => {
                let mut l = [0u8; 2];
                read(&mut l, &at)?;
                let len = u16::from_be_bytes(l) as u64;
                (len >= 126).then_some(len)
            }
            127 => {
                let mut l = [0u8; 8];
                read(&mut l, &at)?;
                let len = u64::from_be_bytes(l);
                (len > u16::MAX as u64 && len >> 63 == 0).then_some(len)
            }
            n => Some(n as u64),
        }
        .ok_or_else(|| format!("{at}: length not in its shortest form"))?;
        let control = op & 0x8 != 0;
        if control && len > 125 || len > LARGEST as u64 {
            return Err(format!("{at}: opcode {op:x}, {len} bytes"));
        }
        let mut payload = vec![0u8; len as usize];
        read(&mut payload, &at)?;
        match op {
            0x1 => {
                check_text(&payload, seen.texts).map_err(|e| format!("{at}: {e}"))?;
                seen.texts += 1;
            }
            0x9 if payload.is_empty() => seen.pings += 1,
            0x8 if payload.len() >= 2 && std::str::from_utf8(&payload[2..]).is_ok() => {
                seen.close_code = u16::from_be_bytes([payload[0], payload[1]]);
                return Ok(seen);
            }
            _ => return Err(format!("{at}: opcode {op:x}, payload {payload:02x?}")),
        }
    }
}

fn check_text(payload: &[u8], expected: u64) -> Result<(), String> {
    let seq = payload
        .get(..SEQ_DIGITS)
        .and_then(|d| std::str::from_utf8(d).ok())
        .and_then(|d| d.parse::<u64>().ok());
    if seq != Some(expected) {
        let start = &payload[..payload.len().min(16)];
        return Err(format!(
            "text {expected} expected, got one starting {start:02x?}"
        ));
    }
    if let Some(at) = payload[SEQ_DIGITS..].iter().position(|b| *b != FILL) {
        let at = SEQ_DIGITS + at;
        let bytes = &payload[at..payload.len().min(at + 8)];
        return Err(format!("text {expected}: {bytes:02x?} at byte {at}"));
    }
    Ok(())
}

/// The consumer's part: delivers text frames of random sizes at random short intervals
/// until the outbox closes or `stop` is set.
fn deliver_until_closed(peer: Peer, stop: Arc<AtomicBool>, seed: u64) {
    let mut random = Lcg(seed);
    // Text 0 is the connection's first frame, queued before.
    let mut seq = 1;
    while !stop.load(Ordering::Relaxed) {
        let len = SEQ_DIGITS + random.below((LARGEST - SEQ_DIGITS) as u64) as usize;
        match peer.hand_over(&text(seq, len), Priority::Normal, Handover::WriteIfQuiet) {
            Delivery::Accepted => seq += 1,
            Delivery::Closed => return,
            other => panic!("frame {seq}: {other:?}"),
        }
        let pause = Instant::now() + Duration::from_micros(random.below(200));
        while Instant::now() < pause {
            std::hint::spin_loop();
        }
    }
}

/// One connection: a writer pinging every millisecond, deliveries racing its pings, and a
/// close with `code` after `after`, flushing the queue or dropping it. Returns what the
/// client read.
async fn round(
    hub: &Arc<Hub>,
    seed: u64,
    after: Duration,
    (code, flush): (u16, bool),
) -> Result<Seen, String> {
    let (server, client) = small_pair().await;
    let limits = Limits {
        frames: 1_000_000,
        bytes: 1 << 34,
        shed_low_after: 1_000_000,
    };
    let (peer, inbox) = Peer::new(limits, Some(server.clone()));
    peer.linger_after_take(LINGER_AFTER_TAKE);
    let reader = std::thread::spawn(move || read_stream(client));
    let id = hub.next_connection_id();
    let beat = Duration::from_millis(1);
    let writer = tokio::spawn(writer::run(hub.clone(), server, inbox, id, beat));
    // The writer pings only after the connection's first frame, as after a welcome.
    peer.hand_over(&text(0, SEQ_DIGITS), Priority::Critical, Handover::Queue);
    let stop = Arc::new(AtomicBool::new(false));
    let consumer = {
        let (peer, stop) = (peer.clone(), stop.clone());
        std::thread::spawn(move || deliver_until_closed(peer, stop, seed))
    };
    tokio::time::sleep(after).await;
    peer.close(code, "closing", flush);
    let ended = tokio::time::timeout(Duration::from_secs(20), writer).await;
    stop.store(true, Ordering::Relaxed);
    consumer.join().unwrap();
    // The socket closes with its last handle: a client still inside a torn frame then
    // meets the end of the stream rather than its read timeout.
    drop(peer);
    let written = ended.map_err(|_| "the writer did not end".to_string())?;
    // What the client read first: a client that found a torn frame hangs up, and the
    // writer then meets a broken socket.
    let seen = tokio::task::spawn_blocking(move || reader.join().unwrap())
        .await
        .unwrap()?;
    assert_eq!(written.unwrap(), code);
    Ok(seen)
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// A drain's close, which flushes the queue, and a slow consumer's, which drops it.
const CLOSES: [(u16, bool); 2] = [(close::GOING_AWAY, true), (close::SLOW_CONSUMER, false)];

/// Pings and closes racing direct writes that leave a frame's rest queued: a ping or close
/// frame written before that rest tears the frame, and so does a close that drops the queue
/// with that rest in it. Runs connections for a few seconds, closed in turn as `CLOSES`.
#[test]
fn frames_never_interleave_under_racing_pings_closes_and_direct_writes() {
    let runtime = runtime();
    let hub = runtime.block_on(async { hub() });
    let started = Instant::now();
    let mut rounds = 0u64;
    let (mut texts, mut pings) = (0, 0);
    while started.elapsed() < Duration::from_secs(4) {
        let after = Duration::from_millis(5 + rounds % 20);
        let close = CLOSES[rounds as usize % CLOSES.len()];
        let seen = runtime.block_on(round(&hub, rounds + 1, after, close));
        let seen =
            seen.unwrap_or_else(|e| panic!("round {rounds}, {:?} in: {e}", started.elapsed()));
        assert_eq!(seen.close_code, close.0);
        (texts, pings) = (texts + seen.texts, pings + seen.pings);
        rounds += 1;
    }
    // The check means something only if pings and frames really were mixed.
    assert!(
        pings > rounds && texts > rounds,
        "{rounds} rounds: {texts} texts, {pings} pings"
    );
}
