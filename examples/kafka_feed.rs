//! Kafka for the browser tests: creates topics and produces records on command, one JSON
//! line in, one JSON line out, so a test written in another language drives the same
//! librdkafka the service reads with (a Kafka client of its own would be one more thing to
//! trust against the broker's protocol versions).
//!
//! Usage: `kafka_feed BROKERS`, then on stdin, one command per line:
//!
//! ```text
//! {"op":"create","topic":"t","partitions":2}
//! {"op":"produce","topic":"t","partition":1,"value":"{\"id\":1}","headers":{"event":"x"}}
//! ```
//!
//! Every command is answered on stdout, in order: `{"ok":true}` for a topic,
//! `{"ok":true,"partition":1,"offset":7}` for a record (where Kafka stored it), or
//! `{"ok":false,"error":"..."}`. A record is acknowledged only once the broker has it.

use std::collections::BTreeMap;
use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::ClientConfig;
use serde::Deserialize;
use serde_json::{json, Value};
use std::io::{BufRead, Write};

/// How long one command may take: the broker is local, but a topic's creation waits for its
/// leader.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(20);

#[derive(Deserialize)]
#[serde(tag = "op", rename_all = "lowercase", deny_unknown_fields)]
enum Command {
    Create {
        topic: String,
        partitions: i32,
    },
    Produce {
        topic: String,
        partition: Option<i32>,
        value: String,
        #[serde(default)]
        headers: BTreeMap<String, String>,
    },
}

struct Feed {
    admin: AdminClient<DefaultClientContext>,
    producer: FutureProducer,
}

impl Feed {
    fn new(brokers: &str) -> Result<Feed, String> {
        let admin = ClientConfig::new()
            .set("bootstrap.servers", brokers)
            .create()
            .map_err(|e| e.to_string())?;
        let producer = ClientConfig::new()
            .set("bootstrap.servers", brokers)
            .set("linger.ms", "0")
            .set("enable.idempotence", "true")
            .create()
            .map_err(|e| e.to_string())?;
        Ok(Feed { admin, producer })
    }

    async fn run(&self, command: Command) -> Result<Value, String> {
        match command {
            Command::Create { topic, partitions } => self.create(&topic, partitions).await,
            Command::Produce {
                topic,
                partition,
                value,
                headers,
            } => self.produce(&topic, partition, &value, &headers).await,
        }
    }

    async fn create(&self, topic: &str, partitions: i32) -> Result<Value, String> {
        let new = NewTopic::new(topic, partitions, TopicReplication::Fixed(1));
        let opts = AdminOptions::new().operation_timeout(Some(COMMAND_TIMEOUT));
        let results = self
            .admin
            .create_topics([&new], &opts)
            .await
            .map_err(|e| e.to_string())?;
        for r in results {
            r.map_err(|(name, code)| format!("{name}: {code}"))?;
        }
        Ok(json!({"ok": true}))
    }

    async fn produce(
        &self,
        topic: &str,
        partition: Option<i32>,
        value: &str,
        headers: &BTreeMap<String, String>,
    ) -> Result<Value, String> {
        let mut hs = OwnedHeaders::new();
        for (key, v) in headers {
            hs = hs.insert(Header {
                key,
                value: Some(v.as_bytes()),
            });
        }
        let mut record = FutureRecord::<(), str>::to(topic)
            .payload(value)
            .headers(hs);
        if let Some(p) = partition {
            record = record.partition(p);
        }
        let delivery = self
            .producer
            .send(record, COMMAND_TIMEOUT)
            .await
            .map_err(|(e, _)| e.to_string())?;
        Ok(json!({"ok": true, "partition": delivery.partition, "offset": delivery.offset}))
    }
}

async fn answer(line: &str, feed: &Feed) -> Value {
    let result = match serde_json::from_str::<Command>(line) {
        Ok(command) => feed.run(command).await,
        Err(e) => Err(format!("bad command: {e}")),
    };
    result.unwrap_or_else(|error| json!({"ok": false, "error": error}))
}

/// Commands are read and answered one at a time, so the test sees its records acknowledged in
/// the order it sent them.
fn main() {
    let Some(brokers) = std::env::args().nth(1) else {
        eprintln!("usage: kafka_feed BROKERS (commands on stdin, one JSON object a line)");
        std::process::exit(2);
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime");
    let feed = runtime
        .block_on(async { Feed::new(&brokers) })
        .unwrap_or_else(|e| {
            eprintln!("kafka_feed: {e}");
            std::process::exit(1);
        });
    let mut out = std::io::stdout().lock();
    for line in std::io::stdin().lock().lines().map_while(Result::ok) {
        if line.trim().is_empty() {
            continue;
        }
        let reply = runtime.block_on(answer(&line, &feed));
        if writeln!(out, "{reply}").and_then(|()| out.flush()).is_err() {
            break;
        }
    }
}
