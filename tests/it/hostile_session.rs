//! One connection's hostile input is bounded, and hurts no other connection: the room limit
//! holds within one message, and a flood of messages is refused, then closed.

use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::net::TcpStream;
use tokio::time::MissedTickBehavior;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

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
    while let Some(f) = client.frame_within(Duration::from_secs(2)).await {
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

    // More rooms than a connection may hold at all: refused whole, with one error.
    let (errors, answer) = c.subscribe(json!({ "rooms": task_rooms(6) })).await;
    assert!(errors.is_empty(), "{errors:?}");
    assert_eq!(answer["code"], "bad_request", "{answer}");
    assert_eq!(
        answer["message"],
        "6 rooms in one message, over the limit of 5 per connection"
    );

    // Its own room `user:many` is one of the five: the fifth room of this one is refused.
    let rooms = task_rooms(5);
    let (errors, ok) = c.subscribe(json!({ "rooms": rooms })).await;
    assert_eq!(ok["rooms"], json!(rooms[..4]));
    assert_eq!(refused_rooms(&errors), rooms[4..]);
    assert_eq!(
        tasks_received(&server, &topic, &mut c).await,
        ["0", "1", "2", "3"]
    );
    let refused = r#"roomcast_subscriptions_total{result="too_many_rooms"}"#;
    assert_eq!(server.metric(refused).await, 1.0);
}

#[tokio::test]
async fn one_resume_cannot_join_past_the_room_limit() {
    let topic = unique("roomlimitresume");
    create_topic(&topic, 1).await;
    let server = Server::start(&task_route(&topic), ROOM_LIMIT).await;
    let token = token("many", &["task:*"]);
    let rooms = task_rooms(5);
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

const RATE: &str = "
[websocket]
client_messages_per_second = 100
client_burst = 20
";

type Socket = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// A bare WebSocket past its welcome, for a client that writes without waiting for answers.
async fn raw_client(server: &Server, token: &str) -> Socket {
    let mut req = server.ws_url().into_client_request().unwrap();
    let protocols = format!("roomcast.v1, bearer.{token}");
    req.headers_mut()
        .insert("Sec-WebSocket-Protocol", protocols.parse().unwrap());
    let (mut ws, _) = tokio_tungstenite::connect_async(req).await.unwrap();
    let welcome = ws.next().await.unwrap().unwrap();
    assert!(welcome.to_text().unwrap().contains("\"welcome\""));
    ws
}

/// What a flooding client got back, in order.
#[derive(Debug, PartialEq)]
enum Answer {
    Pong,
    Error(Value),
    Close(u16),
}

/// Sends `n` JSON pings and `n` WebSocket pings, interleaved, as fast as the socket takes
/// them, then reads every answer up to the close.
async fn flood(ws: &mut Socket, n: u32) -> Vec<Answer> {
    for i in 0..n {
        let ping = json!({"type": "ping", "id": i}).to_string();
        // The server may close before the last of them: later writes may fail.
        let _ = ws.feed(Message::text(ping)).await;
        let _ = ws
            .feed(Message::Ping(i.to_be_bytes().to_vec().into()))
            .await;
    }
    let _ = ws.flush().await;
    let mut answers = Vec::new();
    loop {
        let next = tokio::time::timeout(WAIT, ws.next()).await;
        match next.expect("the server answers or closes in time") {
            Some(Ok(Message::Pong(_))) => answers.push(Answer::Pong),
            Some(Ok(Message::Text(t))) => {
                let frame: Value = serde_json::from_str(t.as_str()).unwrap();
                match frame["type"].as_str() {
                    Some("pong") => answers.push(Answer::Pong),
                    Some("error") => answers.push(Answer::Error(frame)),
                    // Watermarks come as records flow; they answer nothing.
                    Some("positions") => {}
                    _ => panic!("unexpected frame {frame}"),
                }
            }
            Some(Ok(Message::Close(c))) => {
                answers.push(Answer::Close(c.map_or(0, |c| u16::from(c.code))));
                return answers;
            }
            Some(Ok(_)) => {}
            Some(Err(e)) => panic!("connection broken before the close: {e}"),
            None => panic!("connection ended without a close frame"),
        }
    }
}

/// Sends `n` JSON pings at `per_second`, each after the answer to the one before.
async fn steady_pings(mut client: Client, n: u64, per_second: u64) {
    let mut tick = tokio::time::interval(Duration::from_millis(1000 / per_second));
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    for i in 0..n {
        tick.tick().await;
        client.send(json!({"type": "ping", "id": i})).await;
        let answer = client.frame().await.expect("an answer");
        assert_eq!(answer, json!({"type": "pong", "id": i}), "ping {i}");
    }
}

#[tokio::test]
async fn a_message_flood_is_refused_then_closed_and_no_one_else_notices() {
    let topic = unique("flood");
    create_topic(&topic, 1).await;
    let server = Server::start(&task_route(&topic), RATE).await;
    let mut bystander = server.connect(&token("bystander", &[])).await;
    let steady = server.connect(&token("steady", &[])).await;
    let mut attacker = raw_client(&server, &token("attacker", &[])).await;

    let steady = tokio::spawn(steady_pings(steady, 100, 50));
    let topic_for_producer = topic.clone();
    let records = tokio::spawn(async move {
        let producer = Producer::new();
        for seq in 0..100 {
            let record = json!({"taskId": "t", "userId": "bystander", "seq": seq});
            producer.send_json(&topic_for_producer, record).await;
        }
    });
    let started = Instant::now();
    let answers = flood(&mut attacker, 2000).await;
    let flood_took = started.elapsed();

    // The burst is answered, and what the bucket refilled meanwhile; nothing more.
    let pongs = answers.iter().filter(|a| **a == Answer::Pong).count();
    let refilled = (flood_took.as_secs_f64() * 100.0).ceil() as usize;
    assert!(
        (20..=20 + refilled).contains(&pongs),
        "{pongs} pongs in {flood_took:?}"
    );
    let errors: Vec<&Value> = answers
        .iter()
        .filter_map(|a| match a {
            Answer::Error(e) => Some(e),
            _ => None,
        })
        .collect();
    assert_eq!(
        errors.len(),
        1,
        "one rate_limited error per second at most: {errors:?}"
    );
    assert_eq!(errors[0]["code"], "rate_limited");
    assert_eq!(errors[0]["id"], Value::Null);
    let told = answers.iter().position(|a| matches!(a, Answer::Error(_)));
    assert!(told.unwrap() >= 20, "the burst passes before any refusal");
    assert_eq!(answers.last(), Some(&Answer::Close(4029)));
    let refused = r#"roomcast_client_frames_rejected_total{reason="rate_limited"}"#;
    assert!(
        server.metric(refused).await >= 21.0,
        "a burst's worth refused, then the close"
    );

    records.await.unwrap();
    let seqs = payload_field(&bystander.events(100).await, "seq");
    assert_eq!(seqs, (0..100).map(|s| json!(s)).collect::<Vec<_>>());
    steady.await.unwrap();
}

/// Flapping hundreds of rooms in a few messages a second stays within the message budget;
/// the room-change budget refuses it whole, and the client's rooms stay as they were.
#[tokio::test]
async fn flapping_rooms_is_refused_past_the_room_change_budget() {
    let topic = unique("flapping");
    create_topic(&topic, 1).await;
    let config = "[websocket]\nroom_changes_per_second = 10\nroom_changes_burst = 512\n";
    let server = Server::start(&task_route(&topic), config).await;
    let mut flapper = server.connect(&token("u", &["task:*"])).await;
    // With its own room, the most a connection may hold.
    let rooms = task_rooms(255);
    let mut refused = None;
    for round in 0..4u64 {
        let ok = flapper
            .request(json!({"type": "subscribe", "rooms": rooms}), 10 * round + 1)
            .await;
        if ok["type"] == "error" {
            refused = Some((round, ok));
            break;
        }
        let left = flapper
            .request(
                json!({"type": "unsubscribe", "rooms": rooms}),
                10 * round + 2,
            )
            .await;
        assert_eq!(left["rooms"].as_array().unwrap().len(), 255, "{left}");
    }
    // 512 changes are the burst: the second subscribe (changes 511 to 765) is refused.
    let (round, error) = refused.expect("a refusal");
    assert_eq!(round, 1);
    assert_eq!(error["code"], "rate_limited");
    assert_eq!(error["id"], 11);
    assert!(error.get("room").is_none());
    assert_eq!(
        error["message"],
        "over 10 room changes a second: nothing joined or left; retry later"
    );
    // Nothing was joined: a record for one of the rooms does not reach the flapper.
    Producer::new()
        .send_json(&topic, json!({"event": "t", "taskId": "7", "userId": "x"}))
        .await;
    flapper.expect_silence(Duration::from_secs(1)).await;
    // Refilled at 10 a second: one room joins after 0.1 s.
    tokio::time::sleep(Duration::from_millis(200)).await;
    flapper.join(&["task:7"]).await;
}
