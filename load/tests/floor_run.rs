//! roomcast-load against roomcast-floor, both real processes over loopback: every record
//! must reach exactly the connections of its room, once, through the client's own framing.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

fn floor_addresses(line: &str) -> (String, String) {
    let field = |key: &str| {
        let at = line.find(key).expect("address logged") + key.len();
        line[at..].split_whitespace().next().unwrap().to_string()
    };
    (field("public="), field("control="))
}

#[test]
fn every_record_reaches_its_room_once() {
    let mut floor = Command::new(env!("CARGO_BIN_EXE_roomcast-floor"))
        .args(["--max-seconds", "120"])
        .stdout(Stdio::piped())
        .spawn()
        .expect("roomcast-floor starts");
    let mut line = String::new();
    BufReader::new(floor.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let (public, control) = floor_addresses(&line);
    let out =
        std::env::temp_dir().join(format!("roomcast-load-floor-{}.jsonl", std::process::id()));
    let status = Command::new(env!("CARGO_BIN_EXE_roomcast-load"))
        .args([
            "--url",
            &format!("ws://{public}/ws"),
            "--floor-control",
            &control,
        ])
        .args(["--secret", "floor-run-secret-0123456789", "-n", "200"])
        .args(["--dist", "groups:10", "--rate", "200", "--warmup", "1"])
        .args(["--duration", "2", "--drain", "5", "--threads", "2"])
        .arg("--json-out")
        .arg(&out)
        .stdout(Stdio::null())
        .status()
        .expect("roomcast-load runs");
    let _ = floor.kill();
    let _ = floor.wait();
    assert!(status.success(), "roomcast-load failed: {status}");
    let text = std::fs::read_to_string(&out).unwrap();
    let _ = std::fs::remove_file(&out);
    let r: serde_json::Value = serde_json::from_str(text.trim()).unwrap();
    let d = &r["deliveries"];
    let sent = r["records"]["delivered_to_sink"].as_u64().unwrap();
    assert_eq!(r["connections"]["open"], 200);
    assert_eq!(sent, 600, "200 records/s for 3 s");
    // Rooms of 10: each record is for the ten connections of room seq mod 20.
    assert_eq!(d["expected"].as_u64(), Some(sent * 10));
    assert_eq!(d["unique"], d["expected"]);
    for key in ["lost", "duplicates", "misrouted", "out_of_order"] {
        assert_eq!(d[key], 0, "{key}");
    }
    assert_eq!(r["latency_us"]["count"].as_u64(), Some(400 * 10));
}
