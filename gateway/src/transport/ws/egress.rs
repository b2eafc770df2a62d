//! Egress: drain the send queue to the socket with vectored writes, send
//! heartbeat pings, and write the close frame when the session ends.

use std::io::IoSlice;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::{Buf, Bytes};
use tokio::net::TcpStream;
use tokio::time::{Instant, sleep_until};
use tokio_util::sync::CancellationToken;

use crate::hub::SessionCtl;
use crate::metrics as m;
use crate::outbox::OutboxRx;
use crate::policy::{AuthDeadline, AuthLimit, CloseReason, Heartbeat, HeartbeatAction};
use crate::session::SessionConfig;
use crate::wire;

/// Frames taken from the queue per write.
const BATCH: usize = 64;
/// Time an in-flight write may take to finish once a close is requested, and
/// time allowed to write the close frame.
const CLOSE_WRITE_TIMEOUT: Duration = Duration::from_secs(1);

/// Drops `n` written bytes from the frames from `start` on; returns the first frame not
/// fully written.
fn consume(bufs: &mut [Bytes], mut start: usize, mut n: usize) -> usize {
    while n > 0 {
        let b = &mut bufs[start];
        let take = n.min(b.len());
        b.advance(take);
        n -= take;
        if b.is_empty() {
            start += 1;
        }
    }
    start
}

/// Up to `BATCH` frames as `writev` slices, without allocating.
fn slices(bufs: &[Bytes]) -> ([IoSlice<'_>; BATCH], usize) {
    let mut out = [IoSlice::new(&[]); BATCH];
    let mut k = 0;
    for (slot, b) in out.iter_mut().zip(bufs) {
        *slot = IoSlice::new(b);
        k += 1;
    }
    (out, k)
}

async fn write_all(w: &TcpStream, bufs: &mut Vec<Bytes>) -> std::io::Result<()> {
    while !try_write_now(w, bufs)? {
        w.writable().await?;
    }
    Ok(())
}

/// Writes what the socket takes right now, without waiting: one `writev` of up to
/// `BATCH` frames at a time, slices on the stack. Drops what was written; true when
/// everything went out. The common case (the socket has room) then needs no write
/// future at all.
pub(crate) fn try_write_now(w: &TcpStream, bufs: &mut Vec<Bytes>) -> std::io::Result<bool> {
    let mut start = 0;
    while start < bufs.len() {
        let (slices, k) = slices(&bufs[start..]);
        let n = match w.try_write_vectored(&slices[..k]) {
            Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
            Err(e) => return Err(e),
        };
        start = consume(bufs, start, n);
    }
    if start == bufs.len() {
        // Release the batch's capacity: an idle session keeps no buffer.
        *bufs = Vec::new();
        return Ok(true);
    }
    bufs.drain(..start);
    Ok(false)
}

/// Outcome of a write raced against a close request.
enum Wrote {
    Done,
    Failed,
    /// A close was requested; the write finished (true) or was abandoned (false).
    Closing(bool),
}

async fn write_or_close(w: &TcpStream, bufs: &mut Vec<Bytes>, ctl: &SessionCtl) -> Wrote {
    let write = write_all(w, bufs);
    tokio::pin!(write);
    tokio::select! {
        r = &mut write => if r.is_ok() { Wrote::Done } else { Wrote::Failed },
        () = ctl.wait() => {
            let finished = matches!(tokio::time::timeout(CLOSE_WRITE_TIMEOUT, write).await, Ok(Ok(())));
            Wrote::Closing(finished)
        }
    }
}

/// Writes `batch`: at once when the socket has room, else waiting for it (or for a close
/// request). `None`: written, go on; `Some(clean)`: the session ends.
async fn flush(w: &TcpStream, batch: &mut Vec<Bytes>, ctl: &SessionCtl) -> Option<bool> {
    match try_write_now(w, batch) {
        Ok(true) => return None,
        Ok(false) => {}
        Err(_) => {
            ctl.close(CloseReason::Gone, None);
            return Some(false);
        }
    }
    match Box::pin(write_or_close(w, batch, ctl)).await {
        Wrote::Done => None,
        Wrote::Failed => {
            ctl.close(CloseReason::Gone, None);
            Some(false)
        }
        Wrote::Closing(finished) => Some(finished),
    }
}

#[allow(clippy::too_many_arguments)]
pub(super) async fn run(
    cfg: &SessionConfig,
    ctl: &SessionCtl,
    mut rx: OutboxRx,
    w: Arc<TcpStream>,
    last_seen: &AtomicU64,
    started: Instant,
    auth: &AuthDeadline,
    stop: &CancellationToken,
) {
    let mut heartbeat = Heartbeat::new(cfg.heartbeat_interval, cfg.heartbeat_timeout, started);
    let mut wake = started + cfg.heartbeat_interval;
    let mut batch: Vec<Bytes> = Vec::new();
    // Made once, not per wake: each would register and unregister a waiter every time.
    let closing = ctl.wait();
    let draining = stop.cancelled();
    // One timer for both deadlines, re-armed only when the deadline moves. The ingress
    // nudges the queue when it moves the auth deadline (`connect`, `refresh`), so that
    // the timer is re-armed.
    let deadline = |wake: Instant| auth.get().at(started).map_or(wake, |e| e.min(wake));
    let timer = sleep_until(deadline(wake));
    tokio::pin!(closing, draining, timer);
    let clean = loop {
        tokio::select! {
            biased;
            () = &mut closing => break true,
            () = &mut draining => {
                ctl.close(CloseReason::Drain, Some(&crate::session::drain_reason()));
                break true;
            }
            _ = rx.recv_many(&mut batch, BATCH) => {
                if let Some(clean) = flush(&w, &mut batch, ctl).await {
                    break clean;
                }
                rx.written();
                let at = deadline(wake);
                if at != timer.deadline() {
                    timer.as_mut().reset(at);
                }
            }
            () = &mut timer => {
                let now = Instant::now();
                let limit = auth.get();
                if limit.due(started, now) {
                    if let AuthLimit::Connect(_) = limit {
                        metrics::counter!(m::CONNECT, "outcome" => "timeout").increment(1);
                        ctl.close(CloseReason::Unauthenticated, Some("connect timeout"));
                    } else {
                        ctl.close(CloseReason::TokenExpired, Some("token expired"));
                    }
                    break true;
                }
                heartbeat.seen(started + Duration::from_millis(last_seen.load(Ordering::Relaxed)));
                match heartbeat.poll(now) {
                    HeartbeatAction::Wait(at) => wake = at,
                    HeartbeatAction::Timeout => {
                        ctl.close(CloseReason::HeartbeatTimeout, Some("heartbeat timeout"));
                        break true;
                    }
                    HeartbeatAction::Ping => {
                        // Queued (outside the bound), never written past the queue: a corked
                        // flush may be writing.
                        rx.ping(wire::ping(b""));
                        if let HeartbeatAction::Wait(at) = heartbeat.poll(Instant::now()) {
                            wake = at;
                        }
                    }
                }
                timer.as_mut().reset(deadline(wake));
            }
        }
    };
    // Boxed: the close path's timers and writes would otherwise be part of every idle session.
    Box::pin(finish(ctl, rx, w, batch, clean)).await;
}

/// Writes what is still queued (unless the session is a slow consumer) and the close frame.
async fn finish(ctl: &SessionCtl, mut rx: OutboxRx, w: Arc<TcpStream>, mut batch: Vec<Bytes>, clean: bool) {
    rx.seal();
    let (reason, text) = ctl.requested().unwrap_or((CloseReason::Gone, None));
    if clean && reason != CloseReason::Gone {
        // What is already queued still goes out before the close frame (a drain
        // loses nothing), except for a slow consumer, whose queue is the problem.
        batch.clear();
        if reason != CloseReason::SlowConsumer {
            // Everything queued (the queue may hold up to twice `send_queue`).
            rx.take(&mut batch, usize::MAX);
        } else {
            // Only the rest of a frame already begun, so that the close frame parses.
            rx.take_partial(&mut batch);
        }
        let _ = tokio::time::timeout(CLOSE_WRITE_TIMEOUT, write_all(&w, &mut batch)).await;
        let text = text.as_deref().unwrap_or(reason.label());
        let mut frame = vec![wire::close(reason.code(), text)];
        let _ = tokio::time::timeout(CLOSE_WRITE_TIMEOUT, write_all(&w, &mut frame)).await;
    }
    let _ = socket2::SockRef::from(&*w).shutdown(std::net::Shutdown::Write);
}
