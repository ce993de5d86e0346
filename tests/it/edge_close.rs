//! How a connection ends when its close frame cannot be sent: a client that stopped reading.

use std::time::Duration;

use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::time::Instant;

use crate::support::*;

/// Opens a WebSocket connection by hand, with a small receive buffer, and reads nothing
/// past the handshake's answer: a client that has stopped reading.
async fn stalled_client(server: &Server, token: &str) -> TcpStream {
    let socket = TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(8 * 1024).unwrap();
    let mut stream = socket
        .connect(server.public.parse().unwrap())
        .await
        .unwrap();
    let request = format!(
        "GET /ws HTTP/1.1\r\nHost: {}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\
         Sec-WebSocket-Protocol: roomcast.v1, bearer.{token}\r\n\r\n",
        server.public
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut byte = [0u8; 1];
        stream
            .read_exact(&mut byte)
            .await
            .expect("a handshake answer");
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head);
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    stream
}

/// How the stream ends once everything buffered is read: Ok(()) for an orderly end (FIN),
/// else the error.
async fn read_to_end(stream: &mut TcpStream) -> Result<(), std::io::ErrorKind> {
    let mut buf = vec![0u8; 64 * 1024];
    let read_all = async {
        loop {
            match stream.read(&mut buf).await {
                Ok(0) => return Ok(()),
                Ok(_) => {}
                Err(e) => return Err(e.kind()),
            }
        }
    };
    tokio::time::timeout(WAIT, read_all)
        .await
        .expect("the server's side of the connection is gone")
}

/// A slow consumer's 4008 close frame cannot be written to a client that stopped reading.
/// The close is counted as 4008 (not 1006, as if the client had broken the connection), and
/// the server resets the connection rather than leave a FIN queued behind unread bytes, its
/// socket holding kernel memory in FIN-WAIT-1 for minutes.
#[tokio::test]
async fn a_slow_consumer_that_stopped_reading_is_reset_and_counted_4008() {
    let topic = unique("edge-close");
    create_topic(&topic, 1).await;
    let extra = "[websocket]\nsend_buffer_bytes = 16384\nqueue_frames = 200\nshed_low_priority_after = 100\n";
    let server = Server::start(&task_route(&topic), extra).await;
    let mut stalled = stalled_client(&server, &token("stalled", &[])).await;

    // Records for the client's own room, until its queue overflows.
    let pad = "p".repeat(1000);
    let producer = Producer::new();
    let closed = "roomcast_connections_closed_total{code=\"4008\"}";
    let abnormal = "roomcast_connections_closed_total{code=\"1006\"}";
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut seq = 0;
    while server.metric("roomcast_slow_consumer_closes_total").await < 1.0 {
        assert!(
            Instant::now() < deadline,
            "no 4008 close after {seq} records"
        );
        for _ in 0..100 {
            let value = json!({"taskId": "t", "userId": "stalled", "seq": seq, "pad": pad});
            producer.send_json(&topic, value).await;
            seq += 1;
        }
    }
    // The session ends once its close has been given up on.
    while server.metric("roomcast_connections").await > 0.0 {
        assert!(Instant::now() < deadline, "the connection was never let go");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(server.metric(closed).await, 1.0);
    assert_eq!(server.metric(abnormal).await, 0.0);
    assert_eq!(
        read_to_end(&mut stalled).await,
        Err(std::io::ErrorKind::ConnectionReset)
    );
}
