//! The two listeners. Public: `/ws`, the demo page at `/` and the SDK bundle it imports at
//! `/roomcast.js`. Admin (never on the ingress):
//! `/metrics`, `/healthz`, `/readyz`, `/stats`, `/presence`.
//!
//! `/healthz` answers as long as the process serves HTTP: it never depends on Kafka, or a Kafka
//! outage would restart every pod. `/readyz` is true only when partitions are assigned and
//! read up to their head, and not while draining.

use std::sync::Arc;

use axum::extract::{RawQuery, State};
use axum::http::{header, StatusCode};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::Serialize;

use crate::ws::{handshake, Hub};

const DEMO_PAGE: &str = include_str!("../static/index.html");
/// The client SDK's browser bundle, the build of `client/` committed as it is (the test
/// command checks that it is current): the demo page is an application of the SDK, so the
/// binary that serves the page serves its client too, and there is one client, not two.
const SDK_BUNDLE: &str = include_str!("../static/roomcast.js");

/// What the admin endpoints read.
#[derive(Clone)]
pub struct AdminState {
    pub hub: Arc<Hub>,
}

impl AdminState {
    pub fn is_ready(&self) -> bool {
        self.hub.partitions.ready() && !self.hub.is_draining()
    }
}

/// Public router. `demo_token`, when set, is embedded in the page so it connects by itself.
pub fn public_router(hub: Arc<Hub>, demo_token: Option<String>) -> Router {
    let page = demo_page(&hub.config.server.name, demo_token.as_deref());
    Router::new()
        .route("/", get(move || async move { Html(page) }))
        .route("/roomcast.js", get(sdk_bundle))
        .route("/ws", get(handshake::upgrade))
        .with_state(hub)
}

/// The demo page with its token (empty outside demo mode) and the replica's name, which the
/// page shows and the SDK does not hand out.
fn demo_page(server_name: &str, demo_token: Option<&str>) -> String {
    DEMO_PAGE
        .replace("__ROOMCAST_DEMO_TOKEN__", demo_token.unwrap_or(""))
        .replace("\"__ROOMCAST_SERVER_NAME__\"", &script_string(server_name))
}

/// `text` as a JavaScript string literal that can stand inside a `<script>` element.
fn script_string(text: &str) -> String {
    serde_json::Value::from(text)
        .to_string()
        .replace('<', "\\u003c")
        .replace('\u{2028}', "\\u2028")
        .replace('\u{2029}', "\\u2029")
}

async fn sdk_bundle() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/javascript; charset=utf-8"),
            // Revalidated, since it changes with the binary at the same URL.
            (header::CACHE_CONTROL, "no-cache"),
        ],
        SDK_BUNDLE,
    )
        .into_response()
}

pub fn admin_router(state: AdminState) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/stats", get(stats))
        .route("/presence", get(presence))
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

/// `/stats`, its fields in this order (a struct: no map decides it).
#[derive(Serialize)]
struct Stats {
    server: String,
    ready: bool,
    draining: bool,
    connections: usize,
    rooms: usize,
    partitions: Vec<PartitionStats>,
}

#[derive(Serialize)]
struct PartitionStats {
    topic: String,
    partition: i32,
    next_offset: i64,
    high_watermark: i64,
    lag: i64,
}

async fn stats(State(s): State<AdminState>) -> Json<Stats> {
    let partitions = s
        .hub
        .partitions
        .snapshot()
        .into_iter()
        .map(|((topic, partition), p)| PartitionStats {
            topic,
            partition,
            next_offset: p.next_offset,
            high_watermark: p.high_watermark,
            lag: p.lag(),
        })
        .collect();
    Json(Stats {
        server: s.hub.config.server.name.clone(),
        ready: s.is_ready(),
        draining: s.hub.is_draining(),
        connections: s.hub.sessions.len(),
        rooms: s.hub.registry.room_count(),
        partitions,
    })
}

/// `/presence`'s narrowing: a tenant (empty: the tokens without one), and a room of it.
#[derive(Default)]
struct PresenceQuery {
    tenant: Option<String>,
    room: Option<String>,
}

impl PresenceQuery {
    fn parse(query: Option<&str>) -> PresenceQuery {
        let mut q = PresenceQuery::default();
        for pair in query.unwrap_or_default().split('&') {
            let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
            let value = percent_encoding::percent_decode_str(&value.replace('+', " "))
                .decode_utf8_lossy()
                .into_owned();
            match name {
                "tenant" => q.tenant = Some(value),
                "room" => q.room = Some(value),
                _ => {}
            }
        }
        q
    }
}

/// The cluster-wide presence table as this replica holds it; `ready: false` until it has
/// read the topic up to where it stood at start.
async fn presence(State(s): State<AdminState>, RawQuery(query): RawQuery) -> Response {
    let q = PresenceQuery::parse(query.as_deref());
    let Some(presence) = &s.hub.presence else {
        return (StatusCode::NOT_FOUND, "presence is disabled\n").into_response();
    };
    let mut view = presence.view();
    let ready = view.ready;
    let Some(tenant) = q.tenant else {
        return Json(view).into_response();
    };
    let mut tenant_view = view.tenants.remove(&tenant).unwrap_or_default();
    match q.room {
        Some(room) => {
            let users = tenant_view.rooms.remove(&room).unwrap_or_default();
            Json(
                serde_json::json!({"ready": ready, "tenant": tenant, "room": room, "users": users}),
            )
            .into_response()
        }
        None => Json(serde_json::json!({
            "ready": ready,
            "tenant": tenant,
            "users": tenant_view.users,
            "rooms": tenant_view.rooms,
        }))
        .into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_demo_page_names_the_replica_in_a_string_that_cannot_end_its_script() {
        let page = demo_page("pod-7</script><b>\"x\"\u{2028}", None);
        let line = page
            .lines()
            .find(|l| l.starts_with("const SERVER = "))
            .expect("the page's server line");
        assert_eq!(
            line,
            r#"const SERVER = "pod-7\u003c/script>\u003cb>\"x\"\u2028";"#
        );
        assert!(page.contains(r#"const EMBEDDED = "";"#));
    }

    #[test]
    fn the_demo_page_embeds_the_demo_token() {
        let page = demo_page("roomcast", Some("a.b.c"));
        assert!(page.contains(r#"const EMBEDDED = "a.b.c";"#));
        assert!(page.contains(r#"const SERVER = "roomcast";"#));
    }

    #[test]
    fn the_presence_query_is_percent_decoded_and_an_empty_tenant_is_kept() {
        let q = PresenceQuery::parse(Some("tenant=&room=task%3A9+a&x=1"));
        assert_eq!(q.tenant.as_deref(), Some(""));
        assert_eq!(q.room.as_deref(), Some("task:9 a"));
        let q = PresenceQuery::parse(None);
        assert_eq!((q.tenant, q.room), (None, None));
    }
}
