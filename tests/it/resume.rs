//! Nothing lost: positions, resume from memory and from Kafka, resync, slow consumers.

use std::time::Duration;

use serde_json::{json, Value};

use crate::support::*;

const QUIET: Duration = Duration::from_millis(700);

fn task(user: &str, seq: u64) -> Value {
    json!({"taskId": format!("t{seq}"), "userId": user, "seq": seq})
}

fn seqs(events: &[Value]) -> Vec<u64> {
    events
        .iter()
        .map(|e| e["payload"]["seq"].as_u64().unwrap())
        .collect()
}

/// Produces `n` records for `mine` and `n` for `other`, interleaved, with seq from `from`.
async fn produce_mixed(p: &Producer, topic: &str, mine: &str, other: &str, from: u64, n: u64) {
    let sends = (from..from + n).flat_map(|seq| {
        [(mine, seq), (other, seq)].map(|(user, seq)| {
            let value = task(user, seq).to_string();
            async move { p.send(topic, value.as_bytes()).await }
        })
    });
    futures_util::future::join_all(sends).await;
}

/// Connects, receives `live` records, and disconnects: returns what the client kept.
async fn session_then_disconnect(server: &Server, topic: &str, user: &str, live: u64) -> Tracker {
    let mut c = server.connect(&token(user, &[])).await;
    let p = Producer::new();
    for seq in 0..live {
        p.send_json(topic, task(user, seq)).await;
    }
    c.events(live as usize).await;
    c.tracker
}

#[tokio::test]
async fn resume_replays_exactly_the_missed_records_from_memory_then_goes_live() {
    let topic = unique("resume");
    create_topic(&topic, 1).await;
    let server = Server::start(&task_route(&topic), "").await;
    let tracker = session_then_disconnect(&server, &topic, "r", 3).await;
    let p = Producer::new();
    produce_mixed(&p, &topic, "r", "someone-else", 100, 1000).await;
    server.wait_consumed(&topic, 2003).await;

    let (mut c, frames) = Client::resume(&server, &token("r", &[]), &tracker, &[]).await;
    let replayed = only_events(&frames);
    assert_eq!(seqs(&replayed), (100..1100).collect::<Vec<_>>());
    let ok = frames.last().unwrap();
    assert_eq!(ok["replayed"], 1000);
    assert_eq!(ok["source"], "memory");
    assert_eq!(ok["rooms"], json!(["user:r"]));
    // The cut follows the replay, so the client's map is complete again.
    assert_eq!(frames[frames.len() - 2]["type"], "positions");

    for seq in 2000..2005 {
        p.send_json(&topic, task("r", seq)).await;
    }
    assert_eq!(seqs(&c.events(5).await), (2000..2005).collect::<Vec<_>>());
    c.expect_silence(QUIET).await;
    let memory = server
        .metric("roomcast_resumes_total{source=\"memory\"}")
        .await;
    assert_eq!(memory, 1.0);
}

/// A client that keeps what PROTOCOL.md says to keep, and drops before its resume is
/// answered, resumes again with a map that still has the whole gap ahead of it: a `?resume=1`
/// welcome gives it nothing to store.
#[tokio::test]
async fn a_client_dropped_before_its_resume_is_answered_still_gets_the_whole_gap() {
    let topic = unique("resume-dropped");
    create_topic(&topic, 1).await;
    let server = Server::start(&task_route(&topic), "").await;
    let token = token("d", &[]);
    let before = session_then_disconnect(&server, &topic, "d", 2).await;
    let p = Producer::new();
    produce_mixed(&p, &topic, "d", "not-d", 100, 50).await;
    server.wait_consumed(&topic, 102).await;

    let url = format!("{}?resume=1", server.ws_url());
    let mut dropped = Client::connect(&url, &token)
        .await
        .unwrap_or_else(|(s, b)| panic!("refused: {s} {b}"));
    let welcome = dropped.welcome.clone();
    let mut kept = before.clone();
    if let Some(from_welcome) = Tracker::from_welcome(&welcome) {
        kept = from_welcome;
    }
    dropped
        .send(json!({"type": "resume", "id": 1, "positions": kept.positions, "rooms": []}))
        .await;
    drop(dropped);

    let (mut c, frames) = Client::resume(&server, &token, &kept, &[]).await;
    assert_eq!(seqs(&only_events(&frames)), (100..150).collect::<Vec<_>>());
    assert_eq!(frames.last().unwrap()["replayed"], 50);
    assert_eq!(
        welcome.get("positions"),
        None,
        "a ?resume=1 welcome has no positions: {welcome}"
    );
    assert_eq!(kept.positions, before.positions);
    c.expect_silence(QUIET).await;
}

#[tokio::test]
async fn resume_beyond_the_buffer_is_served_from_kafka() {
    let topic = unique("resume-kafka");
    create_topic(&topic, 1).await;
    let server = Server::start(&task_route(&topic), "[resume]\nbuffer_bytes = 20000\n").await;
    let tracker = session_then_disconnect(&server, &topic, "k", 2).await;
    let p = Producer::new();
    produce_mixed(&p, &topic, "k", "another", 10, 1000).await;
    server.wait_consumed(&topic, 2002).await;

    let (mut c, frames) = Client::resume(&server, &token("k", &[]), &tracker, &[]).await;
    assert_eq!(seqs(&only_events(&frames)), (10..1010).collect::<Vec<_>>());
    assert_eq!(frames.last().unwrap()["source"], "kafka");
    p.send_json(&topic, task("k", 5000)).await;
    assert_eq!(seqs(&c.events(1).await), [5000]);
    c.expect_silence(QUIET).await;
}

/// A replica restarted (or scaled up) accepts connections before it has read its partitions
/// up to their head: a resume it answered from what it had read so far found the client's
/// position "ahead of the log", told it to resync, and never delivered the gap, which it read
/// only to warm its buffer.
#[tokio::test]
async fn a_resume_to_a_replica_still_starting_replays_the_gap() {
    let topic = unique("resume-starting");
    create_topic(&topic, 2).await;
    let p = Producer::new();
    // A long warm-up: many records to read back before the replica is at the head.
    for seq in 0..2000 {
        let value = task("starting", seq).to_string();
        p.send_to(&topic, Some((seq % 2) as i32), value.as_bytes(), &[])
            .await;
    }
    // The client had everything up to offset 900 of each partition (seq 1801 and before).
    let mut tracker = Tracker::default();
    for partition in 0..2 {
        tracker
            .positions
            .insert(format!("{topic}:{partition}"), 900);
    }
    let server = Server::launch(&task_route(&topic), "", "", &[]);
    let (_c, frames) = Client::resume(&server, &token("starting", &[]), &tracker, &[]).await;
    assert_eq!(frames[0]["type"], "event", "{}", short(&frames[0]));
    let ok = frames.last().unwrap();
    assert_eq!(ok["replayed"], 198, "{}", short(ok));
    let mut replayed = seqs(&only_events(&frames));
    replayed.sort_unstable();
    assert_eq!(replayed, (1802..2000).collect::<Vec<u64>>());
}

#[tokio::test]
async fn too_old_or_impossible_positions_get_resync() {
    let topic = unique("resync");
    create_topic(&topic, 1).await;
    let extra = "[resume]\nbuffer_bytes = 2000\nmax_age_seconds = 1\n";
    let server = Server::start(&task_route(&topic), extra).await;
    let tracker = session_then_disconnect(&server, &topic, "old", 1).await;
    let p = Producer::new();
    for seq in 10..200 {
        p.send_json(&topic, task("old", seq)).await;
    }
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let (_c, frames) = Client::resume(&server, &token("old", &[]), &tracker, &[]).await;
    assert_eq!(frames[0]["type"], "resync", "{frames:?}");
    assert!(only_events(&frames).is_empty());
    assert_eq!(frames.last().unwrap()["source"], "resync");

    // Positions ahead of the log: what a client of a deleted and recreated topic holds.
    let mut ahead = Tracker::default();
    ahead.positions.insert(format!("{topic}:0"), 1_000_000);
    let (_c, frames) = Client::resume(&server, &token("old", &[]), &ahead, &[]).await;
    assert_eq!(frames[0]["type"], "resync");
    assert!(frames[0]["reason"].as_str().unwrap().contains("recreated"));
    let resyncs = server
        .metric("roomcast_resumes_total{source=\"resync\"}")
        .await;
    assert_eq!(resyncs, 2.0);
}

#[tokio::test]
async fn a_gap_older_than_the_age_limit_gets_resync_though_nothing_came_after_it() {
    let topic = unique("resync-quiet");
    create_topic(&topic, 1).await;
    let extra = "[resume]\nbuffer_max_age_seconds = 1\nmax_age_seconds = 2\n";
    let server = Server::start(&task_route(&topic), extra).await;
    let tracker = session_then_disconnect(&server, &topic, "quiet", 1).await;
    let p = Producer::new();
    for seq in 10..13 {
        p.send_json(&topic, task("quiet", seq)).await;
    }
    server.wait_consumed(&topic, 4).await;
    // The partition stays quiet past both limits.
    tokio::time::sleep(Duration::from_millis(3500)).await;
    let (_c, frames) = Client::resume(&server, &token("quiet", &[]), &tracker, &[]).await;
    assert_eq!(frames[0]["type"], "resync", "{frames:?}");
    assert!(only_events(&frames).is_empty());
    assert_eq!(frames.last().unwrap()["source"], "resync");
}

#[tokio::test]
async fn a_client_that_never_heard_from_a_partition_still_resumes() {
    let topic = unique("resume-partitions");
    create_topic(&topic, 2).await;
    let server = Server::start(&task_route(&topic), "").await;
    let mut c = server.connect(&token("g", &[])).await;
    assert_eq!(
        c.tracker.positions.len(),
        2,
        "the welcome covers every partition"
    );
    let p = Producer::new();
    let send = |partition: i32, seq: u64| {
        let value = task("g", seq).to_string();
        let p = &p;
        let topic = &topic;
        async move {
            p.send_to(topic, Some(partition), value.as_bytes(), &[])
                .await
        }
    };
    send(0, 1).await;
    c.events(1).await;
    let tracker = c.tracker.clone();
    drop(c);
    for seq in 10..20 {
        send(1, seq).await;
    }
    for seq in 20..25 {
        send(0, seq).await;
    }
    server.wait_consumed(&topic, 16).await;
    let (_c, frames) = Client::resume(&server, &token("g", &[]), &tracker, &[]).await;
    let events = only_events(&frames);
    let mut by_partition: Vec<(String, u64)> = events
        .iter()
        .map(|e| {
            (
                split_pos(e["pos"].as_str().unwrap()).0,
                e["payload"]["seq"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(by_partition.len(), 15);
    by_partition.sort_by_key(|(key, _)| key.clone());
    let p0: Vec<u64> = by_partition
        .iter()
        .filter(|(k, _)| k.ends_with(":0"))
        .map(|x| x.1)
        .collect();
    let p1: Vec<u64> = by_partition
        .iter()
        .filter(|(k, _)| k.ends_with(":1"))
        .map(|x| x.1)
        .collect();
    assert_eq!(p0, (20..25).collect::<Vec<_>>());
    assert_eq!(p1, (10..20).collect::<Vec<_>>());
}

#[tokio::test]
async fn a_restarted_server_serves_the_resume_from_its_warmed_buffer() {
    let topic = unique("resume-restart");
    create_topic(&topic, 1).await;
    let mut first = Server::start(&task_route(&topic), "").await;
    let tracker = session_then_disconnect(&first, &topic, "f", 2).await;
    first.sigterm();
    first
        .wait_exit(Duration::from_secs(15))
        .expect("first server exited");
    let p = Producer::new();
    produce_mixed(&p, &topic, "f", "not-f", 100, 100).await;
    let second = Server::start(&task_route(&topic), "").await;
    second.wait_consumed(&topic, 202).await;
    let (mut c, frames) = Client::resume(&second, &token("f", &[]), &tracker, &[]).await;
    assert_eq!(seqs(&only_events(&frames)), (100..200).collect::<Vec<_>>());
    assert_eq!(frames.last().unwrap()["source"], "memory");
    c.expect_silence(QUIET).await;
}

#[tokio::test]
async fn watermarks_never_claim_more_than_was_delivered() {
    let topic = unique("watermarks");
    create_topic(&topic, 1).await;
    let extra = "[resume]\npositions_interval_seconds = 0.05\n";
    let server = Server::start(&task_route(&topic), extra).await;
    let mut c = server.connect(&token("w", &[])).await;
    c.see_positions = true;
    let key = format!("{topic}:0");
    let start = c.welcome["positions"][&key].as_i64().unwrap();
    let p = Producer::new();
    let producing = async {
        for seq in 0..300 {
            p.send_json(&topic, task(if seq % 3 == 0 { "w" } else { "x" }, seq))
                .await;
        }
    };
    let reading = async {
        let mut received: Vec<i64> = Vec::new();
        let mut watermarks = 0;
        while received.len() < 100 {
            let f = c.frame().await.expect("frame");
            match f["type"].as_str().unwrap() {
                "event" => received.push(split_pos(f["pos"].as_str().unwrap()).1),
                "positions" => {
                    watermarks += 1;
                    let claimed = f["positions"][&key].as_i64().unwrap();
                    // Every record of this client's room up to `claimed` was already here:
                    // records for "w" are every third one, offsets start+1+3k.
                    let expected = (start + 1..=claimed)
                        .filter(|o| (o - start - 1) % 3 == 0)
                        .count();
                    assert_eq!(
                        received.len(),
                        expected,
                        "watermark {claimed} after {received:?}"
                    );
                }
                other => panic!("unexpected {other}"),
            }
        }
        watermarks
    };
    let (_, watermarks) = tokio::join!(producing, reading);
    assert!(watermarks > 0, "no watermark seen");
}

#[tokio::test]
async fn a_slow_client_is_closed_with_4008_and_its_resume_brings_back_everything() {
    let topic = unique("slow");
    create_topic(&topic, 1).await;
    let extra =
        "[websocket]\nqueue_frames = 2000\nqueue_bytes = 8388608\nshed_low_priority_after = 1000\n";
    let server = Server::start(&task_route(&topic), extra).await;
    let grant = token("slow", &["task:*"]);
    let mut fast = server.connect(&token("fast", &["task:*"])).await;
    fast.join(&["task:shared"]).await;
    let mut slow = Client::connect_small_buffer(&server.ws_url(), &grant).await;
    slow.join(&["task:shared"]).await;

    let total = 5000u64;
    // Paced (about 2,500 records/s, 10 MB/s), so the fast client keeps up on a busy machine.
    let producing = produce_padded(&topic, "shared", total, 4000, Duration::from_millis(40));
    // The fast client gets every record, in order, while the slow one is not reading.
    let (_, fast_got) = tokio::join!(producing, fast.events(total as usize));
    assert_eq!(seqs(&fast_got), (0..total).collect::<Vec<_>>());

    let mut got = Vec::new();
    let code = loop {
        match slow.next_or_close().await {
            Ok(f) => {
                if f["type"] == "event" {
                    got.push(f["payload"]["seq"].as_u64().unwrap());
                }
            }
            Err(code) => break code,
        }
    };
    // Read within 2 s of the close, the client gets the 4008 close frame; later, the server
    // has given the close frame up and reset the connection (the client sees no close code).
    // Either way the server counts a 4008, and the resume brings back everything.
    assert!(matches!(code, Some(4008) | None), "{code:?}");
    assert!(
        (got.len() as u64) < total,
        "closed before receiving everything"
    );
    let closed = "roomcast_connections_closed_total{code=\"4008\"}";
    let deadline = tokio::time::Instant::now() + WAIT;
    while server.metric(closed).await < 1.0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the close not counted as 4008"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    server.wait_consumed(&topic, total).await;
    let (_c, frames) = Client::resume(&server, &grant, &slow.tracker, &["task:shared"]).await;
    got.extend(seqs(&only_events(&frames)));
    assert_eq!(got.len() as u64, total, "nothing lost, nothing twice");
    assert!(got.iter().copied().eq(0..total), "in order");
    let closes = server.metric("roomcast_slow_consumer_closes_total").await;
    assert_eq!(closes, 1.0);
}

#[tokio::test]
async fn low_priority_frames_are_shed_and_counted_normal_ones_never() {
    let topic = unique("shed");
    create_topic(&topic, 1).await;
    let extra = "[websocket]\nqueue_frames = 100000\nqueue_bytes = 268435456\nshed_low_priority_after = 8\n";
    let server = Server::start(&tenantless_entity_route(&topic), extra).await;
    let mut c =
        Client::connect_small_buffer(&server.ws_url(), &token("lazy", &["feature:users"])).await;
    c.join(&["feature:users"]).await;
    let pad = "y".repeat(4000);
    let n = 2000u64;
    let p = Producer::new();
    let sends = (0..2 * n).map(|seq| {
        let priority = if seq % 2 == 0 { "normal" } else { "low" };
        let value = json!({"feature": "users", "entity": "user", "action": "updated",
            "data": {"id": "1", "seq": seq, "pad": pad}, "meta": {"priority": priority}})
        .to_string();
        let p = &p;
        let topic = &topic;
        async move { p.send(topic, value.as_bytes()).await }
    });
    futures_util::future::join_all(sends).await;
    // Let the queue build up behind the unread socket.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut normal = Vec::new();
    let mut low = 0u64;
    while let Some(f) = c.frame_within(Duration::from_secs(3)).await {
        assert_eq!(f["type"], "event", "{}", short(&f));
        let seq = f["payload"]["data"]["seq"].as_u64().unwrap();
        if seq % 2 == 0 {
            normal.push(seq);
        } else {
            low += 1;
        }
    }
    assert_eq!(
        normal,
        (0..2 * n).step_by(2).collect::<Vec<_>>(),
        "every normal frame, in order"
    );
    let shed = server.metric("roomcast_frames_shed_total").await as u64;
    assert!(shed > 0, "nothing was shed: the test did not build a queue");
    assert_eq!(
        low + shed,
        n,
        "every low frame is either delivered or counted as shed"
    );
}

#[tokio::test]
async fn positions_from_a_deleted_and_recreated_topic_get_resync() {
    let topic = unique("recreated");
    create_topic(&topic, 1).await;
    // History before the server starts: the old log's head is well past the new log's start.
    let p = Producer::new();
    for seq in 0..10 {
        p.send_json(&topic, task("someone", seq)).await;
    }
    let server = Server::start(&task_route(&topic), "").await;
    let tracker = session_then_disconnect(&server, &topic, "rc", 20).await;
    let mut live = server.connect(&token("rc", &[])).await;
    delete_topic(&topic).await;
    // Recreating a topic right after deleting it can be refused for a moment.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !try_create_topic(&topic, 1).await {
        assert!(
            std::time::Instant::now() < deadline,
            "topic never recreated"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    for seq in 100..103 {
        p.send_json(&topic, task("rc", seq)).await;
    }
    // The server notices the log went back and reads the new one from its start, live.
    assert_eq!(seqs(&live.events(3).await), [100, 101, 102]);
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let (_c, frames) = Client::resume(&server, &token("rc", &[]), &tracker, &[]).await;
        if frames[0]["type"] == "resync" {
            assert!(frames[0]["reason"].as_str().unwrap().contains("recreated"));
            let cut = frames[frames.len() - 2]["positions"][format!("{topic}:0")].as_i64();
            let cut = cut.expect("the cut names the partition");
            assert!(
                (0..=2).contains(&cut),
                "the cut {cut} is the new log's position"
            );
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "never told to resync: {frames:?}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// With the default buffers, a stalled socket takes megabytes into the kernel before the
/// queue fills; `send_buffer_bytes` bounds that, so 1.5 MB is enough to close it with 4008.
#[tokio::test]
async fn a_send_buffer_limit_closes_a_stalled_client_sooner() {
    let topic = unique("sndbuf");
    create_topic(&topic, 1).await;
    let extra = "[websocket]\nsend_buffer_bytes = 16384\nqueue_frames = 200\nshed_low_priority_after = 100\n";
    let server = Server::start(&task_route(&topic), extra).await;
    let mut fast = server.connect(&token("fast", &["task:*"])).await;
    fast.join(&["task:stall"]).await;
    let mut stalled = server.connect(&token("stalled", &["task:*"])).await;
    stalled.join(&["task:stall"]).await;

    let total = 1500u64;
    // Paced, so the reading client's own 200-frame queue never fills.
    let producing = produce_padded(&topic, "stall", total, 1000, Duration::from_millis(50));
    let (_, fast_got) = tokio::join!(producing, fast.events(total as usize));
    assert_eq!(seqs(&fast_got), (0..total).collect::<Vec<_>>());
    let deadline = tokio::time::Instant::now() + WAIT;
    while server.metric("roomcast_slow_consumer_closes_total").await < 1.0 {
        assert!(tokio::time::Instant::now() < deadline, "no 4008 close");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let code = loop {
        match stalled.next_or_close().await {
            Ok(_) => {}
            Err(code) => break code,
        }
    };
    assert_eq!(code, Some(4008));
}

/// Produces records `0..total` for task room `task`, each padded to about `pad` bytes, in
/// batches of 100 with `pause` between them.
async fn produce_padded(topic: &str, task: &str, total: u64, pad: usize, pause: Duration) {
    let pad = "p".repeat(pad);
    let p = Producer::new();
    for chunk in (0..total).collect::<Vec<_>>().chunks(100) {
        let sends = chunk.iter().map(|&seq| {
            let value =
                json!({"taskId": task, "userId": "nobody", "seq": seq, "pad": pad}).to_string();
            let p = &p;
            async move { p.send(topic, value.as_bytes()).await }
        });
        futures_util::future::join_all(sends).await;
        tokio::time::sleep(pause).await;
    }
}
