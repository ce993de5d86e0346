//! The two listeners. Public: `/ws` and the demo page at `/`. Admin (never on the ingress):
//! `/metrics`, `/healthz`, `/readyz`, `/stats`.
//!
//! `/healthz` answers as long as the process serves HTTP: it never depends on Kafka, or a Kafka
//! outage would restart every pod. `/readyz` is true only when partitions are assigned and
//! read up to their head, and not while draining.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde_json::json;

use crate::ws::{handshake, Hub};

const DEMO_PAGE: &str = include_str!("../static/index.html");

/// What the admin endpoints read.
#[derive(Clone)]
pub struct AdminState {
    pub hub: Arc<Hub>,
    /// Set once the first partition discovery has succeeded.
    pub discovered: Arc<AtomicBool>,
}

impl AdminState {
    pub fn is_ready(&self) -> bool {
        self.discovered.load(Ordering::Acquire)
            && self.hub.partitions.caught_up()
            && !self.hub.is_draining()
    }
}

/// Public router. `demo_token`, when set, is embedded in the page so it connects by itself.
pub fn public_router(hub: Arc<Hub>, demo_token: Option<String>) -> Router {
    let page = DEMO_PAGE.replace(
        "__ROOMCAST_DEMO_TOKEN__",
        demo_token.as_deref().unwrap_or(""),
    );
    Router::new()
        .route("/", get(move || async move { Html(page) }))
        .route("/ws", get(handshake::upgrade))
        .with_state(hub)
}

pub fn admin_router(state: AdminState) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/stats", get(stats))
        .with_state(state)
}

async fn metrics(State(s): State<AdminState>) -> Response {
    refresh_gauges(&s);
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        s.hub.metrics.render(),
    )
        .into_response()
}

/// Gauges that are cheaper to read at scrape time than to keep current on the hot path.
fn refresh_gauges(s: &AdminState) {
    let m = &s.hub.metrics;
    m.rooms.set(s.hub.registry.room_count() as i64);
    m.ready.set(s.is_ready() as i64);
    let (bytes, records) = s.hub.replay.usage();
    m.replay_buffer_bytes.set(bytes as i64);
    m.replay_buffer_records.set(records as i64);
    for ((topic, partition), p) in s.hub.partitions.snapshot() {
        let labels = [topic.as_str(), &partition.to_string()];
        m.partition_offset
            .with_label_values(&labels)
            .set(p.next_offset);
        m.partition_high_watermark
            .with_label_values(&labels)
            .set(p.high_watermark);
        m.partition_lag.with_label_values(&labels).set(p.lag());
    }
}

async fn readyz(State(s): State<AdminState>) -> Response {
    if s.is_ready() {
        (StatusCode::OK, "ready\n").into_response()
    } else if s.hub.is_draining() {
        (StatusCode::SERVICE_UNAVAILABLE, "draining\n").into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "catching up\n").into_response()
    }
}

async fn stats(State(s): State<AdminState>) -> Json<serde_json::Value> {
    let partitions: Vec<_> = s
        .hub
        .partitions
        .snapshot()
        .into_iter()
        .map(|((topic, partition), p)| {
            json!({
                "topic": topic,
                "partition": partition,
                "next_offset": p.next_offset,
                "high_watermark": p.high_watermark,
                "lag": p.lag(),
            })
        })
        .collect();
    Json(json!({
        "server": s.hub.config.server.name,
        "ready": s.is_ready(),
        "draining": s.hub.is_draining(),
        "connections": s.hub.sessions.len(),
        "rooms": s.hub.registry.room_count(),
        "partitions": partitions,
    }))
}
