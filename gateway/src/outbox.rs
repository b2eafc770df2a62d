//! A session's send queue: bounded, many senders (the hub, the session's own
//! replies), one receiver (the session's egress). Unlike a tokio mpsc channel,
//! which allocates a 32-slot block (about 1.1 KiB for `Bytes`) when it is
//! created and keeps it, an empty queue here owns no buffer, so an idle
//! session pays only for the shared header. The receiver is woken when the
//! queue goes from empty to non-empty, not once per frame.

use std::collections::VecDeque;
use std::sync::Arc;

use std::task::{Context, Poll};

use bytes::Bytes;
use futures_util::task::AtomicWaker;
use parking_lot::Mutex;
use tokio::sync::Notify;

#[derive(Debug, Default)]
struct Queue {
    items: VecDeque<Bytes>,
    /// The receiver is gone: nothing more is accepted.
    closed: bool,
}

#[derive(Debug)]
struct Shared {
    queue: Mutex<Queue>,
    cap: usize,
    /// The receiver's waker (an atomic swap, no list of waiters: one receiver).
    ready: AtomicWaker,
    /// Wakes senders waiting for room.
    room: Notify,
}

/// Why a frame was not queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SendError {
    Full,
    Closed,
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

/// A queue of at most `cap` frames.
pub fn outbox(cap: usize) -> (Outbox, OutboxRx) {
    let shared = Arc::new(Shared {
        queue: Mutex::new(Queue::default()),
        cap: cap.max(1),
        ready: AtomicWaker::new(),
        room: Notify::new(),
    });
    (Outbox { shared: shared.clone() }, OutboxRx { shared })
}

impl Outbox {
    /// Queues `frame` unless the queue is full or the receiver is gone.
    pub fn try_send(&self, frame: Bytes) -> Result<(), SendError> {
        let was_empty = {
            let mut q = self.shared.queue.lock();
            if q.closed {
                return Err(SendError::Closed);
            }
            if q.items.len() >= self.shared.cap {
                return Err(SendError::Full);
            }
            q.items.push_back(frame);
            q.items.len() == 1
        };
        if was_empty {
            self.shared.ready.wake();
        }
        Ok(())
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

    /// Moves up to `limit` frames into `out` without waiting.
    pub fn take(&mut self, out: &mut Vec<Bytes>, limit: usize) -> usize {
        let n = {
            let mut q = self.shared.queue.lock();
            let n = q.items.len().min(limit);
            out.extend(q.items.drain(..n));
            if q.items.is_empty() && q.items.capacity() > 0 {
                // Idle again: give the buffer back.
                q.items = VecDeque::new();
            }
            n
        };
        if n > 0 {
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

    #[test]
    fn bounded_in_order_and_closed_when_the_receiver_goes() {
        let (tx, mut rx) = outbox(2);
        assert_eq!(tx.try_send(b("a")), Ok(()));
        assert_eq!(tx.clone().try_send(b("b")), Ok(()));
        assert_eq!(tx.try_send(b("c")), Err(SendError::Full));
        let mut out = Vec::new();
        assert_eq!(rx.take(&mut out, 10), 2);
        assert_eq!(out, vec![b("a"), b("b")]);
        assert_eq!(rx.take(&mut out, 10), 0);
        drop(rx);
        assert_eq!(tx.try_send(b("d")), Err(SendError::Closed));
    }

    #[tokio::test]
    async fn a_send_before_the_receiver_waits_is_not_lost() {
        let (tx, mut rx) = outbox(4);
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

    #[tokio::test]
    async fn room_waits_for_the_receiver_to_drain() {
        let (tx, mut rx) = outbox(1);
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
