//! RFC 6455 conformance of the real binary, byte by byte over TCP: the close codes a client
//! may send, UTF-8 checked fragment by fragment, the frame length's top bit, and the
//! handshake's refusals (HTTP version, WebSocket version, key).

use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::raw::{close_payload, masked, Raw, Upgrade, CLOSE, FIN, TEXT};
use crate::support::*;

/// Sends `request` and reads the answer until the server closes the connection.
async fn answer_to(addr: &str, request: &str) -> String {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(WAIT, stream.read_to_end(&mut answer))
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

async fn server(name: &str) -> Server {
    let topic = unique(name);
    create_topic(&topic, 1).await;
    Server::start(&task_route(&topic), "").await
}

#[tokio::test]
async fn a_close_code_no_endpoint_may_send_fails_with_1002() {
    let server = server("closecodes").await;
    for code in [0, 999, 1004, 1005, 1006, 1015, 1016, 1100, 2000, 2999, 5000] {
        let mut c = Raw::open(&server, &token(&format!("invalid-{code}"), &[])).await;
        c.send(&masked(FIN | CLOSE, &close_payload(code, b"")))
            .await;
        assert_eq!(
            c.close().await,
            (1002, "protocol error".into()),
            "close code {code}"
        );
    }
    // The codes a client may send are answered with a normal close (or, as RFC 6455 5.5.1
    // allows, with the code echoed).
    for code in [1000, 1001, 1003, 1007, 1011, 1014, 3000, 3999, 4000, 4999] {
        let mut c = Raw::open(&server, &token(&format!("valid-{code}"), &[])).await;
        c.send(&masked(FIN | CLOSE, &close_payload(code, b"bye")))
            .await;
        let (answer, _) = c.close().await;
        assert!(answer == 1000 || answer == code, "{code} answered {answer}");
    }
    let mut c = Raw::open(&server, &token("one-byte", &[])).await;
    c.send(&masked(FIN | CLOSE, &[0x03])).await;
    assert_eq!(c.close().await, (1002, "protocol error".into()));
    let mut c = Raw::open(&server, &token("bad-reason", &[])).await;
    c.send(&masked(
        FIN | CLOSE,
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
    let mut c = Raw::open(&server, &token("broken", &[])).await;
    c.send(&masked(TEXT, "κόσμε".as_bytes())).await;
    c.send(&masked(0, &[0xF4, 0x90, 0x80, 0x80])).await;
    assert_eq!(c.close().await, (1007, "invalid UTF-8".into()));

    // A fragment ending in a lead byte no continuation can follow.
    let mut c = Raw::open(&server, &token("dead-end", &[])).await;
    c.send(&masked(TEXT, &[b'{', 0xED, 0xA0])).await;
    assert_eq!(c.close().await, (1007, "invalid UTF-8".into()));

    // A character cut between fragments is whole once they are joined.
    let mut c = Raw::open(&server, &token("straddling", &[])).await;
    let ping = r#"{"type":"ping","id":"é€😀"}"#.as_bytes();
    let cuts = [0, 22, 24, 28, ping.len()];
    for (n, pair) in cuts.windows(2).enumerate() {
        let fin = if pair[1] == ping.len() { FIN } else { 0 };
        let op = if n == 0 { TEXT } else { 0 };
        c.send(&masked(fin | op, &ping[pair[0]..pair[1]])).await;
    }
    assert_eq!(c.json().await, json!({"type": "pong", "id": "é€😀"}));
}

#[tokio::test]
async fn a_64_bit_length_with_its_top_bit_set_fails_with_1002() {
    let server = server("length").await;
    let mut c = Raw::open(&server, &token("top-bit", &[])).await;
    let mut header = vec![FIN | TEXT, 0x80 | 127];
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
    let answer = answer_to(
        addr,
        &Upgrade {
            version: "8",
            ..Upgrade::new(&token)
        }
        .request(addr),
    )
    .await;
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
        let answer = answer_to(
            addr,
            &Upgrade {
                key,
                ..Upgrade::new(&token)
            }
            .request(addr),
        )
        .await;
        assert_eq!(status(&answer), 400, "{key}: {answer}");
        assert!(answer.ends_with("not_a_websocket_upgrade\n"), "{answer}");
    }

    // HTTP/1.0 has no upgrade: refused, never a 101 that upgrades nothing.
    let answer = answer_to(
        addr,
        &Upgrade {
            http: "HTTP/1.0",
            ..Upgrade::new(&token)
        }
        .request(addr),
    )
    .await;
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
    Raw::open(&server, &token).await;
}
