//! Kafka side: client configuration and the consumer that feeds the hub.
//!
//! Broadcast mode: every replica reads every partition of the routed topics, by explicit
//! assignment rather than a shared group, so each replica can deliver every record to its own
//! subscribers. The group id (`<group_prefix>.<server name>`) is used only to commit offsets,
//! which makes each replica's position and lag visible to standard Kafka tooling.

pub mod consumer;
pub mod presence;
pub mod replay;

use std::ffi::CStr;

use rdkafka::bindings::{rd_kafka_header_get_all, rd_kafka_headers_t, rd_kafka_resp_err_t};
use rdkafka::error::KafkaError;
use rdkafka::message::{BorrowedMessage, Headers, Message};
use rdkafka::ClientConfig;

use crate::config::KafkaConfig;
use crate::route::Record;

/// The routing view of a Kafka message, borrowing from it.
pub fn record<'a>(m: &'a BorrowedMessage<'a>) -> Record<'a> {
    Record {
        topic: m.topic(),
        partition: m.partition(),
        offset: m.offset(),
        timestamp_ms: m.timestamp().to_millis(),
        value: m.payload(),
        headers: headers(m),
    }
}

/// A message's headers that have a value and a UTF-8 key: routes name headers by text, so
/// no other can be meant. Read from librdkafka directly: rdkafka's own reader panics on a
/// key that is not UTF-8, which any producer may send, and on the consumer's thread that
/// panic stopped all delivery.
fn headers<'a>(m: &'a BorrowedMessage<'a>) -> Vec<(&'a str, &'a [u8])> {
    let Some(hs) = m.headers() else {
        return Vec::new();
    };
    // rdkafka's borrowed headers are librdkafka's, at the same address.
    let native = std::ptr::from_ref(hs).cast::<rd_kafka_headers_t>();
    (0..hs.count())
        .filter_map(|idx| {
            let (mut name, mut value, mut size) = (std::ptr::null(), std::ptr::null(), 0);
            // Sound: `native` lives as long as the message, and librdkafka only sets the three
            // out-parameters, to memory of the message's.
            let err =
                unsafe { rd_kafka_header_get_all(native, idx, &mut name, &mut value, &mut size) };
            if err != rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR || value.is_null() {
                return None;
            }
            // Sound: a NUL-terminated name and `size` bytes of value, both the message's.
            let key = unsafe { CStr::from_ptr(name) }.to_str().ok()?;
            let value = unsafe { std::slice::from_raw_parts(value.cast::<u8>(), size) };
            Some((key, value))
        })
        .collect()
}

/// librdkafka's settings for this replica: the consumer's and the resume reader's, checked
/// by librdkafka itself once, when they are built.
#[derive(Clone)]
pub struct KafkaSettings {
    /// The consumer group the replica commits under.
    pub group: String,
    pub consumer: ClientConfig,
    pub replay: ClientConfig,
}

impl KafkaSettings {
    /// Refuses what librdkafka refuses (an unknown property, a value out of its range), with
    /// librdkafka's message.
    pub fn new(c: &KafkaConfig, server_name: &str) -> Result<KafkaSettings, KafkaError> {
        let group = group_id(c, server_name);
        let consumer = client_config(c, &group);
        consumer.create_native_config()?;
        let replay = client_config(c, &format!("{group}.replay"));
        Ok(KafkaSettings {
            group,
            consumer,
            replay,
        })
    }
}

/// The consumer group a replica commits under.
fn group_id(c: &KafkaConfig, server_name: &str) -> String {
    format!("{}.{}", c.group_prefix, server_name)
}

/// librdkafka settings: roomcast's own, then every `kafka.*` key from config unchanged.
fn client_config(c: &KafkaConfig, group_id: &str) -> ClientConfig {
    let mut cc = ClientConfig::new();
    cc.set("bootstrap.servers", &c.brokers)
        .set("group.id", group_id)
        .set("client.id", group_id)
        // Offsets are stored only after a record has been handed to the registry.
        .set("enable.auto.offset.store", "false")
        .set("enable.auto.commit", "true")
        .set("auto.commit.interval.ms", "5000")
        // Bound librdkafka's prefetch per partition (default 64 MiB).
        .set("queued.max.messages.kbytes", "8192")
        // Once that prefetch is full, librdkafka waits this long before fetching again
        // (default 1 s): a consumer that catches up would then sit idle for most of a second.
        .set("fetch.queue.backoff.ms", "10")
        .set("fetch.wait.max.ms", "100")
        // Fetch requests are small and each one gates delivery. With Nagle's algorithm on, one
        // written while another request (a commit, a metadata refresh) is unacknowledged
        // waits for the broker's ACK (docs/BENCHMARKS.md, targeted).
        .set("socket.nagle.disable", "true")
        .set("statistics.interval.ms", "5000")
        .set("enable.partition.eof", "false")
        // An out-of-range position (a recreated topic) restarts from the beginning: nothing
        // lost, and the offset going back tells the consumer to reset that partition.
        .set("auto.offset.reset", "earliest");
    for (key, value) in &c.properties {
        cc.set(key, value);
    }
    cc
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_leave_at_once_unless_configured_otherwise() {
        let mut c = KafkaConfig::default();
        let cc = client_config(&c, "g");
        assert_eq!(cc.get("socket.nagle.disable"), Some("true"));
        assert_eq!(cc.get("group.id"), Some("g"));
        c.properties
            .insert("socket.nagle.disable".into(), "false".into());
        let cc = client_config(&c, "g");
        assert_eq!(cc.get("socket.nagle.disable"), Some("false"));
    }
}
