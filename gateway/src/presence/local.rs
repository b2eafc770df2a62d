//! Presence of a standalone gateway: the hub already knows everything.

use std::sync::Arc;

use super::{Members, PresenceBackend, QueryFuture};
use crate::hub::{ConnRecord, Hub};

/// Answers from the local hub; session changes need no forwarding.
#[derive(Debug)]
pub struct LocalPresence {
    hub: Arc<Hub>,
}

impl LocalPresence {
    pub fn new(hub: Arc<Hub>) -> Self {
        Self { hub }
    }
}

/// A page of `all` (sorted) after `after`.
pub(super) fn page(all: &[Arc<str>], after: &str, limit: usize) -> Members {
    let start = if after.is_empty() { 0 } else { all.partition_point(|u| **u <= *after) };
    let users: Vec<String> = all[start..].iter().take(limit).map(|u| u.to_string()).collect();
    let next_after =
        if start + users.len() < all.len() { users.last().cloned().unwrap_or_default() } else { String::new() };
    Members { users, total: all.len() as u64, next_after }
}

impl PresenceBackend for LocalPresence {
    fn connected(&self, _: &ConnRecord) {}
    fn disconnected(&self, _: u64) {}
    fn subscribed(&self, _: u64, _: &Arc<str>) {}
    fn unsubscribed(&self, _: u64, _: &str) {}

    fn members<'a>(&'a self, channel: &'a str, after: &'a str, limit: usize) -> QueryFuture<'a, Members> {
        let m = page(&self.hub.channel_users(channel), after, limit);
        Box::pin(std::future::ready(m))
    }

    fn connections<'a>(&'a self, users: &'a [String]) -> QueryFuture<'a, Vec<u32>> {
        let v = users.iter().map(|u| self.hub.user_connections(u)).collect();
        Box::pin(std::future::ready(v))
    }
}
