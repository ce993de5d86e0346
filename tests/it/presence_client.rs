//! Presence as clients see it: the `presence` query and the join/leave and online/offline
//! events, on two real binaries sharing one presence topic on the real broker.

use std::time::Duration;

use serde_json::{json, Value};

use crate::presence::tenant_token;
use crate::support::*;

fn presence_section(topic: &str) -> String {
    format!(
        "[presence]\nenabled = true\ntopic = \"{topic}\"\ninterval_seconds = 0.05\n\
         renew_seconds = 0.5\nexpiry_seconds = 3\n"
    )
}

async fn replicas() -> (Server, Server) {
    let topic = unique("presence-client-events");
    create_topic(&topic, 1).await;
    let extra = presence_section(&unique("presence"));
    let a = Server::start(&task_route(&topic), &extra).await;
    let b = Server::start(&task_route(&topic), &extra).await;
    (a, b)
}

/// Queries `room` until its users are `expected` and the table is ready.
pub async fn until_query(client: &mut Client, room: &str, expected: Value) -> Value {
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    for id in 1000.. {
        let answer = client
            .request(json!({"type": "presence", "room": room}), id)
            .await;
        if answer["users"] == expected && answer["ready"] == json!(true) {
            return answer;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{room}: {answer}, not {expected}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    unreachable!()
}

/// The next presence event, skipping nothing else.
pub async fn presence_event(client: &mut Client) -> Value {
    let f = client
        .frame_within(Duration::from_secs(15))
        .await
        .expect("a presence event");
    assert_eq!(f["type"], "event", "{f}");
    assert!(f.get("pos").is_none(), "a presence event has no pos: {f}");
    assert!(f["ts"].as_i64().unwrap() > 0, "{f}");
    json!({"event": f["event"], "payload": f["payload"]})
}

#[tokio::test]
async fn a_query_on_either_replica_sees_users_of_both_and_only_its_tenant() {
    let (a, b) = replicas().await;
    let mut on_a = a.connect(&tenant_token("acme", "42", &["task:9"])).await;
    let mut on_b = b.connect(&tenant_token("acme", "7", &["task:9"])).await;
    let mut second = b.connect(&tenant_token("acme", "7", &["task:9"])).await;
    let mut other = b.connect(&tenant_token("globex", "42", &["task:9"])).await;
    for c in [&mut on_a, &mut on_b, &mut second, &mut other] {
        c.join(&["task:9"]).await;
    }

    let answer = until_query(&mut on_a, "task:9", json!({"42": 1, "7": 2})).await;
    assert_eq!(
        answer,
        json!({"type": "ok", "id": answer["id"], "room": "task:9",
               "users": {"42": 1, "7": 2}, "ready": true})
    );
    until_query(&mut on_b, "task:9", json!({"42": 1, "7": 2})).await;
    // The same room name in another tenant is another room.
    until_query(&mut other, "task:9", json!({"42": 1})).await;

    // Allowed exactly as subscribing: a room the token does not grant is refused.
    let refused = on_a
        .request(json!({"type": "presence", "room": "task:10"}), 1)
        .await;
    assert_eq!(refused["type"], "error");
    assert_eq!(refused["code"], "forbidden");
    assert!(refused.get("room").is_none(), "a final answer: {refused}");
    let bad = on_a
        .request(json!({"type": "presence", "room": ""}), 2)
        .await;
    assert_eq!(bad["code"], "invalid_room");
}

#[tokio::test]
async fn listeners_on_every_replica_hear_joins_leaves_and_status() {
    let (a, b) = replicas().await;
    let rooms = ["task:9", "tenant:acme"];
    let mut here = a.connect(&tenant_token("acme", "1", &rooms)).await;
    let mut there = b.connect(&tenant_token("acme", "2", &rooms)).await;
    let mut deaf = b.connect(&tenant_token("acme", "3", &rooms)).await;
    let mut globex = b
        .connect(&tenant_token("globex", "4", &["task:9", "tenant:globex"]))
        .await;
    for c in [&mut here, &mut there, &mut globex] {
        let (errors, ok) = c
            .subscribe(json!({"rooms": ["task:9"], "presence": true}))
            .await;
        assert!(errors.is_empty() && ok["type"] == "ok", "{errors:?} {ok}");
    }
    deaf.join(&["task:9"]).await;
    for c in [&mut here, &mut there] {
        c.subscribe(json!({"rooms": ["tenant:acme"], "presence": true}))
            .await;
    }
    globex
        .subscribe(json!({"rooms": ["tenant:globex"], "presence": true}))
        .await;
    until_query(&mut here, "task:9", json!({"1": 1, "2": 1, "3": 1})).await;
    until_query(&mut there, "task:9", json!({"1": 1, "2": 1, "3": 1})).await;
    until_query(&mut globex, "task:9", json!({"4": 1})).await;
    // What the table held before: drained, in whatever order it came.
    for c in [&mut here, &mut there, &mut globex] {
        while c.frame_within(Duration::from_millis(500)).await.is_some() {}
    }

    // User 5 connects on replica a: online, then it joins task:9.
    let mut newcomer = a.connect(&tenant_token("acme", "5", &["task:9"])).await;
    for c in [&mut here, &mut there] {
        assert_eq!(
            presence_event(c).await,
            json!({"event": "presence.online", "payload": {"user": "5"}})
        );
    }
    newcomer.join(&["task:9"]).await;
    for c in [&mut here, &mut there] {
        assert_eq!(
            presence_event(c).await,
            json!({"event": "presence.join", "payload": {"room": "task:9", "user": "5"}})
        );
    }

    // It leaves the room, then goes.
    let left = newcomer
        .request(json!({"type": "unsubscribe", "rooms": ["task:9"]}), 9)
        .await;
    assert_eq!(left["rooms"], json!(["task:9"]));
    for c in [&mut here, &mut there] {
        assert_eq!(
            presence_event(c).await,
            json!({"event": "presence.leave", "payload": {"room": "task:9", "user": "5"}})
        );
    }
    drop(newcomer);
    for c in [&mut here, &mut there] {
        assert_eq!(
            presence_event(c).await,
            json!({"event": "presence.offline", "payload": {"user": "5"}})
        );
    }

    // Neither a subscriber without `presence`, nor another tenant's, heard any of it.
    deaf.expect_silence(Duration::from_millis(300)).await;
    globex.expect_silence(Duration::from_millis(300)).await;
}

#[tokio::test]
async fn a_second_connection_of_a_present_user_is_no_event() {
    let (a, b) = replicas().await;
    let mut listener = a.connect(&tenant_token("acme", "1", &["task:9"])).await;
    listener
        .subscribe(json!({"rooms": ["task:9"], "presence": true}))
        .await;
    assert_eq!(
        presence_event(&mut listener).await,
        json!({"event": "presence.join", "payload": {"room": "task:9", "user": "1"}}),
        "a listener hears its own join too"
    );
    let mut first = b.connect(&tenant_token("acme", "2", &["task:9"])).await;
    first.join(&["task:9"]).await;
    assert_eq!(
        presence_event(&mut listener).await,
        json!({"event": "presence.join", "payload": {"room": "task:9", "user": "2"}})
    );

    // Present through two replicas: it leaves only when gone from both.
    let mut second = a.connect(&tenant_token("acme", "2", &["task:9"])).await;
    second.join(&["task:9"]).await;
    until_query(&mut listener, "task:9", json!({"1": 1, "2": 2})).await;
    drop(first);
    until_query(&mut listener, "task:9", json!({"1": 1, "2": 1})).await;
    listener.expect_silence(Duration::from_millis(500)).await;
    drop(second);
    assert_eq!(
        presence_event(&mut listener).await,
        json!({"event": "presence.leave", "payload": {"room": "task:9", "user": "2"}})
    );
}

#[tokio::test]
async fn with_presence_off_the_query_and_the_option_are_refused() {
    let topic = unique("presence-client-events");
    create_topic(&topic, 1).await;
    let server = Server::start(&task_route(&topic), "").await;
    let mut client = server.connect(&token("9", &["task:3"])).await;

    let answer = client
        .request(json!({"type": "presence", "room": "task:3"}), 1)
        .await;
    assert_eq!(answer["type"], "error");
    assert_eq!(answer["code"], "presence_disabled");
    let (errors, answer) = client
        .subscribe(json!({"rooms": ["task:3"], "presence": true}))
        .await;
    assert!(errors.is_empty());
    assert_eq!(answer["type"], "error");
    assert_eq!(answer["code"], "presence_disabled");

    // Nothing was joined: a record for the room does not reach the client.
    Producer::new()
        .send_json(&topic, json!({"event": "task.updated", "taskId": "3"}))
        .await;
    client.expect_silence(Duration::from_secs(1)).await;
    // Without the option, the same subscribe works.
    client.join(&["task:3"]).await;
}

#[tokio::test]
async fn operators_see_each_replica_s_lease_and_the_lag() {
    let (a, b) = replicas().await;
    let _client = b.connect(&tenant_token("acme", "1", &[])).await;
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    let states = loop {
        let (_, body) = http_get(&a.admin, "/presence").await.unwrap();
        let view: Value = serde_json::from_str(&body).unwrap();
        let states = view["replica_states"].as_array().unwrap().clone();
        // b's counts: the user, and its rooms user:1 and tenant:acme.
        if states.len() == 2 && states.iter().any(|s| s["counts"] == 3) {
            break states;
        }
        assert!(std::time::Instant::now() < deadline, "{view}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    for state in &states {
        let left = state["lease_left_ms"].as_u64().unwrap();
        assert!(left > 0 && left <= 3_000, "{state}");
        assert_eq!(state["waiting_for_snapshot"], false, "{state}");
    }
    // Measured every 5 s (-1 until then): read up to the end, nothing is left to read.
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    while a.metric("roomcast_presence_lag_records").await != 0.0 {
        assert!(
            std::time::Instant::now() < deadline,
            "a lag that never fell"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test]
async fn an_uncompacted_presence_topic_is_warned_of() {
    let presence_topic = unique("presence");
    create_topic(&presence_topic, 1).await;
    let topic = unique("presence-client-events");
    create_topic(&topic, 1).await;
    let extra = format!(
        "{}create_topic = false\n",
        presence_section(&presence_topic)
    );
    let server = Server::start(&task_route(&topic), &extra).await;
    let warned = server.logged("the presence topic is not compacted: it grows without bound, and a replica that starts reads every record ever written (docs/PRESENCE.md, The topic)");
    assert_eq!(warned.len(), 1, "one warning at start");
    assert_eq!(warned[0]["policy"], "delete");
    assert_eq!(warned[0]["level"], "WARN");
}

#[tokio::test]
async fn a_resume_with_presence_hears_joins_from_its_cut_on() {
    let (a, b) = replicas().await;
    let positions = a
        .connect(&tenant_token("acme", "0", &[]))
        .await
        .tracker
        .positions
        .clone();
    let watcher = tenant_token("acme", "1", &["task:9"]);
    let url = format!("{}?resume=1", a.ws_url());
    let mut resumed = Client::connect(&url, &watcher).await.unwrap();
    let answer = resumed.request(json!({"type": "resume", "positions": positions, "rooms": ["task:9"], "presence": true}),
        1,
    )
    .await;
    assert_eq!(answer["type"], "ok", "{answer}");
    assert_eq!(
        presence_event(&mut resumed).await,
        json!({"event": "presence.join", "payload": {"room": "task:9", "user": "1"}})
    );
    let mut newcomer = b.connect(&tenant_token("acme", "2", &["task:9"])).await;
    newcomer.join(&["task:9"]).await;
    assert_eq!(
        presence_event(&mut resumed).await,
        json!({"event": "presence.join", "payload": {"room": "task:9", "user": "2"}})
    );
}

#[tokio::test]
async fn a_query_of_a_large_room_answers_within_its_bound_and_says_so() {
    let topic = unique("presence-client-events");
    create_topic(&topic, 1).await;
    let extra = format!(
        "{}max_query_users = 2\n",
        presence_section(&unique("presence"))
    );
    let server = Server::start(&task_route(&topic), &extra).await;
    let mut clients = Vec::new();
    for user in ["a", "b", "c"] {
        let mut c = server
            .connect(&tenant_token("acme", user, &["task:9"]))
            .await;
        c.join(&["task:9"]).await;
        clients.push(c);
    }
    let asker = &mut clients[0];
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    for id in 1.. {
        let answer = asker
            .request(json!({"type": "presence", "room": "task:9"}), id)
            .await;
        if answer["truncated"] == json!(true) {
            assert_eq!(answer["users"], json!({"a": 1, "b": 1}), "the first two");
            break;
        }
        assert!(answer.get("truncated").is_none(), "{answer}");
        assert!(std::time::Instant::now() < deadline, "{answer}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn only_the_rooms_presence_rooms_names_are_kept_and_status_still_heard() {
    let topic = unique("presence-client-events");
    create_topic(&topic, 1).await;
    let extra = format!(
        "{}rooms = [\"task:*\"]\n",
        presence_section(&unique("presence"))
    );
    let server = Server::start(&task_route(&topic), &extra).await;
    let grants = ["task:9", "feature:x"];
    let mut listener = server.connect(&tenant_token("acme", "1", &grants)).await;
    let (errors, ok) = listener
        .subscribe(json!({"rooms": ["tenant:acme", "task:9", "feature:x"], "presence": true}))
        .await;
    assert!(errors.is_empty() && ok["type"] == "ok", "{errors:?} {ok}");
    until_query(&mut listener, "task:9", json!({"1": 1})).await;
    for room in ["feature:x", "tenant:acme", "user:1"] {
        let refused = listener
            .request(json!({"type": "presence", "room": room}), 7)
            .await;
        assert_eq!(refused["code"], "presence_disabled", "{room}: {refused}");
        assert_eq!(
            refused["message"],
            "presence is not kept for this room (presence.rooms)"
        );
    }
    let (_, body) = http_get(&server.admin, "/presence?tenant=acme")
        .await
        .unwrap();
    let view: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(view["rooms"], json!({"task:9": {"1": 1}}), "{view}");
    assert_eq!(view["users"], json!({"1": 1}), "{view}");

    // The status room is not kept, yet its listeners hear users come and go.
    while listener
        .frame_within(Duration::from_millis(300))
        .await
        .is_some()
    {}
    let mut other = server.connect(&tenant_token("acme", "2", &grants)).await;
    assert_eq!(
        presence_event(&mut listener).await,
        json!({"event": "presence.online", "payload": {"user": "2"}})
    );
    // Joining a room that is not kept is heard by no one.
    other.join(&["feature:x"]).await;
    listener.expect_silence(Duration::from_millis(500)).await;
}
