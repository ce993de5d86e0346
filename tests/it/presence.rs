//! Presence across replicas: two real binaries sharing one presence topic on the real broker,
//! each answering `/presence` with the users connected to the other.

use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::ClientConfig;
use roomcast::auth::{now_secs, Claims};
use serde_json::{json, Value};

use crate::support::*;

/// Short intervals, so that a lease runs out within the test.
fn presence_section(topic: &str, lease: Duration) -> String {
    format!(
        "[presence]\nenabled = true\ntopic = \"{topic}\"\ninterval_seconds = 0.05\n\
         renew_seconds = 0.5\nexpiry_seconds = {}\n",
        lease.as_secs_f64()
    )
}

const LEASE: Duration = Duration::from_secs(3);

fn tenant_token(tenant: &str, sub: &str, rooms: &[&str]) -> String {
    token_with(Claims {
        sub: sub.into(),
        tenant: Some(tenant.into()),
        exp: now_secs() + 3600,
        rooms: rooms.iter().map(|r| r.to_string()).collect(),
        ..Claims::default()
    })
}

async fn presence(server: &Server, query: &str) -> (u16, String) {
    http_get(&server.admin, &format!("/presence{query}"))
        .await
        .expect("/presence answers")
}

async fn room_users(server: &Server, tenant: &str, room: &str) -> Value {
    let (status, body) = presence(server, &format!("?tenant={tenant}&room={room}")).await;
    assert_eq!(status, 200, "{body}");
    serde_json::from_str::<Value>(&body).unwrap()["users"].clone()
}

/// Waits until the room's users on `server` are `expected`; how long that took.
async fn until_users(
    server: &Server,
    tenant: &str,
    room: &str,
    expected: Value,
    limit: Duration,
) -> Duration {
    let start = Instant::now();
    loop {
        let users = room_users(server, tenant, room).await;
        if users == expected {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < limit,
            "{tenant}/{room} on {} is {users}, not {expected}, after {limit:?}",
            server.admin
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn until_ready(server: &Server) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (_, body) = presence(server, "").await;
        if serde_json::from_str::<Value>(&body).unwrap()["ready"] == json!(true) {
            return;
        }
        assert!(Instant::now() < deadline, "presence never ready: {body}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn replicas(topic: &str, presence_topic: &str, lease: Duration) -> (Server, Server) {
    let routes = task_route(topic);
    let extra = presence_section(presence_topic, lease);
    let a = Server::start(&routes, &extra).await;
    let b = Server::start(&routes, &extra).await;
    until_ready(&a).await;
    until_ready(&b).await;
    (a, b)
}

#[tokio::test]
async fn a_user_on_one_replica_shows_on_the_other_until_it_disconnects() {
    let topic = unique("presence-events");
    create_topic(&topic, 1).await;
    let (a, b) = replicas(&topic, &unique("presence"), LEASE).await;
    let mut client = a.connect(&tenant_token("acme", "42", &["task:9"])).await;
    client.join(&["task:9"]).await;

    let took = until_users(
        &b,
        "acme",
        "task:9",
        json!({"42": 1}),
        Duration::from_secs(10),
    )
    .await;
    eprintln!("join seen by the other replica after {took:?}");
    assert_eq!(room_users(&a, "acme", "task:9").await, json!({"42": 1}));
    // Another tenant's room of the same spelling is another room.
    assert_eq!(room_users(&b, "globex", "task:9").await, json!({}));
    let (_, tenant) = presence(&b, "?tenant=acme").await;
    let tenant: Value = serde_json::from_str(&tenant).unwrap();
    assert_eq!(tenant["users"], json!({"42": 1}));
    let (_, globex) = presence(&b, "?tenant=globex").await;
    let globex: Value = serde_json::from_str(&globex).unwrap();
    assert_eq!(globex["users"], json!({}));
    assert_eq!(globex["rooms"], json!({}));

    drop(client);
    let took = until_users(&b, "acme", "task:9", json!({}), Duration::from_secs(10)).await;
    eprintln!("leave seen by the other replica after {took:?}");
    let (_, whole) = presence(&b, "").await;
    let whole: Value = serde_json::from_str(&whole).unwrap();
    assert_eq!(whole["tenants"], json!({}), "{whole}");
    assert!(
        b.metric("roomcast_presence_records_published_total").await >= 1.0,
        "the reader publishes its own snapshot too"
    );
    assert!(
        b.metric("roomcast_presence_records_consumed_total{outcome=\"applied\"}")
            .await
            >= 2.0
    );
}

#[tokio::test]
async fn a_killed_replica_s_users_are_gone_from_the_other_within_the_lease() {
    let topic = unique("presence-events");
    create_topic(&topic, 1).await;
    let (a, b) = replicas(&topic, &unique("presence"), LEASE).await;
    let mut client = a.connect(&tenant_token("acme", "7", &["task:1"])).await;
    client.join(&["task:1"]).await;
    until_users(
        &b,
        "acme",
        "task:1",
        json!({"7": 1}),
        Duration::from_secs(10),
    )
    .await;

    // Dropping the server kills it with SIGKILL: no goodbye is published.
    drop(a);
    let took = until_users(
        &b,
        "acme",
        "task:1",
        json!({}),
        LEASE + Duration::from_secs(5),
    )
    .await;
    eprintln!("killed replica's user gone after {took:?} (lease {LEASE:?})");
    assert!(took >= LEASE / 2, "gone after {took:?}: not by expiry");
    assert_eq!(
        b.metric("roomcast_presence_expired_replicas_total").await,
        1.0
    );
    drop(client);
}

#[tokio::test]
async fn a_stopped_replica_s_users_leave_at_once() {
    let topic = unique("presence-events");
    create_topic(&topic, 1).await;
    // A lease far longer than the drain: only the goodbye removes the user in time.
    let lease = Duration::from_secs(60);
    let (mut a, b) = replicas(&topic, &unique("presence"), lease).await;
    let mut client = a.connect(&tenant_token("acme", "8", &["task:2"])).await;
    client.join(&["task:2"]).await;
    until_users(
        &b,
        "acme",
        "task:2",
        json!({"8": 1}),
        Duration::from_secs(10),
    )
    .await;

    // The client does not answer the close: its session is still open when the drain ends.
    a.sigterm();
    let took = until_users(&b, "acme", "task:2", json!({}), Duration::from_secs(15)).await;
    assert!(a.wait_exit(Duration::from_secs(15)).is_some());
    eprintln!("stopped replica's user gone after {took:?}");
    // Two expiry checks: a replica the goodbye left in the table would be expired by now.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(b.metric("roomcast_presence_replicas").await, 1.0);
    assert_eq!(
        b.metric("roomcast_presence_expired_replicas_total").await,
        0.0,
        "gone by the goodbye, not by expiry"
    );
}

#[tokio::test]
async fn with_presence_off_no_topic_is_made_and_the_admin_says_so() {
    let topic = unique("presence-events");
    create_topic(&topic, 1).await;
    let presence_topic = unique("presence");
    let extra = format!("[presence]\ntopic = \"{presence_topic}\"\n");
    let server = Server::start(&task_route(&topic), &extra).await;
    let _client = server.connect(&token("9", &["task:3"])).await;
    tokio::time::sleep(Duration::from_secs(1)).await;

    assert_eq!(
        presence(&server, "").await,
        (404, "presence is disabled\n".to_string())
    );
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .create()
        .unwrap();
    let metadata = consumer
        .fetch_metadata(None, Duration::from_secs(10))
        .unwrap();
    let names: Vec<&str> = metadata.topics().iter().map(|t| t.name()).collect();
    assert!(names.contains(&topic.as_str()));
    assert!(!names.contains(&presence_topic.as_str()));
    assert_eq!(
        server
            .metric("roomcast_presence_records_published_total")
            .await,
        0.0
    );
}
