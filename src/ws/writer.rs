//! The writer: the task that empties a connection's outbox into its socket.
//!
//! It sends everything queued at that moment in as few writes as the socket takes: one
//! vectored write over the frames' shared bytes, with no copy and no buffer of its own. It
//! pings on the heartbeat (each connection at its own phase of it), carries out resumes where
//! they stand in the stream, and finally sends the close frame. The only other writes to the
//! socket are the ones `Peer::deliver` makes while the writer holds nothing (see outbox.rs).

use std::collections::VecDeque;
use std::future::poll_fn;
use std::io::{self, IoSlice};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpStream;
use tokio::time::Instant;

use super::outbox::{Inbox, Outgoing};
use super::protocol::{self, Frame};
use super::{wire, Hub};
use crate::registry::ConnId;
use crate::replay::{self, Replayed, ResumePlan};

/// The close code recorded when the socket broke before a close frame could be sent.
pub const ABNORMAL: u16 = 1006;
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
    /// At most this many bytes per write call.
    max_write: usize,
}

enum Wake {
    Close,
    Batch,
    Ping,
}

/// Runs until a close is requested (then sends the close frame and returns its code) or the
/// socket breaks (returns 1006).
pub async fn run(
    hub: Arc<Hub>,
    socket: Arc<TcpStream>,
    mut inbox: Inbox,
    id: ConnId,
    heartbeat: Duration,
) -> u16 {
    let peer = inbox.peer.clone();
    let max_write = hub.config.websocket.write_buffer_bytes.max(1);
    let w = Writer {
        hub,
        socket,
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
    loop {
        let wake = tokio::select! {
            biased;
            _ = &mut closed => Wake::Close,
            _ = inbox.next_batch() => Wake::Batch,
            _ = ping.tick(), if welcomed => Wake::Ping,
        };
        let sent = match wake {
            Wake::Close => break,
            Wake::Batch => {
                welcomed = true;
                w.write(inbox.batch(), None).await
            }
            // The ping rides in the same write as whatever is queued.
            Wake::Ping => w.write(inbox.take_queued(), Some(&wire::ping()[..])).await,
        };
        inbox.written();
        if sent.is_err() {
            return ABNORMAL;
        }
    }
    let request = peer.close_request().expect("woken by a close request");
    let queued = inbox.take_queued();
    if request.flush {
        let _ = w.write(queued, None).await;
    }
    let frame = wire::close(request.code, request.reason);
    match w.send(&[&frame]).await {
        Ok(()) => request.code,
        Err(_) => ABNORMAL,
    }
}

impl Writer {
    /// Sends a batch in order, then `last`; a resume's replay goes out where it stands.
    async fn write(&self, items: &VecDeque<Outgoing>, last: Option<&[u8]>) -> io::Result<()> {
        let mut run: Vec<&[u8]> = Vec::with_capacity(items.len());
        for item in items {
            match item {
                Outgoing::Frame(frame) => run.push(frame.wire()),
                Outgoing::Wire(bytes) => run.push(bytes),
                Outgoing::Resume(plan) => {
                    self.send(&run).await?;
                    run.clear();
                    // Boxed: a replay's state is large, and every idle writer would carry it.
                    Box::pin(self.replay(plan)).await?;
                }
            }
        }
        run.extend(last);
        self.send(&run).await
    }

    /// Sends what the client missed, then the cut as a watermark, then the answer.
    async fn replay(&self, plan: &ResumePlan) -> io::Result<()> {
        let hub = &self.hub;
        let outcome = replay::gather(&hub.replay, &hub.kafka_replay, plan).await;
        let (mut frames, count, source) = match outcome {
            Replayed::Frames { frames, source } => {
                let count = frames.len();
                (frames, count, source.as_str())
            }
            Replayed::Resync(reason) => {
                let (conn, user) = (plan.conn, &plan.user);
                tracing::info!(%reason, conn, %user, "resume answered with resync");
                (vec![protocol::resync(&reason)], 0, "resync")
            }
        };
        let m = &hub.metrics;
        m.resumes.with_label_values(&[source]).inc();
        m.replayed_records
            .with_label_values(&[source])
            .inc_by(count as u64);
        frames.push(protocol::positions(&plan.cut));
        if let Some(id) = &plan.id {
            frames.push(protocol::resumed(id, &plan.rooms, count, source));
        }
        let chunks: Vec<&[u8]> = frames.iter().map(|f: &Frame| &f.wire()[..]).collect();
        self.send(&chunks).await
    }

    /// Writes `chunks` in order, each call taking as many as fit in one vectored write.
    async fn send(&self, chunks: &[&[u8]]) -> io::Result<()> {
        let (mut next, mut offset) = (0, 0);
        loop {
            // Empty chunks need no bytes to be done with.
            while next < chunks.len() && chunks[next].len() == offset {
                (next, offset) = (next + 1, 0);
            }
            if next == chunks.len() {
                return Ok(());
            }
            // Written first and waited on only when full: the socket is writable almost
            // always, and asking first cost a readiness poll per write.
            let slices = self.slices(&chunks[next..], offset);
            match self.socket.try_write_vectored(&slices) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(mut n) => {
                    while n > 0 {
                        let left = chunks[next].len() - offset;
                        if n < left {
                            offset += n;
                            break;
                        }
                        n -= left;
                        (next, offset) = (next + 1, 0);
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    let socket = &self.socket;
                    poll_fn(|cx| socket.poll_write_ready(cx)).await?;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// The next write's slices: the rest of the first chunk, then whole ones, within bounds.
    fn slices<'a>(&self, chunks: &[&'a [u8]], offset: usize) -> Vec<IoSlice<'a>> {
        let mut slices = Vec::with_capacity(chunks.len().min(SLICES));
        let mut bytes = 0;
        for (i, chunk) in chunks.iter().enumerate() {
            let chunk = if i == 0 { &chunk[offset..] } else { chunk };
            if i > 0 && (slices.len() == SLICES || bytes + chunk.len() > self.max_write) {
                break;
            }
            bytes += chunk.len();
            slices.push(IoSlice::new(chunk));
        }
        slices
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
}
