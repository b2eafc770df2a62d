//! The presence registry: a pure, synchronous state machine. Gateways' hellos,
//! snapshots and deltas go in with the current time; change events come out.
//! Leases expire by virtual time, so every rule is unit-tested without sleeping.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

/// A connection as a gateway reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnIn {
    pub conn_id: u64,
    pub user: String,
    pub connected_at_ms: u64,
    pub client_info: String,
    pub channels: Vec<String>,
}

/// One change within a delta batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeltaIn {
    Connect(ConnIn),
    Disconnect(u64),
    Subscribe(u64, String),
    Unsubscribe(u64, String),
}

/// What changed, for Watch streams and for clients in presence channels.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    NodeUp {
        node: Arc<str>,
        delivery_addr: Arc<str>,
        epoch: u64,
    },
    NodeDown {
        node: Arc<str>,
    },
    Interest {
        channel: Arc<str>,
        node: Arc<str>,
        interested: bool,
    },
    Join {
        channel: Arc<str>,
        user: Arc<str>,
    },
    Leave {
        channel: Arc<str>,
        user: Arc<str>,
    },
    /// The user's first connection on this node.
    UserOnline {
        user: Arc<str>,
        node: Arc<str>,
    },
    /// The user's last connection on this node is gone.
    UserOffline {
        user: Arc<str>,
        node: Arc<str>,
    },
}

/// Why a gateway's message was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SyncError {
    #[error("a newer process of this node is registered (boot epoch is older)")]
    StaleEpoch,
    #[error("this stream was superseded by a newer one from the same node")]
    Superseded,
    #[error("unknown node: send hello first")]
    UnknownNode,
}

#[derive(Debug)]
struct Conn {
    user: Arc<str>,
    connected_at_ms: u64,
    client_info: Box<str>,
    channels: Vec<Arc<str>>,
}

#[derive(Debug)]
struct Node {
    delivery_addr: Arc<str>,
    epoch: u64,
    stream: u64,
    lease_until: Instant,
    conns: HashMap<u64, Conn>,
}

#[derive(Debug, Default)]
struct Channel {
    presence: bool,
    nodes: HashMap<Arc<str>, u32>,
    /// user → subscribed connections (presence channels only).
    members: HashMap<Arc<str>, u32>,
}

/// A located connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Located {
    pub node: Arc<str>,
    pub conn_id: u64,
    pub connected_at_ms: u64,
    pub client_info: Box<str>,
}

/// A node as listed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeSummary {
    pub node: Arc<str>,
    pub delivery_addr: Arc<str>,
    pub epoch: u64,
    pub connections: usize,
    pub lease_left: Duration,
}

/// Totals.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Counts {
    pub users: usize,
    pub connections: usize,
    pub nodes: usize,
    pub channels: usize,
}

/// The whole soft state of one presence replica.
#[derive(Debug)]
pub struct Registry {
    lease: Duration,
    presence_patterns: Vec<String>,
    large_room: usize,
    next_stream: u64,
    nodes: HashMap<Arc<str>, Node>,
    users: HashMap<Arc<str>, Vec<(Arc<str>, u64)>>,
    channels: HashMap<Arc<str>, Channel>,
    dirty_counts: HashSet<Arc<str>>,
    connections: usize,
}

/// Glob match where `*` matches any run of characters.
pub fn glob_match(pattern: &str, text: &str) -> bool {
    match pattern.split_once('*') {
        None => pattern == text,
        Some((head, rest)) => {
            let Some(mut t) = text.strip_prefix(head) else {
                return false;
            };
            let mut parts = rest.split('*').peekable();
            while let Some(part) = parts.next() {
                if parts.peek().is_none() {
                    return t.len() >= part.len() && t.ends_with(part);
                }
                match t.find(part) {
                    Some(i) => t = &t[i + part.len()..],
                    None => return false,
                }
            }
            true
        }
    }
}

impl Registry {
    pub fn new(lease: Duration, presence_patterns: Vec<String>, large_room: usize) -> Self {
        Self {
            lease,
            presence_patterns,
            large_room,
            next_stream: 0,
            nodes: HashMap::new(),
            users: HashMap::new(),
            channels: HashMap::new(),
            dirty_counts: HashSet::new(),
            connections: 0,
        }
    }

    pub fn lease(&self) -> Duration {
        self.lease
    }

    /// A gateway (re)connects. Returns the stream id its later messages carry.
    pub fn hello(
        &mut self,
        node: &str,
        delivery_addr: &str,
        epoch: u64,
        now: Instant,
    ) -> Result<(u64, Vec<Event>), SyncError> {
        self.next_stream += 1;
        let stream = self.next_stream;
        let mut events = Vec::new();
        let lease_until = now + self.lease;
        match self.nodes.get_mut(node) {
            Some(n) if n.epoch > epoch => return Err(SyncError::StaleEpoch),
            Some(n) => {
                n.stream = stream;
                n.lease_until = lease_until;
                // A restarted process (new epoch) or a moved one: routing must learn the
                // new delivery address, so it is announced again.
                if n.epoch != epoch || *n.delivery_addr != *delivery_addr {
                    n.epoch = epoch;
                    n.delivery_addr = delivery_addr.into();
                    events.push(Event::NodeUp { node: node.into(), delivery_addr: n.delivery_addr.clone(), epoch });
                }
            }
            None => {
                let id: Arc<str> = node.into();
                let addr: Arc<str> = delivery_addr.into();
                events.push(Event::NodeUp { node: id.clone(), delivery_addr: addr.clone(), epoch });
                self.nodes.insert(id, Node { delivery_addr: addr, epoch, stream, lease_until, conns: HashMap::new() });
            }
        }
        Ok((stream, events))
    }

    fn node_for(&mut self, node: &str, stream: u64, now: Instant) -> Result<Arc<str>, SyncError> {
        let lease = self.lease;
        let id = self.nodes.get_key_value(node).map(|(k, _)| k.clone()).ok_or(SyncError::UnknownNode)?;
        let n = self.nodes.get_mut(node).ok_or(SyncError::UnknownNode)?;
        if n.stream != stream {
            return Err(SyncError::Superseded);
        }
        n.lease_until = now + lease;
        Ok(id)
    }

    /// Keeps the node's lease alive.
    pub fn renew(&mut self, node: &str, stream: u64, now: Instant) -> Result<(), SyncError> {
        self.node_for(node, stream, now).map(|_| ())
    }

    /// Replaces everything held for `node` by `conns`. Additions are applied
    /// before removals, so unchanged memberships cause no leave/join flicker.
    pub fn snapshot(
        &mut self,
        node: &str,
        stream: u64,
        conns: Vec<ConnIn>,
        now: Instant,
    ) -> Result<Vec<Event>, SyncError> {
        let node = self.node_for(node, stream, now)?;
        let mut ev = Vec::new();
        let keep: HashSet<u64> = conns.iter().map(|c| c.conn_id).collect();
        for c in conns {
            let id = c.conn_id;
            let wanted: Vec<String> = c.channels.clone();
            self.connect(&node, c, &mut ev);
            for ch in &wanted {
                self.subscribe(&node, id, ch, &mut ev);
            }
            let stale: Vec<Arc<str>> = self.nodes[&node].conns[&id]
                .channels
                .iter()
                .filter(|ch| !wanted.iter().any(|w| **w == ***ch))
                .cloned()
                .collect();
            for ch in stale {
                self.unsubscribe(&node, id, &ch, &mut ev);
            }
        }
        let gone: Vec<u64> = self.nodes[&node].conns.keys().filter(|id| !keep.contains(id)).copied().collect();
        for id in gone {
            self.disconnect(&node, id, &mut ev);
        }
        Ok(ev)
    }

    /// Applies a batch of changes in order. Idempotent: a repeated connect or a
    /// change for an unknown connection is ignored.
    pub fn deltas(
        &mut self,
        node: &str,
        stream: u64,
        deltas: Vec<DeltaIn>,
        now: Instant,
    ) -> Result<Vec<Event>, SyncError> {
        let node = self.node_for(node, stream, now)?;
        let mut ev = Vec::new();
        for d in deltas {
            match d {
                DeltaIn::Connect(c) => {
                    let (id, chans) = (c.conn_id, c.channels.clone());
                    self.connect(&node, c, &mut ev);
                    for ch in &chans {
                        self.subscribe(&node, id, ch, &mut ev);
                    }
                }
                DeltaIn::Disconnect(id) => self.disconnect(&node, id, &mut ev),
                DeltaIn::Subscribe(id, ch) => self.subscribe(&node, id, &ch, &mut ev),
                DeltaIn::Unsubscribe(id, ch) => self.unsubscribe(&node, id, &ch, &mut ev),
            }
        }
        Ok(ev)
    }

    /// A clean shutdown: forget the node now.
    pub fn goodbye(&mut self, node: &str, stream: u64) -> Result<Vec<Event>, SyncError> {
        match self.nodes.get(node) {
            Some(n) if n.stream == stream => Ok(self.remove_node(node)),
            Some(_) => Err(SyncError::Superseded),
            None => Err(SyncError::UnknownNode),
        }
    }

    /// Removes every node whose lease ran out by `now`.
    pub fn expire(&mut self, now: Instant) -> Vec<Event> {
        let dead: Vec<Arc<str>> =
            self.nodes.iter().filter(|(_, n)| n.lease_until <= now).map(|(k, _)| k.clone()).collect();
        dead.iter().flat_map(|n| self.remove_node(n)).collect()
    }

    fn remove_node(&mut self, node: &str) -> Vec<Event> {
        let mut ev = Vec::new();
        let Some(id) = self.nodes.get_key_value(node).map(|(k, _)| k.clone()) else {
            return ev;
        };
        let conns: Vec<u64> = self.nodes[&id].conns.keys().copied().collect();
        for c in conns {
            self.disconnect(&id, c, &mut ev);
        }
        self.nodes.remove(&id);
        ev.push(Event::NodeDown { node: id });
        ev
    }

    fn connect(&mut self, node: &Arc<str>, c: ConnIn, ev: &mut Vec<Event>) {
        if let Some(existing) = self.nodes[node].conns.get(&c.conn_id) {
            if *existing.user == *c.user {
                return;
            }
            self.disconnect(node, c.conn_id, ev);
        }
        // One shared allocation per distinct user: the users map's key.
        let user =
            self.users.get_key_value(c.user.as_str()).map_or_else(|| Arc::from(c.user.as_str()), |(k, _)| k.clone());
        let list = self.users.entry(user.clone()).or_default();
        if !list.iter().any(|(n, _)| n == node) {
            ev.push(Event::UserOnline { user: user.clone(), node: node.clone() });
        }
        list.push((node.clone(), c.conn_id));
        let conn =
            Conn { user, connected_at_ms: c.connected_at_ms, client_info: c.client_info.into(), channels: Vec::new() };
        if let Some(n) = self.nodes.get_mut(node) {
            n.conns.insert(c.conn_id, conn);
            self.connections += 1;
        }
    }

    fn disconnect(&mut self, node: &Arc<str>, conn_id: u64, ev: &mut Vec<Event>) {
        let Some(chans) = self.nodes.get(node).and_then(|n| n.conns.get(&conn_id)).map(|c| c.channels.clone()) else {
            return;
        };
        for ch in chans {
            self.unsubscribe(node, conn_id, &ch, ev);
        }
        let Some(conn) = self.nodes.get_mut(node).and_then(|n| n.conns.remove(&conn_id)) else {
            return;
        };
        self.connections -= 1;
        if let Some(list) = self.users.get_mut(&conn.user) {
            list.retain(|(n, id)| !(n == node && *id == conn_id));
            if !list.iter().any(|(n, _)| n == node) {
                ev.push(Event::UserOffline { user: conn.user.clone(), node: node.clone() });
            }
            if list.is_empty() {
                self.users.remove(&conn.user);
            }
        }
    }

    fn subscribe(&mut self, node: &Arc<str>, conn_id: u64, channel: &str, ev: &mut Vec<Event>) {
        let Some(user) = self.nodes.get(node).and_then(|n| n.conns.get(&conn_id)).map(|c| c.user.clone()) else {
            return;
        };
        if self.nodes[node].conns[&conn_id].channels.iter().any(|c| **c == *channel) {
            return;
        }
        // One shared allocation per distinct channel: the channels map's key.
        let ch = self.channels.get_key_value(channel).map_or_else(|| Arc::from(channel), |(k, _)| k.clone());
        if let Some(c) = self.nodes.get_mut(node).and_then(|n| n.conns.get_mut(&conn_id)) {
            c.channels.push(ch.clone());
        }
        let presence = self.presence_patterns.iter().any(|p| glob_match(p, channel));
        let entry = self.channels.entry(ch.clone()).or_insert_with(|| Channel { presence, ..Default::default() });
        let n = entry.nodes.entry(node.clone()).or_insert(0);
        *n += 1;
        if *n == 1 {
            ev.push(Event::Interest { channel: ch.clone(), node: node.clone(), interested: true });
        }
        if entry.presence {
            let m = entry.members.entry(user.clone()).or_insert(0);
            *m += 1;
            if *m == 1 {
                if entry.members.len() > self.large_room {
                    self.dirty_counts.insert(ch);
                } else {
                    ev.push(Event::Join { channel: ch, user });
                }
            }
        }
    }

    fn unsubscribe(&mut self, node: &Arc<str>, conn_id: u64, channel: &str, ev: &mut Vec<Event>) {
        let Some(conn) = self.nodes.get_mut(node).and_then(|n| n.conns.get_mut(&conn_id)) else {
            return;
        };
        let Some(pos) = conn.channels.iter().position(|c| **c == *channel) else {
            return;
        };
        let ch = conn.channels.swap_remove(pos);
        let user = conn.user.clone();
        let Some(entry) = self.channels.get_mut(&ch) else {
            return;
        };
        if let Some(n) = entry.nodes.get_mut(node) {
            *n -= 1;
            if *n == 0 {
                entry.nodes.remove(node);
                ev.push(Event::Interest { channel: ch.clone(), node: node.clone(), interested: false });
            }
        }
        if let Some(m) = entry.members.get_mut(&user).filter(|_| entry.presence) {
            *m -= 1;
            if *m == 0 {
                let large = entry.members.len() > self.large_room;
                entry.members.remove(&user);
                if large {
                    self.dirty_counts.insert(ch.clone());
                } else {
                    ev.push(Event::Leave { channel: ch.clone(), user: user.clone() });
                }
            }
        }
        if entry.nodes.is_empty() {
            self.channels.remove(&ch);
        }
    }

    /// Member counts of large rooms that changed since the last call.
    pub fn take_counts(&mut self) -> Vec<(Arc<str>, u64)> {
        let dirty = std::mem::take(&mut self.dirty_counts);
        dirty
            .into_iter()
            .map(|ch| {
                let n = self.channels.get(&ch).map_or(0, |c| c.members.len() as u64);
                (ch, n)
            })
            .collect()
    }

    /// Every connection of each user.
    pub fn locate(&self, user: &str) -> Vec<Located> {
        self.users.get(user).map_or_else(Vec::new, |list| {
            list.iter()
                .filter_map(|(node, id)| {
                    let c = self.nodes.get(node)?.conns.get(id)?;
                    Some(Located {
                        node: node.clone(),
                        conn_id: *id,
                        connected_at_ms: c.connected_at_ms,
                        client_info: c.client_info.clone(),
                    })
                })
                .collect()
        })
    }

    /// Nodes with at least one subscriber on `channel`, sorted.
    pub fn channel_nodes(&self, channel: &str) -> Vec<Arc<str>> {
        let mut v: Vec<Arc<str>> =
            self.channels.get(channel).map_or_else(Vec::new, |c| c.nodes.keys().cloned().collect());
        v.sort();
        v
    }

    /// A page of a presence channel's members (sorted) and the total.
    pub fn channel_members(&self, channel: &str, after: &str, limit: usize) -> (Vec<Arc<str>>, usize) {
        let Some(c) = self.channels.get(channel) else {
            return (Vec::new(), 0);
        };
        let mut page: Vec<Arc<str>> = c.members.keys().filter(|u| after.is_empty() || ***u > *after).cloned().collect();
        page.sort();
        page.truncate(limit);
        (page, c.members.len())
    }

    /// Whether members are tracked for `channel` (it matches a presence pattern).
    pub fn is_presence_channel(&self, channel: &str) -> bool {
        self.presence_patterns.iter().any(|p| glob_match(p, channel))
    }

    pub fn counts(&self) -> Counts {
        Counts {
            users: self.users.len(),
            connections: self.connections,
            nodes: self.nodes.len(),
            channels: self.channels.len(),
        }
    }

    pub fn nodes(&self, now: Instant) -> Vec<NodeSummary> {
        let mut v: Vec<NodeSummary> = self
            .nodes
            .iter()
            .map(|(id, n)| NodeSummary {
                node: id.clone(),
                delivery_addr: n.delivery_addr.clone(),
                epoch: n.epoch,
                connections: n.conns.len(),
                lease_left: n.lease_until.saturating_duration_since(now),
            })
            .collect();
        v.sort_by(|a, b| a.node.cmp(&b.node));
        v
    }

    /// Where every user is, as `UserOnline` events (one per user and node).
    pub fn user_events(&self) -> Vec<Event> {
        let mut ev = Vec::new();
        for (user, list) in &self.users {
            let mut seen: Vec<&Arc<str>> = Vec::new();
            for (node, _) in list {
                if !seen.contains(&node) {
                    seen.push(node);
                    ev.push(Event::UserOnline { user: user.clone(), node: node.clone() });
                }
            }
        }
        ev
    }

    /// Current interest as events, for a Watch that asked for the initial state.
    pub fn interest_events(&self) -> Vec<Event> {
        let mut ev: Vec<Event> = self
            .nodes
            .iter()
            .map(|(id, n)| Event::NodeUp { node: id.clone(), delivery_addr: n.delivery_addr.clone(), epoch: n.epoch })
            .collect();
        for (ch, c) in &self.channels {
            for node in c.nodes.keys() {
                ev.push(Event::Interest { channel: ch.clone(), node: node.clone(), interested: true });
            }
        }
        ev
    }
}

#[cfg(test)]
mod tests;
