//! Bad client frames get an error or a close code, and no other connection notices.

use std::time::Duration;

use serde_json::json;
use tokio_tungstenite::tungstenite::Message;

use crate::support::*;

#[tokio::test]
async fn bad_frames_get_errors_then_1008_and_others_carry_on() {
    let topic = unique("badframes");
    create_topic(&topic, 1).await;
    let server = Server::start(&task_route(&topic), "").await;
    let mut bystander = server.connect(&token("by", &[])).await;
    let mut bad = server.connect(&token("bad", &[])).await;

    bad.send(json!({"type": "ping", "id": 10})).await;
    assert_eq!(
        bad.frame().await.unwrap(),
        json!({"type": "pong", "id": 10})
    );

    bad.send_raw(Message::text("{not json")).await;
    let err = bad.frame().await.unwrap();
    assert_eq!(err["type"], "error");
    assert_eq!(err["code"], "bad_request");
    bad.send(json!({"type": "dance"})).await;
    assert_eq!(bad.frame().await.unwrap()["code"], "bad_request");
    bad.send_raw(Message::binary(vec![1u8, 2, 3])).await;
    assert_eq!(bad.frame().await.unwrap()["code"], "bad_request");
    // The default tolerance is 10 malformed frames; the 11th closes with 1008.
    for _ in 0..8 {
        bad.send_raw(Message::text("nope")).await;
    }
    let close = bad.close_frame().await.expect("close frame");
    assert_eq!(u16::from(close.code), 1008);

    Producer::new()
        .send_json(&topic, json!({"taskId": "1", "userId": "by"}))
        .await;
    assert_eq!(bystander.events(1).await[0]["payload"]["userId"], "by");
}

#[tokio::test]
async fn an_oversized_message_closes_with_1009() {
    let topic = unique("toobig");
    create_topic(&topic, 1).await;
    let server = Server::start(&task_route(&topic), "").await;
    let mut c = server.connect(&token("big", &[])).await;
    let huge = format!(
        "{{\"type\":\"ping\",\"pad\":\"{}\"}}",
        "x".repeat(100 * 1024)
    );
    c.send_raw(Message::text(huge)).await;
    let close = c.close_frame().await.expect("close frame");
    assert_eq!(u16::from(close.code), 1009);
}

#[tokio::test]
async fn invalid_utf8_closes_with_1007() {
    let topic = unique("utf8");
    create_topic(&topic, 1).await;
    let server = Server::start(&task_route(&topic), "").await;
    let mut c = server.connect(&token("u8", &[])).await;
    // A text frame whose bytes are not UTF-8 (built by hand: the client API refuses it).
    let frame = tokio_tungstenite::tungstenite::protocol::frame::Frame::message(
        vec![0x7b, 0xff, 0xfe, 0x7d],
        tokio_tungstenite::tungstenite::protocol::frame::coding::OpCode::Data(
            tokio_tungstenite::tungstenite::protocol::frame::coding::Data::Text,
        ),
        true,
    );
    c.send_raw(Message::Frame(frame)).await;
    let close = c.close_frame().await.expect("close frame");
    assert_eq!(u16::from(close.code), 1007);
}

#[tokio::test]
async fn an_expiring_token_closes_with_4001_unless_refreshed() {
    let topic = unique("expiry");
    create_topic(&topic, 1).await;
    let server = Server::start(&task_route(&topic), "").await;
    let short = |secs: u64| {
        token_with(roomcast::auth::Claims {
            sub: "exp".into(),
            exp: roomcast::auth::now_secs() + secs,
            ..Default::default()
        })
    };
    let mut refreshed = server.connect(&short(2)).await;
    let mut expiring = server.connect(&short(2)).await;
    refreshed
        .send(json!({"type": "refresh", "id": 3, "token": short(600)}))
        .await;
    assert_eq!(
        refreshed.frame().await.unwrap(),
        json!({"type": "ok", "id": 3})
    );
    let close = expiring.close_frame().await.expect("close frame");
    assert_eq!(u16::from(close.code), 4001);
    refreshed.expect_silence(Duration::from_secs(2)).await;
    Producer::new()
        .send_json(&topic, json!({"taskId": "1", "userId": "exp"}))
        .await;
    assert_eq!(refreshed.events(1).await.len(), 1);
}

#[tokio::test]
async fn a_silent_peer_is_closed_and_a_live_one_is_kept() {
    let topic = unique("silent");
    create_topic(&topic, 1).await;
    let extra = "[websocket]\nheartbeat_seconds = 1\nidle_timeout_seconds = 2\n";
    let server = Server::start(&task_route(&topic), extra).await;
    let mut silent = server.connect(&token("quiet", &[])).await;
    let mut live = server.connect(&token("chatty", &[])).await;
    assert_eq!(live.welcome["heartbeat"], 1);
    // The live client reads, so its library answers the server's pings with pongs.
    live.expect_silence(Duration::from_secs(3)).await;
    // The silent one never read: no pong went out, so the server gave up on it.
    let close = silent.close_frame().await.expect("close frame");
    assert_eq!(u16::from(close.code), 1001);
    assert_eq!(close.reason.as_str(), "heartbeat timeout");
    live.send(json!({"type": "ping", "id": 1})).await;
    assert_eq!(live.frame().await.unwrap()["type"], "pong");
}
