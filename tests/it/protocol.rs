//! Bad client frames get an error or a close code, and no other connection notices.

use std::time::Duration;

use serde_json::json;
use tokio_tungstenite::tungstenite::Message;

use crate::raw::{close_payload, masked, unmasked, Raw, CLOSE, FIN, PING, PONG, TEXT};
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

/// A request refused whole still gets its one final frame with its id, whatever is wrong
/// with the rest of it; only an id that is not a number or a string cannot be answered.
#[tokio::test]
async fn a_refused_request_is_answered_with_its_id() {
    let topic = unique("refusedid");
    create_topic(&topic, 1).await;
    let server = Server::start(&task_route(&topic), "").await;
    let mut c = server.connect(&token("ids", &[])).await;
    let cases = [
        (
            r#"{"type":"subscribe","id":11,"rooms":["x"],"bogus":1}"#,
            json!(11),
            "invalid frame: unknown field `bogus`, expected one of `id`, `rooms`, `features`, \
             `events`, `token`, `presence`",
        ),
        (
            r#"{"type":"dance","id":"d-12"}"#,
            json!("d-12"),
            "invalid frame: unknown variant `dance`, expected one of `subscribe`, `unsubscribe`, \
             `resume`, `presence`, `ping`, `refresh` at line 1 column 15",
        ),
        (
            r#"{"type":"unsubscribe","id":13,"rooms":[7]}"#,
            json!(13),
            "invalid frame: invalid type: integer `7`, expected a string",
        ),
        (
            r#"{"type":"refresh","id":14}"#,
            json!(14),
            "invalid frame: missing field `token`",
        ),
        (
            r#"{"type":"ping","id":true}"#,
            json!(null),
            "invalid frame: id must be a number or a string",
        ),
    ];
    for (text, id, message) in cases {
        c.send_raw(Message::text(text)).await;
        assert_eq!(
            c.frame().await.expect("an answer"),
            json!({"type": "error", "id": id, "code": "bad_request", "message": message}),
            "{text}"
        );
    }
    c.send(json!({"type": "ping", "id": 15})).await;
    assert_eq!(c.frame().await.unwrap(), json!({"type": "pong", "id": 15}));
    c.expect_silence(Duration::from_millis(300)).await;
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
async fn connections_opened_together_ping_apart() {
    let topic = unique("pingphase");
    create_topic(&topic, 1).await;
    let server = Server::start(&task_route(&topic), "[websocket]\nheartbeat_seconds = 2\n").await;
    let heartbeat = Duration::from_secs(2);
    let mut readers = Vec::new();
    for i in 0..8 {
        let mut client = server.connect(&token(&format!("p{i}"), &[])).await;
        assert_eq!(client.welcome["heartbeat"], 2);
        let opened = tokio::time::Instant::now();
        readers.push(tokio::spawn(async move {
            let first = client.next_ping(heartbeat * 2).await.expect("a first ping");
            let second = client
                .next_ping(heartbeat * 2)
                .await
                .expect("a second ping");
            (first - opened, second - first)
        }));
    }
    let mut firsts = Vec::new();
    for reader in readers {
        let (first, interval) = reader.await.unwrap();
        // Within one heartbeat of the welcome, then every heartbeat; the slack is for a
        // machine busy with the other tests.
        assert!(
            first <= heartbeat + Duration::from_millis(700),
            "first ping after {first:?}"
        );
        let off = interval.abs_diff(heartbeat);
        assert!(off < Duration::from_millis(700), "pings {interval:?} apart");
        firsts.push(first);
    }
    // Opened within milliseconds of each other, yet their first pings span most of the
    // interval (all would come 2 s after opening if the phase followed the connect time).
    let span = *firsts.iter().max().unwrap() - *firsts.iter().min().unwrap();
    assert!(
        span >= Duration::from_secs(1),
        "first pings within {span:?}: {firsts:?}"
    );
}

#[tokio::test]
async fn pings_fragments_and_an_unmasked_frame_on_the_wire() {
    let topic = unique("wire");
    create_topic(&topic, 1).await;
    // Watermarks every 50 ms, so they fall between everything below.
    let extra = "[resume]\npositions_interval_seconds = 0.05\n";
    let server = Server::start(&task_route(&topic), extra).await;
    let mut bystander = server.connect(&token("calm", &[])).await;
    let mut c = Raw::open(&server, &token("raw", &[])).await;

    // A WebSocket ping is answered with a pong carrying the same bytes.
    c.send(&masked(FIN | PING, b"are you there")).await;
    assert_eq!(c.next().await, (FIN | PONG, b"are you there".to_vec()));

    // A message in three fragments, with a ping between them, is one message.
    c.send(&masked(TEXT, br#"{"type":"pi"#)).await;
    c.send(&masked(0, br#"ng","i"#)).await;
    c.send(&masked(FIN | PING, b"")).await;
    c.send(&masked(FIN, br#"d":5}"#)).await;
    assert_eq!(c.next().await, (FIN | PONG, Vec::new()));
    assert_eq!(c.json().await, json!({"type": "pong", "id": 5}));

    // Events reach a hand-made client as plain, unmasked text frames.
    Producer::new()
        .send_json(&topic, json!({"taskId": "7", "userId": "raw"}))
        .await;
    let event = c.json().await;
    assert_eq!(event["type"], "event");
    assert_eq!(event["payload"]["taskId"], "7");

    // A client must mask its frames: an unmasked one is a protocol error, closed with 1002.
    c.send(&unmasked(FIN | TEXT, br#"{"type":"ping","id":6}"#))
        .await;
    assert_eq!(
        c.next().await,
        (FIN | CLOSE, close_payload(1002, b"protocol error"))
    );

    Producer::new()
        .send_json(&topic, json!({"taskId": "8", "userId": "calm"}))
        .await;
    assert_eq!(bystander.events(1).await[0]["payload"]["taskId"], "8");
}
