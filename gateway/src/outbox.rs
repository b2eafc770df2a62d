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

#[derive(Debug)]
struct Queue {
    items: VecDeque<Bytes>,
    /// The pong for the latest ping not yet answered (one slot: RFC 6455 lets a
    /// server answer only the most recent ping). Written before queued frames.
    pong: Option<Bytes>,
    /// The receiver is gone: nothing more is accepted.
    closed: bool,
    /// Since when the queue has held `cap` frames or more.
    congested_since: Option<Instant>,
    /// When the receiver last took frames (or the queue was made).
    last_take: Instant,
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
            pong: None,
            closed: false,
            congested_since: None,
            last_take: Instant::now(),
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
            (len == 0 && q.pong.is_none(), len + 1 >= cap)
        };
        if was_empty {
            self.shared.ready.wake();
        }
        Ok(if congested { Queued::Congested } else { Queued::Clear })
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

    /// Sets the pong to send next, replacing one still unsent. Control frames are
    /// outside the queue's bound: a ping flood cannot fill the queue.
    pub fn set_pong(&self, frame: Bytes) {
        let was_idle = {
            let mut q = self.shared.queue.lock();
            if q.closed {
                return;
            }
            let idle = q.items.is_empty() && q.pong.is_none();
            q.pong = Some(frame);
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
    /// returns at least one). Cancel-safe: frames are only taken when this returns.
    pub async fn recv_many(&mut self, out: &mut Vec<Bytes>, limit: usize) -> usize {
        std::future::poll_fn(|cx| self.poll_recv_many(cx, out, limit)).await
    }

    fn poll_recv_many(&mut self, cx: &mut Context<'_>, out: &mut Vec<Bytes>, limit: usize) -> Poll<usize> {
        let n = self.take(out, limit);
        if n > 0 {
            return Poll::Ready(n);
        }
        self.shared.ready.register(cx.waker());
        // A send between the first look and the registration must not be missed.
        match self.take(out, limit) {
            0 => Poll::Pending,
            n => Poll::Ready(n),
        }
    }

    /// One frame, if any is queued.
    pub fn try_recv(&mut self) -> Option<Bytes> {
        let mut one = Vec::with_capacity(1);
        self.take(&mut one, 1);
        one.pop()
    }

    /// Moves up to `limit` frames into `out` without waiting (a pending pong first).
    pub fn take(&mut self, out: &mut Vec<Bytes>, limit: usize) -> usize {
        let mut q = self.shared.queue.lock();
        let pongs = match q.pong.take() {
            Some(p) if limit > 0 => {
                out.push(p);
                1
            }
            p => {
                q.pong = p;
                0
            }
        };
        let n = q.items.len().min(limit - pongs);
        out.extend(q.items.drain(..n));
        if n > 0 {
            q.last_take = Instant::now();
            if q.items.len() < self.shared.cap {
                q.congested_since = None;
            }
        }
        if q.items.is_empty() && q.items.capacity() > 0 {
            // Idle again: give the buffer back.
            q.items = VecDeque::new();
        }
        drop(q);
        if n > 0 {
            self.shared.room.notify_waiters();
        }
        n + pongs
    }
}

impl Drop for OutboxRx {
    fn drop(&mut self) {
        let mut q = self.shared.queue.lock();
        q.closed = true;
        q.items = VecDeque::new();
        q.pong = None;
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
    fn only_the_latest_pong_waits_and_it_goes_first() {
        let (tx, mut rx) = outbox(2, T);
        tx.try_send(b("m1")).unwrap();
        for i in 0..10_000 {
            tx.set_pong(Bytes::from(format!("pong{i}")));
        }
        // The queue's bound is for messages: still room for one more.
        assert_eq!(tx.try_send(b("m2")), Ok(Queued::Congested));
        let mut out = Vec::new();
        assert_eq!(rx.take(&mut out, 10), 3);
        assert_eq!(out, vec![Bytes::from("pong9999"), b("m1"), b("m2")]);
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
}
