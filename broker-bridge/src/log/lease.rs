//! Partition leases for the backbones without a consumer group (NATS, Redis), pure.
//!
//! One record per partition holds `generation offset owner`: who consumes the
//! partition, the generation (bumped by every new owner) and the committed offset.
//! Every write is a compare-and-set on the record's revision, so a commit is also
//! a renewal, and an owner that lost the lease learns it at its next write. A
//! record whose revision stayed the same for the lease time, as seen by the
//! watching bridge's own clock (no clocks are compared), is expired and may be
//! taken; an owner stops delivering when its last successful write is older than
//! half the lease, well before anyone may take it over.

use std::collections::HashMap;
use std::time::{Duration, Instant};

/// What a lease record holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    /// Empty: released, free to take.
    pub owner: String,
    pub generation: u64,
    /// The committed offset: the next one to consume.
    pub offset: i64,
}

impl Lease {
    pub fn encode(&self) -> String {
        format!("{} {} {}", self.generation, self.offset, self.owner)
    }

    pub fn decode(s: &str) -> Option<Self> {
        let mut parts = s.splitn(3, ' ');
        let generation = parts.next()?.parse().ok()?;
        let offset = parts.next()?.parse().ok()?;
        let owner = parts.next().unwrap_or_default().to_owned();
        Some(Self { owner, generation, offset })
    }
}

/// A lease record as stored: its revision changes on every write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stored {
    pub revision: u64,
    pub lease: Lease,
}

/// Whether to take a partition's lease now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Compare-and-set (expecting this revision; None: no record yet) to this lease.
    Take { expect: Option<u64>, lease: Lease },
    /// Held by a live owner (or not watched long enough yet).
    Wait,
}

/// The leases this bridge watches but does not hold: when each may be taken.
#[derive(Debug, Default)]
pub struct Watch {
    seen: HashMap<i32, (u64, Instant)>,
}

impl Watch {
    /// What to do about partition `p`'s lease, as read now.
    pub fn decide(&mut self, me: &str, p: i32, stored: Option<&Stored>, lease: Duration, now: Instant) -> Decision {
        let Some(s) = stored else {
            self.seen.remove(&p);
            return Decision::Take { expect: None, lease: Lease { owner: me.into(), generation: 1, offset: 0 } };
        };
        let take = Decision::Take {
            expect: Some(s.revision),
            lease: Lease { owner: me.into(), generation: s.lease.generation + 1, offset: s.lease.offset },
        };
        // Released, or ours from an earlier life (this bridge id restarted): take it now.
        if s.lease.owner.is_empty() || s.lease.owner == me {
            self.seen.remove(&p);
            return take;
        }
        match self.seen.get(&p) {
            Some(&(rev, since)) if rev == s.revision => {
                if now.duration_since(since) >= lease {
                    self.seen.remove(&p);
                    take
                } else {
                    Decision::Wait
                }
            }
            _ => {
                self.seen.insert(p, (s.revision, now));
                Decision::Wait
            }
        }
    }

    /// Forgets a partition (taken, or held by us).
    pub fn forget(&mut self, p: i32) {
        self.seen.remove(&p);
    }
}

/// How many partitions one of `members` bridges should hold.
pub fn share(partitions: i32, members: usize) -> usize {
    let p = partitions.max(0) as usize;
    p.div_ceil(members.max(1))
}

/// A lease this bridge holds.
#[derive(Debug, Clone)]
pub struct Held {
    pub revision: u64,
    pub generation: u64,
    pub committed: i64,
    /// When the last write of the record succeeded.
    pub written: Instant,
}

impl Held {
    /// Write now: the commit point moved, or the renewal is due.
    pub fn due(&self, point: i64, lease: Duration, now: Instant) -> bool {
        point > self.committed || now.duration_since(self.written) >= lease / 5
    }

    /// Delivering as owner is safe until then (half the lease after the last write).
    pub fn fresh_until(&self, lease: Duration) -> Instant {
        self.written + lease / 2
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip() {
        let l = Lease { owner: "br 0".into(), generation: 7, offset: 42 };
        assert_eq!(Lease::decode(&l.encode()), Some(l));
        assert_eq!(Lease::decode("1 0 "), Some(Lease { owner: String::new(), generation: 1, offset: 0 }));
        assert_eq!(Lease::decode("x"), None);
    }

    #[test]
    fn a_lease_is_taken_when_free_or_unchanged_for_the_lease_time() {
        let t0 = Instant::now();
        let lease = Duration::from_secs(10);
        let s =
            |rev, owner: &str| Stored { revision: rev, lease: Lease { owner: owner.into(), generation: 3, offset: 9 } };
        let mut w = Watch::default();
        assert_eq!(
            w.decide("a", 0, None, lease, t0),
            Decision::Take { expect: None, lease: Lease { owner: "a".into(), generation: 1, offset: 0 } }
        );
        let taken = Decision::Take { expect: Some(5), lease: Lease { owner: "a".into(), generation: 4, offset: 9 } };
        assert_eq!(w.decide("a", 1, Some(&s(5, "")), lease, t0), taken, "released");
        assert_eq!(w.decide("a", 1, Some(&s(5, "a")), lease, t0), taken, "ours from an earlier life");
        assert_eq!(w.decide("a", 2, Some(&s(5, "b")), lease, t0), Decision::Wait);
        assert_eq!(w.decide("a", 2, Some(&s(5, "b")), lease, t0 + Duration::from_secs(9)), Decision::Wait);
        // b renewed: the clock starts again.
        assert_eq!(w.decide("a", 2, Some(&s(6, "b")), lease, t0 + Duration::from_secs(11)), Decision::Wait);
        assert_eq!(w.decide("a", 2, Some(&s(6, "b")), lease, t0 + Duration::from_secs(20)), Decision::Wait);
        assert_eq!(
            w.decide("a", 2, Some(&s(6, "b")), lease, t0 + Duration::from_secs(21)),
            Decision::Take { expect: Some(6), lease: Lease { owner: "a".into(), generation: 4, offset: 9 } }
        );
    }

    #[test]
    fn shares_and_deadlines() {
        assert_eq!((share(4, 1), share(4, 2), share(4, 3), share(12, 5), share(4, 0)), (4, 2, 2, 3, 4));
        let t0 = Instant::now();
        let lease = Duration::from_secs(10);
        let h = Held { revision: 1, generation: 1, committed: 5, written: t0 };
        assert!(!h.due(5, lease, t0 + Duration::from_secs(1)));
        assert!(h.due(6, lease, t0), "a commit");
        assert!(h.due(5, lease, t0 + Duration::from_secs(2)), "a renewal");
        // The owner stops delivering long before a watcher may take over (the lease time).
        assert_eq!(h.fresh_until(lease), t0 + Duration::from_secs(5));
    }
}
