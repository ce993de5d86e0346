//! roomcast: reads records from Kafka, works out which rooms each is for, and pushes it to the
//! WebSocket connections subscribed to those rooms.
//!
//! [`serve`] wires the parts together and runs them until shutdown; see docs/ARCHITECTURE.md
//! for the map.
//!
//! The public modules are what the binary, the benchmarks, the examples and the integration
//! tests use; the rest is the crate's own.

pub mod auth;
pub mod config;
pub mod demo;
pub mod edge;
mod frame;
pub mod http;
mod json_view;
mod kafka;
mod memory;
pub mod metrics;
mod pattern;
pub mod position;
mod presence;
mod proxy;
mod quota;
pub mod registry;
mod resume;
pub mod route;
pub mod setup;
pub mod shutdown;
pub mod thread_cache;
pub mod ws;

use std::future::{Future, IntoFuture};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::serve::ListenerExt;
use tokio::net::{TcpListener, TcpSocket};
use tracing::{error, info, warn};

use crate::config::ConfigError;
use crate::kafka::consumer::{ConsumerError, KafkaConsumer, Shared};
use crate::kafka::presence::PresenceTasks;
use crate::kafka::replay::KafkaReplay;
use crate::metrics::Metrics;
use crate::position::PartitionTable;
use crate::presence::live::Presence;
use crate::presence::record::Origin;
use crate::resume::ReplayBuffer;
use crate::setup::Setup;
use crate::shutdown::Stages;
use crate::ws::{Hub, HubParts};

/// Milliseconds since the Unix epoch, as Kafka timestamps count them.
pub fn unix_millis() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Kafka(#[from] ConsumerError),
    #[error("cannot listen on {addr}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("presence: {0}")]
    Presence(#[from] rdkafka::error::KafkaError),
    #[error("demo: {0}")]
    Demo(String),
    /// The consumer thread ended while the service was running: nothing would flow any more,
    /// so the process drains and exits to be restarted.
    #[error("the Kafka consumer stopped: {0}")]
    ConsumerStopped(String),
}

/// How long a drain waits for the consumer's last commit.
const CONSUMER_STOP: Duration = Duration::from_secs(7);

/// Accept backlog: a reconnect storm after a restart brings thousands of handshakes at once,
/// and the usual 128 drops SYNs, leaving clients to wait for retransmits.
const LISTEN_BACKLOG: u32 = 4096;

/// Binds a listener and tells the address it got (the port may have been 0). A send buffer
/// size set on the listener is inherited by every connection it accepts.
fn bind(addr: SocketAddr, send_buffer: u32) -> Result<(TcpListener, SocketAddr), Error> {
    let bind_error = |source| Error::Bind { addr, source };
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()
    } else {
        TcpSocket::new_v6()
    }
    .map_err(bind_error)?;
    socket.set_reuseaddr(true).map_err(bind_error)?;
    if send_buffer > 0 {
        socket
            .set_send_buffer_size(send_buffer)
            .map_err(bind_error)?;
    }
    socket.bind(addr).map_err(bind_error)?;
    let listener = socket.listen(LISTEN_BACKLOG).map_err(bind_error)?;
    let local = listener.local_addr().map_err(bind_error)?;
    Ok((listener, local))
}

/// The state the hub shares or reads back with, for `setup`: the replay buffer, the reader
/// of Kafka for resumes, and the runtime a large room's fan-out spreads over (the current
/// one, if any). `serve` builds the service on it; the conformance harness and in-process
/// tests build a hub alone on it.
pub fn hub_parts(
    setup: &Setup,
    metrics: Arc<Metrics>,
    partitions: Arc<PartitionTable>,
) -> HubParts {
    let r = &setup.config.resume;
    let history = KafkaReplay::new(
        setup.kafka.replay.clone(),
        setup.routes.clone(),
        r.kafka_concurrency,
        Duration::from_secs(r.max_age_seconds),
        r.max_replay_records,
    );
    HubParts {
        metrics,
        partitions,
        replay: Arc::new(ReplayBuffer::new(setup.replay)),
        history,
        runtime: tokio::runtime::Handle::try_current().ok(),
        presence: presence(&setup.config),
    }
}

/// This replica's presence, with an incarnation of its own start, when presence is on.
fn presence(config: &config::Config) -> Option<Arc<Presence>> {
    use std::hash::{BuildHasher, RandomState};
    if !config.presence.enabled {
        return None;
    }
    // The start's millisecond and a random part: two starts within one millisecond (a
    // restart loop) still differ.
    let random = RandomState::new().hash_one(std::process::id()) & 0xffff;
    Some(Arc::new(Presence::new(Origin {
        replica: config.server.name.clone(),
        incarnation: format!("{:x}-{random:04x}", unix_millis()),
    })))
}

/// Runs the service built by `setup` until `stop` resolves, then drains and returns.
pub async fn serve(
    setup: Setup,
    demo_token: Option<String>,
    stop: impl Future<Output = ()>,
) -> Result<(), Error> {
    let config = setup.config.clone();
    let (listen, admin_listen, kafka) = (setup.listen, setup.admin_listen, setup.kafka.clone());
    let metrics = Arc::new(Metrics::new());
    let topics: Vec<&str> = config.routes.iter().map(|r| r.topic.as_str()).collect();
    metrics.prime(&topics);
    let parts = hub_parts(&setup, metrics, Arc::new(PartitionTable::default()));
    let (partitions, replay) = (parts.partitions.clone(), parts.replay.clone());
    let routes = setup.routes.clone();
    let hub = Arc::new(Hub::new(setup, parts));
    let shared = Shared {
        delivery: hub.clone(),
        routes,
        partitions,
        replay,
        metrics: hub.metrics.clone(),
    };
    let consumer = KafkaConsumer::new(&kafka, &config, shared)?;
    let presence = match &hub.presence {
        Some(p) => Some(
            PresenceTasks::start(
                &config.kafka,
                &config.presence,
                p.clone(),
                hub.metrics.clone(),
                hub.clone(),
            )
            .await?,
        ),
        None => None,
    };

    let (public, public_addr) = bind(listen, config.websocket.send_buffer_bytes)?;
    let (admin, admin_addr) = bind(admin_listen, 0)?;
    info!(public = %public_addr, admin = %admin_addr, server = %config.server.name, "listening");
    if let Some(token) = &demo_token {
        demo::announce(public_addr, admin_addr, token);
    }

    let stages = Stages::new();
    let stop_consuming = stages.stop_consuming.subscribe();
    let mut consuming = tokio::task::spawn_blocking(move || consumer.run(stop_consuming));
    let public_router = http::public_router(hub.clone(), demo_token);
    let edge = edge::Edge::new(
        &config.server,
        public_router,
        hub.metrics.clone(),
        hub.proxies.clone(),
    );
    let unupgraded = edge.ended();
    let public_task = tokio::spawn(edge.run(public, stages.stop_accepting.subscribe()));
    tokio::spawn(memory::run(
        hub.clone(),
        unupgraded,
        stages.stop_accepting.subscribe(),
    ));
    let admin_state = http::AdminState { hub: hub.clone() };
    let (admin_stop, admin_stopped) = tokio::sync::watch::channel(false);
    let admin_task = tokio::spawn(
        axum::serve(
            admin.tap_io(|s| edge::no_delay(s)),
            http::admin_router(admin_state),
        )
        .with_graceful_shutdown(shutdown::wait(admin_stopped))
        .into_future(),
    );

    // The consumer ends only when told to: if it ends first (a panic), readiness drops with
    // the drain, and the process exits with an error for its supervisor to restart it.
    let failure = tokio::select! {
        () = stop => None,
        ended = &mut consuming => Some(consumer_failure(ended)),
    };
    if let Some(reason) = &failure {
        error!(%reason, "the Kafka consumer stopped: draining, then exiting");
    }
    let window = Duration::from_secs_f64(config.server.drain_seconds);
    stages.drain(&hub, window).await;
    // After the drain, whose closes went out as changes: the goodbye then removes whatever
    // is left at once, rather than when the lease runs out.
    if let Some(tasks) = presence {
        tasks.stop().await;
    }
    // The consumer commits within its own 5 s bound; past a little more it is stuck inside a
    // record, and the process exits without it rather than outlive its grace period.
    if failure.is_none()
        && tokio::time::timeout(CONSUMER_STOP, consuming)
            .await
            .is_err()
    {
        warn!("the consumer did not stop in time; exiting without its last commit");
    }
    let _ = admin_stop.send(true);
    let _ = tokio::time::timeout(Duration::from_secs(1), public_task).await;
    let _ = tokio::time::timeout(Duration::from_secs(1), admin_task).await;
    match failure {
        Some(reason) => Err(Error::ConsumerStopped(reason)),
        None => {
            info!("stopped");
            Ok(())
        }
    }
}

/// What ended the consumer before it was told to stop.
fn consumer_failure(ended: Result<(), tokio::task::JoinError>) -> String {
    match ended {
        Ok(()) => "it returned".into(),
        Err(e) if e.is_panic() => {
            let panic = e.into_panic();
            let message = panic
                .downcast_ref::<String>()
                .map(String::as_str)
                .or_else(|| panic.downcast_ref::<&str>().copied())
                .unwrap_or("no message");
            format!("it panicked: {message}")
        }
        Err(e) => e.to_string(),
    }
}
