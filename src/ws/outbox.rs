//! The outbox: one connection's bounded queue of frames, its close signal, and its socket's
//! write side.
//!
//! The consumer and the session's reader put frames in with [`Peer::deliver`], which never
//! waits: a full queue closes the connection with 4008 instead of slowing anyone down. When
//! nothing is queued and the writer is not in the middle of a write, `deliver` writes the
//! frame to the socket itself, without blocking: a frame for one quiet connection then costs
//! one send and no task wake-up. Anything the socket does not take at once is queued, and the
//! session's writer, the only reader of the queue, sends everything queued in one write.
//!
//! The queue is a plain deque under a mutex rather than a channel: an idle connection then
//! holds no preallocated slots (a channel allocates its first block of 32 up front), and the
//! writer swaps the whole queue out in one step.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::Bytes;
use tokio::net::TcpStream;
use tokio::sync::Notify;
use tokio::time::Instant;

use super::protocol::close;
use crate::frame::Frame;
use crate::resume::ResumePlan;
use crate::route::Priority;

/// A drained batch keeps at most this many slots for the next one, so a burst does not pin
/// its memory to an idle connection.
const KEEP_SLOTS: usize = 32;

/// What the writer takes from the queue.
pub enum Outgoing {
    Frame(Frame),
    /// The rest of a frame the socket took only part of: it must go before anything else,
    /// the close frame included, whatever is dropped.
    Rest(Bytes),
    /// The answer to a client's ping, ready for the wire.
    Pong(Bytes),
    /// Replay what the connection missed, right here in the stream: everything queued after
    /// this item is newer than the plan's cut.
    Resume(Box<ResumePlan>),
}

impl Outgoing {
    fn wire_len(&self) -> usize {
        match self {
            Outgoing::Frame(f) => f.len(),
            Outgoing::Rest(b) | Outgoing::Pong(b) => b.len(),
            Outgoing::Resume(_) => 0,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CloseRequest {
    pub code: u16,
    pub reason: &'static str,
    /// Send what is already queued before the close frame (drain), or drop it (4008).
    pub flush: bool,
    /// When it was asked for: the close frame has a bounded time to leave from then on.
    pub at: Instant,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivery {
    /// Taken: queued for the writer, or already written to the socket.
    Accepted,
    /// Low priority, and the queue is past its soft limit.
    Shed,
    /// The queue was full: the connection is being closed with 4008.
    Overflow,
    /// The connection is already closing.
    Closed,
}

/// Whether a frame may be written by the one handing it over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Handover {
    /// Written now if the connection is quiet (nothing queued, the writer idle), else queued.
    WriteIfQuiet,
    /// Queued for the writer, never written here: for fan-out to many connections, where
    /// batching in the writers costs less than one send per frame.
    Queue,
}

impl Handover {
    pub fn write_if(write: bool) -> Handover {
        if write {
            Handover::WriteIfQuiet
        } else {
            Handover::Queue
        }
    }
}

#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub frames: usize,
    pub bytes: usize,
    pub shed_low_after: usize,
}

impl From<&crate::config::WebSocketConfig> for Limits {
    fn from(c: &crate::config::WebSocketConfig) -> Limits {
        Limits {
            frames: c.queue_frames,
            bytes: c.queue_bytes,
            shed_low_after: c.shed_low_priority_after,
        }
    }
}

struct Queue {
    items: VecDeque<Outgoing>,
    /// The writer holds a batch it has not finished writing: nobody else writes meanwhile.
    writing: bool,
}

struct Shared {
    queue: Mutex<Queue>,
    /// The socket, for writes straight from `deliver`; None in tests without one.
    socket: Option<Arc<TcpStream>>,
    /// Woken when the queue stops being empty.
    ready: Notify,
    /// Receives position watermarks (false while a resume is pending).
    live: AtomicBool,
    /// Set with the first close request: checked on every delivery without a lock.
    closing: AtomicBool,
    close_request: Mutex<Option<CloseRequest>>,
    /// Woken (all waiters) by the first close request.
    close_signal: Notify,
    queued_bytes: AtomicUsize,
    limits: Limits,
    /// Test builds only: nanoseconds the writer lingers right after taking the queue, where
    /// a `deliver` once slipped in before the writer held the socket (see `one_writer.rs`).
    #[cfg(test)]
    linger_after_take: std::sync::atomic::AtomicU64,
}

/// A handle on one connection's outbox; cheap to clone.
#[derive(Clone)]
pub struct Peer(Arc<Shared>);

/// The writer's end of the outbox. Dropping it closes the outbox for good.
pub struct Inbox {
    pub peer: Peer,
    batch: VecDeque<Outgoing>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Peer {
    pub fn new(limits: Limits, socket: Option<Arc<TcpStream>>) -> (Peer, Inbox) {
        let peer = Peer(Arc::new(Shared {
            queue: Mutex::new(Queue {
                items: VecDeque::new(),
                writing: false,
            }),
            socket,
            ready: Notify::new(),
            live: AtomicBool::new(false),
            closing: AtomicBool::new(false),
            close_request: Mutex::new(None),
            close_signal: Notify::new(),
            queued_bytes: AtomicUsize::new(0),
            limits,
            #[cfg(test)]
            linger_after_take: Default::default(),
        }));
        let inbox = Inbox {
            peer: peer.clone(),
            batch: VecDeque::new(),
        };
        (peer, inbox)
    }

    /// Asks the CPU to start loading what a delivery touches first (the close flag, the
    /// queue's lock), so that a fan-out over thousands of outboxes overlaps their cache misses.
    pub fn prefetch(&self) {
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
            let s = &*self.0;
            // A prefetch never faults and changes nothing observable.
            unsafe {
                _mm_prefetch::<_MM_HINT_T0>(std::ptr::from_ref(&s.closing).cast());
                _mm_prefetch::<_MM_HINT_T0>(std::ptr::from_ref(&s.queue).cast());
            }
        }
    }

    /// Hands a frame over without waiting: see `Handover` for whether it may be written here.
    pub fn hand_over(&self, frame: &Frame, priority: Priority, how: Handover) -> Delivery {
        let s = &*self.0;
        if s.closing.load(Ordering::Acquire) {
            return Delivery::Closed;
        }
        let queue = lock(&s.queue);
        if priority == Priority::Low && queue.items.len() >= s.limits.shed_low_after {
            return Delivery::Shed;
        }
        let quiet = queue.items.is_empty() && !queue.writing;
        if let (Handover::WriteIfQuiet, true, Some(socket)) = (how, quiet, &s.socket) {
            // Under the queue's lock: the writer cannot start a write in between.
            match socket.try_write(frame.wire()) {
                Ok(n) if n == frame.len() => return Delivery::Accepted,
                Ok(n) if n > 0 => {
                    let rest = frame.wire().slice(n..);
                    s.queued_bytes.fetch_add(rest.len(), Ordering::AcqRel);
                    self.push(queue, Outgoing::Rest(rest));
                    return Delivery::Accepted;
                }
                // Full, or broken: the writer waits for room, or meets the error.
                _ => {}
            }
        }
        let len = frame.len();
        let full = queue.items.len() >= s.limits.frames
            || s.queued_bytes.load(Ordering::Acquire) + len > s.limits.bytes;
        if full {
            drop(queue);
            return self.overflow();
        }
        s.queued_bytes.fetch_add(len, Ordering::AcqRel);
        self.push(queue, Outgoing::Frame(frame.clone()));
        Delivery::Accepted
    }

    fn push(&self, mut queue: MutexGuard<'_, Queue>, item: Outgoing) {
        let was_empty = queue.items.is_empty();
        queue.items.push_back(item);
        drop(queue);
        if was_empty {
            self.0.ready.notify_one();
        }
    }

    /// Queues the answer to a client's ping, in order with everything else.
    pub fn pong(&self, payload: &[u8]) {
        if self.0.closing.load(Ordering::Acquire) {
            return;
        }
        let queue = lock(&self.0.queue);
        if queue.items.len() >= self.0.limits.frames {
            drop(queue);
            self.overflow();
            return;
        }
        let pong = super::wire::pong(payload);
        self.0.queued_bytes.fetch_add(pong.len(), Ordering::AcqRel);
        self.push(queue, Outgoing::Pong(pong));
    }

    /// Queues a reply to the client (ok, error, pong), in order with events.
    pub fn reply(&self, frame: Frame) {
        self.hand_over(&frame, Priority::Critical, Handover::WriteIfQuiet);
    }

    /// Queues a replay at this point of the stream.
    pub fn resume(&self, plan: ResumePlan) {
        let queue = lock(&self.0.queue);
        if queue.items.len() >= self.0.limits.frames {
            drop(queue);
            self.overflow();
            return;
        }
        self.push(queue, Outgoing::Resume(Box::new(plan)));
    }

    /// Test builds only: widens the moment right after the writer takes the queue, so that
    /// a stress test meets a race there in seconds rather than minutes.
    #[cfg(test)]
    pub fn linger_after_take(&self, pause: std::time::Duration) {
        let nanos = pause.as_nanos() as u64;
        self.0.linger_after_take.store(nanos, Ordering::Relaxed);
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
        let mut request = lock(&self.0.close_request);
        if request.is_some() {
            return false;
        }
        *request = Some(CloseRequest {
            code,
            reason,
            flush,
            at: Instant::now(),
        });
        self.0.closing.store(true, Ordering::Release);
        drop(request);
        self.0.close_signal.notify_waiters();
        true
    }

    /// Whether a close has been asked for: one atomic load, no lock.
    pub fn is_closing(&self) -> bool {
        self.0.closing.load(Ordering::Acquire)
    }

    pub fn close_request(&self) -> Option<CloseRequest> {
        lock(&self.0.close_request).clone()
    }

    /// Resolves once a close has been requested.
    pub async fn closed(&self) {
        let signal = self.0.close_signal.notified();
        tokio::pin!(signal);
        // Registered before the flag is read, so a request in between still wakes us.
        signal.as_mut().enable();
        if self.0.closing.load(Ordering::Acquire) {
            return;
        }
        signal.await;
    }
}

impl Inbox {
    /// Waits until something is queued and takes all of it, oldest first. The writer owns the
    /// socket until it calls [`Inbox::written`].
    pub async fn next_batch(&mut self) -> &mut VecDeque<Outgoing> {
        loop {
            if self.take(false) {
                return &mut self.batch;
            }
            self.peer.0.ready.notified().await;
        }
    }

    /// Takes whatever is queued, without waiting, and the socket with it (for a ping or the
    /// close frame, which must not cut into a frame written from `deliver`).
    pub fn take_queued(&mut self) -> &mut VecDeque<Outgoing> {
        self.take(true);
        &mut self.batch
    }

    /// What the last `next_batch` or `take_queued` took.
    pub fn batch(&self) -> &VecDeque<Outgoing> {
        &self.batch
    }

    /// The batch has left: `deliver` may write again, unless more was queued meanwhile.
    pub fn written(&mut self) {
        let bytes: usize = self.batch.iter().map(Outgoing::wire_len).sum();
        self.batch.clear();
        self.peer.0.queued_bytes.fetch_sub(bytes, Ordering::AcqRel);
        let mut queue = lock(&self.peer.0.queue);
        if queue.items.is_empty() {
            queue.writing = false;
        }
    }

    /// Takes the queue, and the socket with it if anything was queued or `even_empty`: in one
    /// critical section, or a `deliver` in between could start a frame that the writer's
    /// next bytes would cut into.
    fn take(&mut self, even_empty: bool) -> bool {
        if self.batch.capacity() > KEEP_SLOTS {
            self.batch = VecDeque::new();
        }
        self.batch.clear();
        let mut queue = lock(&self.peer.0.queue);
        std::mem::swap(&mut self.batch, &mut queue.items);
        if even_empty || !self.batch.is_empty() {
            queue.writing = true;
        }
        drop(queue);
        #[cfg(test)]
        self.linger();
        !self.batch.is_empty()
    }

    #[cfg(test)]
    fn linger(&self) {
        let nanos = self.peer.0.linger_after_take.load(Ordering::Relaxed);
        let until = std::time::Instant::now() + std::time::Duration::from_nanos(nanos);
        while std::time::Instant::now() < until {
            std::hint::spin_loop();
        }
    }
}

impl Drop for Inbox {
    fn drop(&mut self) {
        self.peer.0.closing.store(true, Ordering::Release);
        lock(&self.peer.0.queue).items.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A frame handed over as one recipient of a record is: written if the connection is quiet.
    fn give(peer: &Peer, frame: &Frame, priority: Priority) -> Delivery {
        peer.hand_over(frame, priority, Handover::WriteIfQuiet)
    }

    fn limits() -> Limits {
        Limits {
            frames: 4,
            bytes: 100,
            shed_low_after: 2,
        }
    }

    #[test]
    fn full_queue_closes_with_4008_and_sheds_low_first() {
        let (peer, mut inbox) = Peer::new(limits(), None);
        let f = Frame::from("0123456789");
        assert_eq!(give(&peer, &f, Priority::Low), Delivery::Accepted);
        assert_eq!(give(&peer, &f, Priority::Normal), Delivery::Accepted);
        assert_eq!(give(&peer, &f, Priority::Low), Delivery::Shed);
        assert_eq!(give(&peer, &f, Priority::Normal), Delivery::Accepted);
        assert_eq!(give(&peer, &f, Priority::Normal), Delivery::Accepted);
        assert_eq!(give(&peer, &f, Priority::Normal), Delivery::Overflow);
        assert_eq!(peer.close_request().unwrap().code, close::SLOW_CONSUMER);
        assert_eq!(give(&peer, &f, Priority::Normal), Delivery::Closed);
        let batch = inbox.take_queued();
        assert_eq!(batch.len(), 4);
        assert!(matches!(batch.pop_front().unwrap(), Outgoing::Frame(got) if got == f));
    }

    #[test]
    fn byte_limit_applies() {
        let (peer, _inbox) = Peer::new(limits(), None);
        let big = Frame::from("x".repeat(60));
        assert_eq!(give(&peer, &big, Priority::Normal), Delivery::Accepted);
        assert_eq!(give(&peer, &big, Priority::Normal), Delivery::Overflow);
    }

    #[tokio::test]
    async fn the_writer_is_woken_for_a_frame_and_for_a_close() {
        let (peer, mut inbox) = Peer::new(limits(), None);
        let writer = tokio::spawn(async move {
            let n = inbox.next_batch().await.len();
            inbox.peer.closed().await;
            (n, inbox)
        });
        tokio::task::yield_now().await;
        give(&peer, &Frame::from("a"), Priority::Normal);
        give(&peer, &Frame::from("b"), Priority::Normal);
        tokio::task::yield_now().await;
        peer.close(close::GOING_AWAY, "drain", true);
        let (n, inbox) = writer.await.unwrap();
        assert!(n >= 1);
        drop(inbox);
        assert_eq!(
            give(&peer, &Frame::from("c"), Priority::Normal),
            Delivery::Closed
        );
    }

    /// A connected pair on loopback: the server's end, shared as a session shares it, and
    /// the client's.
    async fn socket_pair() -> (Arc<TcpStream>, TcpStream) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (server, _) = listener.accept().await.unwrap();
        // A direct write needs the runtime to have seen the socket writable; until then
        // `deliver` queues, which is right, but not what these tests are about.
        server.writable().await.unwrap();
        (Arc::new(server), client)
    }

    async fn read_exactly(client: &mut TcpStream, n: usize) -> Vec<u8> {
        use tokio::io::AsyncReadExt;
        let mut buf = vec![0u8; n];
        let read = client.read_exact(&mut buf);
        tokio::time::timeout(std::time::Duration::from_secs(5), read)
            .await
            .expect("written within 5 s")
            .unwrap();
        buf
    }

    #[tokio::test]
    async fn a_quiet_connection_is_written_at_once_and_a_busy_one_queues_in_order() {
        let (server, mut client) = socket_pair().await;
        let big = Limits {
            frames: 100,
            bytes: 1 << 20,
            shed_low_after: 50,
        };
        let (peer, mut inbox) = Peer::new(big, Some(server));
        let a = Frame::from("a");
        assert_eq!(give(&peer, &a, Priority::Normal), Delivery::Accepted);
        // No writer runs here: the frame is on the wire already, and nothing is queued.
        assert_eq!(read_exactly(&mut client, a.len()).await, a.wire().to_vec());
        assert!(inbox.take_queued().is_empty());
        inbox.written();

        // Once something is queued, later frames queue behind it rather than jump ahead.
        let (b, c) = (Frame::from("b"), Frame::from("c"));
        assert_eq!(
            peer.hand_over(&b, Priority::Normal, Handover::Queue),
            Delivery::Accepted
        );
        assert_eq!(give(&peer, &c, Priority::Normal), Delivery::Accepted);
        let queued: Vec<String> = inbox
            .take_queued()
            .iter()
            .map(|item| match item {
                Outgoing::Frame(f) => f.as_str().to_string(),
                _ => panic!("only frames were queued"),
            })
            .collect();
        assert_eq!(queued, ["b", "c"]);
        // The writer holds them: a frame delivered now must wait for them too.
        assert_eq!(give(&peer, &a, Priority::Normal), Delivery::Accepted);
        inbox.written();
        assert_eq!(inbox.take_queued().len(), 1);
    }

    #[tokio::test]
    async fn a_socket_that_takes_nothing_more_leaves_frames_queued_for_the_writer() {
        let (server, _client) = socket_pair().await;
        let (peer, mut inbox) = Peer::new(
            Limits {
                frames: 100_000,
                bytes: 1 << 30,
                shed_low_after: 100_000,
            },
            Some(server),
        );
        // The client never reads: the kernel's buffers fill, and then every frame queues.
        let frame = Frame::from("x".repeat(60_000));
        let mut delivered = 0;
        while inbox.take_queued().is_empty() {
            inbox.written();
            assert_eq!(give(&peer, &frame, Priority::Normal), Delivery::Accepted);
            delivered += 1;
            assert!(delivered < 10_000, "the socket never filled");
        }
        // Whatever part of a frame the socket took, the rest is queued as raw bytes.
        let rest: usize = inbox.batch().iter().map(Outgoing::wire_len).sum();
        assert!(rest > 0 && rest <= frame.len(), "{rest}");
    }

    #[test]
    fn first_close_wins() {
        let (peer, _inbox) = Peer::new(limits(), None);
        assert!(peer.close(close::GOING_AWAY, "drain", true));
        assert!(!peer.close(close::SLOW_CONSUMER, "slow", false));
        assert_eq!(peer.close_request().unwrap().code, close::GOING_AWAY);
    }
}
