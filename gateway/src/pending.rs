//! Half-open connections: TCP connections that have not yet sent a complete
//! HTTP request. They are the cheap way to lock an edge out (open many, send a
//! few bytes, wait), so they live under two budgets: the node's socket budget
//! for connections still in HTTP, and one per client address. A new connection
//! over either budget sheds the oldest half-open connection of that scope
//! instead of being refused: an attacker's connections churn among themselves
//! while other addresses keep getting in, and the accept loop does not stop
//! while any half-open connection can make room.
//!
//! Pure bookkeeping (no I/O): the accept loop registers a connection and gets
//! back what to shed; the connection's task cancels itself when told to.

use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;

use tokio_util::sync::CancellationToken;

/// Why a half-open connection was shed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shed {
    /// The node's half-open budget was full.
    Node,
    /// Its address had its whole per-address budget half-open.
    PerIp,
}

impl Shed {
    /// Closed label for metrics.
    pub fn label(self) -> &'static str {
        match self {
            Self::Node => "node",
            Self::PerIp => "per_ip",
        }
    }
}

#[derive(Debug)]
struct Entry {
    ip: IpAddr,
    cancel: CancellationToken,
}

/// The half-open connections, oldest first.
#[derive(Debug)]
pub struct HalfOpen {
    max_per_ip: usize,
    next: u64,
    /// Arrival order; ids of connections that left are skipped lazily.
    order: VecDeque<u64>,
    live: HashMap<u64, Entry>,
    per_ip: HashMap<IpAddr, usize>,
}

impl HalfOpen {
    /// At most `max_per_ip` half-open connections from one address.
    pub fn new(max_per_ip: usize) -> Self {
        Self {
            max_per_ip: max_per_ip.max(1),
            next: 0,
            order: VecDeque::new(),
            live: HashMap::new(),
            per_ip: HashMap::new(),
        }
    }

    /// Number of half-open connections.
    pub fn len(&self) -> usize {
        self.live.len()
    }

    /// Whether there is none.
    pub fn is_empty(&self) -> bool {
        self.live.is_empty()
    }

    /// Registers a new connection from `ip`; `node_full`: the node's budget of
    /// connections in HTTP is used up. Returns its id and why a connection was
    /// displaced, if one was (already cancelled and forgotten here).
    pub fn admit(&mut self, ip: IpAddr, cancel: CancellationToken, node_full: bool) -> (u64, Option<Shed>) {
        let mut shed = None;
        if self.per_ip.get(&ip).copied().unwrap_or(0) >= self.max_per_ip {
            if let Some(id) = self.order.iter().copied().find(|id| self.live.get(id).is_some_and(|e| e.ip == ip)) {
                self.evict(id);
                shed = Some(Shed::PerIp);
            }
        } else if node_full {
            while let Some(id) = self.order.pop_front() {
                if self.live.contains_key(&id) {
                    self.evict(id);
                    shed = Some(Shed::Node);
                    break;
                }
            }
        }
        let id = self.next;
        self.next += 1;
        self.order.push_back(id);
        self.live.insert(id, Entry { ip, cancel });
        *self.per_ip.entry(ip).or_insert(0) += 1;
        (id, shed)
    }

    /// The connection sent its request (or ended): it is no longer half-open.
    pub fn done(&mut self, id: u64) {
        if let Some(e) = self.live.remove(&id) {
            self.forget_ip(e.ip);
        }
        // Keep the order list proportional to what is live.
        if self.order.len() > 2 * self.live.len() + 64 {
            let live = &self.live;
            self.order.retain(|id| live.contains_key(id));
        }
    }

    fn evict(&mut self, id: u64) {
        if let Some(e) = self.live.remove(&id) {
            e.cancel.cancel();
            self.forget_ip(e.ip);
        }
    }

    fn forget_ip(&mut self, ip: IpAddr) {
        if let Some(n) = self.per_ip.get_mut(&ip) {
            *n -= 1;
            if *n == 0 {
                self.per_ip.remove(&ip);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(last: u8) -> IpAddr {
        IpAddr::from([127, 0, 0, last])
    }

    #[test]
    fn one_address_sheds_only_its_own_oldest() {
        let mut h = HalfOpen::new(3);
        let other = CancellationToken::new();
        h.admit(ip(2), other.clone(), false);
        let mine: Vec<CancellationToken> = (0..3).map(|_| CancellationToken::new()).collect();
        for c in &mine {
            assert_eq!(h.admit(ip(1), c.clone(), false).1, None);
        }
        assert_eq!(h.admit(ip(1), CancellationToken::new(), false).1, Some(Shed::PerIp));
        assert!(mine[0].is_cancelled() && !mine[1].is_cancelled());
        assert!(!other.is_cancelled(), "another address is never shed for this one");
        assert_eq!(h.len(), 4);
    }

    #[test]
    fn a_full_node_sheds_the_oldest_and_finished_ones_do_not_count() {
        let mut h = HalfOpen::new(3);
        let t: Vec<CancellationToken> = (0..3).map(|_| CancellationToken::new()).collect();
        let ids: Vec<u64> = t.iter().enumerate().map(|(i, c)| h.admit(ip(i as u8), c.clone(), false).0).collect();
        h.done(ids[0]);
        assert_eq!(h.admit(ip(9), CancellationToken::new(), false).1, None);
        assert_eq!(h.admit(ip(8), CancellationToken::new(), true).1, Some(Shed::Node));
        assert!(!t[0].is_cancelled(), "finished, not shed");
        assert!(t[1].is_cancelled() && !t[2].is_cancelled());
        for _ in 0..1000 {
            let (id, _) = h.admit(ip(7), CancellationToken::new(), false);
            h.done(id);
        }
        assert!(h.order.len() <= 2 * h.len() + 64);
        assert_eq!(h.len(), 3);
    }
}
