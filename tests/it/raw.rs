//! The one raw WebSocket client of these tests, for what client libraries never send or never
//! show: frames built byte by byte (masked or not, of any length), the server's frames parsed
//! as they arrive, and how and when the connection ends. The bytes themselves come from the
//! load tool's framing module (`roomcast_load::frame`), the one the load client and the floor
//! use.

use std::time::Duration;

use roomcast_load::frame::{self, encode};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpSocket, TcpStream};
use tokio::time::{timeout, Instant};

use crate::support::{Server, WAIT};

pub use roomcast_load::frame::{CLOSE, FIN, PING, PONG, TEXT};

/// The key of RFC 6455's example, and the accept value that answers it.
pub const KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";
const ACCEPT: &str = "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=";

const MASK: [u8; 4] = [0x37, 0xfa, 0x21, 0x3d];

/// An upgrade request as a browser sends it, with the parts a test may spoil.
pub struct Upgrade<'a> {
    pub http: &'a str,
    pub version: &'a str,
    pub key: &'a str,
    pub token: &'a str,
}

impl<'a> Upgrade<'a> {
    pub fn new(token: &'a str) -> Upgrade<'a> {
        Upgrade {
            http: "HTTP/1.1",
            version: "13",
            key: KEY,
            token,
        }
    }

    pub fn request(&self, addr: &str) -> String {
        frame::Upgrade {
            path: "/ws",
            host: addr,
            http: self.http,
            version: self.version,
            key: self.key,
            extra: &format!("Authorization: Bearer {}\r\n", self.token),
        }
        .request()
    }
}

/// A client frame, masked as RFC 6455 requires, its length in whichever form it needs.
pub fn masked(first: u8, payload: &[u8]) -> Vec<u8> {
    encode(first, payload, Some(MASK))
}

/// A frame as a server sends it, or as a broken client might: no mask.
pub fn unmasked(first: u8, payload: &[u8]) -> Vec<u8> {
    encode(first, payload, None)
}

/// A close frame's payload.
pub fn close_payload(code: u16, reason: &[u8]) -> Vec<u8> {
    let mut payload = code.to_be_bytes().to_vec();
    payload.extend_from_slice(reason);
    payload
}

/// The server frame at the start of `buf`: its first byte, its payload and the bytes it
/// takes; None while it is incomplete. Server frames are never masked.
pub fn parse(buf: &[u8]) -> Option<(u8, Vec<u8>, usize)> {
    let head = frame::head(buf)?;
    assert_eq!(head.mask, None, "a masked server frame");
    Some((head.first, buf[head.payload.clone()].to_vec(), head.end()))
}

/// An upgraded connection spoken to byte by byte.
pub struct Raw {
    rd: OwnedReadHalf,
    /// Taken by a test whose writes must go on while it reads.
    wr: Option<OwnedWriteHalf>,
    /// Read but not yet parsed.
    buf: Vec<u8>,
}

impl Raw {
    /// Upgrades, and reads the welcome.
    pub async fn open(server: &Server, token: &str) -> Raw {
        let mut raw = Raw::upgrade(server, token).await;
        let (first, welcome) = raw.next().await;
        assert_eq!(first, FIN | TEXT);
        let welcome: Value = serde_json::from_slice(&welcome).unwrap();
        assert_eq!(welcome["type"], "welcome");
        raw
    }

    /// Upgrades; the welcome is the next frame.
    pub async fn upgrade(server: &Server, token: &str) -> Raw {
        let stream = TcpStream::connect(&server.public).await.unwrap();
        Raw::handshake(stream, &Upgrade::new(token).request(&server.public)).await
    }

    /// Upgrades with a small receive buffer, for a client that then stops reading: the
    /// server's side fills up after a few frames.
    pub async fn stalled(server: &Server, token: &str) -> Raw {
        let socket = TcpSocket::new_v4().unwrap();
        socket.set_recv_buffer_size(8 * 1024).unwrap();
        let stream = socket
            .connect(server.public.parse().unwrap())
            .await
            .unwrap();
        Raw::handshake(stream, &Upgrade::new(token).request(&server.public)).await
    }

    async fn handshake(stream: TcpStream, request: &str) -> Raw {
        let (rd, wr) = stream.into_split();
        let mut raw = Raw {
            rd,
            wr: Some(wr),
            buf: Vec::new(),
        };
        raw.send(request.as_bytes()).await;
        let end = loop {
            if let Some(at) = raw.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break at + 4;
            }
            assert!(raw.fill().await > 0, "closed during the handshake");
        };
        let head = String::from_utf8_lossy(&raw.buf[..end]).into_owned();
        assert!(head.starts_with("HTTP/1.1 101"), "{head}");
        assert!(head.contains(ACCEPT), "{head}");
        raw.buf.drain(..end);
        raw
    }

    pub async fn send(&mut self, bytes: &[u8]) {
        let wr = self.wr.as_mut().expect("the write side was taken");
        wr.write_all(bytes).await.unwrap();
    }

    /// The write side, for a writer that floods while this side reads.
    pub fn take_writer(&mut self) -> OwnedWriteHalf {
        self.wr.take().expect("the write side was taken")
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

    /// The next whole server frame: its first byte and payload; None once the connection
    /// ended.
    pub async fn frame(&mut self) -> Option<(u8, Vec<u8>)> {
        loop {
            if let Some((first, payload, used)) = parse(&self.buf) {
                self.buf.drain(..used);
                return Some((first, payload));
            }
            if self.fill().await == 0 {
                return None;
            }
        }
    }

    /// The next server frame but those that come at any time: the server's heartbeat pings
    /// and `positions` watermarks.
    pub async fn next(&mut self) -> (u8, Vec<u8>) {
        loop {
            let (first, payload) = self.frame().await.expect("a frame before the end");
            let watermark = first == FIN | TEXT
                && serde_json::from_slice::<Value>(&payload)
                    .is_ok_and(|v| v["type"] == "positions");
            if !watermark && first != FIN | PING {
                return (first, payload);
            }
        }
    }

    /// The next frame (as `next`), which must be a whole text frame: its JSON.
    pub async fn json(&mut self) -> Value {
        let (first, payload) = self.next().await;
        assert_eq!(first, FIN | TEXT, "a final text frame");
        serde_json::from_slice(&payload).unwrap()
    }

    /// Reads past anything else up to the server's close frame: its code and reason.
    pub async fn close(&mut self) -> (u16, String) {
        loop {
            let (first, payload) = self.frame().await.expect("a close frame");
            if first == FIN | CLOSE {
                assert!(payload.len() >= 2, "a close frame with a code");
                let code = u16::from_be_bytes([payload[0], payload[1]]);
                return (code, String::from_utf8(payload[2..].to_vec()).unwrap());
            }
        }
    }

    /// How long after `from` the connection ended (end of stream or reset), if it did within
    /// `limit`. What arrives meanwhile is dropped.
    pub async fn ended_within(&mut self, from: Instant, limit: Duration) -> Option<Duration> {
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

    /// How the stream ends once everything buffered is read: Ok(()) for an orderly end
    /// (FIN), else the error's kind. It must end within the wait.
    pub async fn read_to_end(&mut self) -> Result<(), std::io::ErrorKind> {
        let mut chunk = vec![0u8; 64 * 1024];
        let read_all = async {
            loop {
                match self.rd.read(&mut chunk).await {
                    Ok(0) => return Ok(()),
                    Ok(_) => {}
                    Err(e) => return Err(e.kind()),
                }
            }
        };
        timeout(WAIT, read_all)
            .await
            .expect("the server's side of the connection is gone")
    }
}

/// The codec itself, checked on every length form against the bytes RFC 6455 gives.
#[test]
fn frames_of_every_length_form_are_built_and_parsed() {
    assert_eq!(
        masked(FIN | TEXT, b"Hello"),
        [0x81, 0x85, 0x37, 0xfa, 0x21, 0x3d, 0x7f, 0x9f, 0x4d, 0x51, 0x58]
    );
    assert_eq!(unmasked(FIN | TEXT, b"Hello"), b"\x81\x05Hello");
    for (len, header) in [
        (0, 2),
        (125, 2),
        (126, 4),
        (65_535, 4),
        (65_536, 10),
        (70_000, 10),
    ] {
        let payload: Vec<u8> = (0..len).map(|i| i as u8).collect();
        let frame = unmasked(FIN | PONG, &payload);
        assert_eq!(frame.len(), header + len, "{len}");
        assert_eq!(parse(&frame[..frame.len() - 1]), None, "{len}: incomplete");
        assert_eq!(parse(&frame), Some((FIN | PONG, payload, frame.len())));
        let client = masked(FIN | PONG, &vec![0; len]);
        assert_eq!(client.len(), header + 4 + len, "{len}");
        assert_eq!(client[1] & 0x80, 0x80);
    }
}
