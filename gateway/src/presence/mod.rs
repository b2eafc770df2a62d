//! The presence seam: what the gateway tells presence about its sessions, and
//! how it asks who is online. Standalone mode answers from the local hub
//! ([`LocalPresence`]); with `--presence-addrs` the gateway streams its state to
//! every presence replica and asks them ([`RemotePresence`]).

mod local;
mod remote;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

pub use local::LocalPresence;
pub use remote::{RemoteConfig, RemotePresence};

use crate::hub::ConnRecord;

/// Boxed future returned by queries.
pub type QueryFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// A page of channel members.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Members {
    pub users: Vec<String>,
    pub total: u64,
    pub next_after: String,
}

/// Where the gateway's presence goes and where its queries are answered.
pub trait PresenceBackend: Send + Sync + std::fmt::Debug + 'static {
    /// A session started (never blocks).
    fn connected(&self, conn: &ConnRecord);
    /// A session ended; its subscriptions end with it.
    fn disconnected(&self, conn_id: u64);
    fn subscribed(&self, conn_id: u64, channel: &Arc<str>);
    fn unsubscribed(&self, conn_id: u64, channel: &str);
    /// Members of a channel, cluster-wide, sorted, after `after`.
    fn members<'a>(&'a self, channel: &'a str, after: &'a str, limit: usize) -> QueryFuture<'a, Members>;
    /// Live connections of each user, cluster-wide.
    fn connections<'a>(&'a self, users: &'a [String]) -> QueryFuture<'a, Vec<u32>>;
}
