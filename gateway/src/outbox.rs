//! A session's send queue: bounded, many senders (the hub, the session's own
//! replies), one receiver (the session's egress). Unlike a tokio mpsc channel,
//! which allocates a 32-slot block (about 1.1 KiB for `Bytes`) when it is
//! created and keeps it, an empty queue here owns no buffer, so an idle
//! session pays only for the shared header. The receiver is woken when the
//! queue goes from empty to non-empty, not once per frame.
//!
//! Slow consumers are judged by time, not by a burst's size. `cap` is where
//! the queue counts as congested: senders that can wait (the delivery stream,
//! a session's own replies) wait there for room, which paces catch-up bursts
//! by what the client absorbs. The queue takes frames past `cap` (up to twice
//! it, for senders that cannot wait), and refuses them, so that the session is
//! closed as a slow consumer, only once it has stayed congested for `timeout`
//! or reached twice `cap`. A receiver that has taken nothing for
//! [`STALLED_AFTER`] while congested is stalled: nobody waits for it.
//!
//! Corked writes. A sender running inside a [`corked`] scope (the publishing
//! session's ingress) does not wake the receivers of the
//! queues it fills: it notes them, and at [`flush_cork`] (when it has processed
//! every command or item it had at hand) writes each one's frames to its socket
//! itself, from its own thread: one `writev` per session per burst, no task
//! wake-up, no poll of the session. Only what the socket does not take at once is
//! left to the session's egress, which is then woken to wait for room. One writer
//! at a time: whoever takes frames from the queue to write them (a flush or the
//! egress) marks the queue `writing` until they are written or put back at its
//! front, so that frames reach the socket in queue order.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use std::task::{Context, Poll};

use bytes::Bytes;
use futures_util::task::AtomicWaker;
use parking_lot::Mutex;
use tokio::sync::Notify;
use tokio::time::Instant;

/// A congested queue whose receiver has taken nothing for this long is not waited for.
pub const STALLED_AFTER: Duration = Duration::from_secs(1);

/// How many unanswered pings keep their pong; an older one is dropped for a newer.
pub const PONG_SLOTS: usize = 16;

#[derive(Debug)]
struct Queue {
    items: VecDeque<Bytes>,
    /// Pongs for the latest [`PONG_SLOTS`] pings not yet answered, oldest first (RFC
    /// 6455 lets a server answer only the most recent ping; a few back-to-back pings
    /// each get theirs, a flood loses its oldest). Written before queued frames;
    /// outside the queue's bound. Allocates only while pongs wait.
    pongs: VecDeque<Bytes>,
    /// The receiver is gone: nothing more is accepted.
    closed: bool,
    /// Since when the queue has held `cap` frames or more.
    congested_since: Option<Instant>,
    /// When the receiver last took frames (or the queue was made).
    last_take: Instant,
    /// The session's socket, for corked writes (none once the egress sealed it).
    socket: Option<Arc<tokio::net::TcpStream>>,
    /// Frames taken from the queue are being written by the egress: nobody else
    /// writes until they are (a corked flush writes under the lock, see `write_through`).
    egress_writing: bool,
    /// The queue is noted in a cork: its frames will be written at that cork's flush.
    corked: bool,
    /// The egress writes its close: corked writes are over.
    sealed: bool,
    /// The front frame of `items` was written in part (by a corked flush): its rest
    /// goes out before anything else.
    partial: bool,
    /// The receiver is to look at its deadlines again ([`Outbox::nudge`]).
    nudged: bool,
}

impl Queue {
    /// Writes the pong and the queued frames to the socket as far as it takes them
    /// without waiting (partly written frames keep their rest); returns how many
    /// queued frames went out whole. A failed write leaves them to the egress, whose
    /// own write then fails and ends the session.
    fn write_now(&mut self) -> usize {
        const SLICES: usize = 64;
        let Some(socket) = self.socket.clone() else { return 0 };
        // The pongs join the queue here, so that a partly written one is finished
        // before anything else (and a newer pong cannot replace its rest).
        let at = usize::from(self.partial);
        for (i, p) in std::mem::take(&mut self.pongs).into_iter().enumerate() {
            self.items.insert(at + i, p);
        }
        let mut whole = 0;
        while !self.items.is_empty() {
            let mut slices = [std::io::IoSlice::new(&[]); SLICES];
            let mut k = 0;
            for b in self.items.iter().take(SLICES) {
                slices[k] = std::io::IoSlice::new(b);
                k += 1;
            }
            let mut n = match socket.try_write_vectored(&slices[..k]) {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            while n > 0 {
                let Some(front) = self.items.front_mut() else { break };
                let m = n.min(front.len());
                bytes::Buf::advance(front, m);
                n -= m;
                self.partial = !front.is_empty();
                if front.is_empty() {
                    self.items.pop_front();
                    whole += 1;
                }
            }
        }
        whole
    }

    /// Moves up to `limit` frames (pending pongs first) into `out`. Returns how many,
    /// and whether queued frames (not only a pong) were taken, so that waiting senders
    /// are told.
    fn take_into(&mut self, out: &mut Vec<Bytes>, limit: usize, cap: usize) -> (usize, bool) {
        // The rest of a partly written frame goes before anything, the pong included.
        let rest = match self.items.front() {
            Some(_) if self.partial && limit > 0 => {
                self.partial = false;
                out.extend(self.items.pop_front());
                1
            }
            _ => 0,
        };
        let limit = limit - rest;
        let pongs = self.pongs.len().min(limit);
        out.extend(self.pongs.drain(..pongs));
        if self.pongs.is_empty() && self.pongs.capacity() > 0 {
            self.pongs = VecDeque::new();
        }
        let n = self.items.len().min(limit - pongs);
        out.extend(self.items.drain(..n));
        if n > 0 {
            self.last_take = Instant::now();
            if self.items.len() < cap {
                self.congested_since = None;
            }
        }
        if self.items.is_empty() && self.items.capacity() > 0 {
            // Idle again: give the buffer back.
            self.items = VecDeque::new();
        }
        (rest + n + pongs, rest + n > 0)
    }
}

/// The queues a corked sender filled since its last flush. Whatever is left in it
/// when it goes (its task ends or is dropped) is written then.
#[derive(Debug, Default)]
struct Cork(Vec<Outbox>);

impl Cork {
    fn flush(&mut self) {
        for outbox in std::mem::take(&mut self.0) {
            outbox.write_through();
        }
    }
}

impl Drop for Cork {
    fn drop(&mut self) {
        self.flush();
    }
}

tokio::task_local! {
    /// The cork of the task running now, if it runs inside [`corked`].
    static CORK: RefCell<Cork>;
}

/// Runs `f` with a cork: the queues it fills are written each time it has to wait
/// (it has run every command or item it had at hand, or it waits for room), instead
/// of waking their sessions; whatever is left, at its end.
pub fn corked<F: std::future::Future>(f: F) -> impl std::future::Future<Output = F::Output> {
    // Not an async fn: that would keep `f` twice in the session's future.
    CORK.scope(RefCell::new(Cork::default()), FlushWhenWaiting { inner: f })
}

pin_project_lite::pin_project! {
    /// Polls `inner`; flushes the cork each time it is about to wait, and when it is done.
    struct FlushWhenWaiting<F> {
        #[pin]
        inner: F,
    }
}

impl<F: std::future::Future> std::future::Future for FlushWhenWaiting<F> {
    type Output = F::Output;

    fn poll(self: std::pin::Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let poll = self.project().inner.poll(cx);
        // Waiting, or done: either way the queues it filled are written now.
        flush_cork();
        poll
    }
}

/// Writes the frames of every queue the current task's cork noted (see the module
/// docs); nothing outside a [`corked`] scope.
fn flush_cork() {
    let mut pending = CORK.try_with(|c| std::mem::take(&mut *c.borrow_mut())).unwrap_or_default();
    pending.flush();
}

#[derive(Debug)]
struct Shared {
    queue: Mutex<Queue>,
    cap: usize,
    /// How long the queue may stay congested before the session counts as slow.
    timeout: Duration,
    /// The receiver's waker (an atomic swap, no list of waiters: one receiver).
    ready: AtomicWaker,
    /// Wakes senders waiting for room.
    room: Notify,
}

/// Why a frame was not queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SendError {
    /// A slow consumer: congested for the whole timeout, or at twice the cap.
    Full,
    Closed,
}

/// A queued frame, and whether the queue is now congested (at `cap` or more).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Queued {
    Clear,
    Congested,
}

/// What waiting for a congested queue came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Settled {
    /// Below `cap` again (or the receiver is gone).
    Clear,
    /// The receiver has taken nothing for [`STALLED_AFTER`]: not waited for.
    Stalled,
    /// Congested for the whole timeout: a slow consumer.
    Slow,
}

/// The sending side; cheap to clone.
#[derive(Debug, Clone)]
pub struct Outbox {
    shared: Arc<Shared>,
}

/// The receiving side, owned by the session's egress.
#[derive(Debug)]
pub struct OutboxRx {
    shared: Arc<Shared>,
}

/// A queue congested at `cap` frames, slow after `timeout` of congestion.
pub fn outbox(cap: usize, timeout: Duration) -> (Outbox, OutboxRx) {
    let shared = Arc::new(Shared {
        queue: Mutex::new(Queue {
            items: VecDeque::new(),
            pongs: VecDeque::new(),
            closed: false,
            congested_since: None,
            last_take: Instant::now(),
            socket: None,
            egress_writing: false,
            corked: false,
            sealed: false,
            partial: false,
            nudged: false,
        }),
        cap: cap.max(1),
        timeout,
        ready: AtomicWaker::new(),
        room: Notify::new(),
    });
    (Outbox { shared: shared.clone() }, OutboxRx { shared })
}

impl Outbox {
    /// Queues `frame` unless the session is a slow consumer or the receiver is gone.
    pub fn try_send(&self, frame: Bytes) -> Result<Queued, SendError> {
        let cap = self.shared.cap;
        let (was_empty, congested) = {
            let mut q = self.shared.queue.lock();
            if q.closed {
                return Err(SendError::Closed);
            }
            let len = q.items.len();
            if len + 1 >= cap {
                let now = Instant::now();
                let since = *q.congested_since.get_or_insert(now);
                if len >= 2 * cap || (len >= cap && now.duration_since(since) >= self.shared.timeout) {
                    return Err(SendError::Full);
                }
            }
            q.items.push_back(frame);
            let was_empty = len == 0 && q.pongs.is_empty();
            // Already noted in a cork, whose flush writes this too; or noted now.
            let idle = !q.egress_writing && q.socket.is_some();
            let corked = q.corked || (was_empty && idle && self.cork());
            q.corked |= corked;
            (was_empty && !corked, len + 1 >= cap)
        };
        if was_empty {
            self.shared.ready.wake();
        }
        Ok(if congested { Queued::Congested } else { Queued::Clear })
    }

    /// Notes this queue in the current task's cork; false outside a [`corked`] scope.
    fn cork(&self) -> bool {
        CORK.try_with(|c| c.borrow_mut().0.push(self.clone())).is_ok()
    }

    /// A cork's flush: writes what is queued to the socket now, as far as the socket
    /// takes it without waiting; what is left stays at the front of the queue, for the
    /// egress. Done under the queue's lock, which is the writer's token meanwhile (a
    /// syscall or a few, never a wait), so that nothing is copied out of the queue.
    fn write_through(&self) {
        let shared = &self.shared;
        let mut q = shared.queue.lock();
        q.corked = false;
        let took = if q.egress_writing || q.sealed { 0 } else { q.write_now() };
        if took > 0 {
            q.last_take = Instant::now();
            if q.items.len() < shared.cap {
                q.congested_since = None;
            }
            if q.items.is_empty() {
                // Idle again: give the buffer back.
                q.items = VecDeque::new();
            }
        }
        let wake = !q.items.is_empty() || !q.pongs.is_empty();
        drop(q);
        if took > 0 {
            shared.room.notify_waiters();
        }
        if wake {
            // Someone else writes, or the socket is full: the egress takes over.
            shared.ready.wake();
        }
    }

    /// Wakes the receiver, with or without frames (it re-reads its deadlines).
    pub fn nudge(&self) {
        self.shared.queue.lock().nudged = true;
        self.shared.ready.wake();
    }

    /// Lets corked senders write to `socket` themselves.
    pub fn attach(&self, socket: Arc<tokio::net::TcpStream>) {
        self.shared.queue.lock().socket = Some(socket);
    }

    /// Waits while the queue is congested and its receiver is taking frames, at
    /// most until it has been congested for the timeout.
    pub async fn settle(&self) -> Settled {
        loop {
            let notified = self.shared.room.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let deadline = {
                let q = self.shared.queue.lock();
                if q.closed || q.items.len() < self.shared.cap {
                    return Settled::Clear;
                }
                let now = Instant::now();
                let slow_at = q.congested_since.unwrap_or(now) + self.shared.timeout;
                if now >= slow_at {
                    return Settled::Slow;
                }
                let stalled_at = q.last_take + STALLED_AFTER;
                if now >= stalled_at {
                    return Settled::Stalled;
                }
                // Look again at whichever comes first (a take wakes us sooner).
                slow_at.min(stalled_at)
            };
            tokio::select! {
                () = notified => {}
                () = tokio::time::sleep_until(deadline) => {}
            }
        }
    }

    /// Queues a pong to send before queued frames; with [`PONG_SLOTS`] already
    /// waiting, the oldest is dropped. Control frames are outside the queue's bound:
    /// a ping flood cannot fill the queue.
    pub fn set_pong(&self, frame: Bytes) {
        let was_idle = {
            let mut q = self.shared.queue.lock();
            if q.closed {
                return;
            }
            let idle = q.items.is_empty() && q.pongs.is_empty();
            if q.pongs.len() == PONG_SLOTS {
                q.pongs.pop_front();
            }
            q.pongs.push_back(frame);
            idle
        };
        if was_idle {
            self.shared.ready.wake();
        }
    }

    /// Waits until the queue has room (true) or the receiver is gone (false).
    pub async fn room(&self) -> bool {
        // Usually there is room: answer without registering a waiter.
        if let Some(answer) = self.has_room() {
            return answer;
        }
        loop {
            let notified = self.shared.room.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if let Some(answer) = self.has_room() {
                return answer;
            }
            notified.await;
        }
    }

    /// `Some(true)`: room; `Some(false)`: the receiver is gone; `None`: full.
    fn has_room(&self) -> Option<bool> {
        let q = self.shared.queue.lock();
        if q.closed { Some(false) } else { (q.items.len() < self.shared.cap).then_some(true) }
    }
}

impl OutboxRx {
    /// Moves up to `limit` frames into `out`, waiting while the queue is empty (so it
    /// returns at least one, or none after a [`Outbox::nudge`]). Cancel-safe: frames
    /// are only taken when this returns.
    pub async fn recv_many(&mut self, out: &mut Vec<Bytes>, limit: usize) -> usize {
        std::future::poll_fn(|cx| self.poll_recv_many(cx, out, limit)).await
    }

    fn poll_recv_many(&mut self, cx: &mut Context<'_>, out: &mut Vec<Bytes>, limit: usize) -> Poll<usize> {
        let n = self.take_to_write(out, limit);
        if n > 0 || std::mem::take(&mut self.shared.queue.lock().nudged) {
            // (0 after a nudge: the receiver re-reads its deadlines.)
            return Poll::Ready(n);
        }
        self.shared.ready.register(cx.waker());
        // A send between the first look and the registration must not be missed.
        match self.take_to_write(out, limit) {
            0 => Poll::Pending,
            n => Poll::Ready(n),
        }
    }

    /// Like [`Self::take`], for the egress to write. What the egress took before is
    /// written by now; what it takes is being written until [`Self::written`] or its
    /// next call.
    fn take_to_write(&mut self, out: &mut Vec<Bytes>, limit: usize) -> usize {
        let mut q = self.shared.queue.lock();
        let (n, took) = q.take_into(out, limit, self.shared.cap);
        q.egress_writing = n > 0;
        drop(q);
        if took {
            self.shared.room.notify_waiters();
        }
        n
    }

    /// Queues a heartbeat ping behind what is queued, outside the bound (the egress
    /// takes it at its next look at the queue).
    pub fn ping(&mut self, frame: Bytes) {
        let mut q = self.shared.queue.lock();
        if !q.closed {
            q.items.push_back(frame);
        }
    }

    /// What [`Self::recv_many`] returned is written.
    pub fn written(&mut self) {
        self.shared.queue.lock().egress_writing = false;
    }

    /// From now on only the egress writes (its last frames and the close frame).
    pub fn seal(&mut self) {
        let mut q = self.shared.queue.lock();
        q.sealed = true;
        q.socket = None;
    }

    /// The rest of a frame a corked flush wrote in part, if any: it must go out before
    /// a close frame even when the queue is dropped (a slow consumer).
    pub fn take_partial(&mut self, out: &mut Vec<Bytes>) {
        let mut q = self.shared.queue.lock();
        if q.partial {
            q.partial = false;
            out.extend(q.items.pop_front());
        }
    }

    /// One frame, if any is queued.
    pub fn try_recv(&mut self) -> Option<Bytes> {
        let mut one = Vec::with_capacity(1);
        self.take(&mut one, 1);
        one.pop()
    }

    /// Moves up to `limit` frames into `out` without waiting (pending pongs first).
    pub fn take(&mut self, out: &mut Vec<Bytes>, limit: usize) -> usize {
        let mut q = self.shared.queue.lock();
        let (n, took) = q.take_into(out, limit, self.shared.cap);
        drop(q);
        if took {
            self.shared.room.notify_waiters();
        }
        n
    }
}

impl Drop for OutboxRx {
    fn drop(&mut self) {
        let mut q = self.shared.queue.lock();
        q.closed = true;
        q.items = VecDeque::new();
        q.pongs = VecDeque::new();
        q.socket = None;
        drop(q);
        self.shared.room.notify_waiters();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b(s: &'static str) -> Bytes {
        Bytes::from_static(s.as_bytes())
    }

    const T: Duration = Duration::from_secs(5);

    #[test]
    fn bounded_in_order_and_closed_when_the_receiver_goes() {
        let (tx, mut rx) = outbox(2, T);
        assert_eq!(tx.try_send(b("a")), Ok(Queued::Clear));
        assert_eq!(tx.clone().try_send(b("b")), Ok(Queued::Congested));
        // Past the cap for senders that cannot wait, up to twice it.
        assert_eq!(tx.try_send(b("c")), Ok(Queued::Congested));
        assert_eq!(tx.try_send(b("d")), Ok(Queued::Congested));
        assert_eq!(tx.try_send(b("e")), Err(SendError::Full));
        let mut out = Vec::new();
        assert_eq!(rx.take(&mut out, 10), 4);
        assert_eq!(out, vec![b("a"), b("b"), b("c"), b("d")]);
        assert_eq!(rx.take(&mut out, 10), 0);
        assert_eq!(tx.try_send(b("f")), Ok(Queued::Clear), "drained: no longer congested");
        drop(rx);
        assert_eq!(tx.try_send(b("g")), Err(SendError::Closed));
    }

    #[tokio::test(start_paused = true)]
    async fn congestion_for_the_whole_timeout_makes_a_slow_consumer() {
        let (tx, mut rx) = outbox(2, T);
        tx.try_send(b("a")).unwrap();
        tx.try_send(b("b")).unwrap();
        // The receiver keeps taking, but never gets below the cap for 5 s.
        for _ in 0..9 {
            tokio::time::advance(Duration::from_millis(500)).await;
            tx.try_send(b("x")).unwrap();
            rx.take(&mut Vec::new(), 1);
        }
        tokio::time::advance(Duration::from_millis(600)).await;
        assert_eq!(tx.settle().await, Settled::Slow);
        assert_eq!(tx.try_send(b("y")), Err(SendError::Full));
    }

    #[tokio::test(start_paused = true)]
    async fn settle_waits_for_a_draining_receiver_and_not_for_a_stalled_one() {
        let (tx, mut rx) = outbox(2, T);
        tx.try_send(b("a")).unwrap();
        tx.try_send(b("b")).unwrap();
        let sender = tx.clone();
        let waiting = tokio::spawn(async move { sender.settle().await });
        tokio::time::advance(Duration::from_millis(100)).await;
        assert!(!waiting.is_finished());
        rx.take(&mut Vec::new(), 1);
        assert_eq!(waiting.await.unwrap(), Settled::Clear);
        // Congested again and the receiver takes nothing: stalled after STALLED_AFTER.
        tx.try_send(b("c")).unwrap();
        let start = Instant::now();
        assert_eq!(tx.settle().await, Settled::Stalled);
        assert!(start.elapsed() <= STALLED_AFTER, "{:?}", start.elapsed());
    }

    #[tokio::test]
    async fn a_send_before_the_receiver_waits_is_not_lost() {
        let (tx, mut rx) = outbox(4, T);
        tx.try_send(b("x")).unwrap();
        let mut out = Vec::new();
        assert_eq!(rx.recv_many(&mut out, 4).await, 1);
        let waiting = tokio::spawn(async move {
            let mut out = Vec::new();
            rx.recv_many(&mut out, 4).await;
            out
        });
        tokio::task::yield_now().await;
        tx.try_send(b("y")).unwrap();
        assert_eq!(waiting.await.unwrap(), vec![b("y")]);
    }

    #[test]
    fn the_latest_pongs_wait_in_order_and_go_first() {
        let (tx, mut rx) = outbox(2, T);
        tx.try_send(b("m1")).unwrap();
        // Ten back-to-back pings (Autobahn 2.10) each get their pong.
        for i in 0..10 {
            tx.set_pong(Bytes::from(format!("pong{i}")));
        }
        let mut out = Vec::new();
        assert_eq!(rx.take(&mut out, 100), 11);
        let want: Vec<Bytes> = (0..10).map(|i| Bytes::from(format!("pong{i}"))).chain([b("m1")]).collect();
        assert_eq!(out, want);
        // A flood keeps only the latest PONG_SLOTS, outside the queue's bound.
        out.clear();
        tx.try_send(b("m1")).unwrap();
        for i in 0..10_000 {
            tx.set_pong(Bytes::from(format!("pong{i}")));
        }
        assert_eq!(tx.try_send(b("m2")), Ok(Queued::Congested));
        assert_eq!(rx.take(&mut out, 100), PONG_SLOTS + 2);
        let want: Vec<Bytes> =
            (10_000 - PONG_SLOTS..10_000).map(|i| Bytes::from(format!("pong{i}"))).chain([b("m1"), b("m2")]).collect();
        assert_eq!(out, want);
        assert_eq!(rx.take(&mut out, 10), 0);
    }

    #[tokio::test]
    async fn a_pong_wakes_the_receiver() {
        let (tx, mut rx) = outbox(2, T);
        let waiting = tokio::spawn(async move {
            let mut out = Vec::new();
            rx.recv_many(&mut out, 4).await;
            out
        });
        tokio::task::yield_now().await;
        tx.set_pong(b("p"));
        assert_eq!(waiting.await.unwrap(), vec![b("p")]);
    }

    #[tokio::test]
    async fn room_waits_for_the_receiver_to_drain() {
        let (tx, mut rx) = outbox(1, T);
        tx.try_send(b("x")).unwrap();
        let sender = tx.clone();
        let waiting = tokio::spawn(async move { sender.room().await });
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished());
        rx.take(&mut Vec::new(), 1);
        assert!(waiting.await.unwrap());
        drop(rx);
        assert!(!tx.room().await);
    }

    /// A connected loopback pair: (the server side, for the queue; the client side).
    async fn pair() -> (Arc<tokio::net::TcpStream>, tokio::net::TcpStream) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = tokio::net::TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
        let (server, _) = listener.accept().await.unwrap();
        (Arc::new(server), client)
    }

    async fn read_exactly(client: &mut tokio::net::TcpStream, n: usize) -> Vec<u8> {
        use tokio::io::AsyncReadExt;
        let mut got = vec![0; n];
        tokio::time::timeout(T, client.read_exact(&mut got)).await.unwrap().unwrap();
        got
    }

    #[tokio::test]
    async fn a_corked_sender_writes_to_the_socket_itself_in_queue_order() {
        let (server, mut client) = pair().await;
        let (tx, mut rx) = outbox(64, T);
        tx.attach(server);
        corked(async {
            for f in ["a", "b", "c"] {
                tx.try_send(b(f)).unwrap();
            }
            // Nothing written while the sender still runs (one writev per burst).
            assert_eq!(rx.shared.queue.lock().items.len(), 3);
        })
        .await;
        assert_eq!(read_exactly(&mut client, 3).await, b"abc");
        assert!(rx.try_recv().is_none(), "nothing left for the egress");
        // While the egress writes a batch it took, a corked sender leaves the socket to it.
        tx.try_send(b("d")).unwrap();
        let mut batch = Vec::new();
        assert_eq!(rx.recv_many(&mut batch, 8).await, 1);
        corked(async { tx.try_send(b("e")).unwrap() }).await;
        assert_eq!(rx.shared.queue.lock().items.len(), 1, "e waits behind the egress's d");
        crate::transport::ws::try_write_now(rx.shared.queue.lock().socket.as_ref().unwrap(), &mut batch).unwrap();
        rx.written();
        let mut rest = Vec::new();
        assert_eq!(rx.recv_many(&mut rest, 8).await, 1);
        assert_eq!(rest, [b("e")]);
    }

    #[tokio::test]
    async fn what_the_socket_does_not_take_goes_back_to_the_front_for_the_egress() {
        let (server, mut client) = pair().await;
        let (tx, mut rx) = outbox(100_000, T);
        tx.attach(server.clone());
        // Far more than the socket buffers hold, from a client that does not read yet.
        let frames: Vec<Bytes> = (0..16_000u32).map(|i| Bytes::from(format!("{i:08}").repeat(128))).collect();
        corked(async {
            for f in &frames {
                tx.try_send(f.clone()).unwrap();
            }
        })
        .await;
        let left = rx.shared.queue.lock().items.len();
        assert!(left > 0 && left < frames.len(), "part written by the sender, the rest queued ({left})");
        // The egress writes the rest, the partly written frame first.
        let reader = tokio::spawn(async move { read_exactly(&mut client, 16_000 * 1024).await });
        let mut batch = Vec::new();
        while rx.take(&mut batch, usize::MAX) > 0 {
            while !crate::transport::ws::try_write_now(&server, &mut batch).unwrap() {
                server.writable().await.unwrap();
            }
        }
        let want: Vec<u8> = frames.iter().flat_map(|f| f.iter().copied()).collect();
        assert!(reader.await.unwrap() == want, "every byte once, in order");
    }

    #[tokio::test]
    async fn a_nudge_wakes_the_receiver_with_nothing() {
        let (tx, mut rx) = outbox(4, T);
        let waiting = tokio::spawn(async move {
            let mut out = Vec::new();
            rx.recv_many(&mut out, 4).await
        });
        tokio::task::yield_now().await;
        tx.nudge();
        assert_eq!(tokio::time::timeout(T, waiting).await.unwrap().unwrap(), 0);
    }

    #[tokio::test]
    async fn a_pong_never_lands_inside_a_partly_written_frame() {
        // 1025-byte frames: the socket stops mid-frame unless its buffer happens to end
        // on a frame boundary; then the case is tried again on a fresh connection.
        for _ in 0..5 {
            let (server, mut client) = pair().await;
            let (tx, mut rx) = outbox(100_000, T);
            tx.attach(server.clone());
            let frames: Vec<Bytes> = (0..16_000u32).map(|i| Bytes::from(format!("{i:08}").repeat(128) + "x")).collect();
            corked(async {
                for f in &frames {
                    tx.try_send(f.clone()).unwrap();
                }
            })
            .await;
            let (left, partial) = {
                let q = rx.shared.queue.lock();
                (q.items.len(), q.partial)
            };
            // A ping from the client is answered while the rest of that frame waits.
            tx.set_pong(b("PONG"));
            let begun = frames.len() - left;
            let split = if partial { begun + 1 } else { begun };
            let mut want: Vec<u8> = frames[..split].iter().flat_map(|f| f.iter().copied()).collect();
            want.extend_from_slice(b"PONG");
            want.extend(frames[split..].iter().flat_map(|f| f.iter().copied()));
            let total = want.len();
            let reader = tokio::spawn(async move { read_exactly(&mut client, total).await });
            let mut batch = Vec::new();
            while rx.take(&mut batch, 64) > 0 {
                while !crate::transport::ws::try_write_now(&server, &mut batch).unwrap() {
                    server.writable().await.unwrap();
                }
            }
            assert!(reader.await.unwrap() == want, "the pong between whole frames");
            if partial {
                return;
            }
        }
        panic!("the socket never stopped mid-frame");
    }

    #[tokio::test]
    async fn a_corked_task_that_is_done_but_not_dropped_has_written() {
        let (server, mut client) = pair().await;
        let (tx, _rx) = outbox(64, T);
        tx.attach(server);
        let done = corked(async { tx.try_send(b("z")).unwrap() });
        tokio::pin!(done);
        (&mut done).await;
        // Still alive (as a session's ingress is while its egress finishes).
        assert_eq!(read_exactly(&mut client, 1).await, b"z");
    }
}
