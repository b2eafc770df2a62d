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

use crate::hub::Hub;
use crate::metrics as m;
use crate::{protocol, wire};

/// Why the bus could not take a message. Retryable.
#[derive(Debug, Clone, thiserror::Error)]
pub enum BusError {
    /// Not stored; retry later.
    #[error("backend unavailable: {0}")]
    Unavailable(String),
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
    /// Local sessions the message was queued to.
    pub delivered: u64,
}

/// Boxed future returned by [`Bus`] methods.
pub type BusFuture<'a> = Pin<Box<dyn Future<Output = Result<Accepted, BusError>> + Send + 'a>>;

/// Where messages go. `data` is JSON text.
pub trait Bus: Send + Sync + std::fmt::Debug + 'static {
    /// Publishes to every subscriber of `channel`, in channel order.
    fn publish<'a>(&'a self, channel: &'a str, from: &'a str, data: &'a str) -> BusFuture<'a>;
    /// Sends to every session of `to`.
    fn send<'a>(&'a self, to: &'a str, from: &'a str, data: &'a str) -> BusFuture<'a>;
    /// Sends to every session.
    fn broadcast<'a>(&'a self, from: &'a str, data: &'a str) -> BusFuture<'a>;
    /// Closes every session of `user` with 4004; `delivered` is the number closed when known.
    fn disconnect<'a>(&'a self, user: &'a str, reason: &'a str) -> BusFuture<'a>;
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
}

impl LocalBus {
    pub fn new(hub: Arc<Hub>) -> Self {
        Self { hub, ids: IdGen::new() }
    }

    fn publish_now(&self, channel: &str, from: &str, data: &str) -> Accepted {
        let id = self.ids.next_id();
        let start = Instant::now();
        let p = self.hub.publish(channel, &id, from, data);
        metrics::histogram!(m::FANOUT_DURATION).record(start.elapsed().as_secs_f64());
        Accepted { id, seq: Some(p.seq), delivered: p.delivered }
    }

    fn send_now(&self, to: &str, from: &str, data: &str) -> Accepted {
        let id = self.ids.next_id();
        let frame = wire::text(&protocol::direct(&id, from, to, data));
        Accepted { id, seq: None, delivered: self.hub.send_to_user(to, &frame, &mut Vec::new()) }
    }

    fn broadcast_now(&self, from: &str, data: &str) -> Accepted {
        let id = self.ids.next_id();
        let frame = wire::text(&protocol::broadcast(&id, from, data));
        Accepted { id, seq: None, delivered: self.hub.broadcast(&frame, &mut Vec::new()) }
    }
}

impl Bus for LocalBus {
    fn publish<'a>(&'a self, channel: &'a str, from: &'a str, data: &'a str) -> BusFuture<'a> {
        let r = self.publish_now(channel, from, data);
        Box::pin(std::future::ready(Ok(r)))
    }

    fn send<'a>(&'a self, to: &'a str, from: &'a str, data: &'a str) -> BusFuture<'a> {
        let r = self.send_now(to, from, data);
        Box::pin(std::future::ready(Ok(r)))
    }

    fn broadcast<'a>(&'a self, from: &'a str, data: &'a str) -> BusFuture<'a> {
        let r = self.broadcast_now(from, data);
        Box::pin(std::future::ready(Ok(r)))
    }

    fn disconnect<'a>(&'a self, user: &'a str, reason: &'a str) -> BusFuture<'a> {
        let closed = self.hub.disconnect_user(user, reason);
        Box::pin(std::future::ready(Ok(Accepted { id: String::new(), seq: None, delivered: closed })))
    }
}
