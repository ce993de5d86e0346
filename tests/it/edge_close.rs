//! How a connection ends when its close frame cannot be sent: a client that stopped reading.

use std::time::Duration;

use serde_json::json;
use tokio::time::Instant;

use crate::raw::Raw;
use crate::support::*;

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
    // Reads nothing past the handshake's answer.
    let mut stalled = Raw::stalled(&server, &token("stalled", &[])).await;

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
        stalled.read_to_end().await,
        Err(std::io::ErrorKind::ConnectionReset)
    );
}
