//! The outbox: one connection's bounded queue of frames, and its close signal.
//!
//! The consumer and the session's reader put frames in with [`Peer::deliver`], which never
//! waits: a full queue closes the connection with 4008 instead of slowing anyone down. The
//! session's writer is the only reader of the queue.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::sync::{mpsc, watch};

use super::protocol::{close, Frame};
use crate::replay::ResumePlan;
use crate::route::Priority;

/// What the writer takes from the queue.
pub enum Outgoing {
    Frame(Frame),
    /// Replay what the connection missed, right here in the stream: everything queued after
    /// this item is newer than the plan's cut.
    Resume(Box<ResumePlan>),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CloseRequest {
    pub code: u16,
    pub reason: &'static str,
    /// Send what is already queued before the close frame (drain), or drop it (4008).
    pub flush: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivery {
    Queued,
    /// Low priority, and the queue is past its soft limit.
    Shed,
    /// The queue was full: the connection is being closed with 4008.
    Overflow,
    /// The connection is already closing.
    Closed,
}

#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub frames: usize,
    pub bytes: usize,
    pub shed_low_after: usize,
}

struct Shared {
    tx: mpsc::Sender<Outgoing>,
    /// Receives position watermarks (false while a resume is pending).
    live: AtomicBool,
    /// Set with the first close request: checked on every delivery, so kept out of the
    /// watch channel's lock.
    closing: AtomicBool,
    queued_bytes: AtomicUsize,
    close: watch::Sender<Option<CloseRequest>>,
    limits: Limits,
}

/// A handle on one connection's outbox; cheap to clone.
#[derive(Clone)]
pub struct Peer(Arc<Shared>);

/// The writer's end of the outbox.
pub struct Inbox {
    pub rx: mpsc::Receiver<Outgoing>,
    pub peer: Peer,
}

impl Peer {
    pub fn new(limits: Limits) -> (Peer, Inbox) {
        let (tx, rx) = mpsc::channel(limits.frames);
        let (close, _) = watch::channel(None);
        let peer = Peer(Arc::new(Shared {
            tx,
            live: AtomicBool::new(false),
            closing: AtomicBool::new(false),
            queued_bytes: AtomicUsize::new(0),
            close,
            limits,
        }));
        let inbox = Inbox {
            rx,
            peer: peer.clone(),
        };
        (peer, inbox)
    }

    /// Queues a frame without waiting.
    pub fn deliver(&self, frame: &Frame, priority: Priority) -> Delivery {
        let s = &*self.0;
        if s.closing.load(Ordering::Acquire) {
            return Delivery::Closed;
        }
        let queued_frames = s.limits.frames - s.tx.capacity();
        if priority == Priority::Low && queued_frames >= s.limits.shed_low_after {
            return Delivery::Shed;
        }
        let len = frame.len();
        if s.queued_bytes.fetch_add(len, Ordering::AcqRel) + len > s.limits.bytes {
            s.queued_bytes.fetch_sub(len, Ordering::AcqRel);
            return self.overflow();
        }
        match s.tx.try_send(Outgoing::Frame(frame.clone())) {
            Ok(()) => Delivery::Queued,
            Err(e) => {
                s.queued_bytes.fetch_sub(len, Ordering::AcqRel);
                match e {
                    mpsc::error::TrySendError::Full(_) => self.overflow(),
                    mpsc::error::TrySendError::Closed(_) => Delivery::Closed,
                }
            }
        }
    }

    /// Queues a reply to the client (ok, error, pong), in order with events.
    pub fn reply(&self, frame: Frame) {
        self.deliver(&frame, Priority::Critical);
    }

    /// Queues a replay at this point of the stream.
    pub fn resume(&self, plan: ResumePlan) {
        if self
            .0
            .tx
            .try_send(Outgoing::Resume(Box::new(plan)))
            .is_err()
        {
            self.overflow();
        }
    }

    pub fn set_live(&self) {
        self.0.live.store(true, Ordering::Release);
    }

    pub fn is_live(&self) -> bool {
        self.0.live.load(Ordering::Acquire)
    }

    fn overflow(&self) -> Delivery {
        if self.close(
            close::SLOW_CONSUMER,
            "slow consumer: resume to catch up",
            false,
        ) {
            Delivery::Overflow
        } else {
            Delivery::Closed
        }
    }

    /// Asks the session to close. The first request wins; true if this one did.
    pub fn close(&self, code: u16, reason: &'static str, flush: bool) -> bool {
        self.0.close.send_if_modified(|current| {
            if current.is_some() {
                return false;
            }
            self.0.closing.store(true, Ordering::Release);
            *current = Some(CloseRequest {
                code,
                reason,
                flush,
            });
            true
        })
    }

    pub fn close_request(&self) -> Option<CloseRequest> {
        self.0.close.borrow().clone()
    }

    pub fn close_signal(&self) -> watch::Receiver<Option<CloseRequest>> {
        self.0.close.subscribe()
    }

    /// Called by the writer once frames have left.
    pub fn sent(&self, bytes: usize) {
        self.0.queued_bytes.fetch_sub(bytes, Ordering::AcqRel);
    }
}

/// Resolves once a close has been requested. The guard `wait_for` returns is not `Send`, so
/// it is dropped here rather than inside a caller's `select!`.
pub async fn closed(signal: &mut watch::Receiver<Option<CloseRequest>>) {
    let _ = signal.wait_for(Option::is_some).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> Limits {
        Limits {
            frames: 4,
            bytes: 100,
            shed_low_after: 2,
        }
    }

    #[test]
    fn full_queue_closes_with_4008_and_sheds_low_first() {
        let (peer, mut inbox) = Peer::new(limits());
        let f = Frame::from("0123456789");
        assert_eq!(peer.deliver(&f, Priority::Low), Delivery::Queued);
        assert_eq!(peer.deliver(&f, Priority::Normal), Delivery::Queued);
        assert_eq!(peer.deliver(&f, Priority::Low), Delivery::Shed);
        assert_eq!(peer.deliver(&f, Priority::Normal), Delivery::Queued);
        assert_eq!(peer.deliver(&f, Priority::Normal), Delivery::Queued);
        assert_eq!(peer.deliver(&f, Priority::Normal), Delivery::Overflow);
        assert_eq!(peer.close_request().unwrap().code, close::SLOW_CONSUMER);
        assert_eq!(peer.deliver(&f, Priority::Normal), Delivery::Closed);
        assert!(matches!(inbox.rx.try_recv().unwrap(), Outgoing::Frame(got) if got == f));
    }

    #[test]
    fn byte_limit_applies() {
        let (peer, _inbox) = Peer::new(limits());
        let big = Frame::from("x".repeat(60));
        assert_eq!(peer.deliver(&big, Priority::Normal), Delivery::Queued);
        assert_eq!(peer.deliver(&big, Priority::Normal), Delivery::Overflow);
    }

    #[test]
    fn first_close_wins() {
        let (peer, _inbox) = Peer::new(limits());
        assert!(peer.close(close::GOING_AWAY, "drain", true));
        assert!(!peer.close(close::SLOW_CONSUMER, "slow", false));
        assert_eq!(peer.close_request().unwrap().code, close::GOING_AWAY);
    }
}
