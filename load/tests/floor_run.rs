//! roomcast-load against roomcast-floor, both real processes over loopback: every record
//! must reach exactly the connections of its room, once, through the client's own framing.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{SystemTime, UNIX_EPOCH};

fn floor_addresses(line: &str) -> (String, String) {
    let field = |key: &str| {
        let at = line.find(key).expect("address logged") + key.len();
        line[at..].split_whitespace().next().unwrap().to_string()
    };
    (field("public="), field("control="))
}

/// A running roomcast-floor (killed on drop) and its public and control addresses.
struct Floor {
    child: Child,
    public: String,
    control: String,
}

impl Floor {
    fn start(args: &[&str]) -> Floor {
        let mut child = Command::new(env!("CARGO_BIN_EXE_roomcast-floor"))
            .args(["--max-seconds", "120"])
            .args(args)
            .stdout(Stdio::piped())
            .spawn()
            .expect("roomcast-floor starts");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let (public, control) = floor_addresses(&line);
        Floor {
            child,
            public,
            control,
        }
    }
}

impl Drop for Floor {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs roomcast-load against `target` (its server and record flags) with `conns`
/// connections in rooms by `dist`, 200 records/s for 1 s of warm-up and 2 measured, and
/// returns its JSON report.
fn load(target: &[&str], conns: &str, dist: &str) -> serde_json::Value {
    let out = std::env::temp_dir().join(format!(
        "roomcast-load-floor-{}-{}.jsonl",
        std::process::id(),
        unique()
    ));
    let status = Command::new(env!("CARGO_BIN_EXE_roomcast-load"))
        .args(["fanout", "--secret", "floor-run-secret-0123456789"])
        .args(target)
        .args([
            "-n", conns, "--dist", dist, "--rate", "200", "--warmup", "1",
        ])
        .args(["--duration", "2", "--drain", "10", "--threads", "2"])
        .arg("--json-out")
        .arg(&out)
        .stdout(Stdio::null())
        .status()
        .expect("roomcast-load runs");
    assert!(status.success(), "roomcast-load failed: {status}");
    let text = std::fs::read_to_string(&out).unwrap();
    let _ = std::fs::remove_file(&out);
    serde_json::from_str(text.trim()).unwrap()
}

fn unique() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos()
}

fn assert_exact(r: &serde_json::Value, sent: u64, fanout: u64) {
    let d = &r["deliveries"];
    assert_eq!(r["records"]["delivered_to_sink"].as_u64(), Some(sent));
    assert_eq!(d["expected"].as_u64(), Some(sent * fanout));
    assert_eq!(d["unique"], d["expected"]);
    for key in ["lost", "duplicates", "misrouted", "out_of_order"] {
        assert_eq!(d[key], 0, "{key}");
    }
}

#[test]
fn every_record_reaches_its_room_once() {
    let floor = Floor::start(&[]);
    let url = format!("ws://{}/ws", floor.public);
    let r = load(
        &["--url", &url, "--floor-control", &floor.control],
        "200",
        "groups:10",
    );
    assert_eq!(r["connections"]["open"], 200);
    assert_eq!(r["target"], "floor");
    // 200 records/s for 3 s; rooms of 10: each record is for the ten connections of its room.
    assert_exact(&r, 600, 10);
    assert_eq!(r["latency_us"]["count"].as_u64(), Some(400 * 10));
}

/// The floor with Kafka's path in it reads a real broker (ROOMCAST_TEST_BROKERS, started by
/// scripts/test), with a topic of this test's own.
#[test]
fn the_floor_fed_by_kafka_delivers_every_record_once() {
    let brokers = std::env::var("ROOMCAST_TEST_BROKERS").expect(
        "ROOMCAST_TEST_BROKERS is not set: run the tests through scripts/test, \
         or start Kafka with scripts/kafka.sh and export its address",
    );
    let topic = format!("floor-kafka-{}", unique());
    let created = Command::new(env!("CARGO_BIN_EXE_roomcast-load"))
        .args(["create-topic", "--brokers", &brokers, "--topic", &topic])
        .status()
        .unwrap();
    assert!(created.success());
    let floor = Floor::start(&["--brokers", &brokers, "--topic", &topic]);
    let url = format!("ws://{}/ws", floor.public);
    let target = [
        "--url",
        &url,
        "--brokers",
        &brokers,
        "--topic",
        &topic,
        "--floor-kafka",
    ];
    let r = load(&target, "100", "user");
    assert_eq!(r["target"], "floor-kafka");
    // One room per user: each record is for one connection.
    assert_exact(&r, 600, 1);
}
