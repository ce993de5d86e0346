//! `roomcast demo`: the whole service on an in-process Kafka (librdkafka's mock cluster), a
//! producer publishing sample task and entity updates, and a page that connects with a demo
//! token. One command, no broker to install.

use std::future::Future;
use std::time::Duration;

use rdkafka::mocking::MockCluster;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::ClientConfig;
use serde_json::json;
use tracing::warn;

use crate::auth::{now_secs, sign_hs256, Claims};
use crate::config::{default_routes, Algorithm, Config};
use crate::Error;

/// The demo user: sees its own tasks and every feature room.
pub const DEMO_USER: &str = "42";

/// Runs the demo until `stop` resolves. The mock cluster lives as long as the process.
pub async fn run(mut config: Config, stop: impl Future<Output = ()>) -> Result<(), Error> {
    let mock = MockCluster::new(1).map_err(|e| Error::Demo(format!("mock cluster: {e}")))?;
    config.routes = default_routes();
    for route in &mut config.routes {
        // The demo's user and records have no tenant.
        route.tenant_optional = true;
        route.limits = config.records;
    }
    for route in &config.routes {
        mock.create_topic(&route.topic, 3, 1)
            .map_err(|e| Error::Demo(format!("topic {}: {e}", route.topic)))?;
    }
    let brokers = mock.bootstrap_servers();
    config.kafka.brokers = brokers.clone();
    config.auth.algorithm = Algorithm::HS256;
    let secret = config.auth.secret.clone().unwrap_or_else(random_secret);
    config.auth.secret = Some(secret.clone());
    let setup = crate::setup::Setup::build(config)?;

    let token = sign_hs256(
        &secret,
        &Claims {
            sub: DEMO_USER.into(),
            exp: now_secs() + 24 * 3600,
            rooms: vec!["feature:**".into(), "task:*".into()],
            ..Claims::default()
        },
    );
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &brokers)
        .set("linger.ms", "0")
        .create()
        .map_err(|e| Error::Demo(format!("producer: {e}")))?;
    let publishing = tokio::spawn(publish(producer));
    let served = crate::serve(setup, Some(token), stop).await;
    publishing.abort();
    let _ = publishing.await;
    // Not destroyed here: clients of the cluster may still be closing (the consumer's
    // partition discovery, the rdkafka threads of a producer just dropped), and a cluster
    // destroyed under them has librdkafka report every broker down, as an error, on a clean
    // stop. The process ends right after the demo, and the cluster with it.
    std::mem::forget(mock);
    served
}

/// Tells the user where to look and how to connect a client of their own: on stdout, so it
/// is seen whatever the log level.
pub fn announce(public: std::net::SocketAddr, admin: std::net::SocketAddr, token: &str) {
    println!(
        "\nroomcast demo\n\
         \x20 page:      http://{public}/\n\
         \x20 websocket: ws://{public}/ws?token={token}\n\
         \x20 token:     {token}\n\
         \x20            (user {DEMO_USER}, rooms feature:** and task:*, valid 24 h; or send it as\n\
         \x20            `Authorization: Bearer` or the `bearer.<token>` subprotocol)\n\
         \x20 metrics:   http://{admin}/metrics\n\
         \x20 Tokens of your own: give the demo a secret (ROOMCAST_JWT_SECRET or auth.secret)\n\
         \x20 and mint them with `roomcast token --sub <user> --rooms 'task:*'` and the same secret.\n"
    );
}

/// Publishes one sample record every 700 ms, alternating between the two default formats.
async fn publish(producer: FutureProducer) {
    let mut tick = tokio::time::interval(Duration::from_millis(700));
    for n in 0u64.. {
        tick.tick().await;
        let (topic, value) = sample(n);
        let key = n.to_string();
        let record = FutureRecord::to(topic).key(&key).payload(&value);
        if let Err((e, _)) = producer.send(record, Duration::from_secs(5)).await {
            warn!(error = %e, "demo producer");
        }
    }
}

fn sample(n: u64) -> (&'static str, String) {
    const ACTIONS: [&str; 3] = ["created", "updated", "deleted"];
    const NAMES: [&str; 5] = ["Ada", "Grace", "Linus", "Barbara", "Ken"];
    let action = ACTIONS[(n / 2 % 3) as usize];
    let value = match n % 4 {
        0 => json!({
            "feature": "users", "entity": "user", "action": action,
            "data": {"id": format!("u{}", n % 5), "name": NAMES[(n % 5) as usize]},
            "meta": {"priority": "normal"}
        }),
        1 => json!({
            "type": "progress", "taskId": format!("t{}", n % 3), "userId": DEMO_USER,
            "progress": (n * 7) % 101, "status": "running"
        }),
        2 => json!({
            "feature": "rbac", "entity": "role", "action": action,
            "data": {"id": format!("r{}", n % 4), "name": "editor"},
            "meta": {"priority": "low"}
        }),
        _ => json!({
            "type": "done", "taskId": format!("t{}", n % 3), "userId": "7",
            "status": "finished"
        }),
    };
    let topic = if value.get("feature").is_some() {
        "entity-updates"
    } else {
        "task-updates"
    };
    (topic, value.to_string())
}

fn random_secret() -> String {
    use std::io::Read;
    let mut bytes = [0u8; 24];
    let read = std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut bytes));
    if read.is_err() {
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0)
            ^ std::process::id() as u128;
        bytes[..16].copy_from_slice(&seed.to_le_bytes());
    }
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
