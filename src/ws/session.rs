//! A session: one authenticated WebSocket connection from welcome to close.
//!
//! Two tasks share the socket. The writer drains the outbox, sending every queued frame in one
//! write followed by one flush, and pings on the heartbeat. The reader handles client frames,
//! watches for silence and token expiry, and keeps reading while closing so the close
//! handshake runs to its end. Neither ever waits on the consumer, nor the consumer on them.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use serde_json::Value;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::OwnedSemaphorePermit;
use tokio::time::{sleep_until, timeout, Instant};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_tungstenite::WebSocketStream;
use tracing::{debug, info_span, Instrument};

use super::outbox::{Inbox, Limits, Peer};
use super::protocol::{self, close, ClientFrame, Welcome};
use super::Hub;
use crate::auth::{now_secs, Identity};
use crate::pattern::{EventFilter, Pattern};
use crate::registry::ConnId;

/// How long a closing session keeps reading for the peer's close reply.
const CLOSE_GRACE: Duration = Duration::from_secs(3);
/// Frames the writer takes from the queue for one write.
const BATCH: usize = 256;

struct Session {
    id: ConnId,
    hub: Arc<Hub>,
    identity: Identity,
    peer: Peer,
    rooms: HashSet<String>,
    bad_frames: u32,
}

/// Runs a session to its end. The permit is released when it returns.
pub async fn run<S>(
    hub: Arc<Hub>,
    ws: WebSocketStream<S>,
    identity: Identity,
    permit: OwnedSemaphorePermit,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let id = hub.next_connection_id();
    let span = info_span!("session", conn = id, user = %identity.user);
    async move {
        let _permit = permit;
        let ws_cfg = &hub.config.websocket;
        let limits = Limits {
            frames: ws_cfg.queue_frames,
            bytes: ws_cfg.queue_bytes,
            shed_low_after: ws_cfg.shed_low_priority_after,
        };
        let heartbeat = Duration::from_secs(ws_cfg.heartbeat_seconds);
        let (peer, inbox) = Peer::new(id, limits);
        let (sink, stream) = ws.split();
        let mut session = Session {
            id,
            hub: hub.clone(),
            identity,
            peer: peer.clone(),
            rooms: HashSet::new(),
            bad_frames: 0,
        };
        hub.sessions.insert(id, peer.clone());
        hub.metrics.connections.inc();
        hub.metrics.connections_opened.inc();
        session.welcome();
        let writer = tokio::spawn(write_loop(sink, inbox, heartbeat).in_current_span());
        session.read_loop(stream).await;
        // The reader is done: make sure the writer stops too, then forget the connection.
        peer.close(close::NORMAL, "", false);
        hub.registry.leave_all(id);
        hub.sessions.remove(&id);
        let code = writer.await.unwrap_or(close::INTERNAL);
        hub.metrics.connections.dec();
        hub.metrics
            .connections_closed
            .with_label_values(&[&code.to_string()])
            .inc();
        debug!(code, "session ended");
    }
    .instrument(span)
    .await
}

impl Session {
    /// The welcome goes first in the queue, and the position snapshot is taken before the
    /// rooms are joined: a record read in between is then claimed by neither, never by both.
    fn welcome(&mut self) {
        let positions = self.hub.partitions.delivered_map();
        let rooms = self.identity.own_rooms();
        let frame = protocol::welcome(&Welcome {
            connection: self.id,
            user: &self.identity.user,
            tenant: self.identity.tenant.as_deref(),
            rooms: &rooms,
            heartbeat_seconds: self.hub.config.websocket.heartbeat_seconds,
            positions: &positions,
            server: &self.hub.config.server.name,
        });
        self.peer.reply(frame);
        for room in rooms {
            self.join(&room, None);
        }
    }

    async fn read_loop<S>(&mut self, mut stream: SplitStream<WebSocketStream<S>>)
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let idle = Duration::from_secs(self.hub.config.websocket.idle_timeout_seconds);
        let mut closing = self.peer.close_signal();
        let mut silent_until = Instant::now() + idle;
        loop {
            let expiry = sleep_until(self.expiry_instant());
            tokio::select! {
                next = timeout(silent_until - Instant::now(), stream.next()) => match next {
                    Err(_) => {
                        self.peer.close(close::GOING_AWAY, "heartbeat timeout", false);
                        break;
                    }
                    Ok(None) => return,
                    Ok(Some(Err(e))) => {
                        self.on_error(e);
                        break;
                    }
                    Ok(Some(Ok(message))) => {
                        silent_until = Instant::now() + idle;
                        if !self.on_message(message) {
                            break;
                        }
                    }
                },
                _ = expiry => {
                    self.peer.close(close::TOKEN, "token expired", false);
                    break;
                }
                _ = closed(&mut closing) => break,
            }
        }
        // Closing: keep reading so the peer's close reply (and pending pongs) get through.
        let _ = timeout(CLOSE_GRACE, async {
            while let Some(Ok(_)) = stream.next().await {}
        })
        .await;
    }

    fn expiry_instant(&self) -> Instant {
        let left = self.identity.expires_at.saturating_sub(now_secs());
        Instant::now() + Duration::from_secs(left.min(u32::MAX as u64))
    }

    fn on_error(&self, e: WsError) {
        let (code, reason) = match e {
            WsError::Capacity(_) => (close::TOO_BIG, "message too big"),
            WsError::Utf8(_) => (close::INVALID_PAYLOAD, "invalid UTF-8"),
            WsError::Protocol(_) => (close::POLICY, "protocol error"),
            _ => return,
        };
        self.reject("protocol");
        self.peer.close(code, reason, false);
    }

    /// Handles one client message; false when the connection must close.
    fn on_message(&mut self, message: Message) -> bool {
        match message {
            Message::Text(text) => match ClientFrame::parse(text.as_str()) {
                Ok(frame) => {
                    self.on_frame(frame);
                    true
                }
                Err(e) => self.bad_frame(&None, &format!("invalid frame: {e}")),
            },
            Message::Binary(_) => self.bad_frame(&None, "binary frames are not supported"),
            Message::Close(_) => {
                self.peer.close(close::NORMAL, "", true);
                false
            }
            Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => true,
        }
    }

    fn bad_frame(&mut self, id: &Option<Value>, message: &str) -> bool {
        self.reject("bad_frame");
        self.bad_frames += 1;
        self.peer
            .reply(protocol::error(id, "bad_request", None, message));
        if self.bad_frames > self.hub.config.websocket.max_bad_frames {
            self.peer
                .close(close::POLICY, "too many malformed frames", true);
            return false;
        }
        true
    }

    fn reject(&self, reason: &str) {
        self.hub
            .metrics
            .client_frames_rejected
            .with_label_values(&[reason])
            .inc();
    }

    fn on_frame(&mut self, frame: ClientFrame) {
        match frame {
            ClientFrame::Subscribe {
                id,
                rooms,
                features,
                events,
                token,
            } => self.subscribe(
                &id,
                protocol::requested_rooms(rooms, features),
                events,
                token,
            ),
            ClientFrame::Unsubscribe {
                id,
                rooms,
                features,
            } => self.unsubscribe(&id, protocol::requested_rooms(rooms, features)),
            ClientFrame::Ping { id } => self.peer.reply(protocol::pong(&id)),
            ClientFrame::Refresh { id, token } => self.refresh(&id, &token),
        }
    }

    fn subscribe(
        &mut self,
        id: &Option<Value>,
        rooms: Vec<String>,
        events: Option<Vec<String>>,
        token: Option<String>,
    ) {
        if rooms.is_empty() {
            self.bad_frame(id, "subscribe names no rooms");
            return;
        }
        let filter = match events.map(|e| EventFilter::parse(&e)).transpose() {
            Ok(f) => f.map(Arc::new),
            Err(e) => {
                self.bad_frame(id, &format!("events: {e}"));
                return;
            }
        };
        let grants = match token.map(|t| self.hub.auth.subscription_grants(&self.identity, &t)) {
            None => Vec::new(),
            Some(Ok(g)) => g,
            Some(Err(e)) => {
                self.count_subscriptions("invalid_token", rooms.len());
                let message = format!("subscription token refused: {e}");
                self.peer
                    .reply(protocol::error(id, "invalid_token", None, &message));
                return;
            }
        };
        let mut joined = Vec::new();
        for room in rooms {
            match self.admit(&room, &grants) {
                Ok(()) => {
                    self.join(&room, filter.clone());
                    joined.push(room);
                }
                Err((code, message)) => {
                    self.count_subscriptions(code, 1);
                    self.peer
                        .reply(protocol::error(id, code, Some(&room), message));
                }
            }
        }
        self.count_subscriptions("ok", joined.len());
        self.peer.reply(protocol::ok(id, Some(&joined)));
    }

    fn admit(&self, room: &str, grants: &[Pattern]) -> Result<(), (&'static str, &'static str)> {
        if !protocol::valid_room_name(room) {
            return Err((
                "invalid_room",
                "room names are 1 to 200 printable characters",
            ));
        }
        if !self.identity.may_join(room) && !grants.iter().any(|g| g.matches(room)) {
            return Err(("forbidden", "not allowed to join this room"));
        }
        let max = self.hub.config.websocket.max_rooms_per_connection;
        if self.rooms.len() >= max && !self.rooms.contains(room) {
            return Err(("too_many_rooms", "room limit for this connection reached"));
        }
        Ok(())
    }

    fn join(&mut self, room: &str, filter: Option<Arc<EventFilter>>) {
        let tenant = self.identity.tenant.as_deref();
        self.hub
            .registry
            .join(self.id, tenant, room, &self.peer, filter);
        self.rooms.insert(room.to_string());
    }

    fn unsubscribe(&mut self, id: &Option<Value>, rooms: Vec<String>) {
        let tenant = self.identity.tenant.as_deref();
        let mut left = Vec::new();
        for room in rooms {
            if self.rooms.remove(&room) {
                self.hub.registry.leave(self.id, tenant, &room);
                left.push(room);
            }
        }
        self.peer.reply(protocol::ok(id, Some(&left)));
    }

    /// A fresh token for the same user and tenant extends the connection's life.
    fn refresh(&mut self, id: &Option<Value>, token: &str) {
        match self.hub.auth.authenticate(token) {
            Ok(fresh)
                if fresh.user == self.identity.user && fresh.tenant == self.identity.tenant =>
            {
                self.identity = fresh;
                self.peer.reply(protocol::ok(id, None));
            }
            Ok(_) => self.peer.reply(protocol::error(
                id,
                "invalid_token",
                None,
                "token is for another user or tenant",
            )),
            Err(e) => {
                let message = format!("token refused: {e}");
                self.peer
                    .reply(protocol::error(id, "invalid_token", None, &message));
            }
        }
    }

    fn count_subscriptions(&self, result: &str, n: usize) {
        self.hub
            .metrics
            .subscriptions
            .with_label_values(&[result])
            .inc_by(n as u64);
    }
}

/// Drains the outbox into the socket: every frame queued at that moment in one write, then one
/// flush. Returns the close code sent, or 1006 when the socket broke first.
async fn write_loop<S>(
    mut sink: SplitSink<WebSocketStream<S>, Message>,
    mut inbox: Inbox,
    heartbeat: Duration,
) -> u16
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut closing = inbox.peer.close_signal();
    let mut batch = Vec::with_capacity(16);
    let mut ping = tokio::time::interval_at(Instant::now() + heartbeat, heartbeat);
    loop {
        tokio::select! {
            biased;
            _ = closed(&mut closing) => break,
            n = inbox.rx.recv_many(&mut batch, BATCH) => {
                if n == 0 || send_batch(&mut sink, &mut batch, &inbox.peer).await.is_err() {
                    return 1006;
                }
            }
            _ = ping.tick() => {
                if sink.send(Message::Ping(Default::default())).await.is_err() {
                    return 1006;
                }
            }
        }
    }
    let request = inbox
        .peer
        .close_request()
        .expect("woken by a close request");
    if request.flush {
        while let Ok(frame) = inbox.rx.try_recv() {
            batch.push(frame);
        }
        let _ = send_batch(&mut sink, &mut batch, &inbox.peer).await;
    }
    let frame = CloseFrame {
        code: CloseCode::from(request.code),
        reason: request.reason.into(),
    };
    match sink.send(Message::Close(Some(frame))).await {
        Ok(()) => request.code,
        Err(_) => 1006,
    }
}

/// Resolves once a close has been requested. The guard `wait_for` returns is not `Send`, so
/// it is dropped here rather than inside a `select!`.
async fn closed(signal: &mut tokio::sync::watch::Receiver<Option<super::outbox::CloseRequest>>) {
    let _ = signal.wait_for(Option::is_some).await;
}

async fn send_batch<S>(
    sink: &mut SplitSink<WebSocketStream<S>, Message>,
    batch: &mut Vec<protocol::Frame>,
    peer: &Peer,
) -> Result<(), WsError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut bytes = 0;
    for frame in batch.drain(..) {
        bytes += frame.len();
        sink.feed(Message::Text(frame)).await?;
    }
    peer.sent(bytes);
    sink.flush().await
}
