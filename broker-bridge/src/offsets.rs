//! Which offsets may be committed: a pure tracker of consumed records whose
//! deliveries are not all acknowledged yet. The commit point of a partition is
//! its oldest unfinished offset, or the next offset to consume.

use std::collections::{BTreeMap, HashMap};

/// A record waiting for its deliveries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct RecordRef {
    pub partition: i32,
    pub offset: i64,
    /// Assignment generation of the partition when the record was consumed.
    pub generation: u64,
}

#[derive(Debug, Default)]
struct Partition {
    generation: u64,
    /// offset → deliveries still outstanding.
    pending: BTreeMap<i64, usize>,
    /// Next offset to consume (last consumed + 1).
    next: Option<i64>,
    committed: Option<i64>,
}

/// Offsets of every assigned partition.
#[derive(Debug, Default)]
pub struct Tracker {
    partitions: HashMap<i32, Partition>,
    next_generation: u64,
    in_flight: usize,
}

impl Tracker {
    /// Partitions were assigned to us: (re)start tracking them.
    pub fn assign(&mut self, partitions: &[i32]) {
        for p in partitions {
            self.next_generation += 1;
            let old = self.partitions.insert(*p, Partition { generation: self.next_generation, ..Default::default() });
            if let Some(old) = old {
                self.in_flight -= old.pending.len();
            }
        }
    }

    /// Partitions were taken away: forget them (late acknowledgements are ignored).
    pub fn revoke(&mut self, partitions: &[i32]) {
        for p in partitions {
            if let Some(old) = self.partitions.remove(p) {
                self.in_flight -= old.pending.len();
            }
        }
    }

    /// A record was consumed and handed to `targets` gateways.
    pub fn consumed(&mut self, partition: i32, offset: i64, targets: usize) -> RecordRef {
        let next_generation = &mut self.next_generation;
        let p = self.partitions.entry(partition).or_insert_with(|| {
            *next_generation += 1;
            Partition { generation: *next_generation, ..Default::default() }
        });
        p.next = Some(p.next.map_or(offset + 1, |n| n.max(offset + 1)));
        if targets > 0 && p.pending.insert(offset, targets).is_none() {
            self.in_flight += 1;
        }
        RecordRef { partition, offset, generation: p.generation }
    }

    /// One target acknowledged (or was given up on). Returns true when the record is complete.
    pub fn done(&mut self, r: RecordRef) -> bool {
        let Some(p) = self.partitions.get_mut(&r.partition) else { return false };
        if p.generation != r.generation {
            return false;
        }
        let Some(left) = p.pending.get_mut(&r.offset) else { return false };
        *left -= 1;
        if *left == 0 {
            p.pending.remove(&r.offset);
            self.in_flight -= 1;
            return true;
        }
        false
    }

    /// Records consumed and not complete.
    pub fn in_flight(&self) -> usize {
        self.in_flight
    }

    /// Offsets to commit now: (partition, offset) where offset moved since the last call.
    pub fn commit_points(&mut self) -> Vec<(i32, i64)> {
        let mut out = Vec::new();
        for (id, p) in &mut self.partitions {
            let point = p.pending.keys().next().copied().or(p.next);
            if let Some(point) = point
                && p.committed.is_none_or(|c| point > c)
            {
                p.committed = Some(point);
                out.push((*id, point));
            }
        }
        out.sort_unstable();
        out
    }

    /// Commit points of some partitions, regardless of what was committed (for a revoke).
    pub fn points_of(&self, partitions: &[i32]) -> Vec<(i32, i64)> {
        partitions
            .iter()
            .filter_map(|id| {
                let p = self.partitions.get(id)?;
                Some((*id, p.pending.keys().next().copied().or(p.next)?))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commit_point_waits_for_the_oldest_unfinished_record() {
        let mut t = Tracker::default();
        t.assign(&[0]);
        let a = t.consumed(0, 10, 2);
        let b = t.consumed(0, 11, 1);
        let _ = t.consumed(0, 12, 0); // no target: complete at once
        assert_eq!(t.in_flight(), 2);
        assert_eq!(t.commit_points(), vec![(0, 10)]);
        assert!(t.done(b));
        assert_eq!(t.commit_points(), vec![], "10 still pending: nothing new");
        assert!(!t.done(a));
        assert!(t.done(a));
        assert_eq!(t.commit_points(), vec![(0, 13)]);
        assert_eq!(t.in_flight(), 0);
    }

    #[test]
    fn late_acks_after_a_revoke_are_ignored() {
        let mut t = Tracker::default();
        t.assign(&[0, 1]);
        let a = t.consumed(0, 5, 1);
        t.consumed(1, 7, 1);
        assert_eq!(t.points_of(&[0]), vec![(0, 5)]);
        t.revoke(&[0]);
        assert!(!t.done(a));
        t.assign(&[0]);
        assert!(!t.done(a), "an ack from the old generation does not count");
        assert_eq!(t.in_flight(), 1);
        assert_eq!(t.commit_points(), vec![(1, 7)]);
    }
}
