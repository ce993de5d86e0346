//! The conformance harness: roomcast's own WebSocket edge, turned into an echo server for the
//! Autobahn|Testsuite fuzzingclient (run by `scripts/autobahn`).
//!
//! Everything between the socket and a whole message is the service's: the accept loop and
//! HTTP/1 upgrade (`edge.rs`, `handshake.rs`, with a token as a browser gives it), the
//! session's reader and close handshake (`session.rs`), the client frame decoder and the
//! server frames (`wire.rs`), the outbox and the writer. Only the hub's `echo` switch differs:
//! a session then sends back each text and binary message instead of reading roomcast's JSON
//! protocol, and sends no welcome. So a change to any of those files shows in the suite's
//! results.
//!
//! Prints the URL to test (token included) on its first line, then serves until killed.
//! Usage: `autobahn_echo [ADDRESS]` (default `127.0.0.1:0`).

use std::sync::Arc;

use roomcast::auth::{now_secs, sign_hs256, Claims};
use roomcast::config::Config;
use roomcast::edge::Edge;
use roomcast::http::public_router;
use roomcast::metrics::Metrics;
use roomcast::position::PartitionTable;
use roomcast::setup::Setup;
use roomcast::ws::Hub;

/// Signs the harness's only token; the harness listens on loopback alone.
const SECRET: &str = "autobahn-echo-harness-secret";
/// The largest message of the suite's cases 9.x (16 MiB), with room for its queue.
const MAX_MESSAGE: usize = 16 * 1024 * 1024;

/// The service's defaults, but for the limits that would stand between the suite and an
/// echo: its cases send up to 16 MiB messages, thousands of them per connection.
fn config(listen: &str) -> Config {
    let mut config = Config::default();
    config.server.listen = listen.into();
    config.auth.secret = Some(SECRET.into());
    let ws = &mut config.websocket;
    ws.max_message_bytes = MAX_MESSAGE;
    ws.max_frame_bytes = MAX_MESSAGE;
    ws.queue_bytes = 4 * MAX_MESSAGE;
    ws.queue_frames = 1 << 20;
    ws.client_messages_per_second = 1_000_000;
    ws.client_burst = 1_000_000;
    // No server ping in the middle of a case.
    ws.heartbeat_seconds = 3_600;
    ws.idle_timeout_seconds = 7_200;
    config
}

fn token() -> String {
    let claims = Claims {
        sub: "autobahn".into(),
        exp: now_secs() + 24 * 3_600,
        ..Claims::default()
    };
    sign_hs256(SECRET, &claims)
}

#[tokio::main]
async fn main() {
    let listen = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:0".into());
    let setup = Setup::build(config(&listen)).expect("the harness's configuration");
    let metrics = Arc::new(Metrics::new());
    let parts = roomcast::hub_parts(&setup, metrics.clone(), Arc::new(PartitionTable::default()));
    let mut hub = Hub::new(setup, parts);
    hub.echo = true;
    let hub = Arc::new(hub);
    let config = hub.config().clone();

    let listener = tokio::net::TcpListener::bind(&config.server.listen)
        .await
        .expect("cannot listen");
    let addr = listener.local_addr().expect("a bound address");
    println!("ws://{addr}/ws?token={}", token());

    let edge = Edge::new(
        &config.server,
        public_router(hub.clone(), None),
        metrics,
        hub.proxies().clone(),
    );
    // Never told to stop: the harness serves until it is killed.
    let (_stop, stop) = tokio::sync::watch::channel(false);
    edge.run(listener, stop).await;
}
