//! The close handshake's end, seen from a raw socket: once a close is answered the server lets
//! the TCP connection go at once, and a client that writes on after the server's close is cut
//! off instead of being read for the whole grace.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use tokio::time::{timeout, Instant};

use crate::support::*;

/// The server waits this long for a close reply; everything asserted here must come sooner.
const GRACE: Duration = Duration::from_secs(3);
const SOONER: Duration = Duration::from_secs(2);

const RATE: &str = "
[websocket]
client_messages_per_second = 100
client_burst = 20
";

const CLOSE: u8 = 0x8;
const PING: u8 = 0x9;

/// A client frame, masked as RFC 6455 requires (payloads here stay under 126 bytes).
fn masked(opcode: u8, payload: &[u8]) -> Vec<u8> {
    assert!(payload.len() < 126);
    let mask = [0x37, 0xfa, 0x21, 0x3d];
    let mut frame = vec![0x80 | opcode, 0x80 | payload.len() as u8];
    frame.extend_from_slice(&mask);
    frame.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    frame
}

/// A server frame at the start of `buf`: its opcode, payload and length in `buf`.
fn parse(buf: &[u8]) -> Option<(u8, Vec<u8>, usize)> {
    let (&b0, &b1) = (buf.first()?, buf.get(1)?);
    let (len, at) = match b1 & 0x7f {
        126 => (u16::from_be_bytes([*buf.get(2)?, *buf.get(3)?]) as usize, 4),
        127 => (
            u64::from_be_bytes(buf.get(2..10)?.try_into().ok()?) as usize,
            10,
        ),
        n => (n as usize, 2),
    };
    let payload = buf.get(at..at + len)?.to_vec();
    Some((b0 & 0x0f, payload, at + len))
}

/// The read side of a raw WebSocket past its upgrade, and what it read but has not parsed.
struct Raw {
    rd: OwnedReadHalf,
    buf: Vec<u8>,
}

impl Raw {
    /// Upgrades a new connection and reads its welcome; the write side is handed back.
    async fn open(server: &Server, token: &str) -> (Raw, OwnedWriteHalf) {
        let tcp = TcpStream::connect(&server.public).await.unwrap();
        let (rd, mut wr) = tcp.into_split();
        let request = format!(
            "GET /ws HTTP/1.1\r\nHost: {}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\
             Sec-WebSocket-Protocol: roomcast.v1, bearer.{token}\r\n\r\n",
            server.public
        );
        wr.write_all(request.as_bytes()).await.unwrap();
        let mut raw = Raw {
            rd,
            buf: Vec::new(),
        };
        let head_end = loop {
            if let Some(at) = raw.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break at + 4;
            }
            assert!(raw.fill().await > 0, "the upgrade is answered");
        };
        let head = String::from_utf8_lossy(&raw.buf[..head_end]).to_string();
        assert!(head.starts_with("HTTP/1.1 101"), "{head}");
        raw.buf.drain(..head_end);
        let (opcode, welcome) = raw.frame().await.expect("a welcome");
        assert_eq!(opcode, 0x1);
        assert!(String::from_utf8_lossy(&welcome).contains("\"welcome\""));
        (raw, wr)
    }

    /// Reads once; 0 at the end of the stream.
    async fn fill(&mut self) -> usize {
        let mut chunk = [0u8; 16 * 1024];
        let n = timeout(WAIT, self.rd.read(&mut chunk))
            .await
            .expect("the server answers in time")
            .expect("no reset before the close frame");
        self.buf.extend_from_slice(&chunk[..n]);
        n
    }

    /// The next whole frame; None once the connection ended.
    async fn frame(&mut self) -> Option<(u8, Vec<u8>)> {
        loop {
            if let Some((opcode, payload, used)) = parse(&self.buf) {
                self.buf.drain(..used);
                return Some((opcode, payload));
            }
            if self.fill().await == 0 {
                return None;
            }
        }
    }

    /// Reads frames up to the server's close; its code.
    async fn close_code(&mut self) -> u16 {
        loop {
            let (opcode, payload) = self.frame().await.expect("a close frame");
            if opcode == CLOSE {
                return u16::from_be_bytes([payload[0], payload[1]]);
            }
        }
    }

    /// How long after `from` the connection ended (end of stream or reset), if it did within
    /// `limit`.
    async fn ended_within(&mut self, from: Instant, limit: Duration) -> Option<Duration> {
        let mut chunk = [0u8; 4096];
        loop {
            let left = limit.saturating_sub(from.elapsed());
            match timeout(left, self.rd.read(&mut chunk)).await {
                Err(_) => return None,
                Ok(Ok(0)) | Ok(Err(_)) => return Some(from.elapsed()),
                Ok(Ok(_)) => {}
            }
        }
    }
}

#[tokio::test]
async fn the_server_lets_tcp_go_once_it_has_answered_a_clients_close() {
    let topic = unique("close-answered");
    create_topic(&topic, 1).await;
    let server = Server::start(&task_route(&topic), "").await;
    let (mut raw, mut wr) = Raw::open(&server, &token("closer", &[])).await;

    let close = masked(CLOSE, &1000u16.to_be_bytes());
    wr.write_all(&close).await.unwrap();
    let sent = Instant::now();
    assert_eq!(raw.close_code().await, 1000);
    let ended = raw.ended_within(sent, GRACE + SOONER).await;
    assert!(
        ended.is_some_and(|d| d < SOONER),
        "TCP ended {ended:?} after the close; the server must not wait for a second one"
    );
    let deadline = Instant::now() + SOONER;
    while server.metric("roomcast_connections").await != 0.0 {
        assert!(Instant::now() < deadline, "the connection is still counted");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A close frame the server must refuse (a code no endpoint may send, one byte, a reason that
/// is not UTF-8) still ended the client's side: after its own close the server has no reply
/// to wait for, and lets TCP go at once.
#[tokio::test]
async fn a_refused_close_is_failed_and_tcp_let_go_at_once() {
    let topic = unique("close-refused");
    create_topic(&topic, 1).await;
    let server = Server::start(&task_route(&topic), "").await;
    let cases: [(&[u8], u16); 3] = [
        (&[0x03, 0xe7], 1002),
        (&[0x03], 1002),
        (&[0x03, 0xe8, 0xff], 1007),
    ];
    for (payload, code) in cases {
        let (mut raw, mut wr) = Raw::open(&server, &token("bad-closer", &[])).await;
        wr.write_all(&masked(CLOSE, payload)).await.unwrap();
        let sent = Instant::now();
        assert_eq!(raw.close_code().await, code, "{payload:?}");
        let ended = raw.ended_within(sent, GRACE + SOONER).await;
        assert!(
            ended.is_some_and(|d| d < SOONER),
            "TCP ended {ended:?} after the refused close {payload:?}"
        );
    }
}

#[tokio::test]
async fn a_client_writing_on_after_the_servers_close_is_cut_off() {
    let topic = unique("close-flood");
    create_topic(&topic, 1).await;
    let server = Server::start(&task_route(&topic), RATE).await;
    let (mut raw, mut wr) = Raw::open(&server, &token("flooder", &[])).await;

    // Pings flat out, and never a close reply: what a flooder does.
    let writer = tokio::spawn(async move {
        let batch: Vec<u8> = (0..64).flat_map(|_| masked(PING, b"p")).collect();
        while wr.write_all(&batch).await.is_ok() {}
    });
    assert_eq!(raw.close_code().await, 4029);
    let closed = Instant::now();

    let ended = raw.ended_within(closed, GRACE + SOONER).await;
    assert!(
        ended.is_some_and(|d| d < SOONER),
        "the flooder was read on for {ended:?} after its close"
    );
    let stopped = timeout(SOONER, writer).await;
    assert!(stopped.is_ok(), "its writes keep being taken");
}
