//! Presence across replicas: two and three real binaries sharing one presence topic on the real
//! broker, each answering `/presence` with the users connected to the others, also after one
//! is killed and restarted; tenants apart.

use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::ClientConfig;
use roomcast::auth::{now_secs, Claims};
use serde_json::{json, Value};

use crate::presence_client::{presence_event, until_query};
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

pub fn tenant_token(tenant: &str, sub: &str, rooms: &[&str]) -> String {
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

/// `N` replicas sharing one presence topic, each ready with its table read.
async fn cluster<const N: usize>(
    topic: &str,
    presence_topic: &str,
    lease: Duration,
) -> [Server; N] {
    let routes = task_route(topic);
    let extra = presence_section(presence_topic, lease);
    let servers: [Server; N] = std::array::from_fn(|_| Server::launch(&routes, "", &extra, &[]));
    for server in &servers {
        server.wait_ready().await;
        until_ready(server).await;
    }
    servers
}

async fn replicas(topic: &str, presence_topic: &str, lease: Duration) -> (Server, Server) {
    let [a, b] = cluster(topic, presence_topic, lease).await;
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

// Three replicas: every one of them answers for the users of all.

/// Longer than `LEASE`: with nine replicas of parallel tests on a loaded machine, a renewal
/// late by a second must not expire a live replica.
const CLUSTER_LEASE: Duration = Duration::from_secs(5);

/// Generous: the first record of a replica crosses the broker and two other tables.
const AGREE: Duration = Duration::from_secs(20);

/// A tenant's users and rooms on `server`, as `/presence?tenant=` shows them.
async fn tenant_view(server: &Server, tenant: &str) -> Value {
    let (status, body) = presence(server, &format!("?tenant={tenant}")).await;
    assert_eq!(status, 200, "{body}");
    let view: Value = serde_json::from_str(&body).unwrap();
    json!({"users": view["users"], "rooms": view["rooms"]})
}

/// The bare `/presence` of `server`.
async fn whole_view(server: &Server) -> Value {
    let (status, body) = presence(server, "").await;
    assert_eq!(status, 200, "{body}");
    serde_json::from_str(&body).unwrap()
}

/// Waits until the tenant's view on every server is `expected`; how long each took.
async fn until_everywhere(servers: &[&Server], tenant: &str, expected: &Value) -> Vec<Duration> {
    let start = Instant::now();
    let mut took = Vec::new();
    for server in servers {
        loop {
            let view = tenant_view(server, tenant).await;
            if &view == expected {
                took.push(start.elapsed());
                break;
            }
            assert!(
                start.elapsed() < AGREE,
                "{tenant} on {} is {view}, not {expected}, after {AGREE:?}",
                server.admin
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    took
}

/// Connects `user` of `tenant` to `server` and joins `room` (granted by the token).
async fn member(server: &Server, tenant: &str, user: &str, room: &str) -> Client {
    let mut client = server.connect(&tenant_token(tenant, user, &[room])).await;
    client.join(&[room]).await;
    client
}

/// Users 1 to 5 of acme over three replicas; user 4 through two of them.
async fn acme_over([a, b, c]: [&Server; 3]) -> Vec<Client> {
    vec![
        member(a, "acme", "1", "task:9").await,
        member(a, "acme", "4", "task:9").await,
        member(b, "acme", "2", "task:9").await,
        member(c, "acme", "3", "task:5").await,
        member(c, "acme", "4", "task:9").await,
        member(c, "acme", "5", "task:9").await,
    ]
}

/// `acme_over`'s table: every connection also holds its `user:` and `tenant:` rooms.
fn acme_everyone() -> Value {
    let online = json!({"1": 1, "2": 1, "3": 1, "4": 2, "5": 1});
    json!({
        "users": online,
        "rooms": {
            "task:9": {"1": 1, "2": 1, "4": 2, "5": 1},
            "task:5": {"3": 1},
            "tenant:acme": online,
            "user:1": {"1": 1},
            "user:2": {"2": 1},
            "user:3": {"3": 1},
            "user:4": {"4": 2},
            "user:5": {"5": 1},
        }
    })
}

/// `acme_everyone` without the third replica's connections.
fn acme_without_the_third() -> Value {
    let online = json!({"1": 1, "2": 1, "4": 1});
    json!({
        "users": online,
        "rooms": {
            "task:9": online,
            "tenant:acme": online,
            "user:1": {"1": 1},
            "user:2": {"2": 1},
            "user:4": {"4": 1},
        }
    })
}

#[tokio::test]
async fn three_replicas_each_see_the_users_of_all() {
    let topic = unique("presence-events");
    create_topic(&topic, 1).await;
    let servers = cluster::<3>(&topic, &unique("presence"), CLUSTER_LEASE).await;
    let _clients = acme_over(servers.each_ref()).await;

    let everyone = acme_everyone();
    let took = until_everywhere(&[&servers[0], &servers[1], &servers[2]], "acme", &everyone).await;
    eprintln!("three replicas agreed after {took:?}");
    for server in &servers {
        assert_eq!(
            room_users(server, "acme", "task:9").await,
            json!({"1": 1, "2": 1, "4": 2, "5": 1})
        );
        assert_eq!(room_users(server, "acme", "task:5").await, json!({"3": 1}));
        let whole = whole_view(server).await;
        assert_eq!(whole["ready"], json!(true));
        assert_eq!(whole["replicas"], json!(3));
        assert_eq!(whole["tenants"], json!({"acme": everyone}));
    }
}

/// Polls the survivors until the killed replica's users are gone from each, and fails on
/// any other view in between: expiry removes a replica's entries at once, and nobody
/// else's. How long each took from `killed`.
async fn until_expired(
    survivors: &[&Server],
    before: &Value,
    after: &Value,
    killed: Instant,
    limit: Duration,
) -> Vec<Duration> {
    let mut took = vec![None; survivors.len()];
    while took.iter().any(Option::is_none) {
        for (server, took) in survivors.iter().zip(&mut took) {
            if took.is_some() {
                continue;
            }
            let view = tenant_view(server, "acme").await;
            if &view == after {
                *took = Some(killed.elapsed());
            } else {
                assert_eq!(&view, before, "on {} while expiring", server.admin);
            }
        }
        assert!(
            killed.elapsed() < limit,
            "the killed replica's users still shown after {limit:?}: {took:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    took.into_iter().map(Option::unwrap).collect()
}

#[tokio::test]
async fn a_killed_replica_of_three_leaves_everywhere_within_the_lease_and_restarts_with_the_same_table(
) {
    let topic = unique("presence-events");
    create_topic(&topic, 1).await;
    let [a, b, mut c] = cluster::<3>(&topic, &unique("presence"), CLUSTER_LEASE).await;
    let clients = acme_over([&a, &b, &c]).await;
    let name = clients[5].welcome["server"].clone();
    until_everywhere(&[&a, &b, &c], "acme", &acme_everyone()).await;

    c.kill();
    let killed = Instant::now();
    let after = acme_without_the_third();
    let limit = CLUSTER_LEASE + Duration::from_secs(10);
    let took = until_expired(&[&a, &b], &acme_everyone(), &after, killed, limit).await;
    eprintln!("killed replica's users gone after {took:?} (lease {CLUSTER_LEASE:?})");
    for server in [&a, &b] {
        assert_eq!(
            server
                .metric("roomcast_presence_expired_replicas_total")
                .await,
            1.0
        );
    }

    c.restart().await;
    until_ready(&c).await;
    let restarted = whole_view(&c).await;
    assert_eq!(restarted["ready"], json!(true));
    let expected = json!({"acme": after});
    assert_eq!(restarted["tenants"], expected, "the restarted table");
    for server in [&a, &b] {
        assert_eq!(whole_view(server).await["tenants"], expected);
    }

    // Under its old name, the restarted replica's users count like any other's.
    let back = member(&c, "acme", "6", "task:9").await;
    assert_eq!(back.welcome["server"], name);
    for server in [&a, &b, &c] {
        until_users(
            server,
            "acme",
            "task:9",
            json!({"1": 1, "2": 1, "4": 1, "6": 1}),
            AGREE,
        )
        .await;
    }
    drop(clients);
}

/// `observed` holds only users of `full`, none with more connections.
fn within(observed: &Value, full: &Value) -> bool {
    observed.as_object().unwrap().iter().all(|(user, n)| {
        full[user]
            .as_u64()
            .is_some_and(|max| n.as_u64().unwrap() <= max)
    })
}

/// A tenant, the users its room may show on the way, and the users it must come to.
type Bounded<'a> = (&'a str, Value, Value);

/// Waits until `room` of each tenant shows its expected users on every server, failing on
/// any user or count beyond the tenant's bound seen on the way.
async fn until_rooms(servers: &[&Server], room: &str, tenants: &[Bounded<'_>]) {
    let start = Instant::now();
    for server in servers {
        for (tenant, bound, expected) in tenants {
            loop {
                let users = room_users(server, tenant, room).await;
                assert!(
                    within(&users, bound),
                    "{tenant:?}/{room} on {} shows {users}, beyond {bound}",
                    server.admin
                );
                if &users == expected {
                    break;
                }
                assert!(
                    start.elapsed() < AGREE,
                    "{tenant:?}/{room} on {} is {users}, not {expected}, after {AGREE:?}",
                    server.admin
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

#[tokio::test]
async fn tenants_sharing_room_and_user_names_over_three_replicas_never_see_each_other() {
    let topic = unique("presence-events");
    create_topic(&topic, 1).await;
    let [a, b, c] = cluster::<3>(&topic, &unique("presence"), CLUSTER_LEASE).await;
    let _acme = [
        member(&a, "acme", "1", "task:9").await,
        member(&b, "acme", "2", "task:9").await,
        member(&c, "acme", "2", "task:9").await,
    ];
    let globex = vec![
        member(&a, "globex", "2", "task:9").await,
        member(&b, "globex", "1", "task:9").await,
        member(&c, "globex", "1", "task:9").await,
    ];
    // Tokens without a tenant are a namespace of their own.
    let mut tenantless = c.connect(&token("1", &["task:9"])).await;
    tenantless.join(&["task:9"]).await;

    let acme = json!({"1": 1, "2": 2});
    let globex_users = json!({"1": 2, "2": 1});
    let tenants = [
        ("acme", acme.clone(), acme.clone()),
        ("globex", globex_users.clone(), globex_users.clone()),
        ("", json!({"1": 1}), json!({"1": 1})),
    ];
    until_rooms(&[&a, &b, &c], "task:9", &tenants).await;
    for server in [&a, &b, &c] {
        assert_eq!(
            tenant_view(server, "acme").await,
            json!({
                "users": acme,
                "rooms": {
                    "task:9": acme,
                    "tenant:acme": acme,
                    "user:1": {"1": 1},
                    "user:2": {"2": 2},
                }
            })
        );
        assert_eq!(
            tenant_view(server, "").await,
            json!({"users": {"1": 1}, "rooms": {"task:9": {"1": 1}, "user:1": {"1": 1}}})
        );
        let whole = whole_view(server).await;
        let names: Vec<&String> = whole["tenants"].as_object().unwrap().keys().collect();
        assert_eq!(names, ["", "acme", "globex"]);
    }

    // Globex leaving takes nothing of acme's with it.
    drop(globex);
    let tenants = [
        ("globex", globex_users, json!({})),
        ("acme", acme.clone(), acme.clone()),
        ("", json!({"1": 1}), json!({"1": 1})),
    ];
    until_rooms(&[&a, &b, &c], "task:9", &tenants).await;
    for server in [&a, &b, &c] {
        assert_eq!(room_users(server, "acme", "task:9").await, acme);
        assert_eq!(
            tenant_view(server, "globex").await,
            json!({"users": {}, "rooms": {}})
        );
    }
}

// Three replicas as clients see them: the `presence` query and the events.

/// `user` of `tenant` on `server`, listening to the presence of `rooms` (its token grants
/// them).
async fn listener(server: &Server, tenant: &str, user: &str, rooms: &[&str]) -> Client {
    let mut client = server.connect(&tenant_token(tenant, user, rooms)).await;
    let (errors, ok) = client
        .subscribe(json!({"rooms": rooms, "presence": true}))
        .await;
    assert!(errors.is_empty(), "refused: {errors:?}");
    assert_eq!(ok["type"], "ok", "{ok}");
    client
}

/// Reads what the listeners were told of the table as it was, until each is silent for
/// half a second: presence events only, none with a `pos`.
async fn settle(listeners: &mut [&mut Client]) {
    for client in listeners.iter_mut() {
        while let Some(f) = client.frame_within(Duration::from_millis(500)).await {
            assert_eq!(f["type"], "event", "{f}");
            assert!(f.get("pos").is_none(), "{f}");
            assert!(f["event"].as_str().unwrap().starts_with("presence."), "{f}");
        }
    }
}

/// The next `n` presence events, sorted, after checking the one order promised among the
/// events of one record or one expiry: onlines, joins, leaves, offlines. Within a kind they
/// come in the table's key order, which is none of the protocol's business.
async fn presence_events(client: &mut Client, n: usize) -> Vec<Value> {
    let mut events = Vec::with_capacity(n);
    for _ in 0..n {
        events.push(presence_event(client).await);
    }
    let kinds: Vec<&str> = events
        .iter()
        .map(|e| e["event"].as_str().unwrap())
        .collect();
    let rank = |kind: &&str| {
        [
            "presence.online",
            "presence.join",
            "presence.leave",
            "presence.offline",
        ]
        .iter()
        .position(|k| k == kind)
    };
    assert!(
        kinds.windows(2).all(|w| rank(&w[0]) <= rank(&w[1])),
        "out of order: {kinds:?}"
    );
    events.sort_by_key(|e| e.to_string());
    events
}

fn online(user: &str) -> Value {
    json!({"event": "presence.online", "payload": {"user": user}})
}

fn offline(user: &str) -> Value {
    json!({"event": "presence.offline", "payload": {"user": user}})
}

fn join(room: &str, user: &str) -> Value {
    json!({"event": "presence.join", "payload": {"room": room, "user": user}})
}

fn leave(room: &str, user: &str) -> Value {
    json!({"event": "presence.leave", "payload": {"room": room, "user": user}})
}

fn sorted(mut events: Vec<Value>) -> Vec<Value> {
    events.sort_by_key(|e| e.to_string());
    events
}

const LISTENED: [&str; 3] = ["task:9", "task:5", "tenant:acme"];

/// `acme_over`'s task:9 with a listener (users 10, 11, 12) on each replica.
fn acme_task_9_with_listeners() -> Value {
    json!({"1": 1, "2": 1, "4": 2, "5": 1, "10": 1, "11": 1, "12": 1})
}

/// A listener of acme's rooms on each of three replicas, and acme's users over them; the
/// listeners have read what was told of the table up to now.
async fn listened_acme(servers: [&Server; 3]) -> (Vec<Client>, [Client; 3]) {
    let users = acme_over(servers).await;
    let [a, b, c] = servers;
    let mut listeners = [
        listener(a, "acme", "10", &LISTENED).await,
        listener(b, "acme", "11", &LISTENED).await,
        listener(c, "acme", "12", &LISTENED).await,
    ];
    for client in listeners.iter_mut() {
        until_query(client, "task:9", acme_task_9_with_listeners()).await;
    }
    let [la, lb, lc] = &mut listeners;
    settle(&mut [la, lb, lc]).await;
    (users, listeners)
}

#[tokio::test]
async fn over_three_replicas_the_query_sees_everyone_and_every_listener_hears_every_change() {
    let topic = unique("presence-events");
    create_topic(&topic, 1).await;
    let [a, b, c] = cluster::<3>(&topic, &unique("presence"), CLUSTER_LEASE).await;
    let (_users, mut listeners) = listened_acme([&a, &b, &c]).await;
    for (id, client) in (1..).zip(listeners.iter_mut()) {
        let answer = client
            .request(json!({"type": "presence", "room": "task:5"}), id)
            .await;
        assert_eq!(
            answer,
            json!({"type": "ok", "id": id, "room": "task:5", "users": {"3": 1, "10": 1, "11": 1, "12": 1}, "ready": true})
        );
    }

    // User 20 connects on a, joins task:9 there, then again through c.
    let mut first = a.connect(&tenant_token("acme", "20", &["task:9"])).await;
    for client in listeners.iter_mut() {
        assert_eq!(presence_event(client).await, online("20"));
    }
    first.join(&["task:9"]).await;
    for client in listeners.iter_mut() {
        assert_eq!(presence_event(client).await, join("task:9", "20"));
    }
    let mut second = c.connect(&tenant_token("acme", "20", &["task:9"])).await;
    second.join(&["task:9"]).await;
    let mut everyone = acme_task_9_with_listeners();
    everyone["20"] = json!(2);
    for client in listeners.iter_mut() {
        until_query(client, "task:9", everyone.clone()).await;
    }

    // Gone from a, still there through c: nobody is told anything.
    drop(first);
    everyone["20"] = json!(1);
    for client in listeners.iter_mut() {
        until_query(client, "task:9", everyone.clone()).await;
    }
    for client in listeners.iter_mut() {
        client.expect_silence(Duration::from_millis(500)).await;
    }

    // It leaves the room, then goes.
    let left = second
        .request(json!({"type": "unsubscribe", "rooms": ["task:9"]}), 1)
        .await;
    assert_eq!(left["rooms"], json!(["task:9"]));
    for client in listeners.iter_mut() {
        assert_eq!(presence_event(client).await, leave("task:9", "20"));
    }
    drop(second);
    for client in listeners.iter_mut() {
        assert_eq!(presence_event(client).await, offline("20"));
        client.expect_silence(Duration::from_millis(500)).await;
    }
}

#[tokio::test]
async fn listeners_on_the_survivors_hear_a_killed_replica_s_users_leave_and_go_offline() {
    let topic = unique("presence-events");
    create_topic(&topic, 1).await;
    let [a, b, mut c] = cluster::<3>(&topic, &unique("presence"), CLUSTER_LEASE).await;
    let (_users, listeners) = listened_acme([&a, &b, &c]).await;
    let [mut la, mut lb, lc] = listeners;

    c.kill();
    let killed = Instant::now();
    // Users 3, 5 and the listener 12 were on c alone; user 4 is still on a.
    let gone = sorted(vec![
        offline("3"),
        offline("5"),
        offline("12"),
        leave("task:5", "3"),
        leave("task:5", "12"),
        leave("task:9", "5"),
        leave("task:9", "12"),
    ]);
    for client in [&mut la, &mut lb] {
        assert_eq!(presence_events(client, gone.len()).await, gone);
        eprintln!(
            "a listener heard the killed replica's users go after {:?}",
            killed.elapsed()
        );
    }
    assert!(
        killed.elapsed() < CLUSTER_LEASE + Duration::from_secs(10),
        "heard after {:?}",
        killed.elapsed()
    );
    for client in [&mut la, &mut lb] {
        client.expect_silence(Duration::from_secs(1)).await;
        until_query(
            client,
            "task:9",
            json!({"1": 1, "2": 1, "4": 1, "10": 1, "11": 1}),
        )
        .await;
    }
    drop(lc);

    // Restarted: a listener there hears its own join, and queries what the others hold.
    c.restart().await;
    until_ready(&c).await;
    let mut back = listener(&c, "acme", "13", &["task:9"]).await;
    assert_eq!(presence_event(&mut back).await, join("task:9", "13"));
    let now = json!({"1": 1, "2": 1, "4": 1, "10": 1, "11": 1, "13": 1});
    until_query(&mut back, "task:9", now.clone()).await;
    for client in [&mut la, &mut lb] {
        assert_eq!(presence_event(client).await, online("13"));
        assert_eq!(presence_event(client).await, join("task:9", "13"));
        until_query(client, "task:9", now.clone()).await;
    }
}

#[tokio::test]
async fn over_three_replicas_a_tenant_hears_nothing_of_another_s_room_of_the_same_name() {
    let topic = unique("presence-events");
    create_topic(&topic, 1).await;
    let [a, b, c] = cluster::<3>(&topic, &unique("presence"), CLUSTER_LEASE).await;
    let acme_rooms = ["task:9", "tenant:acme"];
    let globex_rooms = ["task:9", "tenant:globex"];
    // The listeners share user ids across the tenants, and replicas.
    let mut acme = [
        listener(&a, "acme", "1", &acme_rooms).await,
        listener(&c, "acme", "2", &acme_rooms).await,
    ];
    let mut globex = [
        listener(&a, "globex", "1", &globex_rooms).await,
        listener(&b, "globex", "2", &globex_rooms).await,
    ];
    let both = json!({"1": 1, "2": 1});
    for client in acme.iter_mut().chain(globex.iter_mut()) {
        until_query(client, "task:9", both.clone()).await;
    }
    {
        let [a1, a2] = &mut acme;
        let [g1, g2] = &mut globex;
        settle(&mut [a1, a2, g1, g2]).await;
    }

    // Acme's user 3 comes on b, joins task:9, leaves it and goes.
    let mut visitor = b.connect(&tenant_token("acme", "3", &["task:9"])).await;
    visitor.join(&["task:9"]).await;
    for client in acme.iter_mut() {
        assert_eq!(presence_event(client).await, online("3"));
        assert_eq!(presence_event(client).await, join("task:9", "3"));
    }
    for client in globex.iter_mut() {
        until_query(client, "task:9", both.clone()).await;
    }
    visitor
        .request(json!({"type": "unsubscribe", "rooms": ["task:9"]}), 1)
        .await;
    drop(visitor);
    for client in acme.iter_mut() {
        assert_eq!(presence_event(client).await, leave("task:9", "3"));
        assert_eq!(presence_event(client).await, offline("3"));
    }

    // Globex's user 3, on c, the other way round.
    let mut visitor = c.connect(&tenant_token("globex", "3", &["task:9"])).await;
    visitor.join(&["task:9"]).await;
    for client in globex.iter_mut() {
        assert_eq!(presence_event(client).await, online("3"));
        assert_eq!(presence_event(client).await, join("task:9", "3"));
    }
    let mut three = both.clone();
    three["3"] = json!(1);
    for client in globex.iter_mut() {
        until_query(client, "task:9", three.clone()).await;
    }
    for client in acme.iter_mut() {
        until_query(client, "task:9", both.clone()).await;
    }
    // Gone without leaving first: its leave still comes before its offline.
    drop(visitor);
    for client in globex.iter_mut() {
        assert_eq!(presence_event(client).await, leave("task:9", "3"));
        assert_eq!(presence_event(client).await, offline("3"));
    }

    // Neither heard anything of the other's, on any replica.
    for client in acme.iter_mut().chain(globex.iter_mut()) {
        client.expect_silence(Duration::from_secs(1)).await;
    }
}
