//! The close handshake's end, seen from a raw socket: once a close is answered the server lets
//! the TCP connection go at once, and a client that writes on after the server's close is cut
//! off instead of being read for the whole grace.

use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::time::{timeout, Instant};

use crate::raw::{close_payload, masked, Raw, CLOSE, FIN, PING};
use crate::support::*;

/// The server waits this long for a close reply; everything asserted here must come sooner.
const GRACE: Duration = Duration::from_secs(3);
const SOONER: Duration = Duration::from_secs(2);

const RATE: &str = "
[websocket]
client_messages_per_second = 100
client_burst = 20
";

#[tokio::test]
async fn the_server_lets_tcp_go_once_it_has_answered_a_clients_close() {
    let topic = unique("close-answered");
    create_topic(&topic, 1).await;
    let server = Server::start(&task_route(&topic), "").await;
    let mut raw = Raw::open(&server, &token("closer", &[])).await;

    raw.send(&masked(FIN | CLOSE, &close_payload(1000, b"")))
        .await;
    let sent = Instant::now();
    assert_eq!(raw.close().await.0, 1000);
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
        let mut raw = Raw::open(&server, &token("bad-closer", &[])).await;
        raw.send(&masked(FIN | CLOSE, payload)).await;
        let sent = Instant::now();
        assert_eq!(raw.close().await.0, code, "{payload:?}");
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
    let mut raw = Raw::open(&server, &token("flooder", &[])).await;

    // Pings flat out, and never a close reply: what a flooder does.
    let mut wr = raw.take_writer();
    let writer = tokio::spawn(async move {
        let batch: Vec<u8> = (0..64).flat_map(|_| masked(FIN | PING, b"p")).collect();
        while wr.write_all(&batch).await.is_ok() {}
    });
    assert_eq!(raw.close().await.0, 4029);
    let closed = Instant::now();

    let ended = raw.ended_within(closed, GRACE + SOONER).await;
    assert!(
        ended.is_some_and(|d| d < SOONER),
        "the flooder was read on for {ended:?} after its close"
    );
    let stopped = timeout(SOONER, writer).await;
    assert!(stopped.is_ok(), "its writes keep being taken");
}
