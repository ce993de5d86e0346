//! Failover to a replica that lags: the client's map is ahead of what that replica has read,
//! though not of the log. The replica is made to lag for real: its consumer's fetches are held
//! by the broker for seconds (`fetch.min.bytes` never reached, `fetch.wait.max.ms` long), so
//! records produced after it is ready reach it only when its fetch comes back.

use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::support::*;

const QUIET: Duration = Duration::from_millis(700);

fn task(user: &str, seq: u64) -> Value {
    json!({"taskId": format!("t{seq}"), "userId": user, "seq": seq})
}

fn offsets(events: &[Value]) -> Vec<i64> {
    events
        .iter()
        .map(|e| split_pos(e["pos"].as_str().unwrap()).1)
        .collect()
}

/// A replica whose consumer sees new records only once every `hold_ms`: the broker answers
/// each of its fetches after that long.
async fn lagging_replica(topic: &str, hold_ms: &str) -> Server {
    let env = [
        ("ROOMCAST_KAFKA_FETCH_WAIT_MAX_MS", hold_ms),
        ("ROOMCAST_KAFKA_FETCH_MIN_BYTES", "100000000"),
    ];
    Server::start_with(&task_route(topic), "", &env).await
}

async fn consumed(server: &Server, topic: &str) -> f64 {
    let series = format!("roomcast_records_consumed_total{{topic=\"{topic}\"}}");
    server.metric(&series).await
}

async fn resume_waits(server: &Server, result: &str) -> f64 {
    let series = format!("roomcast_resume_waits_total{{result=\"{result}\"}}");
    server.metric(&series).await
}

/// A client of replica A has offsets 0..=6, misses 7..=9 while it moves, and resumes on
/// replica B, which has read none of them yet. It used to be told to resync ("ahead of the
/// log"); now B waits until it has read past offset 6, replays 7..=9 and goes live: every
/// record after the map exactly once, in order, and none of those B read meanwhile twice.
#[tokio::test]
async fn a_resume_on_a_lagging_replica_waits_for_it_and_misses_nothing() {
    let topic = unique("lagging");
    create_topic(&topic, 1).await;
    let a = Server::start(&task_route(&topic), "").await;
    let b = lagging_replica(&topic, "6000").await;
    let token = token("moving", &[]);
    let p = Producer::new();

    let mut on_a = a.connect(&token).await;
    for seq in 0..7 {
        p.send_json(&topic, task("moving", seq)).await;
    }
    assert_eq!(offsets(&on_a.events(7).await), (0..7).collect::<Vec<_>>());
    let map = on_a.tracker.clone();
    drop(on_a);
    for seq in 7..10 {
        p.send_json(&topic, task("moving", seq)).await;
    }
    assert_eq!(
        consumed(&b, &topic).await,
        0.0,
        "replica B has read nothing yet"
    );

    let asked = Instant::now();
    let (mut c, frames) = Client::resume(&b, &token, &map, &[]).await;
    let waited = asked.elapsed();
    assert!(
        frames.iter().all(|f| f["type"] != "resync"),
        "told to resync: {frames:?}"
    );
    // The cut is wherever B's consumer stood once past the map: what is before it is
    // replayed, from memory, and the rest comes live.
    let cut = frames[frames.len() - 2]["positions"][format!("{topic}:0")]
        .as_i64()
        .expect("the cut names the partition");
    assert!((6..10).contains(&cut), "the cut {cut}");
    let mut events = only_events(&frames);
    assert_eq!(offsets(&events), (7..=cut).collect::<Vec<_>>());
    let ok = frames.last().unwrap();
    assert_eq!(ok["replayed"], events.len());
    let source = if cut > 6 { "memory" } else { "nothing" };
    assert_eq!(ok["source"], source, "{}", short(ok));

    for seq in 10..15 {
        p.send_json(&topic, task("moving", seq)).await;
    }
    let live = 15 - 7 - events.len();
    events.extend(c.events(live).await);
    assert_eq!(offsets(&events), (7..15).collect::<Vec<_>>());
    c.expect_silence(QUIET).await;
    assert_eq!(resume_waits(&b, "caught_up").await, 1.0);
    assert_eq!(resume_waits(&b, "behind").await, 0.0);
    assert!(waited < Duration::from_secs(10), "waited {waited:?}");
}

/// A replica still behind the map when the wait ends says so, with a retryable error, and
/// closes with 1013: the client's map stays valid, for a later resume or another replica.
#[tokio::test]
async fn a_replica_too_far_behind_answers_lagging_not_resync() {
    let topic = unique("lagging-far");
    create_topic(&topic, 1).await;
    // Its next fetch comes back 30 s after it became ready: past the resume's 10 s.
    let b = lagging_replica(&topic, "30000").await;
    let p = Producer::new();
    for seq in 0..10 {
        p.send_json(&topic, task("far", seq)).await;
    }
    let url = format!("{}?resume=1", b.ws_url());
    let mut c = Client::connect(&url, &token("far", &[]))
        .await
        .unwrap_or_else(|(s, body)| panic!("refused: {s} {body}"));
    let positions = json!({ format!("{topic}:0"): 6 });
    let asked = Instant::now();
    c.send(json!({"type": "resume", "id": 1, "positions": positions}))
        .await;
    let answer = c.next_or_close().await.expect("an answer");
    let waited = asked.elapsed();
    assert_eq!(answer["type"], "error", "{answer}");
    assert_eq!(answer["id"], 1);
    assert_eq!(answer["code"], "lagging");
    let message = answer["message"].as_str().unwrap();
    assert!(
        message.contains(&format!("{topic}:0 up to -1, behind the position 6")),
        "{message}"
    );
    assert_eq!(c.next_or_close().await, Err(Some(1013)));
    assert!(
        waited >= Duration::from_secs(10) && waited < Duration::from_secs(20),
        "answered after {waited:?}"
    );
    assert_eq!(resume_waits(&b, "behind").await, 1.0);
    assert_eq!(
        consumed(&b, &topic).await,
        0.0,
        "still behind at the answer"
    );
    let resyncs = b.metric("roomcast_resumes_total{source=\"resync\"}").await;
    assert_eq!(resyncs, 0.0);
}

/// A map past the end of the log itself (a recreated or truncated topic) is still a resync,
/// at once, on a replica that lags too: the log's end, not the replica's, tells them apart.
#[tokio::test]
async fn a_map_past_the_end_of_the_log_still_resyncs_at_once_on_a_lagging_replica() {
    let topic = unique("lagging-short");
    create_topic(&topic, 1).await;
    let b = lagging_replica(&topic, "6000").await;
    let p = Producer::new();
    for seq in 0..3 {
        p.send_json(&topic, task("short", seq)).await;
    }
    let mut map = Tracker::default();
    map.positions.insert(format!("{topic}:0"), 50);
    let asked = Instant::now();
    let (_c, frames) = Client::resume(&b, &token("short", &[]), &map, &[]).await;
    assert!(
        asked.elapsed() < Duration::from_secs(3),
        "{:?}",
        asked.elapsed()
    );
    assert_eq!(frames[0]["type"], "resync", "{frames:?}");
    assert!(frames[0]["reason"].as_str().unwrap().contains("recreated"));
    assert_eq!(frames.last().unwrap()["source"], "resync");
    assert_eq!(resume_waits(&b, "caught_up").await, 0.0);
    assert_eq!(resume_waits(&b, "behind").await, 0.0);
}
