//! The process watches its consumer: a consumer that ends while the service runs takes
//! readiness down and the process out, so that its supervisor restarts it.

use std::time::Duration;

use serde_json::json;
use tokio::time::Instant;

use crate::support::*;

/// The consumer panics on a record (in a debug build, told to by `PANIC_ON_TOPIC`, the way
/// a record it cannot handle would make it). Until then the replica serves normally; after
/// it, /readyz answers 503 at once, clients are closed with 1001 as in a drain, and the
/// process exits with an error: nothing would reach its clients any more.
#[tokio::test]
async fn a_consumer_that_panics_takes_readiness_down_and_the_process_out() {
    let topic = unique("supervised");
    create_topic(&topic, 1).await;
    let env = [("ROOMCAST_TEST_PANIC_ON_TOPIC", topic.as_str())];
    let mut server = Server::start_with(&task_route(&topic), "", &env).await;
    let mut client = server.connect(&token("u1", &["task:*"])).await;
    assert_eq!(http_get(&server.admin, "/readyz").await.unwrap().0, 200);

    let record = json!({"taskId": "t1", "userId": "u1", "seq": 0});
    Producer::new().send_json(&topic, record).await;
    let deadline = Instant::now() + WAIT;
    loop {
        match http_get(&server.admin, "/readyz").await {
            Ok((200, _)) => {}
            // Not ready, or already gone.
            _ => break,
        }
        assert!(
            Instant::now() < deadline,
            "still ready after the consumer died"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let close = client.close_frame().await.expect("a close frame");
    assert_eq!(u16::from(close.code), 1001);
    let status = server
        .wait_exit(Duration::from_secs(20))
        .expect("the process exits");
    assert_eq!(status.code(), Some(1), "{status:?}");
}
