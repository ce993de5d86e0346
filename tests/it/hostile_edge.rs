//! Before the upgrade: what a peer without a token can hold (a place among the handshakes,
//! time, bytes of request head), and the per-user and per-address caps after it.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::time::{timeout, Instant};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::MaybeTlsStream;

use crate::support::*;

const FAILURES: &str = "roomcast_handshake_failures_total";

fn failures(reason: &str) -> String {
    format!("{FAILURES}{{reason=\"{reason}\"}}")
}

/// Reads until the server closes the connection; what it sent, or None if it is still open
/// after `limit`.
async fn read_until_closed(s: &mut TcpStream, limit: Duration) -> Option<String> {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = Instant::now() + limit;
    loop {
        match timeout(deadline - Instant::now(), s.read(&mut buf)).await {
            Err(_) => return None,
            Ok(Ok(0)) | Ok(Err(_)) => return Some(String::from_utf8_lossy(&got).into()),
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
        }
    }
}

/// A TCP connection to `addr` from the loopback address `from`.
async fn connect_from(from: &str, addr: &str) -> TcpStream {
    let socket = TcpSocket::new_v4().unwrap();
    socket
        .bind(format!("{from}:0").parse::<SocketAddr>().unwrap())
        .unwrap();
    socket.connect(addr.parse().unwrap()).await.unwrap()
}

/// A WebSocket upgrade from the loopback address `from` with extra request headers: the
/// welcome's `type`, or the refusal's status and body.
async fn upgrade_from(
    server: &Server,
    from: &str,
    token: &str,
    headers: &[(&str, &str)],
) -> Result<String, (u16, String)> {
    let mut req = server.ws_url().into_client_request().unwrap();
    req.headers_mut().insert(
        "Sec-WebSocket-Protocol",
        format!("roomcast.v1, bearer.{token}").parse().unwrap(),
    );
    for (k, v) in headers {
        let name = tokio_tungstenite::tungstenite::http::HeaderName::from_bytes(k.as_bytes());
        req.headers_mut()
            .insert(name.unwrap(), v.parse().expect("header value"));
    }
    let stream = connect_from(from, &server.public).await;
    match tokio_tungstenite::client_async(req, MaybeTlsStream::Plain(stream)).await {
        Ok((mut ws, _)) => {
            use futures_util::StreamExt;
            let first = timeout(WAIT, ws.next()).await.expect("welcome in time");
            let text = first
                .expect("a frame")
                .expect("a message")
                .into_text()
                .unwrap();
            let v: serde_json::Value = serde_json::from_str(&text).unwrap();
            // Kept open for the caller's count by leaking it into a task that holds it.
            tokio::spawn(async move {
                let _ws = ws;
                tokio::time::sleep(Duration::from_secs(60)).await;
            });
            Ok(v["type"].as_str().unwrap_or_default().to_string())
        }
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => Err(refusal(&resp)),
        Err(e) => panic!("upgrade failed: {e}"),
    }
}

#[tokio::test]
async fn a_slow_request_head_is_closed_at_the_handshake_deadline() {
    let topic = unique("edge-slow");
    let server = start_with_server(&topic, "handshake_timeout_seconds = 1.0\n").await;
    let mut s = TcpStream::connect(&server.public).await.unwrap();
    s.write_all(b"GET /ws HTTP/1.1\r\n").await.unwrap();
    let started = Instant::now();
    // One byte every 200 ms: a head that never ends, trickled to look alive.
    let trickle = async {
        loop {
            tokio::time::sleep(Duration::from_millis(200)).await;
            if s.write_all(b"X").await.is_err() {
                return;
            }
            if started.elapsed() > Duration::from_secs(10) {
                return;
            }
        }
    };
    trickle.await;
    let held = started.elapsed();
    assert!(
        held < Duration::from_secs(5),
        "a slow head was held {held:?}, past the 1 s deadline"
    );
    assert_eq!(server.metric(&failures("handshake_timeout")).await, 1.0);
}

#[tokio::test]
async fn a_request_head_over_the_bound_is_answered_431_and_closed() {
    let topic = unique("edge-head");
    let server = start_with_server(&topic, "max_request_head_bytes = 16384\n").await;
    let mut s = TcpStream::connect(&server.public).await.unwrap();
    s.write_all(b"GET /ws HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    let pad = format!("X-Pad: {}\r\n", "a".repeat(1000));
    // 40 KB of head, unfinished: past the bound long before the end.
    for _ in 0..40 {
        if s.write_all(pad.as_bytes()).await.is_err() {
            break;
        }
    }
    let answer = read_until_closed(&mut s, Duration::from_secs(10))
        .await
        .expect("closed after the head grew past the bound");
    assert!(answer.starts_with("HTTP/1.1 431"), "answer: {answer:?}");
    assert_eq!(
        server.metric(&failures("request_head_too_large")).await,
        1.0
    );
}

#[tokio::test]
async fn handshakes_past_the_cap_are_refused_and_other_clients_still_connect() {
    let topic = unique("edge-cap");
    let server = start_with_server(
        &topic,
        "max_handshakes = 8\nmax_handshakes_per_address = 4\nhandshake_timeout_seconds = 3.0\n",
    )
    .await;
    // Four silent connections from one address take all that address may hold.
    let mut silent = Vec::new();
    for _ in 0..4 {
        silent.push(connect_from("127.0.0.1", &server.public).await);
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut fifth = connect_from("127.0.0.1", &server.public).await;
    let answer = read_until_closed(&mut fifth, Duration::from_secs(2))
        .await
        .expect("refused at once");
    assert!(answer.starts_with("HTTP/1.1 503"), "answer: {answer:?}");
    assert!(
        answer.ends_with("too_many_handshakes\n"),
        "answer: {answer:?}"
    );
    assert_eq!(
        server
            .metric(&failures("too_many_handshakes_for_address"))
            .await,
        1.0
    );
    // Another address still gets in, and is welcomed.
    let welcome = upgrade_from(&server, "127.0.0.2", &token("edge-other", &[]), &[]).await;
    assert_eq!(welcome, Ok("welcome".to_string()));

    // Four more silent connections from elsewhere fill the global cap.
    for from in ["127.0.0.3", "127.0.0.4", "127.0.0.5", "127.0.0.6"] {
        silent.push(connect_from(from, &server.public).await);
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut over = connect_from("127.0.0.7", &server.public).await;
    let answer = read_until_closed(&mut over, Duration::from_secs(2))
        .await
        .expect("refused at once");
    assert!(answer.starts_with("HTTP/1.1 503"), "answer: {answer:?}");
    assert_eq!(server.metric(&failures("too_many_handshakes")).await, 1.0);

    // The silent ones run out of time and are closed; their places come back.
    for mut s in silent {
        assert!(
            read_until_closed(&mut s, Duration::from_secs(8))
                .await
                .is_some(),
            "a silent connection outlived the handshake deadline"
        );
    }
    let welcome = upgrade_from(&server, "127.0.0.1", &token("edge-after", &[]), &[]).await;
    assert_eq!(welcome, Ok("welcome".to_string()));
}

#[tokio::test]
async fn one_user_cannot_take_every_connection() {
    let topic = unique("edge-user");
    let server = start_with_server(&topic, "max_connections_per_user = 2\n").await;
    let alice = token("edge-alice", &[]);
    let first = server.connect(&alice).await;
    let _second = server.connect(&alice).await;
    let refused = Client::connect(&server.ws_url(), &alice).await.err();
    assert_eq!(
        refused,
        Some((429, "too_many_connections_for_user".to_string()))
    );
    let _bob = server.connect(&token("edge-bob", &[])).await;
    assert_eq!(
        server
            .metric(&failures("too_many_connections_for_user"))
            .await,
        1.0
    );
    // A closed connection gives its place back.
    drop(first);
    let deadline = Instant::now() + WAIT;
    loop {
        match Client::connect(&server.ws_url(), &alice).await {
            Ok(_) => break,
            Err((429, _)) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(100)).await
            }
            Err(e) => panic!("not admitted again after a close: {e:?}"),
        }
    }
}

#[tokio::test]
async fn the_address_cap_believes_forwarded_for_only_from_trusted_proxies() {
    let topic = unique("edge-addr");
    let server = start_with_server(
        &topic,
        "max_connections_per_address = 1\ntrusted_proxies = [\"127.0.0.1\"]\n",
    )
    .await;
    let xff = |ip: &'static str| [("X-Forwarded-For", ip)];
    let t = |n: &str| token(n, &[]);
    // Behind the trusted proxy, clients are told apart by the header.
    assert_eq!(
        upgrade_from(&server, "127.0.0.1", &t("a1"), &xff("203.0.113.5")).await,
        Ok("welcome".into())
    );
    assert_eq!(
        upgrade_from(&server, "127.0.0.1", &t("a2"), &xff("203.0.113.5")).await,
        Err((429, "too_many_connections_for_address".into()))
    );
    assert_eq!(
        upgrade_from(&server, "127.0.0.1", &t("a3"), &xff("203.0.113.6")).await,
        Ok("welcome".into())
    );
    // From an untrusted peer the header is ignored: its own address counts.
    assert_eq!(
        upgrade_from(&server, "127.0.0.9", &t("b1"), &xff("198.51.100.1")).await,
        Ok("welcome".into())
    );
    assert_eq!(
        upgrade_from(&server, "127.0.0.9", &t("b2"), &xff("198.51.100.2")).await,
        Err((429, "too_many_connections_for_address".into()))
    );
    assert_eq!(
        server
            .metric(&failures("too_many_connections_for_address"))
            .await,
        2.0
    );
}

/// A server for `topic` with extra `[server]` keys.
async fn start_with_server(topic: &str, server_keys: &str) -> Server {
    Server::start_keys(&task_route(topic), server_keys, "", &[]).await
}
