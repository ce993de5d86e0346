//! Shutdown: the signal that starts it, and the order in which the parts stop.
//!
//! SIGTERM or SIGINT starts a drain: readiness turns false and no new connection is accepted,
//! open clients are closed with 1001 in paced batches over the drain window (no reconnect
//! stampede on the other replicas), queues are flushed, then the consumer commits and the
//! process exits, each step bounded in time so a dead broker cannot hold the pod hostage.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tracing::{info, warn};

use crate::ws::Hub;

/// Resolves on the first SIGTERM or SIGINT.
pub async fn signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => info!("SIGTERM received"),
                    _ = tokio::signal::ctrl_c() => info!("SIGINT received"),
                }
            }
            Err(e) => {
                warn!(error = %e, "cannot listen for SIGTERM; only SIGINT stops the service");
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// The steps of a drain, each told through its own watch channel.
pub struct Stages {
    /// Turned true when the public listener must stop accepting.
    pub stop_accepting: watch::Sender<bool>,
    /// Turned true when the consumer must commit and stop.
    pub stop_consuming: watch::Sender<bool>,
}

impl Stages {
    pub fn new() -> Stages {
        Stages {
            stop_accepting: watch::channel(false).0,
            stop_consuming: watch::channel(false).0,
        }
    }

    /// Runs the drain. Sessions get the drain window plus a little to finish their close
    /// handshakes.
    pub async fn drain(&self, hub: &Arc<Hub>, window: Duration) {
        info!(
            connections = hub.sessions.len(),
            window_ms = window.as_millis() as u64,
            "draining"
        );
        let _ = self.stop_accepting.send(true);
        hub.drain(window).await;
        if !hub.sessions_ended(Duration::from_secs(3)).await {
            warn!(
                left = hub.sessions.len(),
                "sessions still open after the drain window"
            );
        }
        let _ = self.stop_consuming.send(true);
    }
}

impl Default for Stages {
    fn default() -> Self {
        Stages::new()
    }
}

/// Resolves when `rx` turns true (or its sender is gone).
pub async fn wait(mut rx: watch::Receiver<bool>) {
    let _ = rx.wait_for(|v| *v).await;
}
