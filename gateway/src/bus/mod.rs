//! The message bus seam: where a publish or a direct message goes after the
//! session accepted it. Standalone mode uses [`LocalBus`], which assigns the id
//! and fans out in-process; the distributed mode (broker-bridge) implements the
//! same trait over gRPC ([`RemoteBus`]).

mod remote;

pub use remote::RemoteBus;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use kit::idempotency::Idempotency;

use crate::history::{Page, Position};
use crate::hub::Hub;
use crate::metrics as m;
use crate::{protocol, wire};

/// Why the bus could not take a message. Retryable.
#[derive(Debug, Clone, thiserror::Error)]
pub enum BusError {
    /// Not taken now; retry later. `ambiguous`: it may have been stored all the same
    /// (the backend failed after receiving it), so only a retry with the same
    /// idempotency key is safe.
    #[error("backend unavailable: {message}")]
    Unavailable { message: String, ambiguous: bool },
    /// Refused as malformed; retrying will not help.
    #[error("refused: {0}")]
    Invalid(String),
}

/// What the bus did with a message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Accepted {
    pub id: String,
    /// Channel sequence number (publishes only).
    pub seq: Option<u64>,
    /// Sessions the message was queued to, where that is known when it is accepted
    /// (standalone); `None` in a cluster, where it is stored before any gateway has it.
    pub delivered: Option<u64>,
    /// The answer of an earlier call with the same idempotency key (nothing new stored).
    pub duplicate: bool,
}

/// How long, and for how many keys, an idempotency key is remembered.
pub const IDEMPOTENCY_WINDOW: std::time::Duration = std::time::Duration::from_secs(300);
pub const IDEMPOTENCY_KEYS: usize = 100_000;

/// The scope of a client's idempotency key: its method, who sent it, the key.
pub fn idempotency_scope(method: &str, from: &str, key: &str) -> String {
    format!("{method}\0{from}\0{key}")
}

/// Boxed future returned by [`Bus`] methods.
pub type BusFuture<'a> = Pin<Box<dyn Future<Output = Result<Accepted, BusError>> + Send + 'a>>;

/// Boxed future of a history read.
pub type HistoryFuture<'a> = Pin<Box<dyn Future<Output = Result<Page, BusError>> + Send + 'a>>;

/// Where messages go. `data` is JSON text; `key` an optional idempotency key.
pub trait Bus: Send + Sync + std::fmt::Debug + 'static {
    /// Publishes to every subscriber of `channel`, in channel order.
    fn publish<'a>(&'a self, channel: &'a str, from: &'a str, data: &'a str, key: Option<&'a str>) -> BusFuture<'a>;
    /// Sends to every session of `to`.
    fn send<'a>(&'a self, to: &'a str, from: &'a str, data: &'a str, key: Option<&'a str>) -> BusFuture<'a>;
    /// Sends to every session.
    fn broadcast<'a>(&'a self, from: &'a str, data: &'a str) -> BusFuture<'a>;
    /// Closes every session of `user` with 4004; `delivered` is the number closed when known.
    fn disconnect<'a>(&'a self, user: &'a str, reason: &'a str) -> BusFuture<'a>;
    /// A channel's history: the messages after `since` (or the newest `limit`), at
    /// most `limit`; with `position_only`, only the current position.
    fn history<'a>(
        &'a self,
        channel: &'a str,
        since: Option<&'a Position>,
        limit: usize,
        position_only: bool,
    ) -> HistoryFuture<'a>;
    /// Whether the frames held for a recovering session follow a history read with
    /// nothing in between (one process keeps both: standalone).
    fn gapless(&self) -> bool {
        false
    }
}

/// Unique message ids for one process: boot time plus a counter.
#[derive(Debug)]
pub struct IdGen {
    boot_ms: u64,
    next: AtomicU64,
}

impl IdGen {
    pub fn new() -> Self {
        let boot_ms =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64);
        Self { boot_ms, next: AtomicU64::new(1) }
    }

    pub fn next_id(&self) -> String {
        format!("{:x}-{:013x}", self.boot_ms, self.next.fetch_add(1, Ordering::Relaxed))
    }
}

impl Default for IdGen {
    fn default() -> Self {
        Self::new()
    }
}

/// The in-process bus of a standalone gateway.
#[derive(Debug)]
pub struct LocalBus {
    hub: Arc<Hub>,
    ids: IdGen,
    idempotency: Idempotency<Accepted>,
}

impl LocalBus {
    pub fn new(hub: Arc<Hub>) -> Self {
        Self { hub, ids: IdGen::new(), idempotency: Idempotency::new(IDEMPOTENCY_WINDOW, IDEMPOTENCY_KEYS) }
    }

    fn publish_now(&self, channel: &str, from: &str, data: &str) -> Accepted {
        let id = self.ids.next_id();
        let start = Instant::now();
        let p = self.hub.publish(channel, &id, from, data);
        metrics::histogram!(m::FANOUT_DURATION).record(start.elapsed().as_secs_f64());
        Accepted { id, seq: Some(p.seq), delivered: Some(p.delivered), duplicate: false }
    }

    fn send_now(&self, to: &str, from: &str, data: &str) -> Accepted {
        let id = self.ids.next_id();
        let frame = wire::text(&protocol::direct(&id, from, to, data));
        let delivered = self.hub.send_to_user(to, &frame, &mut Vec::new());
        Accepted { id, seq: None, delivered: Some(delivered), duplicate: false }
    }

    fn broadcast_now(&self, from: &str, data: &str) -> Accepted {
        let id = self.ids.next_id();
        let frame = wire::text(&protocol::broadcast(&id, from, data));
        let delivered = self.hub.broadcast(&frame, &mut Vec::new());
        Accepted { id, seq: None, delivered: Some(delivered), duplicate: false }
    }

    /// Runs `f` once per idempotency key in the window; a repeat gets the first answer.
    async fn once(&self, scope: Option<String>, f: impl FnOnce() -> Accepted) -> Accepted {
        let Some(scope) = scope else { return f() };
        match self.idempotency.run(&scope, || std::future::ready(Ok::<_, std::convert::Infallible>(f()))).await {
            Ok((a, replayed)) => Accepted { duplicate: replayed, ..a },
            Err(never) => match never {},
        }
    }
}

impl Bus for LocalBus {
    fn publish<'a>(&'a self, channel: &'a str, from: &'a str, data: &'a str, key: Option<&'a str>) -> BusFuture<'a> {
        let scope = key.map(|k| idempotency_scope("publish", from, k));
        Box::pin(async move { Ok(self.once(scope, || self.publish_now(channel, from, data)).await) })
    }

    fn send<'a>(&'a self, to: &'a str, from: &'a str, data: &'a str, key: Option<&'a str>) -> BusFuture<'a> {
        let scope = key.map(|k| idempotency_scope("send", from, k));
        Box::pin(async move { Ok(self.once(scope, || self.send_now(to, from, data)).await) })
    }

    fn broadcast<'a>(&'a self, from: &'a str, data: &'a str) -> BusFuture<'a> {
        let r = self.broadcast_now(from, data);
        Box::pin(std::future::ready(Ok(r)))
    }

    fn disconnect<'a>(&'a self, user: &'a str, reason: &'a str) -> BusFuture<'a> {
        let closed = self.hub.disconnect_user(user, reason);
        Box::pin(std::future::ready(Ok(Accepted {
            id: String::new(),
            seq: None,
            delivered: Some(closed),
            duplicate: false,
        })))
    }

    fn history<'a>(
        &'a self,
        channel: &'a str,
        since: Option<&'a Position>,
        limit: usize,
        position_only: bool,
    ) -> HistoryFuture<'a> {
        Box::pin(std::future::ready(Ok(self.hub.history(channel, since, limit, position_only))))
    }

    fn gapless(&self) -> bool {
        true
    }
}
