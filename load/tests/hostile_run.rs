//! roomcast-load's hostile mode end to end at a tiny scale: the real roomcast binary (the one
//! built beside roomcast-load, or ROOMCAST_BIN) and the real broker (ROOMCAST_TEST_BROKERS).
//! Every phase runs, the bystander is watched through all of them, and what the attacks leave
//! behind is gone again at the end.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{SystemTime, UNIX_EPOCH};

const SECRET: &str = "hostile-run-secret-0123456789";

fn unique() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos()
}

/// The server binary: ROOMCAST_BIN, else `roomcast` beside roomcast-load (the workspace's
/// build, as scripts/test makes it before testing).
fn roomcast_bin() -> PathBuf {
    let bin = std::env::var_os("ROOMCAST_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_BIN_EXE_roomcast-load")).with_file_name("roomcast")
        });
    assert!(
        bin.exists(),
        "{} is missing: build the workspace first (cargo build --workspace) or set ROOMCAST_BIN",
        bin.display()
    );
    bin
}

fn config(topic: &str, brokers: &str) -> String {
    format!(
        r#"[server]
listen = "127.0.0.1:0"
admin_listen = "127.0.0.1:0"
name = "hostile-{topic}"

[kafka]
brokers = "{brokers}"
metadata_refresh_seconds = 1

[auth]
secret = "{SECRET}"

[[route]]
topic = "{topic}"
event = "task:update"
rooms = ["user:{{userId}}", "task:{{taskId}}"]
"#
    )
}

#[test]
fn every_phase_runs_and_the_bystander_is_watched_throughout() {
    let brokers = std::env::var("ROOMCAST_TEST_BROKERS").expect(
        "ROOMCAST_TEST_BROKERS is not set: run the tests through scripts/test, \
         or start Kafka with scripts/kafka.sh and export its address",
    );
    let bin = roomcast_bin();
    let dir = std::env::temp_dir().join(format!("roomcast-hostile-{}", unique()));
    std::fs::create_dir_all(&dir).unwrap();
    let topic = format!("hostile-{}", unique());
    let load = env!("CARGO_BIN_EXE_roomcast-load");
    let created = Command::new(load)
        .args(["create-topic", "--brokers", &brokers, "--topic", &topic])
        .stdout(Stdio::null())
        .status()
        .unwrap();
    assert!(created.success());
    let conf = dir.join("roomcast.toml");
    std::fs::write(&conf, config(&topic, &brokers)).unwrap();
    let out = dir.join("report.jsonl");
    let status = Command::new(load)
        .args([
            "hostile",
            "--secret",
            SECRET,
            "--brokers",
            &brokers,
            "--topic",
            &topic,
        ])
        .arg("--server-bin")
        .arg(&bin)
        .arg("--server-config")
        .arg(&conf)
        .arg("--server-log")
        .arg(dir.join("server.log"))
        .args(["--hostile-scale", "0.005", "--phase-seconds", "2"])
        .args([
            "--settle-seconds",
            "2",
            "--recover-seconds",
            "10",
            "--threads",
            "2",
        ])
        .arg("--json-out")
        .arg(&out)
        .stdout(Stdio::null())
        .status()
        .expect("roomcast-load runs");
    assert!(status.success(), "roomcast-load failed: {status}");
    let r: serde_json::Value =
        serde_json::from_str(std::fs::read_to_string(&out).unwrap().trim()).unwrap();
    let _ = std::fs::remove_dir_all(&dir);

    let names: Vec<&str> = r["windows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        [
            "quiet",
            "filter",
            "pre-upgrade",
            "rooms",
            "flood",
            "burst",
            "end"
        ]
    );
    for w in r["windows"].as_array().unwrap() {
        assert!(w["bystander"]["produced"].as_u64().unwrap() > 0, "{w}");
        assert!(w["healthz"]["probes"].as_u64().unwrap() > 0, "{w}");
    }
    // Quiet and unattacked: every record arrives.
    assert_eq!(r["windows"][0]["bystander"]["lost"], 0);
    assert_eq!(r["windows"][6]["bystander"]["lost"], 0);

    // 349 KB of request head is more than any server reads before it answers 431.
    let head = &r["windows"][2]["attack"]["head"];
    assert_eq!(head["connections"], 2);
    assert_eq!(head["outcomes"]["answered 431"], 2, "{head}");

    // The burst: 50 connections of their own users asking for 256 rooms each: the default
    // limit counts their own user room, so 255 are admitted and one refused; once they are
    // closed only the bystander's connection and rooms are left.
    let burst = &r["windows"][5]["attack"];
    assert_eq!(burst["outcomes"]["ok"], 50, "{burst}");
    assert_eq!(burst["rooms_admitted"], 50 * 255);
    assert_eq!(burst["room_errors"]["too_many_rooms"], 50, "{burst}");
    assert_eq!(burst["peak"]["connections"], 51.0);
    assert_eq!(burst["after_settle"]["connections"], 1.0);
    // user:bystander and task:bystander.
    assert_eq!(burst["after_settle"]["rooms"], 2.0);

    let rss = &r["rss"];
    assert!(rss["baseline_kib"].as_u64().unwrap() > 0);
    assert!(rss["end_kib"].as_u64().unwrap() > 0);
}
