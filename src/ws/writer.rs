//! The writer: the one task that writes to a connection's socket.
//!
//! It drains the outbox, sending every frame queued at that moment in one write followed by
//! one flush, pings on the heartbeat, carries out resumes where they stand in the stream, and
//! finally sends the close frame.

use std::sync::Arc;
use std::time::Duration;

use futures_util::stream::SplitSink;
use futures_util::SinkExt;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_tungstenite::WebSocketStream;

use std::collections::VecDeque;

use super::outbox::{Inbox, Outgoing, Peer};
use super::protocol::{self, Frame};
use super::Hub;
use crate::replay::{self, Replayed, ResumePlan};

/// The close code recorded when the socket broke before a close frame could be sent.
pub const ABNORMAL: u16 = 1006;

struct Writer<S> {
    hub: Arc<Hub>,
    sink: SplitSink<WebSocketStream<S>, Message>,
    peer: Peer,
}

/// Runs until a close is requested (then sends the close frame and returns its code) or the
/// socket breaks (returns 1006).
pub async fn run<S>(
    hub: Arc<Hub>,
    sink: SplitSink<WebSocketStream<S>, Message>,
    mut inbox: Inbox,
    heartbeat: Duration,
) -> u16
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut w = Writer {
        hub,
        sink,
        peer: inbox.peer.clone(),
    };
    let mut ping = tokio::time::interval_at(Instant::now() + heartbeat, heartbeat);
    loop {
        tokio::select! {
            biased;
            _ = w.peer.closed() => break,
            batch = inbox.next_batch() => {
                if w.write(batch).await.is_err() {
                    return ABNORMAL;
                }
            }
            _ = ping.tick() => {
                if w.sink.send(Message::Ping(Default::default())).await.is_err() {
                    return ABNORMAL;
                }
            }
        }
    }
    let request = w.peer.close_request().expect("woken by a close request");
    if request.flush {
        let _ = w.write(inbox.take_queued()).await;
    }
    let frame = CloseFrame {
        code: CloseCode::from(request.code),
        reason: request.reason.into(),
    };
    match w.sink.send(Message::Close(Some(frame))).await {
        Ok(()) => request.code,
        Err(_) => ABNORMAL,
    }
}

impl<S> Writer<S>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    async fn write(&mut self, items: &mut VecDeque<Outgoing>) -> Result<(), WsError> {
        let mut bytes = 0;
        for item in items.drain(..) {
            match item {
                Outgoing::Frame(frame) => {
                    bytes += frame.len();
                    self.feed(frame).await?;
                }
                // Boxed: a replay's state is large, and every idle writer would carry it.
                Outgoing::Resume(plan) => Box::pin(self.replay(*plan)).await?,
            }
        }
        self.peer.sent(bytes);
        self.sink.flush().await
    }

    async fn feed(&mut self, frame: Frame) -> Result<(), WsError> {
        self.sink.feed(Message::Text(frame)).await
    }

    /// Sends what the client missed, then the cut as a watermark, then the answer.
    async fn replay(&mut self, plan: ResumePlan) -> Result<(), WsError> {
        let hub = self.hub.clone();
        let outcome = replay::gather(&hub.replay, &hub.kafka_replay, &plan).await;
        let (count, source) = match outcome {
            Replayed::Frames { frames, source } => {
                let count = frames.len();
                for frame in frames {
                    self.feed(frame).await?;
                }
                (count, source.as_str())
            }
            Replayed::Resync(reason) => {
                let (conn, user) = (plan.conn, &plan.user);
                tracing::info!(%reason, conn, %user, "resume answered with resync");
                self.feed(protocol::resync(&reason)).await?;
                (0, "resync")
            }
        };
        let m = &hub.metrics;
        m.resumes.with_label_values(&[source]).inc();
        m.replayed_records
            .with_label_values(&[source])
            .inc_by(count as u64);
        self.feed(protocol::positions(&plan.cut)).await?;
        if let Some(id) = &plan.id {
            self.feed(protocol::resumed(id, &plan.rooms, count, source))
                .await?;
        }
        Ok(())
    }
}
