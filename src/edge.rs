//! The public listener from `accept` until a connection is upgraded: every bound that holds
//! before anyone has shown a token.
//!
//! A connection gets a place among `server.max_handshakes` (and, from one peer address, among
//! `server.max_handshakes_per_address`) or is answered 503 at once; it then has
//! `server.handshake_timeout_seconds` in all to send a request head of at most
//! `server.max_request_head_bytes` and be answered. Its place is given back when it upgrades
//! (the session's own limits take over) or closes. Without these, silent or slow peers could
//! hold every file descriptor, and unfinished request heads hundreds of megabytes.

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::ConnectInfo;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::Router;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::Request;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};
use tower_service::Service;
use tracing::{debug, warn};

use crate::metrics::Metrics;
use crate::proxy::TrustedProxies;
use crate::quota::{Quota, Share};

/// Answer to a connection refused before its request is read: no room for another handshake.
const BUSY: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: text/plain\r\n\
content-length: 20\r\nconnection: close\r\n\r\ntoo_many_handshakes\n";

/// The public listener's accept loop and what it bounds.
pub struct Edge {
    router: Router,
    metrics: Arc<Metrics>,
    proxies: TrustedProxies,
    handshakes: Arc<Semaphore>,
    per_address: Arc<Quota<IpAddr>>,
    deadline: Duration,
    http: http1::Builder,
    /// Connections that ended before an upgrade, for `memory.rs`: their buffers are freed
    /// as sessions' are.
    ended: Arc<AtomicU64>,
}

/// What a connection holds until it upgrades or closes.
struct Place {
    _permit: OwnedSemaphorePermit,
    _address: Share<IpAddr>,
}

impl Edge {
    pub fn new(
        config: &crate::config::ServerConfig,
        router: Router,
        metrics: Arc<Metrics>,
        proxies: TrustedProxies,
    ) -> Edge {
        let deadline = Duration::from_secs_f64(config.handshake_timeout_seconds);
        let mut http = http1::Builder::new();
        http.timer(TokioTimer::new())
            .header_read_timeout(deadline)
            .max_buf_size(config.max_request_head_bytes);
        Edge {
            router,
            metrics,
            proxies,
            handshakes: Arc::new(Semaphore::new(config.max_handshakes)),
            per_address: Quota::new(config.max_handshakes_per_address),
            deadline,
            http,
            ended: Arc::default(),
        }
    }

    /// See the `ended` field.
    pub fn ended(&self) -> Arc<AtomicU64> {
        self.ended.clone()
    }

    /// Accepts until `stop` turns true.
    pub async fn run(self, listener: TcpListener, mut stop: watch::Receiver<bool>) {
        let edge = Arc::new(self);
        loop {
            let accepted = tokio::select! {
                accepted = listener.accept() => accepted,
                _ = stop.wait_for(|v| *v) => return,
            };
            match accepted {
                Ok((stream, peer)) => edge.admit(stream, peer),
                Err(e) => accept_failed(e).await,
            }
        }
    }

    fn admit(self: &Arc<Self>, stream: TcpStream, peer: SocketAddr) {
        no_delay(&stream);
        let Some(place) = self.place(peer.ip()) else {
            // Best effort: the peer learns why, but nothing waits for a peer that does not
            // read.
            let _ = stream.try_write(BUSY);
            return;
        };
        let edge = self.clone();
        tokio::spawn(async move {
            edge.serve(stream, peer).await;
            drop(place);
            edge.ended.fetch_add(1, Ordering::Relaxed);
        });
    }

    fn place(&self, peer: IpAddr) -> Option<Place> {
        let Ok(permit) = self.handshakes.clone().try_acquire_owned() else {
            self.refused("too_many_handshakes");
            return None;
        };
        let address = if self.proxies.contains(peer) {
            Quota::unlimited()
        } else {
            let Some(share) = self.per_address.take(peer) else {
                self.refused("too_many_handshakes_for_address");
                return None;
            };
            share
        };
        Some(Place {
            _permit: permit,
            _address: address,
        })
    }

    async fn serve(&self, stream: TcpStream, peer: SocketAddr) {
        let router = self.router.clone();
        let service = hyper::service::service_fn(move |mut req: Request<Incoming>| {
            req.extensions_mut().insert(ConnectInfo(peer));
            let answer = router.clone().call(req);
            async move {
                let mut response = answer.await?;
                // One request per connection unless it upgrades: a kept-alive connection
                // would hold its place among the handshakes while idle.
                if response.status() != StatusCode::SWITCHING_PROTOCOLS {
                    close_after(response.headers_mut());
                }
                Ok::<_, std::convert::Infallible>(response)
            }
        });
        let connection = self
            .http
            .serve_connection(TokioIo::new(stream), service)
            .with_upgrades();
        match tokio::time::timeout(self.deadline, connection).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) if e.is_parse_too_large() => self.refused("request_head_too_large"),
            Ok(Err(e)) if e.is_timeout() => self.refused("handshake_timeout"),
            Ok(Err(e)) => debug!(error = %e, "connection ended before an upgrade"),
            Err(_) => self.refused("handshake_timeout"),
        }
    }

    fn refused(&self, reason: &str) {
        self.metrics
            .handshake_failures
            .with_label_values(&[reason])
            .inc();
    }
}

/// Adds `close` to a response's connection options, keeping those it lists already (a 426
/// lists `upgrade`, as the `Upgrade` header it carries requires).
fn close_after(headers: &mut HeaderMap) {
    let options = match headers.get(header::CONNECTION).map(HeaderValue::to_str) {
        Some(Ok(listed)) => format!("{listed}, close"),
        _ => "close".to_string(),
    };
    if let Ok(value) = HeaderValue::try_from(options) {
        headers.insert(header::CONNECTION, value);
    }
}

/// Out of file descriptors, `accept` fails at once until one is freed: pause rather than
/// spin. Anything else (a peer gone before it was accepted) is that peer's alone.
async fn accept_failed(e: std::io::Error) {
    const ENFILE: i32 = 23;
    const EMFILE: i32 = 24;
    if matches!(e.raw_os_error(), Some(ENFILE | EMFILE)) {
        warn!(error = %e, "cannot accept: out of file descriptors");
        tokio::time::sleep(Duration::from_millis(50)).await;
    } else {
        debug!(error = %e, "accept failed");
    }
}

/// Frames are small and must leave at once. With Nagle's algorithm on, a frame written while
/// an earlier one (a ping, an event) is unacknowledged waits for the peer's delayed ACK,
/// 40 ms on Linux.
pub fn no_delay(stream: &TcpStream) {
    if let Err(e) = stream.set_nodelay(true) {
        warn!(error = %e, "could not turn Nagle's algorithm off for a connection");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refusal_closes_its_connection_and_keeps_its_own_options() {
        let mut headers = HeaderMap::new();
        close_after(&mut headers);
        assert_eq!(headers[header::CONNECTION], "close");
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        close_after(&mut headers);
        assert_eq!(headers[header::CONNECTION], "upgrade, close");
    }
}
