//! Operations: metrics that promtool accepts, health endpoints, drain on SIGTERM, config checks.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::json;

use crate::support::*;

#[tokio::test]
async fn metrics_pass_promtool_and_carry_no_identity_labels() {
    let topic = unique("metrics");
    create_topic(&topic, 2).await;
    let server = Server::start(&task_route(&topic), "").await;
    let mut c = server.connect(&token("met", &[])).await;
    Producer::new()
        .send_json(&topic, json!({"taskId": "1", "userId": "met"}))
        .await;
    c.events(1).await;
    let metrics = server.metrics().await;
    for name in [
        "roomcast_connections 1",
        "roomcast_deliveries_total 1",
        "roomcast_kafka_assigned_partitions 2",
        "roomcast_ready 1",
    ] {
        assert!(
            metrics.lines().any(|l| l == name),
            "missing {name:?} in\n{metrics}"
        );
    }
    assert!(metrics.contains(&format!(
        "roomcast_kafka_consumer_lag{{partition=\"0\",topic=\"{topic}\"}}"
    )));

    let labels = label_names(&metrics);
    let allowed = [
        "code",
        "le",
        "partition",
        "reason",
        "result",
        "source",
        "topic",
    ];
    for name in labels.keys() {
        assert!(
            allowed.contains(&name.as_str()),
            "unexpected label {name:?}"
        );
    }

    let mut promtool = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool is installed (scripts/test installs it)");
    use std::io::Write;
    promtool
        .stdin
        .take()
        .unwrap()
        .write_all(metrics.as_bytes())
        .unwrap();
    let out = promtool.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test]
async fn the_public_listener_serves_the_demo_page_and_the_sdk_it_imports() {
    let topic = unique("static");
    create_topic(&topic, 1).await;
    let server = Server::start(&task_route(&topic), "").await;
    let (status, bundle) = http_get(&server.public, "/roomcast.js").await.unwrap();
    assert_eq!(status, 200);
    assert_eq!(bundle, include_str!("../../static/roomcast.js"));
    let (status, page) = http_get(&server.public, "/").await.unwrap();
    assert_eq!(status, 200);
    assert!(
        page.contains(r#"from "./roomcast.js""#),
        "the page does not import the served bundle"
    );
}

#[tokio::test]
async fn health_and_stats() {
    let topic = unique("health");
    create_topic(&topic, 3).await;
    let server = Server::start(&task_route(&topic), "").await;
    assert_eq!(http_get(&server.admin, "/healthz").await.unwrap().0, 200);
    assert_eq!(http_get(&server.admin, "/readyz").await.unwrap().0, 200);
    let (status, body) = http_get(&server.admin, "/stats").await.unwrap();
    assert_eq!(status, 200);
    let stats: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(stats["ready"], true);
    assert_eq!(stats["partitions"].as_array().unwrap().len(), 3);
    // The admin endpoints are not on the public listener, and /ws is not on the admin one.
    assert_eq!(http_get(&server.public, "/metrics").await.unwrap().0, 404);
    assert_eq!(http_get(&server.admin, "/ws").await.unwrap().0, 404);
}

#[tokio::test]
async fn healthz_does_not_depend_on_kafka() {
    // A broker address where nothing listens: liveness holds, readiness does not.
    let dir = TempDir::new();
    let config = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n\
         [kafka]\nbrokers = \"127.0.0.1:1\"\n[auth]\nsecret = \"{SECRET}\"\n"
    );
    let path = dir.0.join("c.toml");
    std::fs::write(&path, config).unwrap();
    let mut server = Server::spawn(&path, &[]);
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(http_get(&server.admin, "/healthz").await.unwrap().0, 200);
    assert_eq!(http_get(&server.admin, "/readyz").await.unwrap().0, 503);
    // Exits in bounded time even though Kafka never answered.
    let started = Instant::now();
    server.sigterm();
    let status = server.wait_exit(Duration::from_secs(15)).expect("exited");
    assert!(status.success(), "{status:?}");
    assert!(started.elapsed() < Duration::from_secs(15));
}

#[tokio::test]
async fn sigterm_closes_clients_with_1001_and_exits() {
    let topic = unique("drain");
    create_topic(&topic, 1).await;
    let mut server = Server::start(&task_route(&topic), "").await;
    let mut clients = Vec::new();
    for i in 0..3 {
        clients.push(server.connect(&token(&format!("d{i}"), &[])).await);
    }
    let started = Instant::now();
    server.sigterm();
    for c in &mut clients {
        let close = c.close_frame().await.expect("a close frame");
        assert_eq!(u16::from(close.code), 1001);
    }
    let status = server.wait_exit(Duration::from_secs(15)).expect("exited");
    assert!(status.success(), "{status:?}");
    assert!(started.elapsed() < Duration::from_secs(15));
}

/// A drain waits for close replies, but only for those not yet in: clients that answer at
/// once let the server exit well before the 3 s each session would wait for a missing one.
#[tokio::test]
async fn sigterm_exits_as_soon_as_the_clients_answer_the_close() {
    let topic = unique("drain-answered");
    create_topic(&topic, 1).await;
    let mut server = Server::start(&task_route(&topic), "").await;
    let mut clients = Vec::new();
    for i in 0..3 {
        clients.push(server.connect(&token(&format!("a{i}"), &[])).await);
    }
    let started = Instant::now();
    server.sigterm();
    for c in &mut clients {
        let close = c.close_frame().await.expect("a close frame");
        assert_eq!(u16::from(close.code), 1001);
        assert!(
            c.finish_close().await,
            "the server ends the connection after the reply"
        );
    }
    let status = server.wait_exit(Duration::from_secs(15)).expect("exited");
    assert!(status.success(), "{status:?}");
    let took = started.elapsed();
    assert!(
        took < Duration::from_secs(2),
        "exited {took:?} after SIGTERM"
    );
}

#[tokio::test]
async fn check_config_prints_the_effective_config_without_secrets() {
    let dir = TempDir::new();
    let path = dir.0.join("ok.toml");
    std::fs::write(
        &path,
        format!("[auth]\nsecret = \"{SECRET}\"\n[kafka]\n\"sasl.password\" = \"hunter2\"\n"),
    )
    .unwrap();
    let out = Command::new(binary())
        .args(["check-config", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    assert!(out.status.success());
    let shown = String::from_utf8(out.stdout).unwrap();
    assert!(shown.contains("entity-updates"), "default routes shown");
    assert!(!shown.contains("hunter2") && !shown.contains(SECRET));

    let bad = dir.0.join("bad.toml");
    std::fs::write(
        &bad,
        format!("[auth]\nsecret = \"{SECRET}\"\n[websocket]\nqueue_frames = 0\n"),
    )
    .unwrap();
    let out = Command::new(binary())
        .args(["serve", "--config"])
        .arg(&bad)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(err.contains("websocket.queue_frames"), "{err}");
}

/// `check-config` and `serve` go through one build step: a configuration one refuses, the
/// other refuses with the very same message, before listening. Before that step, a read
/// buffer under 64 bytes, a frame limit over the message limit or a metadata refresh of 0 s
/// passed `check-config` and were quietly changed by `serve`, and a log filter that `serve`
/// refused passed `check-config`.
#[tokio::test]
async fn check_config_and_serve_refuse_the_same_configs_with_the_same_message() {
    let dir = TempDir::new();
    let cases = [
        (
            "[websocket]\nread_buffer_bytes = 63\n",
            "websocket.read_buffer_bytes: must be between 64 and 4294967295",
        ),
        (
            "[websocket]\nmax_message_bytes = 1000\nmax_frame_bytes = 1001\n",
            "websocket.max_frame_bytes: must not exceed websocket.max_message_bytes",
        ),
        (
            "[kafka]\nmetadata_refresh_seconds = 0\n",
            "kafka.metadata_refresh_seconds: must be between 1 and 3600",
        ),
        (
            "[[route]]\ntopic = \"t\"\nevent = \"e\"\nrooms = []\n",
            "route[0] (t): rooms: at least one room template is needed",
        ),
        (
            "[log]\nlevel = \"roomcast=loud\"\n",
            "log.level: invalid filter \"roomcast=loud\": error parsing level filter: \
             expected one of \"off\", \"error\", \"warn\", \"info\", \"debug\", \"trace\", \
             or a number 0-5",
        ),
    ];
    for (i, (extra, expected)) in cases.into_iter().enumerate() {
        let path = dir.0.join(format!("bad-{i}.toml"));
        let text = format!(
            "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n\
             [auth]\nsecret = \"{SECRET}\"\n{extra}"
        );
        std::fs::write(&path, text).unwrap();
        let checked = Command::new(binary())
            .args(["check-config", "--config"])
            .arg(&path)
            .env("ROOMCAST_KAFKA_BROKERS", brokers())
            .output()
            .unwrap();
        let check_err = String::from_utf8(checked.stderr).unwrap();
        assert_eq!(checked.status.code(), Some(1), "{extra}: {check_err}");
        assert!(checked.stdout.is_empty(), "{extra}: nothing printed");
        assert_eq!(check_err, format!("roomcast: {expected}\n"), "{extra}");
        let (status, serve_err) = serve_briefly(&path);
        assert_eq!(status, Some(1), "{extra}: serve started: {serve_err}");
        assert_eq!(serve_err, check_err, "{extra}");
    }
}

/// Runs `serve` on `config` for at most 10 s: its exit code (None if it was still running),
/// and what it wrote on stderr.
fn serve_briefly(config: &std::path::Path) -> (Option<i32>, String) {
    let mut child = Command::new(binary())
        .args(["serve", "--config"])
        .arg(config)
        .env("ROOMCAST_KAFKA_BROKERS", brokers())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let code = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status.code();
        }
        if Instant::now() > deadline {
            child.kill().unwrap();
            child.wait().unwrap();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut err = String::new();
    use std::io::Read;
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    (code, err)
}

/// `roomcast demo` takes its listeners from the environment like `serve` (its own defaults
/// only fill what nothing set), and prints a token and URL a client of one's own connects
/// with. Before, ROOMCAST_LISTEN lost to the demo's 127.0.0.1:8080.
#[tokio::test]
async fn the_demo_honours_listen_settings_and_prints_a_token_that_connects() {
    use std::io::{BufRead, BufReader};
    let mut demo = Command::new(binary())
        .arg("demo")
        .env("ROOMCAST_LISTEN", "127.0.0.1:0")
        .env("ROOMCAST_ADMIN_LISTEN", "127.0.0.1:0")
        .env("ROOMCAST_LOG", "info")
        .env("ROOMCAST_LOG_FORMAT", "text")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("roomcast demo starts");
    let stderr = demo.stderr.take().unwrap();
    let log = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = std::io::Read::read_to_string(&mut BufReader::new(stderr), &mut text);
        text
    });
    let stdout = demo.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if let Some(url) = line.trim().strip_prefix("websocket: ") {
                let _ = tx.send(url.to_string());
            }
        }
    });
    let url = rx
        .recv_timeout(Duration::from_secs(30))
        .expect("the demo prints a websocket URL");
    let (base, token) = url
        .split_once("?token=")
        .expect("the URL carries the token");
    assert!(base.starts_with("ws://127.0.0.1:"), "{base}");
    assert!(
        !base.contains(":8080/"),
        "ROOMCAST_LISTEN was ignored: {base}"
    );
    let mut client = Client::connect(base, token)
        .await
        .expect("the token is accepted");
    assert_eq!(client.welcome["user"], "42");
    // The demo publishes a task of user 42 within a few records.
    let event = client.frame_within(Duration::from_secs(20)).await;
    // A clean stop, as an operator's Ctrl-C: no error on the way out.
    unsafe { libc::kill(demo.id() as i32, libc::SIGINT) };
    let status = demo.wait().unwrap();
    let log = log.join().unwrap();
    assert_eq!(event.expect("a demo event")["type"], "event");
    assert!(status.success(), "{status:?}\n{log}");
    assert!(log.contains(" INFO "), "{log}");
    // Written to a pipe, the log carries no terminal colour codes.
    assert!(!log.contains('\x1b'), "{log}");
    assert!(!log.contains("ERROR"), "{log}");
}

/// An error's cause is printed once, after what failed.
#[test]
fn an_error_names_its_cause_once() {
    let out = Command::new(binary())
        .args(["check-config", "--config", "/nonexistent/roomcast.toml"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert_eq!(
        String::from_utf8_lossy(&out.stderr),
        "roomcast: cannot read config file /nonexistent/roomcast.toml: \
         No such file or directory (os error 2)\n"
    );
}

/// The sample configuration the README points to is valid as shipped.
#[test]
fn the_example_configuration_passes_check_config() {
    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/roomcast.example.toml");
    let effective = run_ok(&["check-config", "--config", example], &[]);
    assert!(
        effective.contains("topic = \"task-updates\""),
        "{effective}"
    );
}

/// Without `$HOSTNAME` (a shell that does not export it), the replica is named after the host,
/// not a name every such replica would share.
#[test]
fn the_server_name_defaults_to_the_host_name() {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap();
    let out = Command::new(binary())
        .arg("check-config")
        .env_remove("HOSTNAME")
        .env_remove("ROOMCAST_SERVER_NAME")
        .env("ROOMCAST_JWT_SECRET", "a-secret-of-16-bytes-or-more")
        .output()
        .unwrap();
    let effective = String::from_utf8(out.stdout).unwrap();
    assert!(
        effective.contains(&format!("name = \"{}\"", host.trim())),
        "{effective}"
    );
}
