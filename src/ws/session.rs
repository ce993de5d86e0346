//! A session: one authenticated WebSocket connection from welcome to close.
//!
//! Two tasks share the socket. The writer (see `writer.rs`) drains the outbox. The reader,
//! here, handles client frames, watches for silence and token expiry, and keeps reading while
//! closing so the close handshake runs to its end. Neither ever waits on the consumer, nor the
//! consumer on them.

use std::collections::{HashMap, HashSet};
use std::future::{poll_fn, Future};
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::net::TcpStream;
use tokio::time::{sleep_until, timeout, Instant};
use tracing::{debug, debug_span, Instrument};

use super::outbox::{Handover, Limits, Peer};
use super::protocol::{self, close, ClientFrame, ErrorCode, RequestId, Welcome};
use super::throttle::{Allowance, Budget, Throttle, Verdict};
use super::wire::{Decoder, Incoming, WireError};
use super::{writer, Hub};
use crate::auth::{now_secs, Identity};
use crate::frame::Frame;
use crate::pattern::{EventFilter, Pattern, PatternError};
use crate::position::PositionMap;
use crate::quota::Admission;
use crate::registry::ConnId;
use crate::resume::lag::{self, Behind, Level};
use crate::resume::{ResumePlan, Selection};
use crate::route::Priority;

/// How long a closing session keeps reading for the peer's close reply, and then waits for
/// its writer (which may be stuck on a peer that stopped reading).
const CLOSE_GRACE: Duration = Duration::from_secs(3);
/// How much more a closing session reads (beyond the message under way) while it waits for
/// the peer's close reply. A client that goes on writing after its close is cut off here
/// rather than read for the whole grace: a flooder closed for its rate would otherwise be
/// read flat out, 512 bytes a call, until it noticed.
const CLOSE_READ_BYTES: u32 = 64 * 1024;
/// How long a resume waits for this replica: to be ready if it is still starting, then to have
/// read as far as the client's map if it is behind it (see `lag.rs`), and how often it looks.
/// Long enough for a restart's warm-up. Past it, a replica not yet ready goes on with what it
/// has (a gap it cannot place is a `resync`); one still behind the map says so (`lagging`).
const READY_WAIT: Duration = Duration::from_secs(10);
const READY_POLL: Duration = Duration::from_millis(20);

/// What a subscribe or resume asks for, besides its rooms.
struct Asked {
    events: Option<Vec<String>>,
    token: Option<String>,
    presence: bool,
}

/// How a connection is in a room: the events it takes, and whether it hears who comes and
/// goes.
#[derive(Default)]
struct Interest {
    filter: Option<Arc<EventFilter>>,
    presence: bool,
}

struct Session {
    id: ConnId,
    hub: Arc<Hub>,
    identity: Identity,
    /// When the token expires, unless refreshed.
    expires: Instant,
    peer: Peer,
    /// Joined rooms and their event filters.
    rooms: HashMap<String, Option<Arc<EventFilter>>>,
    bad_frames: u32,
    /// The client's budget of messages.
    throttle: Throttle,
    /// The client's budget of room changes.
    room_changes: Allowance,
    /// Set when the client asked to resume (`?resume=1`): the positions of the welcome's
    /// instant (not sent to it), and no room joined yet, until its first frame.
    awaiting_resume: Option<PositionMap>,
    /// Whether the hub holds this connection (rooms, session table, presence): set by the
    /// welcome, cleared by `forget`, which a session dropped half way (a panic, an aborted
    /// task) runs on drop, so that no room keeps a dead member and no user stays online.
    known: bool,
    /// This connection's share of the connection limits, given back when the session ends.
    _admission: Admission,
}

impl Drop for Session {
    /// Ended or dropped half way, a session leaves nothing behind: its writer is told to go
    /// (a no-op after the usual end), the hub forgets it, and it is counted out once.
    fn drop(&mut self) {
        self.peer.close(close::INTERNAL, "", false);
        self.forget();
        self.hub.metrics.connections.dec();
    }
}

/// Starts a session: spawns its writer now, and returns the reader, which queues the welcome
/// and then runs the session to its end. The admission (its share of the connection limits)
/// is given back when that returns.
///
/// Not an `async fn`: everything an async block captures stays in its state for the whole
/// connection, even once moved out, so the socket and identity are split and placed before
/// the block, which captures only small handles.
/// `early` holds whatever the client sent right behind its upgrade request.
pub fn run(
    hub: Arc<Hub>,
    stream: TcpStream,
    early: Bytes,
    identity: Identity,
    admission: Admission,
    resume_requested: bool,
) -> impl Future<Output = ()> + Send {
    let id = hub.next_connection_id();
    // At debug level only: an enabled span costs every connection a few hundred bytes in
    // the log subscriber for its whole life.
    let span = debug_span!("session", conn = id, user = %identity.user);
    let ws_cfg = &hub.config.websocket;
    let heartbeat = Duration::from_secs(ws_cfg.heartbeat_seconds);
    // Shared rather than split: the halves' readiness futures would make every idle
    // session's state larger, where polling readiness directly costs nothing.
    let socket = Arc::new(stream);
    let (peer, inbox) = Peer::new(Limits::from(ws_cfg), Some(socket.clone()));
    let reader = Reader {
        socket: socket.clone(),
        buf: BytesMut::from(&early[..]),
        decoder: Decoder::new(ws_cfg.max_frame_bytes, ws_cfg.max_message_bytes),
        chunk: ws_cfg.read_buffer_bytes,
        taken: 0,
    };
    let mut session = Session {
        id,
        hub: hub.clone(),
        expires: Session::expiry_instant(&identity),
        identity,
        peer,
        rooms: HashMap::new(),
        bad_frames: 0,
        throttle: Throttle::new(Instant::now()),
        room_changes: Allowance::new(Instant::now()),
        // Filled with the welcome's positions.
        awaiting_resume: resume_requested.then(PositionMap::new),
        known: false,
        _admission: admission,
    };
    hub.metrics.connections.inc();
    hub.metrics.connections_opened.inc();
    let writer = writer::run(hub.clone(), socket, inbox, id, heartbeat).instrument(span.clone());
    let writer = tokio::spawn(writer);
    async move {
        session.welcome().await;
        session.read_loop(reader).await;
        session.end(writer).await;
    }
    .instrument(span)
}

/// The socket's read side and the client messages in it.
struct Reader {
    /// Read only here; written by the writer and by `Peer::deliver`.
    socket: Arc<TcpStream>,
    /// Bytes read but not yet decoded; empty, and holding no memory, between messages.
    buf: BytesMut,
    decoder: Decoder,
    /// Bytes asked of the socket per read.
    chunk: u32,
    /// Bytes taken from the socket so far, wrapping (only differences are read). Both u32 so
    /// that they fit where one usize was: every idle session carries this.
    taken: u32,
}

impl Reader {
    /// The next message; None once the socket is closed or broken.
    async fn next(&mut self) -> Option<Result<Incoming, WireError>> {
        loop {
            match self.decoder.decode(&mut self.buf) {
                Ok(Some(message)) => {
                    self.release();
                    return Some(Ok(message));
                }
                Ok(None) => {}
                Err(e) => return Some(Err(e)),
            }
            self.release();
            // Waits with no buffer: an idle connection holds none.
            let socket = &self.socket;
            if poll_fn(|cx| socket.poll_read_ready(cx)).await.is_err() {
                return None;
            }
            self.buf.reserve(self.chunk as usize);
            match self.socket.try_read_buf(&mut self.buf) {
                Ok(0) => return None,
                Ok(n) => self.taken = self.taken.wrapping_add(n as u32),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(_) => return None,
            }
        }
    }

    fn release(&mut self) {
        if self.buf.is_empty() && self.buf.capacity() > 0 {
            self.buf = BytesMut::new();
        }
    }
}

/// The server has closed: reads on until the peer's close reply, so that the reply is not met
/// with a reset, within the grace and `CLOSE_READ_BYTES`. Whatever is left unread when it
/// gives up makes the kernel reset the connection, which is what a flooder should get.
async fn await_close_reply(mut reader: Reader) {
    let from = reader.taken;
    let _ = timeout(CLOSE_GRACE, async {
        while let Some(Ok(message)) = reader.next().await {
            if matches!(message, Incoming::Close(_))
                || reader.taken.wrapping_sub(from) > CLOSE_READ_BYTES
            {
                break;
            }
        }
    })
    .await;
}

impl Session {
    /// The reader is done: makes sure the writer stops too, then forgets the connection.
    async fn end(&mut self, mut writer: tokio::task::JoinHandle<u16>) {
        let hub = self.hub.clone();
        self.peer.close(close::NORMAL, "", false);
        self.forget();
        let code = match timeout(CLOSE_GRACE, &mut writer).await {
            Ok(done) => done.unwrap_or(close::INTERNAL),
            Err(_) => {
                writer.abort();
                writer::ABNORMAL
            }
        };
        hub.metrics
            .connections_closed
            .with_label_values(&[&code.to_string()])
            .inc();
        debug!(code, "session ended");
    }

    /// Leaves every room and the session table. Not under the cut: nothing is promised about
    /// a record in flight while a connection goes, and 10,000 connections leaving 256 rooms
    /// each, one after the other under the cut, held the consumer up for two seconds.
    fn forget(&mut self) {
        if !std::mem::take(&mut self.known) {
            return;
        }
        self.hub.registry.leave_all(self.id);
        self.hub.listeners.leave_all(self.id);
        self.hub.sessions.remove(&self.id);
        if let Some(presence) = &self.hub.presence {
            let (tenant, user) = (self.identity.tenant.as_deref(), &self.identity.user);
            for room in self.rooms.keys() {
                if let Some(presence) = self.hub.presence_of(room) {
                    presence.local.left(tenant, room, user);
                }
            }
            presence.local.disconnected(tenant, user);
        }
    }

    /// The welcome goes first in the queue, and the writer pings only behind it. Its
    /// positions and the joining of the user's own rooms happen under the hub's cut, so every
    /// record after the positions is delivered live and none before it is. A resuming client
    /// joins nothing until its resume, and is told no positions: it has received nothing up
    /// to them, and keeps its own map until the resume's cut.
    async fn welcome(&mut self) {
        self.known = true;
        // Online before any of its rooms: a drain between the two tells them in this order.
        if let Some(presence) = &self.hub.presence {
            presence
                .local
                .connected(self.identity.tenant.as_deref(), &self.identity.user);
        }
        let hub = self.hub.clone();
        let _cut = hub.cut().await;
        let positions = self.hub.partitions.delivered_map();
        let rooms = self.identity.own_rooms();
        let resuming = self.awaiting_resume.is_some();
        let frame = protocol::welcome(&Welcome {
            connection: self.id,
            user: &self.identity.user,
            tenant: self.identity.tenant.as_deref(),
            rooms: &rooms,
            heartbeat_seconds: self.hub.config.websocket.heartbeat_seconds,
            positions: (!resuming).then_some(&positions),
            server: &self.hub.config.server.name,
        });
        if !self.hub.echo {
            self.peer
                .hand_over(&frame, Priority::Critical, Handover::Queue);
        }
        if resuming {
            self.awaiting_resume = Some(positions);
        } else {
            for room in rooms {
                self.join(&room, None, false);
            }
            self.peer.set_live();
        }
        hub.sessions.insert(self.id, self.peer.clone());
    }

    async fn read_loop(&mut self, mut reader: Reader) {
        let idle = Duration::from_secs(self.hub.config.websocket.idle_timeout_seconds);
        let mut silent_until = Instant::now() + idle;
        loop {
            let expiry = sleep_until(self.expires);
            let message = tokio::select! {
                next = timeout(silent_until - Instant::now(), reader.next()) => match next {
                    Err(_) => {
                        self.peer.close(close::GOING_AWAY, "heartbeat timeout", false);
                        break;
                    }
                    Ok(None) => return,
                    Ok(Some(Err(e))) => {
                        self.on_error(e);
                        // A malformed close still ended the client's side: no reply will come.
                        if reader.decoder.peer_closed() {
                            return;
                        }
                        break;
                    }
                    Ok(Some(Ok(message))) => message,
                },
                _ = expiry => {
                    self.peer.close(close::TOKEN, "token expired", false);
                    break;
                }
                _ = self.peer.closed() => break,
            };
            silent_until = Instant::now() + idle;
            match self.throttle(&message) {
                Verdict::Pass => {}
                Verdict::Refuse { .. } => continue,
                Verdict::Close => break,
            }
            // The peer's close ends the handshake once it is answered: nothing more to read.
            let peer_closed = matches!(message, Incoming::Close(_));
            // Handled outside the select, whose futures would otherwise live on meanwhile,
            // and boxed: a message's handling is large and short-lived, and every idle
            // session would carry its state.
            if !Box::pin(self.on_message(message)).await {
                if peer_closed {
                    return;
                }
                break;
            }
        }
        await_close_reply(reader).await;
    }

    /// `exp` on the runtime's clock, read once per token: the wall clock is not read per
    /// message, and the deadline follows the clock the runtime's timers run on.
    fn expiry_instant(identity: &Identity) -> Instant {
        let left = identity.expires_at.saturating_sub(now_secs());
        Instant::now() + Duration::from_secs(left.min(u32::MAX as u64))
    }

    /// Spends the message's share of the client's budget; a refused message is not handled.
    /// A close is not refused: it ends the connection, which is what a flood should do.
    fn throttle(&mut self, message: &Incoming) -> Verdict {
        if matches!(message, Incoming::Close(_)) {
            return Verdict::Pass;
        }
        let ws = &self.hub.config.websocket;
        let budget = Budget::new(ws.client_messages_per_second, ws.client_burst);
        let verdict = self.throttle.admit(Instant::now(), budget);
        match verdict {
            Verdict::Pass => return verdict,
            Verdict::Refuse { warn: false } => {}
            Verdict::Refuse { warn: true } => {
                let message = format!(
                    "over {} messages a second: messages are dropped until the rate falls",
                    ws.client_messages_per_second
                );
                let code = ErrorCode::RateLimited;
                self.peer
                    .reply(protocol::error(&RequestId::None, code, None, &message));
            }
            Verdict::Close => {
                self.peer.close(close::TOO_MANY, "message rate limit", true);
            }
        }
        // Counted under the error's own word.
        self.reject(ErrorCode::RateLimited.as_str());
        verdict
    }

    fn on_error(&self, e: WireError) {
        let (code, reason) = match e {
            WireError::TooBig => (close::TOO_BIG, "message too big"),
            WireError::Utf8 => (close::INVALID_PAYLOAD, "invalid UTF-8"),
            WireError::Protocol(_) => (close::PROTOCOL, "protocol error"),
        };
        self.reject("protocol");
        self.peer.close(code, reason, false);
    }

    /// Handles one client message; false when the connection must close.
    async fn on_message(&mut self, message: Incoming) -> bool {
        match message {
            Incoming::Text(text) if self.hub.echo => {
                self.peer.reply(Frame::from(text));
                true
            }
            Incoming::Binary(data) if self.hub.echo => {
                self.peer.reply(Frame::binary(&data));
                true
            }
            Incoming::Text(text) => match ClientFrame::parse(&text) {
                Ok(frame) => {
                    self.on_frame(frame).await;
                    true
                }
                Err(refused) => self.bad_frame(&refused.id, &refused.to_string()),
            },
            Incoming::Binary(_) => {
                self.bad_frame(&RequestId::None, "binary frames are not supported")
            }
            Incoming::Close(_) => {
                self.peer.close(close::NORMAL, "", true);
                false
            }
            Incoming::Ping(payload) => {
                self.peer.pong(&payload);
                true
            }
            Incoming::Pong => true,
        }
    }

    fn bad_frame(&mut self, id: &RequestId, message: &str) -> bool {
        self.refuse_frame("bad_frame", id, message)
    }

    /// A refused `events` filter; one over a limit is counted apart.
    fn bad_filter(&mut self, id: &RequestId, e: &PatternError) {
        let reason = if e.is_limit() {
            "filter_too_large"
        } else {
            "bad_frame"
        };
        self.refuse_frame(reason, id, &format!("events: {e}"));
    }

    /// Answers `bad_request`, counted under `reason`; false when the connection must close.
    fn refuse_frame(&mut self, reason: &str, id: &RequestId, message: &str) -> bool {
        self.reject(reason);
        self.bad_frames += 1;
        self.peer
            .reply(protocol::error(id, ErrorCode::BadRequest, None, message));
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

    async fn on_frame(&mut self, frame: ClientFrame) {
        if let Some(welcome_positions) = self.awaiting_resume.take() {
            if let ClientFrame::Resume {
                id,
                positions,
                rooms,
                features,
                events,
                token,
                presence,
            } = frame
            {
                let rooms = protocol::requested_rooms(rooms, features);
                let asked = Asked {
                    events,
                    token,
                    presence,
                };
                return self
                    .resume(&id, positions, rooms, asked, welcome_positions)
                    .await;
            }
            // Anything else first: resume from the welcome, then carry on.
            if let Err(behind) = self
                .start_resume(None, welcome_positions, Vec::new(), Interest::default())
                .await
            {
                return self.refuse_behind(&RequestId::None, &behind);
            }
        }
        match frame {
            ClientFrame::Resume { id, .. } => {
                self.bad_frame(
                    &id,
                    "resume must be the first frame of a connection opened with ?resume=1",
                );
            }
            ClientFrame::Subscribe {
                id,
                rooms,
                features,
                events,
                token,
                presence,
            } => {
                let rooms = protocol::requested_rooms(rooms, features);
                let asked = Asked {
                    events,
                    token,
                    presence,
                };
                self.subscribe(&id, rooms, asked).await
            }
            ClientFrame::Unsubscribe {
                id,
                rooms,
                features,
            } => {
                let rooms = protocol::requested_rooms(rooms, features);
                self.unsubscribe(&id, rooms).await
            }
            ClientFrame::Presence { id, room, token } => self.presence_query(&id, &room, token),
            ClientFrame::Ping { id } => self.peer.reply(protocol::pong(&id)),
            ClientFrame::Refresh { id, token } => self.refresh(&id, &token),
        }
    }

    async fn subscribe(&mut self, id: &RequestId, rooms: Vec<String>, asked: Asked) {
        if rooms.is_empty() {
            self.bad_frame(id, "subscribe names no rooms");
            return;
        }
        if let Err(message) = self.within_room_limit(&rooms) {
            self.bad_frame(id, &message);
            return;
        }
        if !self.take_room_changes(id, rooms.len()) {
            return;
        }
        let Some(interest) = self.interest(id, &asked) else {
            return;
        };
        let held = self.rooms.keys().cloned().collect();
        let Some(admitted) = self.admit_all(id, rooms, asked.token, held) else {
            return;
        };
        // Not under the cut: a live subscription promises no position, so a record in flight
        // may or may not reach a room joined meanwhile. A room's shard is locked for one
        // join at a time, which the consumer may wait on for one room's fan-out at most.
        for room in &admitted {
            self.join(room, interest.filter.clone(), interest.presence);
        }
        self.peer.reply(protocol::ok(id, Some(&admitted)));
    }

    /// Takes `n` room changes from the budget, or refuses the request whole.
    fn take_room_changes(&mut self, id: &RequestId, n: usize) -> bool {
        let ws = &self.hub.config.websocket;
        let budget = Budget::new(ws.room_changes_per_second, ws.room_changes_burst);
        let n = u32::try_from(n).unwrap_or(u32::MAX);
        if self.room_changes.take(Instant::now(), budget, n) {
            return true;
        }
        let message = format!(
            "over {} room changes a second: nothing joined or left; retry later",
            ws.room_changes_per_second
        );
        self.peer
            .reply(protocol::error(id, ErrorCode::RateLimited, None, &message));
        self.reject(ErrorCode::RateLimited.as_str());
        false
    }

    /// A message naming more rooms than a connection may hold is refused whole, with one
    /// error: answering each room past the limit let one 64 KiB subscribe queue 5,000 errors.
    fn within_room_limit(&self, rooms: &[String]) -> Result<(), String> {
        let max = self.hub.config.websocket.max_rooms_per_connection;
        if rooms.len() > max {
            return Err(format!(
                "{} rooms in one message, over the limit of {max} per connection",
                rooms.len()
            ));
        }
        Ok(())
    }

    /// Checks each room against the identity, the subscription token and the room limit;
    /// replies with an error for each refused room. `held` are the rooms the connection holds
    /// (or, resuming, will hold) besides these: the limit counts them and every room admitted
    /// before in the same message. None (after a final error) if the token is refused.
    fn admit_all(
        &self,
        id: &RequestId,
        rooms: Vec<String>,
        token: Option<String>,
        mut held: HashSet<String>,
    ) -> Option<Vec<String>> {
        let grants = match token.map(|t| self.hub.auth.subscription_grants(&self.identity, &t)) {
            None => Vec::new(),
            Some(Ok(g)) => g,
            Some(Err(e)) => {
                let code = ErrorCode::InvalidToken;
                self.count_subscriptions(code.as_str(), rooms.len());
                let message = format!("subscription token refused: {e}");
                self.peer.reply(protocol::error(id, code, None, &message));
                return None;
            }
        };
        let max = self.hub.config.websocket.max_rooms_per_connection;
        let mut admitted = Vec::new();
        for room in rooms {
            let within = |()| {
                if held.len() >= max && !held.contains(&room) {
                    let message = "room limit for this connection reached";
                    return Err((ErrorCode::TooManyRooms, message));
                }
                Ok(())
            };
            match self.admit(&room, &grants).and_then(within) {
                Ok(()) => {
                    held.insert(room.clone());
                    admitted.push(room);
                }
                Err((code, message)) => {
                    self.count_subscriptions(code.as_str(), 1);
                    self.peer
                        .reply(protocol::error(id, code, Some(&room), message));
                }
            }
        }
        self.count_subscriptions("ok", admitted.len());
        Some(admitted)
    }

    /// A resume request: the user's own rooms plus `rooms`, as of `after`.
    async fn resume(
        &mut self,
        id: &RequestId,
        after: PositionMap,
        rooms: Vec<String>,
        asked: Asked,
        welcome_positions: PositionMap,
    ) {
        if let Err(message) = self.within_room_limit(&rooms) {
            self.awaiting_resume = Some(welcome_positions);
            self.bad_frame(id, &message);
            return;
        }
        let Some(interest) = self.interest(id, &asked) else {
            self.awaiting_resume = Some(welcome_positions);
            return;
        };
        let held = self.identity.own_rooms().into_iter().collect();
        let Some(admitted) = self.admit_all(id, rooms, asked.token, held) else {
            self.awaiting_resume = Some(welcome_positions);
            return;
        };
        if let Err(behind) = self
            .start_resume(Some(id.clone()), after, admitted, interest)
            .await
        {
            self.refuse_behind(id, &behind);
        }
    }

    /// This replica is behind the client's map: the client keeps its map and resumes later
    /// or elsewhere. Closed, so that it does: waiting on here would hold it to this replica.
    fn refuse_behind(&self, id: &RequestId, behind: &Behind) {
        let (conn, user) = (self.id, &self.identity.user);
        tracing::info!(%behind, conn, %user, "resume refused: replica behind the client");
        self.peer.reply(protocol::error(
            id,
            ErrorCode::Lagging,
            None,
            &format!("{behind}: resume again later or on another replica"),
        ));
        self.peer
            .close(close::TRY_AGAIN, "replica behind; resume later", true);
    }

    /// Joins the rooms under the cut and queues the replay of `(after, cut]` in their place.
    /// Not before the replica is ready: one that has just started has not read what the
    /// client missed, and a cut taken then lacks partitions (whose gap is then replayed by
    /// nobody, since what a replica reads back at start only warms its buffer) or stands
    /// behind the client's map (a needless resync). Nor before it has read as far as the
    /// client's map, where its log holds the map (a client come from a replica ahead of this
    /// one): a cut behind the map would be taken for a recreated topic. Until the cut, the
    /// connection is in no room, so what the replica reads meanwhile reaches it only through
    /// the replay, and only past the map.
    async fn start_resume(
        &mut self,
        id: Option<RequestId>,
        after: PositionMap,
        extra: Vec<String>,
        interest: Interest,
    ) -> Result<(), Behind> {
        let hub = self.hub.clone();
        let deadline = Instant::now() + READY_WAIT;
        // Boxed: the rare waits must not grow every session's future.
        Box::pin(until_ready(&hub, deadline)).await;
        let replica = lag::Replica {
            table: &hub.partitions,
            ends: &hub.log_ends,
            log: &hub.kafka_replay,
        };
        let level = Box::pin(lag::catch_up(replica, &after, deadline)).await;
        let outcome = match &level {
            Ok(Level::Even) => None,
            Ok(Level::CaughtUp) => Some("caught_up"),
            Err(_) => Some("behind"),
        };
        if let Some(outcome) = outcome {
            hub.metrics.resume_waits.with_label_values(&[outcome]).inc();
        }
        level?;
        let _cut = hub.cut().await;
        let mut joined = self.identity.own_rooms();
        for room in &joined {
            self.join(room, None, false);
        }
        for room in extra {
            // Its own room named again takes the filter, but is listed once.
            self.join(&room, interest.filter.clone(), interest.presence);
            if !joined.contains(&room) {
                joined.push(room);
            }
        }
        let plan = ResumePlan {
            id,
            after,
            cut: hub.partitions.delivered_map(),
            selection: Selection {
                tenant: self.identity.tenant.clone(),
                rooms: self.rooms.clone(),
            },
            rooms: joined,
            conn: self.id,
            user: self.identity.user.clone(),
        };
        self.peer.resume(plan);
        self.peer.set_live();
        Ok(())
    }

    /// The filter and presence a subscribe or resume asks for; None (after an error) if
    /// either is refused.
    fn interest(&mut self, id: &RequestId, asked: &Asked) -> Option<Interest> {
        let events = asked.events.as_deref().map(EventFilter::parse).transpose();
        let filter = match events {
            Ok(f) => f.map(Arc::new),
            Err(e) => {
                self.bad_filter(id, &e);
                return None;
            }
        };
        if asked.presence && self.hub.presence.is_none() {
            self.presence_disabled(id);
            return None;
        }
        Some(Interest {
            filter,
            presence: asked.presence,
        })
    }

    fn presence_disabled(&self, id: &RequestId) {
        let code = ErrorCode::PresenceDisabled;
        let message = "presence is not enabled on this server";
        self.peer.reply(protocol::error(id, code, None, message));
    }

    /// Who is in `room` on any replica: allowed exactly as subscribing to it would be.
    fn presence_query(&self, id: &RequestId, room: &str, token: Option<String>) {
        let Some(presence) = &self.hub.presence else {
            return self.presence_disabled(id);
        };
        let grants = match token.map(|t| self.hub.auth.subscription_grants(&self.identity, &t)) {
            None => Vec::new(),
            Some(Ok(g)) => g,
            Some(Err(e)) => {
                let message = format!("subscription token refused: {e}");
                let code = ErrorCode::InvalidToken;
                return self.peer.reply(protocol::error(id, code, None, &message));
            }
        };
        // The query's final answer: an error naming no room, as every request's is.
        if let Err((code, message)) = self.admit(room, &grants) {
            return self.peer.reply(protocol::error(id, code, None, message));
        }
        if self.hub.presence_of(room).is_none() {
            let code = ErrorCode::PresenceDisabled;
            let message = "presence is not kept for this room (presence.rooms)";
            return self.peer.reply(protocol::error(id, code, None, message));
        }
        // Nobody to answer: nothing copied, nothing queued.
        if self.peer.is_closing() {
            return;
        }
        let max = self.hub.config.presence.max_query_users;
        let tenant = self.identity.tenant.as_deref();
        let (peer, asked, name) = (self.peer.clone(), id.clone(), room.to_string());
        let queued = presence.query((tenant, room), max, move |view| {
            peer.reply(protocol::presence_ok(&asked, &name, &view));
        });
        if queued.is_err() {
            let message = "too many presence answers waiting to be sent: query again later";
            let code = ErrorCode::RateLimited;
            self.peer.reply(protocol::error(id, code, None, message));
        }
    }

    fn admit(&self, room: &str, grants: &[Pattern]) -> Result<(), (ErrorCode, &'static str)> {
        if !protocol::valid_room_name(room) {
            return Err((ErrorCode::InvalidRoom, protocol::INVALID_ROOM_MESSAGE));
        }
        if !self.identity.may_join(room) && !grants.iter().any(|g| g.matches(room)) {
            return Err((ErrorCode::Forbidden, "not allowed to join this room"));
        }
        Ok(())
    }

    /// Joins `room` with `filter`; `presence`: listens to its presence events, or no longer.
    fn join(&mut self, room: &str, filter: Option<Arc<EventFilter>>, presence: bool) {
        let tenant = self.identity.tenant.as_deref();
        self.hub
            .registry
            .join(self.id, tenant, room, &self.peer, filter.clone());
        if self.hub.has_presence_events(tenant, room) {
            if presence {
                let peer = &self.peer;
                self.hub.listeners.join(self.id, tenant, room, peer, None);
            } else {
                self.hub.listeners.leave(self.id, tenant, room);
            }
        }
        let kept = self.hub.presence_of(room);
        let fresh = self.rooms.insert(room.to_string(), filter).is_none();
        if let (true, Some(presence)) = (fresh, kept) {
            presence.local.joined(tenant, room, &self.identity.user);
        }
    }

    async fn unsubscribe(&mut self, id: &RequestId, rooms: Vec<String>) {
        let held = rooms.iter().filter(|r| self.rooms.contains_key(*r)).count();
        if !self.take_room_changes(id, held) {
            return;
        }
        let tenant = self.identity.tenant.as_deref();
        let mut left = Vec::new();
        for room in rooms {
            if self.rooms.remove(&room).is_some() {
                self.hub.registry.leave(self.id, tenant, &room);
                self.hub.listeners.leave(self.id, tenant, &room);
                if let Some(presence) = self.hub.presence_of(&room) {
                    presence.local.left(tenant, &room, &self.identity.user);
                }
                left.push(room);
            }
        }
        self.peer.reply(protocol::ok(id, Some(&left)));
    }

    /// A fresh token for the same user and tenant extends the connection's life.
    fn refresh(&mut self, id: &RequestId, token: &str) {
        match self.hub.auth.authenticate(token) {
            Ok(fresh)
                if fresh.user == self.identity.user && fresh.tenant == self.identity.tenant =>
            {
                self.expires = Session::expiry_instant(&fresh);
                self.identity = fresh;
                self.peer.reply(protocol::ok(id, None));
            }
            Ok(_) => self.peer.reply(protocol::error(
                id,
                ErrorCode::InvalidToken,
                None,
                "token is for another user or tenant",
            )),
            Err(e) => {
                let message = format!("token refused: {e}");
                let code = ErrorCode::InvalidToken;
                self.peer.reply(protocol::error(id, code, None, &message));
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

/// Returns once the replica is ready, or at `deadline`.
async fn until_ready(hub: &Hub, deadline: Instant) {
    while !hub.partitions.ready() && Instant::now() < deadline {
        tokio::time::sleep(READY_POLL).await;
    }
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};
    use std::net::{TcpListener, TcpStream as StdStream};
    use std::sync::mpsc;

    use serde_json::{json, Value};

    use super::*;
    use crate::auth::{sign_hs256, Claims};
    use crate::config::Config;
    use crate::http::{admin_router, AdminState};
    use crate::metrics::Metrics;
    use crate::position::PartitionTable;
    use crate::setup::Setup;

    const SECRET: &str = "session-test-secret-0123456789";
    const PATIENCE: Duration = Duration::from_secs(10);

    fn hub(mut config: Config) -> Arc<Hub> {
        config.auth.secret = Some(SECRET.into());
        let setup = Setup::build(config).unwrap();
        let partitions = Arc::new(PartitionTable::default());
        let metrics = Arc::new(Metrics::new());
        let parts = crate::hub_parts(&setup, metrics, partitions);
        Arc::new(Hub::new(setup, parts))
    }

    fn identity(hub: &Hub, user: &str) -> Identity {
        let claims = Claims {
            sub: user.into(),
            exp: now_secs() + 600,
            ..Claims::default()
        };
        hub.auth.authenticate(&sign_hs256(SECRET, &claims)).unwrap()
    }

    /// A connected pair: the server's end for the runtime, the client's as a plain socket
    /// (so the client needs no worker).
    fn pair(listener: &TcpListener) -> (TcpStream, StdStream) {
        let client = StdStream::connect(listener.local_addr().unwrap()).unwrap();
        client.set_read_timeout(Some(PATIENCE)).unwrap();
        let (server, _) = listener.accept().unwrap();
        server.set_nonblocking(true).unwrap();
        (TcpStream::from_std(server).unwrap(), client)
    }

    /// The next text frame the server sent, skipping pings.
    fn read_json(client: &mut StdStream) -> Value {
        loop {
            let mut head = [0u8; 2];
            client.read_exact(&mut head).expect("a frame in time");
            let len = match head[1] & 0x7f {
                126 => {
                    let mut l = [0u8; 2];
                    client.read_exact(&mut l).unwrap();
                    u16::from_be_bytes(l) as usize
                }
                127 => {
                    let mut l = [0u8; 8];
                    client.read_exact(&mut l).unwrap();
                    u64::from_be_bytes(l) as usize
                }
                n => n as usize,
            };
            let mut payload = vec![0u8; len];
            client.read_exact(&mut payload).unwrap();
            if head[0] & 0x0f == 1 {
                return serde_json::from_slice(&payload).unwrap();
            }
        }
    }

    /// A client text frame, masked with a zero key (which leaves the payload as it is).
    fn send_json(client: &mut StdStream, value: &Value) {
        let payload = value.to_string();
        assert!(payload.len() < 126);
        let mut frame = vec![0x81, 0x80 | payload.len() as u8, 0, 0, 0, 0];
        frame.extend_from_slice(payload.as_bytes());
        client.write_all(&frame).unwrap();
    }

    fn healthz(admin: std::net::SocketAddr) -> String {
        let mut http = StdStream::connect(admin).unwrap();
        http.set_read_timeout(Some(PATIENCE)).unwrap();
        http.write_all(b"GET /healthz HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n")
            .unwrap();
        let mut answer = String::new();
        let _ = http.read_to_string(&mut answer);
        answer
    }

    /// The consumer stalled on one record: holds the cut, having advanced `t:0` to `offset`,
    /// until `release` is dropped or sent to.
    fn stalled_consumer(
        hub: &Arc<Hub>,
        offset: i64,
    ) -> (mpsc::Sender<()>, std::thread::JoinHandle<()>) {
        let (release, released) = mpsc::channel::<()>();
        let (held, holding) = mpsc::channel();
        let hub = hub.clone();
        let thread = std::thread::spawn(move || {
            let _cut = hub.hold_cut();
            hub.partitions.advance("t", 0, offset);
            held.send(()).unwrap();
            let _ = released.recv();
        });
        holding.recv().unwrap();
        (release, thread)
    }

    /// A multi-threaded runtime of `workers` threads, with timers and I/O.
    fn runtime(workers: usize) -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(workers)
            .enable_all()
            .build()
            .unwrap()
    }

    #[test]
    fn handshakes_waiting_for_a_stalled_record_hold_no_worker() {
        let runtime = runtime(2);
        let _entered = runtime.enter();
        let hub = hub(Config::default());
        hub.partitions.assign("t", 0, 0, 0);
        hub.partitions.set_discovered();
        hub.replay.reset("t", 0, 0);
        let admin_listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let admin = admin_listener.local_addr().unwrap();
        admin_listener.set_nonblocking(true).unwrap();
        let state = AdminState { hub: hub.clone() };
        let admin_listener = tokio::net::TcpListener::from_std(admin_listener).unwrap();
        runtime.spawn(async move { axum::serve(admin_listener, admin_router(state)).await });
        assert!(healthz(admin).contains("200 OK"));

        // Three welcomes and then three resumes wait for the cut, on a runtime of two workers.
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let (release, consumer) = stalled_consumer(&hub, 41);
        let mut clients = Vec::new();
        let (started, starts) = mpsc::channel();
        for n in 0..6 {
            let (server, client) = pair(&listener);
            let permit = hub.limit.clone().try_acquire_owned().unwrap();
            let identity = identity(&hub, &format!("u{n}"));
            let session_hub = hub.clone();
            let resume = n >= 3;
            let started = started.clone();
            runtime.spawn(async move {
                // Sent in the same poll as the session starts: once it is received, that
                // worker is committed to the session's first step.
                let _ = started.send(());
                run(
                    session_hub,
                    server,
                    Bytes::new(),
                    identity,
                    Admission::permit_only(permit),
                    resume,
                )
                .await
            });
            clients.push(client);
        }
        for _ in 0..2 {
            starts.recv_timeout(PATIENCE).unwrap();
        }
        assert!(
            healthz(admin).contains("200 OK"),
            "liveness while the cut is held"
        );
        drop(release);
        consumer.join().unwrap();
        for (n, client) in clients.iter_mut().enumerate() {
            let welcome = read_json(client);
            assert_eq!(welcome["type"], "welcome");
            let positions = welcome.get("positions");
            if n < 3 {
                assert_eq!(positions, Some(&json!({"t:0": 41})));
            } else {
                assert_eq!(positions, None, "a resuming connection's welcome");
            }
        }

        let (release, consumer) = stalled_consumer(&hub, 42);
        for client in &mut clients[3..] {
            send_json(
                client,
                &json!({"type": "resume", "id": 1, "positions": {"t:0": 42}}),
            );
        }
        assert!(
            healthz(admin).contains("200 OK"),
            "liveness while resumes wait"
        );
        drop(release);
        consumer.join().unwrap();
        for client in &mut clients[3..] {
            let watermark = read_json(client);
            assert_eq!(
                watermark,
                json!({"type": "positions", "positions": {"t:0": 42}})
            );
            let answer = read_json(client);
            assert_eq!(
                (&answer["type"], &answer["source"]),
                (&json!("ok"), &json!("nothing"))
            );
        }
    }

    /// Every idle connection carries this future: it must capture handles only, and a
    /// message's handling must not be part of its state. 984 bytes before the cut became
    /// async; the boxed handling's place adds 16, the message budget 32, the share of the
    /// per-user and per-address limits 56 (in place of the permit's 16).
    #[test]
    fn an_idle_session_stays_small() {
        let runtime = runtime(1);
        let _entered = runtime.enter();
        let hub = hub(Config::default());
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let (server, _client) = pair(&listener);
        let session = user_session(&hub, server);
        let size = std::mem::size_of_val(&session);
        assert!(size <= 1072, "a session's future takes {size} bytes");
    }

    /// User `u`'s session on `server`, holding one of the hub's permits.
    fn user_session(hub: &Arc<Hub>, server: TcpStream) -> impl Future<Output = ()> + Send {
        let permit = hub.limit.clone().try_acquire_owned().unwrap();
        let identity = identity(hub, "u");
        let admission = Admission::permit_only(permit);
        run(
            hub.clone(),
            server,
            Bytes::new(),
            identity,
            admission,
            false,
        )
    }

    /// A session whose task is aborted (or panics) half way still leaves its rooms and the
    /// session table, and reports its user gone to presence.
    #[test]
    fn a_session_dropped_half_way_is_forgotten() {
        let runtime = runtime(1);
        let _entered = runtime.enter();
        let mut inner = Arc::into_inner(hub(Config::default())).unwrap();
        let origin = crate::presence::record::Origin {
            replica: "r".into(),
            incarnation: "i".into(),
        };
        inner.presence = Some(Arc::new(crate::presence::live::Presence::new(origin)));
        let hub = Arc::new(inner);
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let (server, mut client) = pair(&listener);
        let session = runtime.spawn(user_session(&hub, server));
        assert_eq!(read_json(&mut client)["type"], "welcome");
        assert_eq!(hub.sessions.len(), 1);
        assert!(hub.registry.room_count() > 0);
        session.abort();
        runtime.block_on(async {
            while !session.is_finished() {
                tokio::task::yield_now().await
            }
        });
        assert_eq!(hub.sessions.len(), 0);
        assert_eq!(hub.registry.room_count(), 0);
        let presence = hub.presence.as_ref().unwrap();
        let batch = presence.local.drain(crate::presence::local::Kind::Snapshot);
        assert!(batch.counts.is_empty(), "still counted: {:?}", batch.counts);
        assert_eq!(hub.metrics.connections.get(), 0);
        // Its writer is told to go: the client sees the connection end, not a silent socket.
        client
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let mut rest = Vec::new();
        client.read_to_end(&mut rest).expect("the connection ends");
        assert!(
            rest.starts_with(b"\x88\x02\x03\xf3"),
            "a close 1011: {rest:?}"
        );
    }

    /// The conformance harness's session: no welcome, each message sent back as it came,
    /// text as text and binary as binary, and the close handshake as usual.
    #[test]
    fn an_echo_session_sends_back_text_and_binary() {
        let runtime = runtime(1);
        let _entered = runtime.enter();
        let mut echo = Arc::into_inner(hub(Config::default())).unwrap();
        echo.echo = true;
        let hub = Arc::new(echo);
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let (server, mut client) = pair(&listener);
        runtime.spawn(user_session(&hub, server));
        // Masked with a zero key, which leaves the payload as it is.
        let text = b"\x81\x85\0\0\0\0hello";
        let binary = b"\x82\x83\0\0\0\0\0\xff\x80";
        let close = b"\x88\x82\0\0\0\0\x03\xe8";
        client.write_all(text).unwrap();
        client.write_all(binary).unwrap();
        client.write_all(close).unwrap();
        let mut answer = Vec::new();
        client.read_to_end(&mut answer).unwrap();
        assert_eq!(
            answer,
            b"\x81\x05hello\x82\x03\0\xff\x80\x88\x02\x03\xe8".to_vec()
        );
    }

    /// A session on a loopback pair under tokio's clock (paused in these tests), the client's
    /// end as an async socket.
    async fn timed_session(
        config: Config,
        expires_in: u64,
    ) -> (Arc<Hub>, tokio::net::TcpStream, Instant) {
        let hub = hub(config);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = tokio::net::TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (server, _) = listener.accept().await.unwrap();
        let claims = Claims {
            sub: "timed".into(),
            exp: now_secs() + expires_in,
            ..Claims::default()
        };
        let identity = hub.auth.authenticate(&sign_hs256(SECRET, &claims)).unwrap();
        let permit = hub.limit.clone().try_acquire_owned().unwrap();
        let opened = Instant::now();
        tokio::spawn(run(
            hub.clone(),
            server,
            Bytes::new(),
            identity,
            Admission::permit_only(permit),
            false,
        ));
        (hub, client, opened)
    }

    /// One server frame: opcode and payload (the server never masks nor fragments these).
    async fn next_frame(client: &mut tokio::net::TcpStream) -> Option<(u8, Vec<u8>)> {
        use tokio::io::AsyncReadExt;
        let mut head = [0u8; 2];
        client.read_exact(&mut head).await.ok()?;
        let len = match head[1] & 0x7f {
            126 => client.read_u16().await.ok()? as usize,
            127 => client.read_u64().await.ok()? as usize,
            n => n as usize,
        };
        let mut payload = vec![0u8; len];
        client.read_exact(&mut payload).await.ok()?;
        Some((head[0] & 0x0f, payload))
    }

    /// Reads until the close frame, answering each ping with a pong when `answer` is set;
    /// returns the close's code and reason and when it came.
    async fn until_close(
        client: &mut tokio::net::TcpStream,
        answer: bool,
    ) -> Option<(u16, String, Instant)> {
        use tokio::io::AsyncWriteExt;
        while let Some((opcode, payload)) = next_frame(client).await {
            match opcode {
                0x8 => {
                    let code = u16::from_be_bytes([payload[0], payload[1]]);
                    let reason = String::from_utf8(payload[2..].to_vec()).unwrap();
                    return Some((code, reason, Instant::now()));
                }
                0x9 if answer => {
                    // Masked with a zero key, which leaves the payload as it is.
                    let mut pong = vec![0x8a, 0x80 | payload.len() as u8, 0, 0, 0, 0];
                    pong.extend_from_slice(&payload);
                    client.write_all(&pong).await.unwrap();
                }
                _ => {}
            }
        }
        None
    }

    async fn send_text(client: &mut tokio::net::TcpStream, value: &Value) {
        use tokio::io::AsyncWriteExt;
        let payload = value.to_string();
        let mut frame = vec![0x81];
        match u16::try_from(payload.len()).unwrap() {
            n @ 0..=125 => frame.push(0x80 | n as u8),
            n => {
                frame.push(0x80 | 126);
                frame.extend_from_slice(&n.to_be_bytes());
            }
        }
        // Masked with a zero key, which leaves the payload as it is.
        frame.extend_from_slice(&[0, 0, 0, 0]);
        frame.extend_from_slice(payload.as_bytes());
        client.write_all(&frame).await.unwrap();
    }

    fn heartbeat_config(heartbeat: u64, idle: u64) -> Config {
        let mut config = Config::default();
        config.websocket.heartbeat_seconds = heartbeat;
        config.websocket.idle_timeout_seconds = idle;
        config
    }

    /// A client that reads but never answers a ping is let go once it has been silent for
    /// the idle timeout, with 1001 and the reason.
    #[tokio::test(start_paused = true)]
    async fn a_silent_peer_is_closed_after_the_idle_timeout() {
        let (_hub, mut client, opened) = timed_session(heartbeat_config(20, 60), 3600).await;
        let (code, reason, at) = until_close(&mut client, false).await.expect("a close");
        assert_eq!((code, reason.as_str()), (1001, "heartbeat timeout"));
        let silent = at - opened;
        assert!(
            silent >= Duration::from_secs(60) && silent < Duration::from_secs(61),
            "{silent:?}"
        );
    }

    /// A client that answers every ping stays connected however long it says nothing else.
    #[tokio::test(start_paused = true)]
    async fn a_peer_answering_pings_is_kept_past_many_idle_timeouts() {
        let (_hub, mut client, opened) = timed_session(heartbeat_config(20, 60), 3600).await;
        let kept = tokio::time::timeout(Duration::from_secs(600), until_close(&mut client, true));
        assert!(kept.await.is_err(), "closed within ten idle timeouts");
        assert!(opened.elapsed() >= Duration::from_secs(600));
        send_text(&mut client, &json!({"type": "ping", "id": 1})).await;
        loop {
            let (opcode, payload) = next_frame(&mut client).await.expect("an answer");
            if opcode == 0x1 {
                let frame: Value = serde_json::from_slice(&payload).unwrap();
                if frame["type"] == "pong" {
                    assert_eq!(frame["id"], 1);
                    break;
                }
            }
        }
    }

    /// A token that expires unrefreshed ends the connection with 4001 at its `exp`.
    #[tokio::test(start_paused = true)]
    async fn an_expiring_token_closes_with_4001_at_its_exp() {
        let (_hub, mut client, opened) = timed_session(heartbeat_config(20, 600), 30).await;
        let (code, reason, at) = until_close(&mut client, true).await.expect("a close");
        assert_eq!((code, reason.as_str()), (4001, "token expired"));
        let lived = at - opened;
        // `exp` is in whole seconds of the wall clock, read once when the session starts.
        assert!(
            lived >= Duration::from_secs(29) && lived <= Duration::from_secs(30),
            "{lived:?}"
        );
    }

    /// A refresh before `exp` replaces the deadline: the connection outlives the first token.
    #[tokio::test(start_paused = true)]
    async fn a_refreshed_token_keeps_the_connection_past_the_first_exp() {
        let (_hub, mut client, _opened) = timed_session(heartbeat_config(20, 600), 30).await;
        let fresh = Claims {
            sub: "timed".into(),
            exp: now_secs() + 3600,
            ..Claims::default()
        };
        let token = sign_hs256(SECRET, &fresh);
        send_text(
            &mut client,
            &json!({"type": "refresh", "id": 2, "token": token}),
        )
        .await;
        let kept = tokio::time::timeout(Duration::from_secs(300), until_close(&mut client, true));
        assert!(kept.await.is_err(), "closed although refreshed");
    }
}
