//! Poison records: each is skipped and counted at routing, and the record after it is
//! delivered; none reaches a connection it was not meant for.

use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::ClientConfig;
use serde_json::{json, Value};

use crate::support::*;

const QUIET: Duration = Duration::from_millis(700);

fn malformed(topic: &str, reason: &str) -> String {
    format!("roomcast_records_malformed_total{{reason=\"{reason}\",topic=\"{topic}\"}}")
}

fn entity(seq: u32, meta: Value) -> Value {
    json!({"feature": "users", "entity": "user", "action": "updated",
           "data": {"id": "u1", "seq": seq}, "meta": meta})
}

fn seqs(events: &[Value]) -> Vec<Value> {
    events
        .iter()
        .map(|e| e["payload"]["data"]["seq"].clone())
        .collect()
}

/// A token for the users feature, of `tenant` or of none.
fn users_token(sub: &str, tenant: Option<&str>) -> String {
    token_with(roomcast::auth::Claims {
        sub: sub.into(),
        exp: roomcast::auth::now_secs() + 600,
        tenant: tenant.map(String::from),
        rooms: vec!["feature:users".into()],
        ..Default::default()
    })
}

async fn users_client(server: &Server, sub: &str, tenant: Option<&str>) -> Client {
    let mut c = server.connect(&users_token(sub, tenant)).await;
    c.join(&["feature:users"]).await;
    c
}

#[tokio::test]
async fn a_nested_escaped_tenant_key_reaches_its_tenant_only() {
    let topic = unique("escaped-tenant");
    create_topic(&topic, 1).await;
    let server = Server::start(&entity_route(&topic), "").await;
    let mut beta = users_client(&server, "b", Some("beta")).await;
    let mut none = users_client(&server, "n", None).await;
    let escaped = r#"{"feature":"users","entity":"user","action":"updated","data":{"id":"u1","seq":1},"meta":{"\u0074enantId":"beta"}}"#;
    let p = Producer::new();
    p.send(&topic, escaped.as_bytes()).await;
    p.send_json(&topic, entity(2, json!({"tenantId": "beta"})))
        .await;
    assert_eq!(seqs(&beta.events(2).await), [json!(1), json!(2)]);
    none.expect_silence(QUIET).await;
}

#[tokio::test]
async fn a_record_without_its_tenant_is_skipped_counted_and_the_next_delivered() {
    let topic = unique("no-tenant");
    create_topic(&topic, 1).await;
    let server = Server::start(&entity_route(&topic), "").await;
    let mut acme = users_client(&server, "a", Some("acme")).await;
    let mut none = users_client(&server, "n", None).await;
    let p = Producer::new();
    let mut missing = entity(1, json!({}));
    missing.as_object_mut().unwrap().remove("meta");
    p.send_json(&topic, missing).await;
    p.send_json(&topic, entity(2, json!({"tenantId": null})))
        .await;
    p.send_json(&topic, entity(3, json!({"tenantId": ""})))
        .await;
    p.send_json(&topic, entity(4, json!({"tenantId": {"id": "acme"}})))
        .await;
    p.send_json(&topic, entity(5, json!({"tenantId": "acme"})))
        .await;
    assert_eq!(seqs(&acme.events(1).await), [json!(5)]);
    none.expect_silence(QUIET).await;
    acme.expect_silence(QUIET).await;
    assert_eq!(server.metric(&malformed(&topic, "no_tenant")).await, 4.0);
}

#[tokio::test]
async fn a_route_with_optional_tenants_still_delivers_tenant_less_records() {
    let topic = unique("optional-tenant");
    create_topic(&topic, 1).await;
    let server = Server::start(&tenantless_entity_route(&topic), "").await;
    let mut acme = users_client(&server, "a", Some("acme")).await;
    let mut none = users_client(&server, "n", None).await;
    let p = Producer::new();
    p.send_json(&topic, entity(1, json!({"tenantId": null})))
        .await;
    p.send_json(&topic, entity(2, json!({"tenantId": "acme"})))
        .await;
    assert_eq!(seqs(&none.events(1).await), [json!(1)]);
    assert_eq!(seqs(&acme.events(1).await), [json!(2)]);
    none.expect_silence(QUIET).await;
    assert_eq!(server.metric(&malformed(&topic, "no_tenant")).await, 0.0);
}

/// A topic and a producer that take records of a few MiB, past `records.max_bytes`.
async fn large_record_topic(name: &str) -> FutureProducer {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .create()
        .unwrap();
    let topic =
        NewTopic::new(name, 1, TopicReplication::Fixed(1)).set("max.message.bytes", "4000000");
    let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(20)));
    for r in admin.create_topics([&topic], &opts).await.unwrap() {
        r.expect("topic created");
    }
    ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .set("linger.ms", "0")
        .set("message.max.bytes", "4000000")
        .create()
        .unwrap()
}

#[tokio::test]
async fn a_record_over_max_bytes_is_skipped_counted_and_the_next_delivered() {
    let topic = unique("too-large");
    let producer = large_record_topic(&topic).await;
    let server = Server::start(&task_route(&topic), "").await;
    let mut c = server.connect(&token("big", &[])).await;
    // Past the default records.max_bytes (1 MiB), within websocket.queue_bytes (4 MiB).
    let pad = "x".repeat(3 * 1024 * 1024 / 2);
    let large = json!({"userId": "big", "seq": 1, "pad": pad}).to_string();
    let good = json!({"userId": "big", "seq": 2}).to_string();
    for value in [&large, &good] {
        producer
            .send(
                FutureRecord::<(), str>::to(&topic).payload(value.as_str()),
                Duration::from_secs(10),
            )
            .await
            .map_err(|(e, _)| e)
            .unwrap();
    }
    let got = c.events(1).await;
    assert_eq!(got[0]["payload"]["seq"], 2);
    assert_eq!(server.metric(&malformed(&topic, "too_large")).await, 1.0);
}

#[tokio::test]
async fn a_rooms_header_over_max_rooms_is_skipped_counted_and_the_next_delivered() {
    let topic = unique("too-many-rooms");
    create_topic(&topic, 1).await;
    let server = Server::start(&task_route(&topic), "").await;
    let mut c = server.connect(&token("r", &[])).await;
    // The default records.max_rooms is 1,000; repeats count once.
    let rooms = |n: usize| -> String {
        let mut list: Vec<String> = (1..n).map(|i| format!("room:{i}")).collect();
        list.push("user:r".into());
        list.extend((1..n).map(|i| format!("room:{i}")));
        list.join(",")
    };
    let (at, over) = (rooms(1000), rooms(1001));
    let p = Producer::new();
    for (seq, list) in [(1, &at), (2, &over)] {
        let value = json!({"seq": seq}).to_string();
        p.send_to(
            &topic,
            None,
            value.as_bytes(),
            &[("rooms", list), ("event", "e")],
        )
        .await;
    }
    p.send_json(&topic, json!({"userId": "r", "seq": 3})).await;
    let got = c.events(2).await;
    assert_eq!(payload_field(&got, "seq"), [json!(1), json!(3)]);
    assert_eq!(
        server.metric(&malformed(&topic, "too_many_rooms")).await,
        1.0
    );
}

#[tokio::test]
async fn a_value_over_max_depth_is_skipped_counted_and_the_next_delivered() {
    let topic = unique("too-deep");
    create_topic(&topic, 1).await;
    let server = Server::start(&task_route(&topic), "").await;
    let mut c = server.connect(&token("d", &[])).await;
    // The default records.max_depth is 64, the record itself the first level.
    let nested = |seq: u32, depth: usize| {
        let inner = format!("{}{}", "[".repeat(depth - 1), "]".repeat(depth - 1));
        format!(r#"{{"userId":"d","seq":{seq},"deep":{inner}}}"#)
    };
    let p = Producer::new();
    p.send(&topic, nested(1, 64).as_bytes()).await;
    p.send(&topic, nested(2, 65).as_bytes()).await;
    p.send_json(&topic, json!({"userId": "d", "seq": 3})).await;
    let got = c.events(2).await;
    assert_eq!(payload_field(&got, "seq"), [json!(1), json!(3)]);
    assert_eq!(server.metric(&malformed(&topic, "too_deep")).await, 1.0);
}

/// Header keys are bytes on the wire, and a producer may send any. rdkafka's header reader
/// panics on a key that is not UTF-8, which on the consumer's thread stopped all delivery:
/// such a header is ignored (no route can name it), and the record is delivered.
#[tokio::test]
async fn a_header_key_that_is_not_utf8_is_ignored_and_its_record_delivered() {
    use rdkafka::message::OwnedHeaders;
    let topic = unique("header-bytes");
    create_topic(&topic, 1).await;
    let server = Server::start(&task_route(&topic), "").await;
    let mut c = server.connect(&token("u1", &[])).await;

    let mut headers = OwnedHeaders::new();
    let key = b"\xffkey";
    let value = b"v";
    // rdkafka's own headers are its C library's: their address is the native handle.
    let native = std::ptr::from_ref(headers.as_borrowed()).cast_mut();
    let added = unsafe {
        rdkafka::bindings::rd_kafka_header_add(
            native.cast(),
            key.as_ptr().cast(),
            key.len() as isize,
            value.as_ptr().cast(),
            value.len() as isize,
        )
    };
    assert_eq!(
        added,
        rdkafka::bindings::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR
    );
    headers = headers.insert(rdkafka::message::Header {
        key: "after",
        value: Some("fine"),
    });
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .create()
        .unwrap();
    for seq in 0..2 {
        let value = json!({"taskId": "t", "userId": "u1", "seq": seq}).to_string();
        let record = FutureRecord::<(), str>::to(&topic)
            .payload(&value)
            .headers(headers.clone());
        producer
            .send(record, Duration::from_secs(10))
            .await
            .map_err(|(e, _)| e)
            .expect("record produced");
    }
    let events = c.events(2).await;
    let got: Vec<Value> = events.iter().map(|e| e["payload"]["seq"].clone()).collect();
    assert_eq!(got, [json!(0), json!(1)]);
    assert_eq!(http_get(&server.admin, "/readyz").await.unwrap().0, 200);
}
