//! Records reach exactly the connections subscribed to their rooms, once, in order.

use std::time::Duration;

use serde_json::json;

use crate::support::*;

const QUIET: Duration = Duration::from_millis(700);

fn entity(feature: &str, entity: &str, action: &str, id: &str, seq: u32) -> serde_json::Value {
    json!({"feature": feature, "entity": entity, "action": action,
           "data": {"id": id, "seq": seq}, "meta": {"priority": "normal"}})
}

#[tokio::test]
async fn entity_updates_reach_exactly_the_subscribed_feature_rooms() {
    let topic = unique("entity");
    create_topic(&topic, 3).await;
    let server = Server::start(&tenantless_entity_route(&topic), "").await;
    let mut users = server.connect(&token("alice", &["feature:users"])).await;
    let mut rbac = server.connect(&token("bob", &["feature:rbac"])).await;
    users.join(&["feature:users"]).await;
    // Seed style: features: ["rbac"] means the room feature:rbac.
    let (errors, ok) = rbac.subscribe(json!({"features": ["rbac"]})).await;
    assert!(errors.is_empty());
    assert_eq!(ok["rooms"], json!(["feature:rbac"]));

    let p = Producer::new();
    for seq in 0..6 {
        let feature = if seq % 2 == 0 { "users" } else { "rbac" };
        p.send_json(
            &topic,
            entity(feature, "user", "deleted", &format!("x{seq}"), seq),
        )
        .await;
    }
    let got_users = users.events(3).await;
    let got_rbac = rbac.events(3).await;
    // Three partitions: order holds within each, not across them.
    let mut seqs: Vec<u64> = payload_field(&got_users, "data")
        .iter()
        .map(|d| d["seq"].as_u64().unwrap())
        .collect();
    seqs.sort_unstable();
    assert_eq!(seqs, [0, 2, 4]);
    assert_eq!(event_names(&got_rbac), ["rbac.user.deleted"; 3]);
    assert_eq!(event_names(&got_users), ["users.user.deleted"; 3]);
    // Every event names its own position, and the room list is not disclosed by default.
    for e in got_users.iter().chain(&got_rbac) {
        let pos = e["pos"].as_str().unwrap();
        assert!(pos.starts_with(&format!("{topic}:")), "{pos}");
        assert!(e.get("rooms").is_none());
        assert!(e["ts"].as_i64().unwrap() > 0);
    }
    users.expect_silence(QUIET).await;
    rbac.expect_silence(QUIET).await;
}

#[tokio::test]
async fn task_updates_reach_only_their_users() {
    let topic = unique("task");
    create_topic(&topic, 2).await;
    let server = Server::start(&task_route(&topic), "").await;
    // user:{sub} is joined automatically.
    let mut one = server.connect(&token("1", &[])).await;
    let mut two = server.connect(&token("2", &[])).await;
    assert_eq!(one.welcome["rooms"], json!(["user:1"]));
    let p = Producer::new();
    for (user, task) in [("1", "a"), ("2", "b"), ("1", "c"), ("3", "d"), ("2", "e")] {
        p.send_json(
            &topic,
            json!({"type": "progress", "taskId": task, "userId": user}),
        )
        .await;
    }
    let got_one = one.events(2).await;
    let got_two = two.events(2).await;
    // Two partitions: order holds within each, not across them.
    let tasks = |events: &[serde_json::Value]| {
        let mut t: Vec<String> = payload_field(events, "taskId")
            .iter()
            .map(|v| v.as_str().unwrap().to_string())
            .collect();
        t.sort();
        t
    };
    assert_eq!(tasks(&got_one), ["a", "c"]);
    assert_eq!(tasks(&got_two), ["b", "e"]);
    assert_eq!(event_names(&got_one), ["task:update", "task:update"]);
    one.expect_silence(QUIET).await;
    two.expect_silence(QUIET).await;
}

#[tokio::test]
async fn a_connection_in_several_target_rooms_gets_a_record_once() {
    let topic = unique("once");
    create_topic(&topic, 1).await;
    let server = Server::start(&tenantless_entity_route(&topic), "").await;
    // Auto-joined to user:u1, which is also the record's {entity}:{data.id} room.
    let mut c = server.connect(&token("u1", &["feature:**"])).await;
    c.join(&["feature:users", "feature:users:entity:user"])
        .await;
    let p = Producer::new();
    p.send_json(&topic, entity("users", "user", "updated", "u1", 1))
        .await;
    p.send_json(&topic, entity("users", "user", "updated", "u2", 2))
        .await;
    let got = c.events(2).await;
    assert_eq!(payload_field(&got, "data")[0]["seq"], 1);
    assert_eq!(payload_field(&got, "data")[1]["seq"], 2);
    c.expect_silence(QUIET).await;
}

#[tokio::test]
async fn a_room_without_the_claim_is_refused_and_never_delivered() {
    let topic = unique("forbidden");
    create_topic(&topic, 1).await;
    let server = Server::start(&tenantless_entity_route(&topic), "").await;
    let mut c = server.connect(&token("mallory", &["feature:users"])).await;
    let (errors, ok) = c
        .subscribe(json!({"rooms": ["feature:rbac", "feature:users"]}))
        .await;
    assert_eq!(errors.len(), 1);
    assert_eq!(errors[0]["code"], "forbidden");
    assert_eq!(errors[0]["room"], "feature:rbac");
    assert_eq!(ok["rooms"], json!(["feature:users"]));
    let p = Producer::new();
    p.send_json(&topic, entity("rbac", "role", "deleted", "r1", 1))
        .await;
    p.send_json(&topic, entity("users", "user", "deleted", "u1", 2))
        .await;
    // The connection is alive and gets what it may see, and only that.
    let got = c.events(1).await;
    assert_eq!(got[0]["event"], "users.user.deleted");
    c.expect_silence(QUIET).await;
}

#[tokio::test]
async fn permissions_map_to_rooms_by_config() {
    let topic = unique("perms");
    create_topic(&topic, 1).await;
    let server = Server::start(&tenantless_entity_route(&topic), "").await;
    let claims = roomcast::auth::Claims {
        sub: "p1".into(),
        exp: roomcast::auth::now_secs() + 600,
        perms: vec!["users:read".into()],
        ..Default::default()
    };
    let mut c = server.connect(&token_with(claims)).await;
    let (errors, ok) = c
        .subscribe(json!({"rooms": ["feature:users:entity:user", "feature:rbac"]}))
        .await;
    assert_eq!(ok["rooms"], json!(["feature:users:entity:user"]));
    assert_eq!(errors[0]["room"], "feature:rbac");
}

#[tokio::test]
async fn a_subscription_token_grants_exactly_its_rooms() {
    let topic = unique("subtoken");
    create_topic(&topic, 1).await;
    let server = Server::start(&task_route(&topic), "").await;
    let mut c = server.connect(&token("7", &[])).await;
    let grant = token("7", &["task:9"]);
    let (errors, ok) = c
        .subscribe(json!({"rooms": ["task:9", "task:10"], "token": grant}))
        .await;
    assert_eq!(ok["rooms"], json!(["task:9"]));
    assert_eq!(errors.len(), 1);
    assert_eq!(errors[0]["room"], "task:10");
    assert_eq!(errors[0]["code"], "forbidden");
    // Another user's subscription token grants nothing.
    let stolen = token("8", &["task:10"]);
    let (errors, last) = c
        .subscribe(json!({"rooms": ["task:10"], "token": stolen}))
        .await;
    assert!(errors.is_empty());
    assert_eq!(last["type"], "error");
    assert_eq!(last["code"], "invalid_token");
    let p = Producer::new();
    for task in ["10", "9", "11"] {
        p.send_json(&topic, json!({"taskId": task, "userId": "other"}))
            .await;
    }
    let got = c.events(1).await;
    assert_eq!(got[0]["payload"]["taskId"], "9");
    c.expect_silence(QUIET).await;
}

#[tokio::test]
async fn unsubscribe_stops_delivery() {
    let topic = unique("unsub");
    create_topic(&topic, 1).await;
    let server = Server::start(&task_route(&topic), "").await;
    let mut c = server.connect(&token("u", &["task:*"])).await;
    c.join(&["task:1"]).await;
    c.send(json!({"type": "unsubscribe", "id": 5, "rooms": ["task:1", "task:2"]}))
        .await;
    let ok = c.frame().await.unwrap();
    assert_eq!(ok, json!({"type": "ok", "id": 5, "rooms": ["task:1"]}));
    let p = Producer::new();
    p.send_json(&topic, json!({"taskId": "1", "userId": "x"}))
        .await;
    p.send_json(&topic, json!({"taskId": "2", "userId": "u"}))
        .await;
    let got = c.events(1).await;
    assert_eq!(got[0]["payload"]["taskId"], "2");
}

#[tokio::test]
async fn tenants_never_see_each_others_records() {
    let topic = unique("tenant");
    create_topic(&topic, 1).await;
    let server = Server::start(&entity_route(&topic), "").await;
    let with_tenant = |sub: &str, tenant: &str| {
        token_with(roomcast::auth::Claims {
            sub: sub.into(),
            exp: roomcast::auth::now_secs() + 600,
            tenant: Some(tenant.into()),
            rooms: vec!["feature:users".into()],
            ..Default::default()
        })
    };
    let mut a = server.connect(&with_tenant("1", "acme")).await;
    let mut b = server.connect(&with_tenant("1", "globex")).await;
    assert_eq!(a.welcome["tenant"], "acme");
    a.join(&["feature:users"]).await;
    b.join(&["feature:users"]).await;
    let p = Producer::new();
    let mut record = entity("users", "user", "created", "z", 1);
    record["meta"]["tenantId"] = json!("acme");
    p.send_json(&topic, record).await;
    let mut record = entity("users", "user", "created", "z", 2);
    record["meta"]["tenantId"] = json!("globex");
    p.send_json(&topic, record).await;
    assert_eq!(a.events(1).await[0]["payload"]["data"]["seq"], 1);
    assert_eq!(b.events(1).await[0]["payload"]["data"]["seq"], 2);
    a.expect_silence(QUIET).await;
    b.expect_silence(QUIET).await;
}

#[tokio::test]
async fn headers_target_rooms_without_templates() {
    let topic = unique("headers");
    create_topic(&topic, 1).await;
    let server = Server::start(&task_route(&topic), "").await;
    let mut c = server.connect(&token("h", &["board:*"])).await;
    c.join(&["board:3"]).await;
    let p = Producer::new();
    p.send_to(
        &topic,
        None,
        br#"{"anything":true}"#,
        &[("rooms", "board:3,board:4"), ("event", "board.moved")],
    )
    .await;
    let got = c.events(1).await;
    assert_eq!(got[0]["event"], "board.moved");
    assert_eq!(got[0]["payload"], json!({"anything": true}));
}

#[tokio::test]
async fn event_filters_narrow_a_subscription() {
    let topic = unique("filter");
    create_topic(&topic, 1).await;
    let server = Server::start(&tenantless_entity_route(&topic), "").await;
    let mut c = server.connect(&token("f", &["feature:users"])).await;
    let (_, ok) = c
        .subscribe(json!({"rooms": ["feature:users"], "events": ["users.*.deleted"]}))
        .await;
    assert_eq!(ok["rooms"], json!(["feature:users"]));
    let p = Producer::new();
    for (seq, action) in ["created", "deleted", "updated", "deleted"]
        .iter()
        .enumerate()
    {
        p.send_json(&topic, entity("users", "user", action, "q", seq as u32))
            .await;
    }
    let got = c.events(2).await;
    assert_eq!(
        event_names(&got),
        ["users.user.deleted", "users.user.deleted"]
    );
    c.expect_silence(QUIET).await;
}

#[tokio::test]
async fn a_malformed_record_is_skipped_counted_and_the_next_delivered() {
    let topic = unique("malformed");
    create_topic(&topic, 1).await;
    let server = Server::start(&task_route(&topic), "").await;
    let mut c = server.connect(&token("m", &[])).await;
    let p = Producer::new();
    p.send(&topic, b"this is not json").await;
    p.send_json(&topic, json!({"type": "no rooms here"})).await;
    p.send_json(&topic, json!({"taskId": "ok", "userId": "m"}))
        .await;
    let got = c.events(1).await;
    assert_eq!(got[0]["payload"]["taskId"], "ok");
    assert_eq!(got[0]["pos"], format!("{topic}:0:2"));
    let not_json =
        format!("roomcast_records_malformed_total{{reason=\"not_json\",topic=\"{topic}\"}}");
    let no_rooms =
        format!("roomcast_records_malformed_total{{reason=\"no_rooms\",topic=\"{topic}\"}}");
    assert_eq!(server.metric(&not_json).await, 1.0);
    assert_eq!(server.metric(&no_rooms).await, 1.0);
}

#[tokio::test]
async fn a_thousand_records_on_one_partition_arrive_in_order() {
    let topic = unique("order");
    create_topic(&topic, 1).await;
    let server = Server::start(&task_route(&topic), "").await;
    let mut c = server.connect(&token("o", &[])).await;
    let p = Producer::new();
    let sends = (0..1000).map(|seq| {
        let value = json!({"taskId": "t", "userId": "o", "seq": seq}).to_string();
        let p = &p;
        let topic = &topic;
        async move { p.send(topic, value.as_bytes()).await }
    });
    futures_util::future::join_all(sends).await;
    let got = c.events(1000).await;
    let seqs: Vec<i64> = got
        .iter()
        .map(|e| e["payload"]["seq"].as_i64().unwrap())
        .collect();
    let offsets: Vec<i64> = got
        .iter()
        .map(|e| {
            e["pos"]
                .as_str()
                .unwrap()
                .rsplit(':')
                .next()
                .unwrap()
                .parse()
                .unwrap()
        })
        .collect();
    // The idempotent producer keeps the order records were handed to it.
    assert!(
        offsets.windows(2).all(|w| w[1] == w[0] + 1),
        "offsets out of order"
    );
    assert_eq!(
        seqs,
        (0..1000).collect::<Vec<_>>(),
        "every record once, in order"
    );
    c.expect_silence(QUIET).await;
}

#[tokio::test]
async fn a_topic_created_after_start_is_delivered_from_its_first_record() {
    let topic = unique("late");
    let server = Server::start(&task_route(&topic), "").await;
    let mut c = server.connect(&token("late", &[])).await;
    create_topic(&topic, 1).await;
    let p = Producer::new();
    for seq in 0..3 {
        p.send_json(&topic, json!({"taskId": "x", "userId": "late", "seq": seq}))
            .await;
    }
    let got = c.events(3).await;
    assert_eq!(payload_field(&got, "seq"), [json!(0), json!(1), json!(2)]);
}

/// A room this large is fanned out in parts on several threads (more than twice the part
/// size of 1,024): every member must still get every record once, in order, and a member that
/// is also in the record's other room (its own user room) nothing twice.
#[tokio::test]
async fn a_room_of_2500_gets_every_record_once_in_order() {
    const MEMBERS: usize = 2500;
    const RECORDS: i64 = 60;
    let topic = unique("large");
    create_topic(&topic, 1).await;
    let server = Server::start(&task_route(&topic), "").await;
    let mut clients = Vec::with_capacity(MEMBERS);
    let server_ref = &server;
    for chunk in (0..MEMBERS).collect::<Vec<_>>().chunks(250) {
        let joins = chunk.iter().map(|i| async move {
            let server = server_ref;
            let mut c = server
                .connect(&token(&format!("m{i}"), &["task:big"]))
                .await;
            c.join(&["task:big"]).await;
            c
        });
        clients.extend(futures_util::future::join_all(joins).await);
    }
    let p = Producer::new();
    for seq in 0..RECORDS {
        // Also to the user room of one of the first ten members.
        let user = format!("m{}", seq % 10);
        let value = json!({"taskId": "big", "userId": user, "seq": seq}).to_string();
        p.send(&topic, value.as_bytes()).await;
    }
    let reads = clients.iter_mut().map(|c| async move {
        let got = c.events(RECORDS as usize).await;
        let seqs: Vec<i64> = payload_field(&got, "seq")
            .iter()
            .map(|s| s.as_i64().unwrap())
            .collect();
        c.expect_silence(QUIET).await;
        seqs
    });
    let all = futures_util::future::join_all(reads).await;
    let expected: Vec<i64> = (0..RECORDS).collect();
    let wrong = all.iter().filter(|seqs| **seqs != expected).count();
    assert_eq!(wrong, 0, "members without every record once in order");
    let delivered = server.metric("roomcast_deliveries_total").await;
    assert_eq!(delivered as usize, MEMBERS * RECORDS as usize);
}
