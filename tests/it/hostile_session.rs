//! One connection's hostile input is bounded, and hurts no other connection: the room limit
//! holds within one message, and a flood of messages is refused, then closed.

use serde_json::{json, Value};

use crate::support::*;

const ROOM_LIMIT: &str = "
[websocket]
max_rooms_per_connection = 5
";

fn task_rooms(n: usize) -> Vec<String> {
    (0..n).map(|i| format!("task:{i}")).collect()
}

/// The rooms of `frames`' `too_many_rooms` errors, failing on any other error.
fn refused_rooms(frames: &[Value]) -> Vec<String> {
    frames
        .iter()
        .filter(|f| f["type"] == "error")
        .map(|f| {
            assert_eq!(f["code"], "too_many_rooms", "{f}");
            f["room"].as_str().unwrap().to_string()
        })
        .collect()
}

/// Produces a record for every task room and returns the task ids `client` got.
async fn tasks_received(server: &Server, topic: &str, client: &mut Client) -> Vec<String> {
    let producer = Producer::new();
    for i in 0..20 {
        producer
            .send_json(topic, json!({"taskId": i.to_string(), "userId": "nobody"}))
            .await;
    }
    server.wait_consumed(topic, 20).await;
    let mut got = Vec::new();
    while let Some(f) = client.frame_within(std::time::Duration::from_secs(2)).await {
        assert_eq!(f["type"], "event", "{f}");
        got.push(f["payload"]["taskId"].as_str().unwrap().to_string());
    }
    got
}

#[tokio::test]
async fn one_subscribe_cannot_join_past_the_room_limit() {
    let topic = unique("roomlimit");
    create_topic(&topic, 1).await;
    let server = Server::start(&task_route(&topic), ROOM_LIMIT).await;
    let mut c = server.connect(&token("many", &["task:*"])).await;
    let rooms = task_rooms(20);

    let (errors, ok) = c.subscribe(json!({ "rooms": rooms })).await;

    // Its own room `user:many` is one of the five.
    assert_eq!(ok["rooms"], json!(rooms[..4]));
    assert_eq!(refused_rooms(&errors), rooms[4..]);
    assert_eq!(
        tasks_received(&server, &topic, &mut c).await,
        ["0", "1", "2", "3"]
    );
    let refused = r#"roomcast_subscriptions_total{result="too_many_rooms"}"#;
    assert_eq!(server.metric(refused).await, 16.0);
}

#[tokio::test]
async fn one_resume_cannot_join_past_the_room_limit() {
    let topic = unique("roomlimitresume");
    create_topic(&topic, 1).await;
    let server = Server::start(&task_route(&topic), ROOM_LIMIT).await;
    let token = token("many", &["task:*"]);
    let rooms = task_rooms(20);
    let names: Vec<&str> = rooms.iter().map(String::as_str).collect();

    let (mut c, frames) = Client::resume(&server, &token, &Tracker::default(), &names).await;

    let answer = frames.last().unwrap();
    let mut joined = vec!["user:many".to_string()];
    joined.extend_from_slice(&rooms[..4]);
    assert_eq!(answer["rooms"], json!(joined));
    assert_eq!(refused_rooms(&frames), rooms[4..]);
    assert_eq!(
        tasks_received(&server, &topic, &mut c).await,
        ["0", "1", "2", "3"]
    );
}
