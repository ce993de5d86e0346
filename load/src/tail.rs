//! A Kafka consumer with the librdkafka settings roomcast's consumer uses (src/kafka/mod.rs),
//! assigned to every partition of a topic from its end: for the load tool's Kafka probes and
//! for the floor fed by Kafka. The settings are restated because neither depends on the
//! service crate.

use std::time::Duration;

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{Offset, TopicPartitionList};

pub fn from_end(brokers: &str, topic: &str, group: &str) -> anyhow::Result<BaseConsumer> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .set("queued.max.messages.kbytes", "8192")
        .set("fetch.queue.backoff.ms", "10")
        .set("fetch.wait.max.ms", "100")
        .set("socket.nagle.disable", "true")
        .set("enable.partition.eof", "false")
        .create()?;
    let metadata = consumer.fetch_metadata(Some(topic), Duration::from_secs(10))?;
    let mut tpl = TopicPartitionList::new();
    for t in metadata.topics() {
        for p in t.partitions() {
            tpl.add_partition_offset(topic, p.id(), Offset::End)?;
        }
    }
    anyhow::ensure!(tpl.count() > 0, "topic {topic} has no partitions");
    consumer.assign(&tpl)?;
    Ok(consumer)
}
