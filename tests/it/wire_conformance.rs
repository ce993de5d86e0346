//! RFC 6455 conformance of the real binary, byte by byte over TCP: the close codes a client
//! may send, UTF-8 checked fragment by fragment, the frame length's top bit, and the
//! handshake's refusals (HTTP version, WebSocket version, key).

use std::time::Duration;

use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::support::*;

/// Longest wait for any answer; a server that does not answer fails the test long before its
/// own timeouts (60 s of silence) would close the connection.
const PATIENCE: Duration = Duration::from_secs(10);

/// An upgrade request as a browser sends it, with the parts a test may spoil.
fn upgrade_request(addr: &str, http: &str, version: &str, key: &str, token: &str) -> String {
    format!(
        "GET /ws {http}\r\nHost: {addr}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
         Sec-WebSocket-Version: {version}\r\nSec-WebSocket-Key: {key}\r\n\
         Authorization: Bearer {token}\r\n\r\n"
    )
}

const KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";

/// Sends `request` and reads the answer until the server closes the connection.
async fn answer_to(addr: &str, request: &str) -> String {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(PATIENCE, stream.read_to_end(&mut answer))
        .await
        .expect("the server answers and closes in time")
        .unwrap();
    String::from_utf8_lossy(&answer).into_owned()
}

/// The status code of an HTTP answer.
fn status(answer: &str) -> u16 {
    answer
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

/// A header's value in an HTTP answer (names compared without case).
fn header<'a>(answer: &'a str, name: &str) -> Option<&'a str> {
    let head = answer.split("\r\n\r\n").next()?;
    head.lines().skip(1).find_map(|line| {
        let (n, v) = line.split_once(':')?;
        n.eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

/// An upgraded connection that sends raw bytes and reads server frames.
struct Wire {
    stream: TcpStream,
    buf: Vec<u8>,
}

/// A masked client frame.
fn frame(first: u8, payload: &[u8]) -> Vec<u8> {
    let mask = [0x3C, 0x5A, 0x96, 0xE1];
    let mut out = vec![first];
    match payload.len() {
        n if n < 126 => out.push(0x80 | n as u8),
        n => {
            out.push(0x80 | 126);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
    }
    out.extend_from_slice(&mask);
    out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i & 3]));
    out
}

fn close_payload(code: u16, reason: &[u8]) -> Vec<u8> {
    let mut payload = code.to_be_bytes().to_vec();
    payload.extend_from_slice(reason);
    payload
}

impl Wire {
    /// Upgrades as `user` and reads past the welcome.
    async fn open(server: &Server, user: &str) -> Wire {
        let mut stream = TcpStream::connect(&server.public).await.unwrap();
        let request = upgrade_request(&server.public, "HTTP/1.1", "13", KEY, &token(user, &[]));
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut wire = Wire {
            stream,
            buf: Vec::new(),
        };
        let end = loop {
            if let Some(at) = wire.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break at + 4;
            }
            assert!(wire.read().await > 0, "closed during the handshake");
        };
        let head = String::from_utf8_lossy(&wire.buf[..end]).into_owned();
        assert_eq!(status(&head), 101, "{head}");
        wire.buf.drain(..end);
        let (first, welcome) = wire.frame().await.expect("a welcome");
        assert_eq!(first, 0x81);
        let welcome: Value = serde_json::from_slice(&welcome).unwrap();
        assert_eq!(welcome["type"], "welcome");
        wire
    }

    async fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).await.unwrap();
    }

    async fn read(&mut self) -> usize {
        let mut chunk = [0u8; 4096];
        let n = tokio::time::timeout(PATIENCE, self.stream.read(&mut chunk))
            .await
            .expect("the server answers in time")
            .unwrap_or(0);
        self.buf.extend_from_slice(&chunk[..n]);
        n
    }

    /// The next server frame (first byte and payload); None if the connection ended first.
    async fn frame(&mut self) -> Option<(u8, Vec<u8>)> {
        loop {
            if self.buf.len() >= 2 {
                let (len, at) = match self.buf[1] {
                    126 if self.buf.len() >= 4 => {
                        (u16::from_be_bytes([self.buf[2], self.buf[3]]) as usize, 4)
                    }
                    126 => (usize::MAX, 0),
                    127 => panic!("the server sends nothing that long here"),
                    n => (n as usize, 2),
                };
                if at > 0 && self.buf.len() >= at + len {
                    let first = self.buf[0];
                    let payload = self.buf[at..at + len].to_vec();
                    self.buf.drain(..at + len);
                    return Some((first, payload));
                }
            }
            if self.read().await == 0 {
                return None;
            }
        }
    }

    /// Reads up to the server's close frame, past pings and watermarks: its code and reason.
    async fn close(&mut self) -> (u16, String) {
        loop {
            let (first, payload) = self.frame().await.expect("a close frame");
            if first == 0x88 {
                assert!(payload.len() >= 2, "a close frame with a code");
                let code = u16::from_be_bytes([payload[0], payload[1]]);
                return (code, String::from_utf8(payload[2..].to_vec()).unwrap());
            }
        }
    }

    /// Reads up to the next text frame that is not a watermark.
    async fn json(&mut self) -> Value {
        loop {
            let (first, payload) = self.frame().await.expect("a frame");
            if first == 0x81 {
                let v: Value = serde_json::from_slice(&payload).unwrap();
                if v["type"] != "positions" {
                    return v;
                }
            }
        }
    }
}

async fn server(name: &str) -> Server {
    let topic = unique(name);
    create_topic(&topic, 1).await;
    Server::start(&task_route(&topic), "").await
}

#[tokio::test]
async fn a_close_code_no_endpoint_may_send_fails_with_1002() {
    let server = server("closecodes").await;
    for code in [0, 999, 1004, 1005, 1006, 1015, 1016, 1100, 2000, 2999, 5000] {
        let mut c = Wire::open(&server, &format!("invalid-{code}")).await;
        c.send(&frame(0x88, &close_payload(code, b""))).await;
        assert_eq!(
            c.close().await,
            (1002, "protocol error".into()),
            "close code {code}"
        );
    }
    // The codes a client may send are answered with a normal close (or, as RFC 6455 5.5.1
    // allows, with the code echoed).
    for code in [1000, 1001, 1003, 1007, 1011, 1014, 3000, 3999, 4000, 4999] {
        let mut c = Wire::open(&server, &format!("valid-{code}")).await;
        c.send(&frame(0x88, &close_payload(code, b"bye"))).await;
        let (answer, _) = c.close().await;
        assert!(answer == 1000 || answer == code, "{code} answered {answer}");
    }
    let mut c = Wire::open(&server, "one-byte").await;
    c.send(&frame(0x88, &[0x03])).await;
    assert_eq!(c.close().await, (1002, "protocol error".into()));
    let mut c = Wire::open(&server, "bad-reason").await;
    c.send(&frame(
        0x88,
        &close_payload(1000, &[b'o', b'k', 0xC0, 0xAF]),
    ))
    .await;
    assert_eq!(c.close().await, (1007, "invalid UTF-8".into()));
}

#[tokio::test]
async fn invalid_utf8_fails_at_the_fragment_that_breaks_it() {
    let server = server("utf8").await;
    // Autobahn 6.4.1: valid text, then a fragment holding U+110000, and no final fragment
    // yet. The message is known to be broken: 1007 now, not when (if ever) it ends.
    let mut c = Wire::open(&server, "broken").await;
    c.send(&frame(0x01, "κόσμε".as_bytes())).await;
    c.send(&frame(0x00, &[0xF4, 0x90, 0x80, 0x80])).await;
    assert_eq!(c.close().await, (1007, "invalid UTF-8".into()));

    // A fragment ending in a lead byte no continuation can follow.
    let mut c = Wire::open(&server, "dead-end").await;
    c.send(&frame(0x01, &[b'{', 0xED, 0xA0])).await;
    assert_eq!(c.close().await, (1007, "invalid UTF-8".into()));

    // A character cut between fragments is whole once they are joined.
    let mut c = Wire::open(&server, "straddling").await;
    let ping = r#"{"type":"ping","id":"é€😀"}"#.as_bytes();
    let cuts = [0, 22, 24, 28, ping.len()];
    for (n, pair) in cuts.windows(2).enumerate() {
        let fin = if pair[1] == ping.len() { 0x80 } else { 0 };
        let op = if n == 0 { 0x01 } else { 0x00 };
        c.send(&frame(fin | op, &ping[pair[0]..pair[1]])).await;
    }
    assert_eq!(c.json().await, json!({"type": "pong", "id": "é€😀"}));
}

#[tokio::test]
async fn a_64_bit_length_with_its_top_bit_set_fails_with_1002() {
    let server = server("length").await;
    let mut c = Wire::open(&server, "top-bit").await;
    let mut header = vec![0x81, 0x80 | 127];
    header.extend_from_slice(&(1u64 << 63 | 16).to_be_bytes());
    header.extend_from_slice(&[0; 4]);
    c.send(&header).await;
    assert_eq!(c.close().await, (1002, "protocol error".into()));
}

#[tokio::test]
async fn the_handshake_refuses_what_cannot_be_a_websocket_upgrade() {
    let server = server("handshake").await;
    let addr = &server.public;
    let token = token("shaker", &[]);

    // Another WebSocket version: 426, naming the one spoken, and the connection closed.
    let answer = answer_to(addr, &upgrade_request(addr, "HTTP/1.1", "8", KEY, &token)).await;
    assert_eq!(status(&answer), 426, "{answer}");
    assert_eq!(header(&answer, "sec-websocket-version"), Some("13"));
    assert_eq!(header(&answer, "upgrade"), Some("websocket"));
    assert_eq!(header(&answer, "connection"), Some("upgrade, close"));
    assert!(
        answer.ends_with("unsupported_websocket_version\n"),
        "{answer}"
    );

    // A key that is not 16 bytes in base64.
    for key in [
        "x",
        "AAAAAAAAAAAAAAAAAAAA",
        "AAAAAAAAAAAAAAAAAAAAAAA=",
        "dGhlIHNhbXBsZSBub25jZQ",
    ] {
        let answer = answer_to(addr, &upgrade_request(addr, "HTTP/1.1", "13", key, &token)).await;
        assert_eq!(status(&answer), 400, "{key}: {answer}");
        assert!(answer.ends_with("not_a_websocket_upgrade\n"), "{answer}");
    }

    // HTTP/1.0 has no upgrade: refused, never a 101 that upgrades nothing.
    let answer = answer_to(addr, &upgrade_request(addr, "HTTP/1.0", "13", KEY, &token)).await;
    assert_eq!(status(&answer), 400, "{answer}");
    assert!(answer.ends_with("not_a_websocket_upgrade\n"), "{answer}");

    let refused =
        |reason: &str| format!("roomcast_handshake_failures_total{{reason=\"{reason}\"}}");
    assert_eq!(
        server
            .metric(&refused("unsupported_websocket_version"))
            .await,
        1.0
    );
    assert_eq!(
        server.metric(&refused("not_a_websocket_upgrade")).await,
        5.0
    );

    // The same request, well formed, is upgraded.
    Wire::open(&server, "shaker").await;
}
