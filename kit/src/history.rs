//! Channel history: the retention rules operators give by channel pattern
//! (`--history room:*=1000/24h`) and the bounded ring one channel's retained
//! messages live in. Pure: no clock, no I/O; times are passed in (unix ms).
//!
//! A ring knows the highest sequence number it no longer holds (`lost_through`):
//! a reader asking for everything after a position below it is told the history
//! no longer reaches back that far, never handed a partial list.

use std::collections::VecDeque;
use std::time::Duration;

/// The most messages one rule may keep per channel.
pub const MAX_MESSAGES: usize = 1_000_000;

/// Channels matching `pattern` (`*` matches any run) keep their last
/// `max_messages` messages, each for at most `max_age`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    pub pattern: String,
    /// 0: no history for these channels.
    pub max_messages: usize,
    pub max_age: Duration,
}

impl std::str::FromStr for Rule {
    type Err = String;

    /// `pattern=N/AGE` (e.g. `room:*=1000/24h`), `pattern=N` (age 24h) or `pattern=off`.
    fn from_str(s: &str) -> Result<Self, String> {
        let (pattern, limit) =
            s.rsplit_once('=').ok_or_else(|| format!("history rule `{s}`: expected PATTERN=COUNT/AGE"))?;
        if pattern.is_empty() {
            return Err(format!("history rule `{s}`: empty pattern"));
        }
        if limit == "off" {
            return Ok(Self { pattern: pattern.into(), max_messages: 0, max_age: Duration::ZERO });
        }
        let (count, age) = match limit.split_once('/') {
            Some((c, a)) => (c, crate::args::parse_duration(a)?),
            None => (limit, Duration::from_secs(24 * 3600)),
        };
        let max_messages: usize = count.parse().map_err(|_| format!("history rule `{s}`: bad count `{count}`"))?;
        if max_messages > MAX_MESSAGES {
            return Err(format!("history rule `{s}`: at most {MAX_MESSAGES} messages per channel"));
        }
        if max_messages > 0 && age.is_zero() {
            return Err(format!("history rule `{s}`: the age must be above zero"));
        }
        Ok(Self { pattern: pattern.into(), max_messages, max_age: age })
    }
}

/// The rules in the order given; the first whose pattern matches a channel decides.
#[derive(Debug, Clone, Default)]
pub struct Rules(Vec<Rule>);

impl Rules {
    pub fn new(rules: Vec<Rule>) -> Self {
        Self(rules)
    }

    /// The rule for `channel`; `None` when no rule matches or the rule keeps nothing.
    pub fn for_channel(&self, channel: &str) -> Option<&Rule> {
        self.0.iter().find(|r| crate::glob_match(&r.pattern, channel)).filter(|r| r.max_messages > 0)
    }

    /// The longest age any rule keeps.
    pub fn max_age(&self) -> Duration {
        self.0.iter().map(|r| r.max_age).max().unwrap_or_default()
    }
}

/// One retained message.
#[derive(Debug, Clone)]
pub struct Entry<T> {
    pub seq: u64,
    /// Unix milliseconds when it was retained.
    pub at_ms: u64,
    /// Bytes it accounts for in the memory budget.
    pub cost: usize,
    pub value: T,
}

/// Why a read after a position cannot be answered completely.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lost {
    /// A message after the position is no longer held (count, age or memory).
    TooOld,
}

/// One channel's retained messages, oldest first, in strictly increasing `seq`.
#[derive(Debug)]
pub struct Ring<T> {
    entries: VecDeque<Entry<T>>,
    lost_through: u64,
    bytes: usize,
}

impl<T> Ring<T> {
    /// An empty ring for a stream in which every message up to and including
    /// `lost_through` was never retained here.
    pub fn new(lost_through: u64) -> Self {
        Self { entries: VecDeque::new(), lost_through, bytes: 0 }
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Bytes the retained entries account for.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// The highest sequence number no longer (or never) held.
    pub fn lost_through(&self) -> u64 {
        self.lost_through
    }

    /// The newest retained sequence number.
    pub fn last_seq(&self) -> Option<u64> {
        self.entries.back().map(|e| e.seq)
    }

    /// The oldest retained sequence number.
    pub fn first_seq(&self) -> Option<u64> {
        self.entries.front().map(|e| e.seq)
    }

    /// Appends (a `seq` not above the newest is ignored: a redelivery) and applies
    /// `rule`'s count and age. Returns (bytes added, bytes freed).
    pub fn push(&mut self, entry: Entry<T>, rule: &Rule) -> (usize, usize) {
        if self.entries.back().is_some_and(|e| e.seq >= entry.seq) || entry.seq <= self.lost_through {
            return (0, 0);
        }
        let now = entry.at_ms;
        let added = entry.cost;
        self.bytes += added;
        self.entries.push_back(entry);
        let mut freed = 0;
        while self.entries.len() > rule.max_messages {
            freed += self.pop_oldest().unwrap_or(0);
        }
        (added, freed + self.expire(now, rule.max_age))
    }

    /// Drops entries retained more than `max_age` before `now_ms`; returns bytes freed.
    pub fn expire(&mut self, now_ms: u64, max_age: Duration) -> usize {
        let cutoff = now_ms.saturating_sub(max_age.as_millis() as u64);
        let mut freed = 0;
        while self.entries.front().is_some_and(|e| e.at_ms < cutoff) {
            freed += self.pop_oldest().unwrap_or(0);
        }
        freed
    }

    /// Drops the oldest entry; returns the bytes it accounted for.
    pub fn pop_oldest(&mut self) -> Option<usize> {
        let e = self.entries.pop_front()?;
        self.lost_through = self.lost_through.max(e.seq);
        self.bytes -= e.cost;
        Some(e.cost)
    }

    /// Drops everything (a history reset); returns the bytes freed.
    pub fn clear(&mut self) -> usize {
        let freed = self.bytes;
        if let Some(last) = self.last_seq() {
            self.lost_through = self.lost_through.max(last);
        }
        self.entries.clear();
        self.bytes = 0;
        freed
    }

    /// The entries after `since`, oldest first, at most `limit`; `TooOld` when a
    /// message after `since` is no longer held.
    pub fn after(&self, since: u64, limit: usize) -> Result<impl Iterator<Item = &Entry<T>>, Lost> {
        if since < self.lost_through {
            return Err(Lost::TooOld);
        }
        let start = self.entries.partition_point(|e| e.seq <= since);
        Ok(self.entries.range(start..).take(limit))
    }

    /// The newest `n` entries, oldest first.
    pub fn last(&self, n: usize) -> impl Iterator<Item = &Entry<T>> {
        self.entries.range(self.entries.len().saturating_sub(n)..)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(s: &str) -> Rule {
        s.parse().unwrap()
    }

    fn entry(seq: u64, at_ms: u64) -> Entry<u64> {
        Entry { seq, at_ms, cost: 10, value: seq }
    }

    #[test]
    fn rules_parse_and_the_first_match_decides() {
        let r = rule("room:*=1000/24h");
        assert_eq!((r.pattern.as_str(), r.max_messages, r.max_age), ("room:*", 1000, Duration::from_secs(86400)));
        assert_eq!(rule("a=5").max_age, Duration::from_secs(86400));
        assert_eq!(rule("a=off").max_messages, 0);
        assert_eq!(rule("a=b=3/1m").pattern, "a=b");
        for bad in ["room:*", "=5/1h", "a=x/1h", "a=5/1y", "a=-1/1h", "a=2000000/1h", "a=5/0s"] {
            assert!(bad.parse::<Rule>().is_err(), "{bad}");
        }
        let rules = Rules::new(vec![rule("secret:*=off"), rule("room:*=10/1m"), rule("*=3/1h")]);
        assert!(rules.for_channel("secret:x").is_none());
        assert_eq!(rules.for_channel("room:1").unwrap().max_messages, 10);
        assert_eq!(rules.for_channel("other").unwrap().max_messages, 3);
        assert_eq!(rules.max_age(), Duration::from_secs(3600));
        assert!(Rules::default().for_channel("x").is_none());
    }

    #[test]
    fn a_ring_keeps_the_newest_and_knows_what_it_lost() {
        let r = rule("*=3/1m");
        let mut ring = Ring::new(0);
        for seq in [2, 5, 7] {
            assert_eq!(ring.push(entry(seq, 1000), &r), (10, 0));
        }
        assert_eq!(ring.after(0, 10).unwrap().map(|e| e.seq).collect::<Vec<_>>(), [2, 5, 7]);
        assert_eq!(ring.after(5, 10).unwrap().map(|e| e.seq).collect::<Vec<_>>(), [7]);
        assert_eq!(ring.after(3, 1).unwrap().map(|e| e.seq).collect::<Vec<_>>(), [5]);
        // A fourth pushes the oldest out: positions before it can no longer be served.
        assert_eq!(ring.push(entry(9, 1000), &r), (10, 10));
        assert_eq!(ring.lost_through(), 2);
        assert_eq!(ring.after(1, 10).err(), Some(Lost::TooOld));
        assert_eq!(ring.after(2, 10).unwrap().map(|e| e.seq).collect::<Vec<_>>(), [5, 7, 9]);
        // A redelivery or an older seq is ignored.
        assert_eq!(ring.push(entry(9, 1000), &r), (0, 0));
        assert_eq!(ring.push(entry(1, 1000), &r), (0, 0));
        assert_eq!(ring.last(2).map(|e| e.seq).collect::<Vec<_>>(), [7, 9]);
        assert_eq!(ring.bytes(), 30);
    }

    #[test]
    fn age_expiry_and_clear_move_the_lost_mark() {
        let r = rule("*=100/1s");
        let mut ring = Ring::new(4);
        assert_eq!(ring.push(entry(3, 0), &r), (0, 0), "at or below lost_through");
        ring.push(entry(5, 0), &r);
        ring.push(entry(6, 500), &r);
        assert_eq!(ring.expire(1200, r.max_age), 10);
        assert_eq!(ring.lost_through(), 5);
        assert_eq!(ring.after(4, 10).err(), Some(Lost::TooOld));
        assert_eq!(ring.after(5, 10).unwrap().count(), 1);
        // Pushing at a later time expires what is older than the age.
        ring.push(entry(8, 2000), &r);
        assert_eq!(ring.after(6, 10).unwrap().map(|e| e.seq).collect::<Vec<_>>(), [8]);
        assert_eq!(ring.lost_through(), 6);
        assert_eq!(ring.clear(), 10);
        assert!(ring.is_empty());
        assert_eq!(ring.after(7, 10).err(), Some(Lost::TooOld));
        assert_eq!(ring.after(8, 10).unwrap().count(), 0);
    }
}
