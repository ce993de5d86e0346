//! Hostile patterns: an event filter built to make matching explode is refused before it
//! reaches the consumer, tokens cannot hand out unbounded grants, and patterns or invisible
//! characters are never taken for room names.

use std::time::Duration;

use roomcast::auth::{now_secs, Claims};
use serde_json::{json, Value};

use crate::support::*;

/// An entity record of the default entity route, for the room `{entity}:{id}`.
fn entity_record(feature: &str, entity: &str, id: &str) -> Value {
    json!({"feature": feature, "entity": entity, "action": "updated", "data": {"id": id}})
}

#[tokio::test]
async fn a_huge_events_filter_is_refused_and_deliveries_go_on() {
    let topic = unique("hugefilter");
    create_topic(&topic, 1).await;
    let server = Server::start(&tenantless_entity_route(&topic), "").await;
    let mut bystander = server.connect(&token("bystander", &[])).await;
    let mut mallory = server.connect(&token("mallory", &[])).await;

    // 63 KB, one message: it made the old matcher walk C(21000 + 3, 3) states per record.
    let huge = format!("{}zzz", "**.".repeat(21_000));
    let (errors, answer) = mallory
        .subscribe(json!({"rooms": ["user:mallory"], "events": [huge]}))
        .await;
    assert!(errors.is_empty(), "{errors:?}");
    assert_eq!(
        answer,
        json!({"type": "error", "id": answer["id"], "code": "bad_request",
               "message": "events: a pattern of 63003 bytes is over the limit of 256 bytes"})
    );
    let many: Vec<String> = (0..17).map(|i| format!("users.{i}")).collect();
    let (_, answer) = mallory
        .subscribe(json!({"rooms": ["user:mallory"], "events": many}))
        .await;
    assert_eq!(answer["code"], "bad_request");
    assert_eq!(
        answer["message"],
        "events: 17 patterns are over the limit of 16 per filter"
    );

    let producer = Producer::new();
    producer
        .send_json(&topic, entity_record("users", "user", "mallory"))
        .await;
    producer
        .send_json(&topic, entity_record("users", "user", "bystander"))
        .await;
    let limit = Duration::from_secs(10);
    let seen = bystander.frame_within(limit).await.expect("delivery");
    assert_eq!(seen["payload"]["data"]["id"], "bystander", "{seen}");
    let own = mallory.frame_within(limit).await.expect("delivery");
    assert_eq!(own["payload"]["data"]["id"], "mallory", "{own}");
    let health = tokio::time::timeout(limit, http_get(&server.admin, "/healthz")).await;
    assert_eq!(health.expect("healthz answers").unwrap().0, 200);
    assert_eq!(
        server
            .metric(r#"roomcast_client_frames_rejected_total{reason="filter_too_large"}"#)
            .await,
        2.0
    );
}

#[tokio::test]
async fn a_resume_with_a_huge_filter_is_refused() {
    let topic = unique("hugeresume");
    create_topic(&topic, 1).await;
    let server = Server::start(&tenantless_entity_route(&topic), "").await;
    let url = format!("{}?resume=1", server.ws_url());
    let mut c = Client::connect(&url, &token("mallory", &[]))
        .await
        .unwrap_or_else(|(s, b)| panic!("refused: {s} {b}"));
    let huge = format!("{}zzz", "**.".repeat(40));
    c.send(json!({"type": "resume", "id": 1, "positions": {},
                  "rooms": ["user:mallory"], "events": [huge]}))
        .await;
    assert_eq!(
        c.frame().await.expect("answer"),
        json!({"type": "error", "id": 1, "code": "bad_request",
               "message": "events: a pattern of 41 segments is over the limit of 32 segments"})
    );
}

#[tokio::test]
async fn tokens_with_oversized_grants_are_refused() {
    let topic = unique("grants");
    create_topic(&topic, 1).await;
    let server = Server::start(&tenantless_entity_route(&topic), "").await;
    let rooms: Vec<String> = (0..257).map(|i| format!("task:{i}")).collect();
    let refused = Client::connect(
        &server.ws_url(),
        &token_with(Claims {
            sub: "greedy".into(),
            exp: now_secs() + 3600,
            rooms,
            ..Claims::default()
        }),
    )
    .await
    .err()
    .expect("refused");
    assert_eq!(refused.0, 401);
    assert!(refused.1.contains("invalid_claims"), "{refused:?}");

    let mut c = server.connect(&token("greedy", &[])).await;
    let long = format!("task:{}", "x".repeat(300));
    let grant = token("greedy", &[&long]);
    let (errors, answer) = c
        .subscribe(json!({"rooms": ["task:1"], "token": grant}))
        .await;
    assert!(errors.is_empty(), "{errors:?}");
    assert_eq!(answer["code"], "invalid_token");
    assert_eq!(
        answer["message"],
        "subscription token refused: invalid claims: rooms: \
         a pattern of 305 bytes is over the limit of 256 bytes"
    );
}

#[tokio::test]
async fn patterns_and_invisible_characters_are_not_room_names() {
    let topic = unique("roomnames");
    create_topic(&topic, 1).await;
    let server = Server::start(&tenantless_entity_route(&topic), "").await;
    let mut eve = server.connect(&token("eve", &["**"])).await;
    let bad = [
        "feature:*",
        "task:**",
        "task:a\u{2028}b",
        "task:\u{feff}b",
        "task:\u{202e}b",
    ];
    for room in bad {
        let (errors, answer) = eve.subscribe(json!({ "rooms": [room] })).await;
        let expected = json!({"type": "error", "id": answer["id"], "code": "invalid_room",
            "room": room,
            "message": "room names are 1 to 200 bytes, with no '*' and no control or \
                        invisible formatting characters"});
        assert_eq!(errors, [expected], "{room:?}");
        assert_eq!(answer["rooms"], json!([]), "{room:?}");
    }

    let producer = Producer::new();
    producer
        .send_json(&topic, entity_record("*", "task", "**"))
        .await;
    for id in ["a\u{2028}b", "\u{feff}b", "\u{202e}b"] {
        producer
            .send_json(&topic, entity_record("f", "task", id))
            .await;
    }
    producer
        .send_json(&topic, entity_record("f", "user", "eve"))
        .await;
    let first = eve.events(1).await;
    assert_eq!(first[0]["payload"]["data"]["id"], "eve", "{first:?}");
}

#[tokio::test]
async fn a_resume_refuses_a_pattern_for_a_room() {
    let topic = unique("roomresume");
    create_topic(&topic, 1).await;
    let server = Server::start(&tenantless_entity_route(&topic), "").await;
    let url = format!("{}?resume=1", server.ws_url());
    let mut c = Client::connect(&url, &token("eve", &["**"]))
        .await
        .unwrap_or_else(|(s, b)| panic!("refused: {s} {b}"));
    c.send(json!({"type": "resume", "id": 1, "positions": {},
                  "rooms": ["feature:*", "task:1", "user:eve"]}))
        .await;
    let refusal = c.frame().await.expect("answer");
    assert_eq!(refusal["code"], "invalid_room", "{refusal}");
    assert_eq!(refusal["room"], "feature:*");
    c.see_positions = true;
    loop {
        let f = c.frame().await.expect("resume answer");
        if f["type"] == "ok" {
            // Its own room, named again, is listed once.
            assert_eq!(f["rooms"], json!(["user:eve", "task:1"]), "{f}");
            break;
        }
    }
}
