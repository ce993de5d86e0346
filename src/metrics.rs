//! The metric set, exported at the admin listener's `/metrics`.
//!
//! Names start with `roomcast_`, use base units, and counters end in `_total`. No label ever
//! carries a room, user or connection id: labels are bounded sets (topic, partition, reason,
//! close code), so cardinality does not grow with traffic.

use prometheus::{
    Encoder, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

use crate::ws::protocol::{ErrorCode, Source};

pub struct Metrics {
    registry: Registry,
    pub connections: IntGauge,
    pub connections_opened: IntCounter,
    pub connections_closed: IntCounterVec,
    pub handshake_failures: IntCounterVec,
    pub subscriptions: IntCounterVec,
    pub client_frames_rejected: IntCounterVec,
    pub rooms: IntGauge,
    pub records_consumed: IntCounterVec,
    pub records_malformed: IntCounterVec,
    pub deliveries: IntCounter,
    pub frames_shed: IntCounter,
    pub slow_consumer_closes: IntCounter,
    pub record_latency: Histogram,
    pub resumes: IntCounterVec,
    pub replayed_records: IntCounterVec,
    pub resume_waits: IntCounterVec,
    pub replay_buffer_bytes: IntGauge,
    pub replay_buffer_records: IntGauge,
    pub partition_offset: IntGaugeVec,
    pub partition_high_watermark: IntGaugeVec,
    pub partition_lag: IntGaugeVec,
    pub assigned_partitions: IntGauge,
    pub ready: IntGauge,
    pub presence_users_online: IntGauge,
    pub presence_replicas: IntGauge,
    pub presence_records_published: IntCounter,
    pub presence_records_consumed: IntCounterVec,
    pub presence_expired_replicas: IntCounter,
    pub presence_events: IntCounterVec,
    pub presence_lag: IntGauge,
}

fn counter_vec(r: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let c = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric");
    r.register(Box::new(c.clone())).expect("unique metric");
    c
}

fn gauge_vec(r: &Registry, name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    let g = IntGaugeVec::new(Opts::new(name, help), labels).expect("valid metric");
    r.register(Box::new(g.clone())).expect("unique metric");
    g
}

fn counter(r: &Registry, name: &str, help: &str) -> IntCounter {
    let c = IntCounter::new(name, help).expect("valid metric");
    r.register(Box::new(c.clone())).expect("unique metric");
    c
}

fn gauge(r: &Registry, name: &str, help: &str) -> IntGauge {
    let g = IntGauge::new(name, help).expect("valid metric");
    r.register(Box::new(g.clone())).expect("unique metric");
    g
}

impl Metrics {
    pub fn new() -> Metrics {
        let r = Registry::new();
        #[cfg(target_os = "linux")]
        r.register(Box::new(
            prometheus::process_collector::ProcessCollector::for_self(),
        ))
        .expect("process collector");
        let latency = Histogram::with_opts(
            HistogramOpts::new(
                "roomcast_record_latency_seconds",
                "Time from a record's Kafka timestamp until it is queued for its recipients.",
            )
            .buckets(vec![
                0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
            ]),
        )
        .expect("valid histogram");
        r.register(Box::new(latency.clone()))
            .expect("unique metric");
        Metrics {
            connections: gauge(&r, "roomcast_connections", "Open WebSocket connections."),
            connections_opened: counter(
                &r,
                "roomcast_connections_opened_total",
                "WebSocket connections accepted.",
            ),
            connections_closed: counter_vec(
                &r,
                "roomcast_connections_closed_total",
                "WebSocket connections closed, by close code.",
                &["code"],
            ),
            handshake_failures: counter_vec(
                &r,
                "roomcast_handshake_failures_total",
                "Upgrade requests refused, by reason.",
                &["reason"],
            ),
            subscriptions: counter_vec(
                &r,
                "roomcast_subscriptions_total",
                "Room subscription requests, by result.",
                &["result"],
            ),
            client_frames_rejected: counter_vec(
                &r,
                "roomcast_client_frames_rejected_total",
                "Client frames refused, by reason.",
                &["reason"],
            ),
            rooms: gauge(&r, "roomcast_rooms", "Rooms with at least one member."),
            records_consumed: counter_vec(
                &r,
                "roomcast_records_consumed_total",
                "Kafka records read, by topic.",
                &["topic"],
            ),
            records_malformed: counter_vec(
                &r,
                "roomcast_records_malformed_total",
                "Kafka records skipped because they could not be routed, by topic and reason.",
                &["topic", "reason"],
            ),
            deliveries: counter(
                &r,
                "roomcast_deliveries_total",
                "Event frames queued for a connection.",
            ),
            frames_shed: counter(
                &r,
                "roomcast_frames_shed_total",
                "Low-priority frames dropped for connections past their soft queue limit.",
            ),
            slow_consumer_closes: counter(
                &r,
                "roomcast_slow_consumer_closes_total",
                "Connections closed with 4008 because their queue was full.",
            ),
            record_latency: latency,
            resumes: counter_vec(
                &r,
                "roomcast_resumes_total",
                "Resumes, by where they were served from (nothing, memory, kafka) or resync.",
                &["source"],
            ),
            replayed_records: counter_vec(
                &r,
                "roomcast_replayed_records_total",
                "Event frames replayed to resuming connections, by source.",
                &["source"],
            ),
            resume_waits: counter_vec(
                &r,
                "roomcast_resume_waits_total",
                "Resumes that found this replica behind the client's map, by result: \
                 caught_up within the wait, or still behind (answered lagging).",
                &["result"],
            ),
            replay_buffer_bytes: gauge(
                &r,
                "roomcast_replay_buffer_bytes",
                "Bytes held by the in-memory replay buffer.",
            ),
            replay_buffer_records: gauge(
                &r,
                "roomcast_replay_buffer_records",
                "Records held by the in-memory replay buffer.",
            ),
            partition_offset: gauge_vec(
                &r,
                "roomcast_kafka_partition_offset",
                "Next offset this replica will read, per partition.",
                &["topic", "partition"],
            ),
            partition_high_watermark: gauge_vec(
                &r,
                "roomcast_kafka_partition_high_watermark",
                "Latest known high watermark, per partition.",
                &["topic", "partition"],
            ),
            partition_lag: gauge_vec(
                &r,
                "roomcast_kafka_consumer_lag",
                "Records behind the high watermark, per partition.",
                &["topic", "partition"],
            ),
            assigned_partitions: gauge(
                &r,
                "roomcast_kafka_assigned_partitions",
                "Partitions this replica reads.",
            ),
            ready: gauge(
                &r,
                "roomcast_ready",
                "1 when the replica is ready to serve (caught up, not draining).",
            ),
            presence_users_online: gauge(
                &r,
                "roomcast_presence_users_online",
                "Users online on any replica, summed over the tenants (0 with presence off).",
            ),
            presence_replicas: gauge(
                &r,
                "roomcast_presence_replicas",
                "Replicas in this replica's presence table.",
            ),
            presence_records_published: counter(
                &r,
                "roomcast_presence_records_published_total",
                "Presence records this replica published.",
            ),
            presence_records_consumed: counter_vec(
                &r,
                "roomcast_presence_records_consumed_total",
                "Presence records read, by what became of them.",
                &["outcome"],
            ),
            presence_expired_replicas: counter(
                &r,
                "roomcast_presence_expired_replicas_total",
                "Replicas dropped from the presence table because their lease ran out.",
            ),
            presence_events: counter_vec(
                &r,
                "roomcast_presence_events_total",
                "Presence events handed to connections, by result (sent; shed: low priority \
                 behind a long queue; closed: the connection was going).",
                &["result"],
            ),
            presence_lag: gauge(
                &r,
                "roomcast_presence_lag_records",
                "Presence records on the topic that this replica has not read yet (-1 until measured, \
                 every 5 s; 0 with presence off).",
            ),
            registry: r,
        }
    }

    /// Creates the series whose labels are known in advance, so dashboards and alerts see a
    /// zero rather than no data until the first increment. Labels that name an error code or
    /// a resume's source are the wire's words, taken from the protocol, so they cannot differ.
    pub fn prime(&self, topics: &[&str]) {
        let sets: [(&IntCounterVec, &[&str]); 7] = [
            (
                &self.handshake_failures,
                &[
                    "missing_token",
                    "malformed_token",
                    "expired_token",
                    "immature_token",
                    "bad_signature",
                    "wrong_algorithm",
                    "invalid_claims",
                    "origin_not_allowed",
                    "not_a_websocket_upgrade",
                    "unsupported_websocket_version",
                    "too_many_connections",
                    "too_many_connections_for_user",
                    "too_many_connections_for_address",
                    "too_many_handshakes",
                    "too_many_handshakes_for_address",
                    "request_head_too_large",
                    "handshake_timeout",
                    "draining",
                ],
            ),
            (
                &self.connections_closed,
                &[
                    "1000", "1001", "1006", "1008", "1013", "4001", "4008", "4029",
                ],
            ),
            (
                &self.subscriptions,
                &[
                    "ok",
                    ErrorCode::Forbidden.as_str(),
                    ErrorCode::InvalidRoom.as_str(),
                    ErrorCode::TooManyRooms.as_str(),
                    ErrorCode::InvalidToken.as_str(),
                ],
            ),
            (
                &self.client_frames_rejected,
                &[
                    "bad_frame",
                    "protocol",
                    "filter_too_large",
                    ErrorCode::RateLimited.as_str(),
                ],
            ),
            (
                &self.resumes,
                &[
                    Source::Nothing.as_str(),
                    Source::Memory.as_str(),
                    Source::Kafka.as_str(),
                    Source::Resync.as_str(),
                ],
            ),
            (
                &self.replayed_records,
                &[Source::Memory.as_str(), Source::Kafka.as_str()],
            ),
            (&self.resume_waits, &["caught_up", "behind"]),
        ];
        for (vec, labels) in sets {
            for label in labels {
                vec.with_label_values(&[*label]);
            }
        }
        for topic in topics {
            self.records_consumed.with_label_values(&[*topic]);
            for reason in [
                "no_value",
                "not_json",
                "no_event",
                "no_rooms",
                "bad_header",
                "not_utf8",
                "no_tenant",
                "too_large",
                "too_many_rooms",
                "too_deep",
            ] {
                self.records_malformed.with_label_values(&[*topic, reason]);
            }
        }
    }

    /// Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut out = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut out)
            .expect("text encoding cannot fail");
        String::from_utf8(out).expect("text encoding is UTF-8")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}
