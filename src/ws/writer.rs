//! The writer: the task that empties a connection's outbox into its socket.
//!
//! It sends everything queued at that moment in as few writes as the socket takes: one
//! vectored write over the frames' shared bytes, with no copy and no buffer of its own. It
//! pings on the heartbeat (each connection at its own phase of it), carries out resumes where
//! they stand in the stream, and finally sends the close frame. The only other writes to the
//! socket are the ones `Peer::deliver` makes while the writer holds nothing (see outbox.rs).
//!
//! A close that drops the queue (4008 above all) does not wait for the socket to take the
//! batch in hand: the close frame goes right behind the frame being written. A close frame
//! that cannot leave within [`CLOSE_WRITE`] is given up, and the connection reset: a client
//! that stopped reading would otherwise keep the kernel's buffers for its socket full, for
//! minutes, behind a FIN that it never reads either.

use std::collections::VecDeque;
use std::future::poll_fn;
use std::io::{self, IoSlice};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::net::TcpStream;
use tokio::time::{timeout_at, Instant};
use tracing::debug;

use super::outbox::{Inbox, Outgoing, Peer};
use super::protocol::{self, Source};
use super::{wire, Hub};
use crate::frame::Frame;
use crate::registry::ConnId;
use crate::resume::{self, Replayed, ResumePlan};

/// The close code recorded when the socket broke before a close frame could be sent.
pub const ABNORMAL: u16 = 1006;
/// How long, from the moment a close is asked for, its frame (and, for a drain, what is
/// queued before it) may take to leave; then the connection is reset. Shorter than the
/// session's wait for its writer, so that the writer's own outcome is what is counted.
pub const CLOSE_WRITE: Duration = Duration::from_secs(2);
/// Slices per vectored write.
const SLICES: usize = 64;

/// How long after its start a connection sends its first ping: somewhere in (0, heartbeat],
/// spread by its id. Connections opened together (a deploy, a reconnect storm) would
/// otherwise ping together every heartbeat from then on, and each such burst of thousands
/// of pings and pongs holds up the records behind it for tens of milliseconds.
fn first_ping(id: ConnId, heartbeat: Duration) -> Duration {
    // Consecutive ids times the golden ratio, modulo 1, fill [0, 1) evenly at every length.
    const GOLDEN: u64 = 0x9E37_79B9_7F4A_7C15;
    let phase = (id.wrapping_mul(GOLDEN) >> 11) as f64 / (1u64 << 53) as f64;
    heartbeat.mul_f64(1.0 - phase)
}

struct Writer {
    hub: Arc<Hub>,
    socket: Arc<TcpStream>,
    peer: Peer,
    /// At most this many bytes per write call.
    max_write: usize,
}

enum Wake {
    Close,
    Batch,
    Ping,
}

/// Why a write stopped before its end.
#[derive(Debug)]
enum Halt {
    /// The socket broke.
    Broken,
    /// A close was asked for: between two writes, or, for a close that drops the queue, while
    /// the socket was full. `unfinished` is what is left of a frame the socket took part of:
    /// it must still go first.
    Close { unfinished: Option<Bytes> },
    /// A close that flushes the queue ran out of time while the socket was full.
    Overdue,
}

/// Whether a close stops a write that waits for room: not while the close frame is sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Open,
    Closing,
}

/// Runs until a close is requested (then sends the close frame, or resets the connection if
/// it cannot leave in time, and returns the close's code) or the socket breaks (returns 1006).
pub async fn run(
    hub: Arc<Hub>,
    socket: Arc<TcpStream>,
    mut inbox: Inbox,
    id: ConnId,
    heartbeat: Duration,
) -> u16 {
    let peer = inbox.peer.clone();
    let max_write = hub.config.websocket.write_buffer_bytes;
    let w = Writer {
        hub,
        socket,
        peer: peer.clone(),
        max_write,
    };
    let mut ping = tokio::time::interval_at(Instant::now() + first_ping(id, heartbeat), heartbeat);
    // One close signal for the writer's whole life: made afresh per wake-up, its registration
    // and removal were a tenth of the writer's own CPU in a broadcast.
    let closed = peer.closed();
    tokio::pin!(closed);
    // The welcome is the connection's first frame, and it is always queued: no ping before
    // the first batch, however long the session waits for the hub's cut.
    let mut welcomed = false;
    let halt = loop {
        let wake = tokio::select! {
            biased;
            _ = &mut closed => Wake::Close,
            _ = inbox.next_batch() => Wake::Batch,
            _ = ping.tick(), if welcomed => Wake::Ping,
        };
        let sent = match wake {
            Wake::Close => break Halt::Close { unfinished: None },
            Wake::Batch => {
                welcomed = true;
                w.write(inbox.batch(), None, Phase::Open).await
            }
            // The ping rides in the same write as whatever is queued.
            Wake::Ping => {
                let ping = wire::ping();
                w.write(inbox.take_queued(), Some(&ping), Phase::Open).await
            }
        };
        match sent {
            Ok(()) => inbox.written(),
            // The batch is kept, and the socket with it: the close goes on from here.
            Err(halt) => break halt,
        }
    };
    // Boxed, as the wait for room below: rare, and every idle writer would carry their state.
    Box::pin(w.close(&mut inbox, halt)).await
}

impl Writer {
    /// Ends the connection after `halt`: the close frame, behind the rest of a frame begun
    /// and (if the close flushes) everything queued, within the close's time; else a reset.
    async fn close(&self, inbox: &mut Inbox, halt: Halt) -> u16 {
        let request = match (halt, self.peer.close_request()) {
            (Halt::Close { unfinished }, Some(request)) => (unfinished, request),
            (Halt::Overdue, Some(request)) => return self.reset(request.code),
            _ => return ABNORMAL,
        };
        let (unfinished, request) = request;
        let queued = inbox.take_queued();
        if !request.flush {
            // The rest of a frame written directly is first in the queue whenever it is in it.
            let rest = matches!(queued.front(), Some(Outgoing::Rest(_)));
            queued.truncate(usize::from(rest));
        }
        if let Some(bytes) = unfinished {
            queued.push_front(Outgoing::Rest(bytes));
        }
        let frame = wire::close(request.code, request.reason);
        let sent = self.write(queued, Some(&frame), Phase::Closing);
        match timeout_at(request.at + CLOSE_WRITE, sent).await {
            Ok(Ok(())) => request.code,
            Ok(Err(Halt::Broken)) => ABNORMAL,
            Ok(Err(_)) | Err(_) => self.reset(request.code),
        }
    }

    /// Gives the connection up: with no linger, closing the socket resets it and frees its
    /// buffers at once, where a FIN would wait behind bytes the client no longer reads. The
    /// close is still counted under its code: it was the server's, and it was not the peer
    /// that broke the connection.
    fn reset(&self, code: u16) -> u16 {
        if let Err(e) = self.socket.set_zero_linger() {
            debug!(error = %e, "cannot set SO_LINGER to reset the connection");
        }
        debug!(
            code,
            "close frame not sent in time: the connection is reset"
        );
        code
    }

    /// Sends a batch in order, then `last`; a resume's replay goes out where it stands.
    async fn write(
        &self,
        items: &VecDeque<Outgoing>,
        last: Option<&[u8]>,
        phase: Phase,
    ) -> Result<(), Halt> {
        let mut run: Vec<&[u8]> = Vec::with_capacity(items.len() + 1);
        let mut begun = false;
        for item in items {
            let chunk = match item {
                Outgoing::Frame(frame) => frame.wire(),
                Outgoing::Rest(bytes) | Outgoing::Pong(bytes) => bytes,
                Outgoing::Resume(plan) => {
                    self.send(&run, begun, phase).await?;
                    run.clear();
                    // Boxed: a replay's state is large, and every idle writer would carry it.
                    Box::pin(self.replay(plan, phase)).await?;
                    continue;
                }
            };
            if run.is_empty() {
                begun = matches!(item, Outgoing::Rest(_));
            }
            run.push(chunk);
        }
        run.extend(last);
        self.send(&run, begun, phase).await
    }

    /// Sends what the client missed, then the cut as a watermark, then the answer.
    async fn replay(&self, plan: &ResumePlan, phase: Phase) -> Result<(), Halt> {
        let hub = &self.hub;
        let outcome = resume::gather(&hub.replay, &hub.kafka_replay, plan).await;
        let (mut frames, count, source) = match outcome {
            Replayed::Frames { frames, source } => {
                let count = frames.len();
                (frames, count, source)
            }
            Replayed::Resync(reason) => {
                let (conn, user) = (plan.conn, &plan.user);
                tracing::info!(%reason, conn, %user, "resume answered with resync");
                (vec![protocol::resync(&reason)], 0, Source::Resync)
            }
        };
        let m = &hub.metrics;
        // The metric's labels are the wire's words.
        m.resumes.with_label_values(&[source.as_str()]).inc();
        m.replayed_records
            .with_label_values(&[source.as_str()])
            .inc_by(count as u64);
        frames.push(protocol::positions(&plan.cut));
        if let Some(id) = &plan.id {
            frames.push(protocol::resumed(id, &plan.rooms, count, source));
        }
        let chunks: Vec<&[u8]> = frames.iter().map(|f: &Frame| &f.wire()[..]).collect();
        self.send(&chunks, false, phase).await
    }

    /// Writes `chunks` in order, each call taking as many as fit in one vectored write.
    /// `begun`: the first chunk is the rest of a frame already partly on the wire.
    async fn send(&self, chunks: &[&[u8]], begun: bool, phase: Phase) -> Result<(), Halt> {
        let mut at = Cursor::start(chunks, begun);
        while !at.is_done(chunks) {
            // Written first and waited on only when full: the socket is writable almost
            // always, and asking first cost a readiness poll per write.
            let slices = at.slices(chunks, self.max_write);
            match self.socket.try_write_vectored(&slices) {
                Ok(0) => return Err(Halt::Broken),
                Ok(n) => at.advance(chunks, n),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if let Err(halt) = Box::pin(self.writable(phase)).await {
                        return Err(match halt {
                            Halt::Close { .. } => Halt::Close {
                                unfinished: at.unfinished(chunks).map(Bytes::copy_from_slice),
                            },
                            other => other,
                        });
                    }
                }
                Err(_) => return Err(Halt::Broken),
            }
        }
        Ok(())
    }

    /// Waits for room in the socket. While the connection is open, a close that drops the
    /// queue ends the wait at once, and one that flushes it bounds the wait by its time;
    /// while the close frame is sent, the caller bounds it.
    async fn writable(&self, phase: Phase) -> Result<(), Halt> {
        let socket = &self.socket;
        let room = || poll_fn(|cx| socket.poll_write_ready(cx));
        if phase == Phase::Open && !self.peer.is_closing() {
            tokio::select! {
                biased;
                ready = room() => return ready.map_err(|_| Halt::Broken),
                () = self.peer.closed() => {}
            }
        }
        match self.peer.close_request() {
            Some(request) if phase == Phase::Open => {
                if !request.flush {
                    return Err(Halt::Close { unfinished: None });
                }
                match timeout_at(request.at + CLOSE_WRITE, room()).await {
                    Ok(ready) => ready.map_err(|_| Halt::Broken),
                    Err(_) => Err(Halt::Overdue),
                }
            }
            _ => room().await.map_err(|_| Halt::Broken),
        }
    }
}

/// How far a run of chunks has been written: the next chunk with bytes left, and how many of
/// its bytes are already on the wire. Every chunk is a whole frame, except that the first
/// may be the rest of one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Cursor {
    next: usize,
    offset: usize,
    /// The chunk `next` is part of a frame already partly on the wire.
    begun: bool,
}

impl Cursor {
    fn start(chunks: &[&[u8]], begun: bool) -> Cursor {
        let mut at = Cursor {
            next: 0,
            offset: 0,
            begun,
        };
        at.skip_empty(chunks);
        at
    }

    fn is_done(&self, chunks: &[&[u8]]) -> bool {
        self.next == chunks.len()
    }

    /// The next write's slices: the rest of the next chunk, then whole ones, within bounds.
    fn slices<'a>(&self, chunks: &[&'a [u8]], max_write: usize) -> Vec<IoSlice<'a>> {
        let left = &chunks[self.next..];
        let mut slices = Vec::with_capacity(left.len().min(SLICES));
        let mut bytes = 0;
        for (i, chunk) in left.iter().enumerate() {
            let chunk = if i == 0 { &chunk[self.offset..] } else { chunk };
            if i > 0 && (slices.len() == SLICES || bytes + chunk.len() > max_write) {
                break;
            }
            bytes += chunk.len();
            slices.push(IoSlice::new(chunk));
        }
        slices
    }

    /// Moves past `n` bytes written.
    fn advance(&mut self, chunks: &[&[u8]], mut n: usize) {
        while n > 0 {
            let left = chunks[self.next].len() - self.offset;
            if n < left {
                self.offset += n;
                self.begun = true;
                return;
            }
            n -= left;
            self.next_chunk();
            self.skip_empty(chunks);
        }
    }

    /// What is left of a frame partly on the wire, if the cursor stands inside one.
    fn unfinished<'a>(&self, chunks: &[&'a [u8]]) -> Option<&'a [u8]> {
        let chunk = chunks.get(self.next).filter(|_| self.begun)?;
        Some(&chunk[self.offset..])
    }

    fn next_chunk(&mut self) {
        (self.next, self.offset, self.begun) = (self.next + 1, 0, false);
    }

    /// Empty chunks need no bytes to be done with.
    fn skip_empty(&mut self, chunks: &[&[u8]]) {
        while chunks.get(self.next).is_some_and(|c| c.is_empty()) {
            self.next_chunk();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_pings_fall_within_one_heartbeat_and_spread_evenly() {
        let heartbeat = Duration::from_secs(25);
        let mut per_second = [0u32; 25];
        for id in 1..=10_000u64 {
            let first = first_ping(id, heartbeat);
            assert!(
                first > Duration::ZERO && first <= heartbeat,
                "{id}: {first:?}"
            );
            per_second[(first.as_secs_f64() as usize).min(24)] += 1;
        }
        // 400 per second if perfectly even; connections opened together ping apart.
        for (second, n) in per_second.iter().enumerate() {
            assert!((395..=405).contains(n), "second {second}: {n} first pings");
        }
        // Any 100 consecutive ids (a burst of connects) are spread over the whole interval.
        let mut burst: Vec<Duration> = (500..600).map(|id| first_ping(id, heartbeat)).collect();
        burst.sort();
        let widest_gap = burst.windows(2).map(|w| w[1] - w[0]).max().unwrap();
        assert!(widest_gap < Duration::from_millis(700), "{widest_gap:?}");
    }

    /// Three frames as a write sees them: 12, 130 (a 4-byte header) and 12 bytes.
    fn frames() -> Vec<Bytes> {
        ["0123456789", &"x".repeat(126), "abcdefghij"]
            .iter()
            .map(|t| Frame::from(*t).wire().clone())
            .collect()
    }

    fn chunks(frames: &[Bytes]) -> Vec<&[u8]> {
        frames.iter().map(|f| &f[..]).collect()
    }

    /// The bytes the next write would take, end to end.
    fn next_write(at: &Cursor, chunks: &[&[u8]], max_write: usize) -> Vec<u8> {
        let slices = at.slices(chunks, max_write);
        slices.iter().flat_map(|s| s.iter().copied()).collect()
    }

    #[test]
    fn a_write_that_stops_inside_a_frame_resumes_inside_it() {
        let frames = frames();
        let chunks = chunks(&frames);
        let stream = chunks.concat();
        let mut at = Cursor::start(&chunks, false);
        assert_eq!(at.unfinished(&chunks), None);
        assert_eq!(next_write(&at, &chunks, usize::MAX), stream);
        at.advance(&chunks, 7);
        assert_eq!(at.unfinished(&chunks), Some(&frames[0][7..]));
        assert_eq!(next_write(&at, &chunks, usize::MAX), stream[7..]);
        // The rest of the frame is written even when it alone is past the bound.
        assert_eq!(next_write(&at, &chunks, 1), frames[0][7..]);
    }

    #[test]
    fn a_write_that_stops_inside_a_header_resumes_inside_it() {
        let frames = frames();
        let chunks = chunks(&frames);
        let mut at = Cursor::start(&chunks, false);
        // The first frame and two bytes of the second's four-byte header.
        at.advance(&chunks, 12 + 2);
        assert_eq!(at.unfinished(&chunks), Some(&frames[1][2..]));
        assert_eq!(frames[1][..2], [0x81, 126]);
        let next = next_write(&at, &chunks, usize::MAX);
        assert_eq!(next, chunks.concat()[14..]);
        assert_eq!(next[..2], 126u16.to_be_bytes());
    }

    #[test]
    fn a_write_that_stops_inside_the_last_buffer_ends_with_its_rest() {
        let frames = frames();
        let chunks = chunks(&frames);
        let mut at = Cursor::start(&chunks, false);
        at.advance(&chunks, 12 + 130 + 5);
        assert_eq!(next_write(&at, &chunks, usize::MAX), frames[2][5..]);
        assert!(!at.is_done(&chunks));
        at.advance(&chunks, 7);
        assert!(at.is_done(&chunks));
        assert_eq!(at.unfinished(&chunks), None);
    }

    #[test]
    fn a_write_that_stops_between_frames_leaves_none_unfinished() {
        let frames = frames();
        let chunks = chunks(&frames);
        let mut at = Cursor::start(&chunks, false);
        at.advance(&chunks, 12);
        assert_eq!(at.unfinished(&chunks), None);
        assert_eq!(next_write(&at, &chunks, usize::MAX), chunks[1..].concat());
        // Bounded writes stop between whole frames, never inside one.
        assert_eq!(next_write(&at, &chunks, 141), frames[1]);
    }

    #[test]
    fn a_frame_begun_before_the_run_is_unfinished_until_written() {
        let frames = frames();
        let rest = frames[1].slice(50..);
        let chunks = vec![&rest[..], &[][..], &frames[2][..]];
        let mut at = Cursor::start(&chunks, true);
        assert_eq!(at.unfinished(&chunks), Some(&rest[..]));
        at.advance(&chunks, rest.len());
        // Past the empty chunk too, at the next frame's start.
        assert_eq!((at.next, at.offset, at.unfinished(&chunks)), (2, 0, None));
    }

    #[test]
    fn a_write_takes_at_most_its_slices_and_its_bytes() {
        let frame = Frame::from("x").wire().clone();
        let chunks = vec![&frame[..]; 100];
        let at = Cursor::start(&chunks, false);
        assert_eq!(at.slices(&chunks, usize::MAX).len(), SLICES);
        assert_eq!(at.slices(&chunks, 3 * frame.len()).len(), 3);
    }

    proptest::proptest! {
        /// However the socket cuts the writes, resuming from the cursor sends every byte once,
        /// in order, and the cursor knows whether it stands inside a frame.
        #[test]
        fn resuming_after_every_partial_write_sends_the_stream_once(
            lens in proptest::collection::vec(0usize..300, 1..12),
            takes in proptest::collection::vec(1usize..400, 1..64),
            begun: bool,
            max_write in 1usize..1000,
        ) {
            let frames: Vec<Vec<u8>> = lens
                .iter()
                .enumerate()
                .map(|(i, n)| vec![i as u8; *n])
                .collect();
            let chunks: Vec<&[u8]> = frames.iter().map(|f| &f[..]).collect();
            let mut sent = Vec::new();
            let mut at = Cursor::start(&chunks, begun);
            let mut takes = takes.iter().cycle();
            while !at.is_done(&chunks) {
                let offered = next_write(&at, &chunks, max_write);
                let n = (*takes.next().unwrap()).min(offered.len());
                sent.extend_from_slice(&offered[..n]);
                at.advance(&chunks, n);
                // Inside a frame exactly when the bytes sent end inside a chunk (or inside
                // the frame begun before the run, until its rest is sent).
                let mut bounds = chunks.iter().scan(0, |end, c| { *end += c.len(); Some(*end) });
                let at_bound = sent.is_empty() || bounds.any(|end| end == sent.len());
                let first = chunks.iter().position(|c| !c.is_empty());
                let in_first_begun = begun && first.is_some_and(|i| at.next == i);
                let expected = !at.is_done(&chunks) && (!at_bound || in_first_begun);
                proptest::prop_assert_eq!(at.unfinished(&chunks).is_some(), expected);
            }
            proptest::prop_assert_eq!(sent, chunks.concat());
        }
    }

    fn hub() -> Arc<Hub> {
        let mut config = crate::config::Config::default();
        config.auth.secret = Some("writer-test-secret-0123456789".into());
        let setup = crate::setup::Setup::build(config).unwrap();
        let metrics = Arc::new(crate::metrics::Metrics::new());
        let partitions = Arc::new(crate::position::PartitionTable::default());
        let parts = crate::hub_parts(&setup, metrics, partitions);
        Arc::new(Hub::new(setup, parts))
    }

    /// Every connection's writer task holds its whole future for the connection's life: the
    /// rare paths (the close, the wait for room) are boxed to keep it small. 616 bytes before
    /// the close and the wait learned to stop for a close, 1,056 with them inline.
    #[tokio::test]
    async fn an_idle_writer_stays_small() {
        use super::super::outbox::Limits;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let _client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let server = Arc::new(listener.accept().await.unwrap().0);
        let limits = Limits {
            frames: 1,
            bytes: 1,
            shed_low_after: 1,
        };
        let (_peer, inbox) = Peer::new(limits, Some(server.clone()));
        let writer = run(hub(), server, inbox, 1, Duration::from_secs(25));
        let size = std::mem::size_of_val(&writer);
        assert!(size <= 616, "a writer's future takes {size} bytes");
    }

    /// A client that stopped reading, its writer stuck on a full socket, and then `close`
    /// (the queue overflowing when None). Returns the writer's code, how long after the close
    /// it ended, and how the client's stream ended once the socket was let go.
    async fn close_a_client_that_stopped_reading(
        close: Option<(u16, bool)>,
    ) -> (u16, Duration, Result<usize, io::ErrorKind>) {
        use super::super::outbox::{Delivery, Handover, Limits};
        use crate::route::Priority;
        use tokio::io::AsyncReadExt;

        // Small kernel buffers, so that a few frames fill them.
        let listener = tokio::net::TcpSocket::new_v4().unwrap();
        listener.set_send_buffer_size(16 * 1024).unwrap();
        listener.bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let listener = listener.listen(1).unwrap();
        let client = tokio::net::TcpSocket::new_v4().unwrap();
        client.set_recv_buffer_size(16 * 1024).unwrap();
        let mut client = client
            .connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let server = Arc::new(listener.accept().await.unwrap().0);
        let limits = Limits {
            frames: 8,
            bytes: 1 << 30,
            shed_low_after: 8,
        };
        let (peer, inbox) = Peer::new(limits, Some(server.clone()));
        let writer = tokio::spawn(run(hub(), server, inbox, 1, Duration::from_secs(25)));
        let frame = Frame::from("x".repeat(100_000));
        for _ in 0..if close.is_some() { 4 } else { usize::MAX } {
            match peer.hand_over(&frame, Priority::Normal, Handover::Queue) {
                Delivery::Accepted => tokio::task::yield_now().await,
                Delivery::Overflow => break,
                other => panic!("{other:?}"),
            }
        }
        let started = Instant::now();
        if let Some((code, flush)) = close {
            peer.close(code, "closing", flush);
        }
        let code = tokio::time::timeout(Duration::from_secs(60), writer)
            .await
            .expect("the writer gives up on a client that does not read");
        let waited = started.elapsed();
        // The outbox's handle on the socket is its last one.
        drop(peer);
        let mut buf = vec![0u8; 1 << 16];
        let end = loop {
            match client.read(&mut buf).await {
                Ok(0) => break Ok(0),
                Ok(_) => continue,
                Err(e) => break Err(e.kind()),
            }
        };
        (code.unwrap(), waited, end)
    }

    /// The queue overflows behind the frame the writer is stuck on: the 4008 close cannot
    /// be written, so the writer gives up within its time, the close counts as 4008, and
    /// the socket closes with a reset.
    #[tokio::test(start_paused = true)]
    async fn a_slow_consumer_whose_close_cannot_be_written_is_reset_and_counted_4008() {
        let (code, waited, end) = close_a_client_that_stopped_reading(None).await;
        assert_eq!(code, protocol::close::SLOW_CONSUMER);
        assert!(
            waited <= CLOSE_WRITE + Duration::from_millis(100),
            "{waited:?}"
        );
        assert_eq!(end, Err(io::ErrorKind::ConnectionReset));
    }

    /// A drain's close flushes the queue first; to a client that does not read, neither the
    /// queue nor the close frame can go, and the connection is reset once the close's time
    /// is out, counted under the drain's code.
    #[tokio::test(start_paused = true)]
    async fn a_drain_close_that_cannot_flush_is_reset_when_its_time_is_out() {
        let drain = (protocol::close::GOING_AWAY, true);
        let (code, waited, end) = close_a_client_that_stopped_reading(Some(drain)).await;
        assert_eq!(code, protocol::close::GOING_AWAY);
        let late = CLOSE_WRITE + Duration::from_millis(100);
        assert!(waited >= CLOSE_WRITE && waited <= late, "{waited:?}");
        assert_eq!(end, Err(io::ErrorKind::ConnectionReset));
    }
}
