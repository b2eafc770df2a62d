//! The hot window, pure: per channel of the partitions this bridge consumes, a
//! bounded ring (`kit::history::Ring`) of its recent messages, fed in offset
//! order by the consume loop. Positions are `seq` = offset + 1.
//!
//! - A partition's window is continuous from the first offset consumed after
//!   its assignment (or after a hole in the offsets) up to the last consumed;
//!   a read whose `since` lies before that start, or after what was consumed,
//!   is not answered here (the caller reads Kafka).
//! - Per channel the `--history` rule bounds count and age; the node-wide
//!   budget evicts the globally oldest entries first. An evicted entry moves the
//!   ring's `lost_through`, so reads before it go to Kafka too.
//! - Keyed (idempotent) messages stored twice under one id are kept once: the
//!   first; a later copy with an id the ring still holds is not retained. A read
//!   whose answer holds a keyed message marked `maybe_stored_before` is left to the
//!   log (which looks back for an earlier copy), unless the window holds the
//!   partition from its start.
//! - A revoke drops the partition's windows.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;

use kit::history::{Entry, Ring, Rules};
use proto::bridge::v1::{Envelope, envelope};

/// Bytes an entry accounts for besides its payload, id and sender (ring slot,
/// `Arc`, envelope struct, bookkeeping).
pub const ENTRY_OVERHEAD: usize = 160;

/// One retained message.
pub type Msg = Arc<Envelope>;

#[derive(Debug, Default)]
struct Chan {
    ring: Option<Ring<Msg>>,
    /// Ids of keyed messages the ring holds, and the same in seq order (for pruning).
    keyed: HashSet<String>,
    keyed_order: VecDeque<(u64, String)>,
}

#[derive(Debug)]
struct Window {
    /// First offset of the continuous window.
    from: i64,
    /// Next offset expected (last consumed + 1).
    next: i64,
    channels: HashMap<Arc<str>, Chan>,
}

/// What a read asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Query {
    /// Messages with seq > this.
    Since(u64),
    /// The newest messages.
    Newest,
}

/// A complete answer from the window.
#[derive(Debug, Clone, PartialEq)]
pub struct Answer {
    /// (seq, message), oldest first.
    pub messages: Vec<(u64, Msg)>,
    /// The position the answer is complete through.
    pub position: u64,
    pub more: bool,
}

/// Every hot window of this bridge.
#[derive(Debug)]
pub struct HotWindows {
    rules: Rules,
    budget: usize,
    bytes: usize,
    /// Entries held (kept here: counting the rings would cost a walk per record).
    entries: usize,
    windows: HashMap<i32, Window>,
    /// Every retained entry in the order retained: (partition, channel, seq).
    order: VecDeque<(i32, Arc<str>, u64)>,
}

fn cost(env: &Envelope) -> usize {
    ENTRY_OVERHEAD + env.payload.len() + env.id.len() + env.from.len()
}

impl HotWindows {
    pub fn new(rules: Rules, budget: usize) -> Self {
        Self { rules, budget, bytes: 0, entries: 0, windows: HashMap::new(), order: VecDeque::new() }
    }

    pub fn rules(&self) -> &Rules {
        &self.rules
    }

    /// Bytes held now.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Entries held now.
    pub fn len(&self) -> usize {
        self.entries
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Partitions (re)assigned: their windows start again at the next consumed offset.
    pub fn assign(&mut self, partitions: &[i32]) {
        self.revoke(partitions);
    }

    /// Partitions taken away (or a hole in their offsets): their windows are dropped.
    pub fn revoke(&mut self, partitions: &[i32]) {
        for p in partitions {
            if let Some(w) = self.windows.remove(p) {
                for c in w.channels.values() {
                    self.bytes -= c.ring.as_ref().map_or(0, Ring::bytes);
                    self.entries -= c.ring.as_ref().map_or(0, Ring::len);
                }
            }
        }
        self.compact_order();
    }

    /// Drops every window (e.g. the topic's epochs changed).
    pub fn clear(&mut self) {
        let all: Vec<i32> = self.windows.keys().copied().collect();
        self.revoke(&all);
    }

    /// A record of `partition` at `offset` was consumed (in offset order);
    /// `env` is `None` for a record that is not an envelope.
    pub fn consumed(&mut self, partition: i32, offset: i64, env: Option<&Msg>, now_ms: u64) {
        let w = self.windows.entry(partition).or_insert_with(|| Window {
            from: offset,
            next: offset,
            channels: HashMap::new(),
        });
        if offset < w.next {
            return; // a redelivery: already in the window
        }
        if offset > w.next {
            // A hole: the window is continuous only from here.
            self.revoke(&[partition]);
            return self.consumed(partition, offset, env, now_ms);
        }
        w.next = offset + 1;
        let Some(env) = env else { return };
        let Some(envelope::Target::Channel(channel)) = &env.target else { return };
        if env.kind != envelope::Kind::Message as i32 {
            return;
        }
        let Some(rule) = self.rules.for_channel(channel) else { return };
        let channel: Arc<str> = match w.channels.get_key_value(channel.as_str()) {
            Some((k, _)) => k.clone(),
            None => channel.as_str().into(),
        };
        let from = w.from;
        let c = w.channels.entry(channel.clone()).or_default();
        if env.idempotent && c.keyed.contains(&env.id) {
            return; // a second copy of a keyed message: the first one stands
        }
        // Nothing before the window's start was ever retained here.
        let ring = c.ring.get_or_insert_with(|| Ring::new(from as u64));
        let seq = offset as u64 + 1;
        let before = ring.len();
        let (added, freed) = ring.push(Entry { seq, at_ms: now_ms, cost: cost(env), value: env.clone() }, rule);
        self.bytes = self.bytes + added - freed;
        self.entries = self.entries + ring.len() - before;
        if added > 0 {
            self.order.push_back((partition, channel, seq));
            if env.idempotent {
                c.keyed.insert(env.id.clone());
                c.keyed_order.push_back((seq, env.id.clone()));
            }
        }
        prune_keyed(c);
        self.enforce_budget();
    }

    /// Evicts the globally oldest entries until the budget holds.
    fn enforce_budget(&mut self) {
        while self.bytes > self.budget {
            let Some((p, ch, seq)) = self.order.pop_front() else { break };
            let Some(c) = self.windows.get_mut(&p).and_then(|w| w.channels.get_mut(&ch)) else { continue };
            let Some(ring) = c.ring.as_mut() else { continue };
            if ring.last(ring.len()).next().is_some_and(|e| e.seq == seq) {
                self.bytes -= ring.pop_oldest().unwrap_or(0);
                self.entries -= 1;
                prune_keyed(c);
            }
        }
        if self.order.len() > 2 * self.len() + 1024 {
            self.compact_order();
        }
    }

    /// Forgets order entries whose message is gone (count, age, revoke).
    fn compact_order(&mut self) {
        let windows = &self.windows;
        self.order.retain(|(p, ch, seq)| {
            windows
                .get(p)
                .and_then(|w| w.channels.get(ch))
                .and_then(|c| c.ring.as_ref())
                .is_some_and(|r| *seq > r.lost_through() && r.last_seq().is_some_and(|l| *seq <= l))
        });
    }

    /// Answers from the window of `partition` when it can do so completely.
    pub fn read(&mut self, partition: i32, channel: &str, query: Query, limit: usize, now_ms: u64) -> Option<Answer> {
        let rule = self.rules.for_channel(channel)?.clone();
        let w = self.windows.get_mut(&partition)?;
        let position = w.next as u64;
        let empty = Answer { messages: Vec::new(), position, more: false };
        let from = w.from as u64;
        let c = w.channels.get_mut(channel);
        match query {
            Query::Since(since) => {
                if since < from || since > position {
                    return None;
                }
                let Some(ring) = c.and_then(|c| c.ring.as_mut()) else { return Some(empty) };
                let before = ring.len();
                self.bytes -= ring.expire(now_ms, rule.max_age);
                self.entries -= before - ring.len();
                let mut messages: Vec<(u64, Msg)> =
                    ring.after(since, limit + 1).ok()?.map(|e| (e.seq, e.value.clone())).collect();
                // A keyed message that may have been stored before: its earlier copy, if
                // any, is not here (it would have kept this one out), so unless the window
                // holds the partition from its start, the log is read (and looked back in).
                let whole = from == 0 && ring.lost_through() == 0;
                if !whole && messages.iter().any(|(_, m)| m.idempotent && m.maybe_stored_before) {
                    return None;
                }
                let more = messages.len() > limit;
                messages.truncate(limit);
                let position = if more { messages.last().map_or(position, |m| m.0) } else { position };
                Some(Answer { messages, position, more })
            }
            Query::Newest => {
                let want = limit.min(rule.max_messages);
                let Some(ring) = c.and_then(|c| c.ring.as_mut()) else {
                    return (from == 0).then_some(empty);
                };
                let before = ring.len();
                self.bytes -= ring.expire(now_ms, rule.max_age);
                self.entries -= before - ring.len();
                // Complete when it holds enough, or holds everything since the partition began.
                if ring.len() < want && !(from == 0 && ring.lost_through() == 0) {
                    return None;
                }
                let messages = ring.last(want).map(|e| (e.seq, e.value.clone())).collect();
                Some(Answer { messages, position, more: false })
            }
        }
    }

    /// The next offset of `partition`'s window (None: not consumed here).
    pub fn next_offset(&self, partition: i32) -> Option<i64> {
        self.windows.get(&partition).map(|w| w.next)
    }
}

fn prune_keyed(c: &mut Chan) {
    let lost = c.ring.as_ref().map_or(0, Ring::lost_through);
    while c.keyed_order.front().is_some_and(|(seq, _)| *seq <= lost) {
        if let Some((_, id)) = c.keyed_order.pop_front() {
            c.keyed.remove(&id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules(s: &str) -> Rules {
        Rules::new(s.split(',').map(|r| r.parse().unwrap()).collect())
    }

    fn msg(channel: &str, id: &str, keyed: bool) -> Msg {
        Arc::new(Envelope {
            id: id.into(),
            target: Some(envelope::Target::Channel(channel.into())),
            from: "u".into(),
            payload: b"{}".to_vec(),
            idempotent: keyed,
            ..Default::default()
        })
    }

    impl HotWindows {
        /// Entries counted by walking every ring (what `len` must equal).
        fn walked(&self) -> usize {
            self.windows.values().flat_map(|w| w.channels.values()).map(|c| c.ring.as_ref().map_or(0, Ring::len)).sum()
        }
    }

    fn seqs(a: &Answer) -> Vec<u64> {
        a.messages.iter().map(|m| m.0).collect()
    }

    #[test]
    fn answers_after_a_position_within_the_continuous_window() {
        let mut h = HotWindows::new(rules("*=100/1h"), 1 << 20);
        // Partition 0 consumed from offset 10: a, b, a, other user message, a.
        let user = Arc::new(Envelope { target: Some(envelope::Target::User("x".into())), ..Default::default() });
        h.consumed(0, 10, Some(&msg("a", "1", false)), 0);
        h.consumed(0, 11, Some(&msg("b", "2", false)), 0);
        h.consumed(0, 12, Some(&msg("a", "3", false)), 0);
        h.consumed(0, 13, Some(&user), 0);
        h.consumed(0, 14, None, 0);
        h.consumed(0, 15, Some(&msg("a", "4", false)), 0);
        let a = h.read(0, "a", Query::Since(10), 10, 0).unwrap();
        assert_eq!((seqs(&a), a.position, a.more), (vec![11, 13, 16], 16, false));
        let a = h.read(0, "a", Query::Since(11), 1, 0).unwrap();
        assert_eq!((seqs(&a), a.position, a.more), (vec![13], 13, true), "paged: position is the last message");
        assert_eq!(seqs(&h.read(0, "a", Query::Since(16), 10, 0).unwrap()), Vec::<u64>::new());
        // Before the window's start (offset 10 = seq 11 is its first): unknown here.
        assert!(h.read(0, "a", Query::Since(9), 10, 0).is_none());
        // Beyond what was consumed: unknown here.
        assert!(h.read(0, "a", Query::Since(17), 10, 0).is_none());
        // A channel without messages in the window: complete and empty.
        assert_eq!(h.read(0, "c", Query::Since(12), 10, 0).unwrap().messages.len(), 0);
        // Not our partition.
        assert!(h.read(1, "a", Query::Since(12), 10, 0).is_none());
        // Newest: the window started at 10, so fewer than asked cannot be known complete.
        assert!(h.read(0, "a", Query::Newest, 10, 0).is_none());
        assert_eq!(seqs(&h.read(0, "a", Query::Newest, 2, 0).unwrap()), [13, 16]);
    }

    #[test]
    fn holes_revokes_and_redeliveries() {
        let mut h = HotWindows::new(rules("*=100/1h"), 1 << 20);
        h.consumed(3, 0, Some(&msg("a", "1", false)), 0);
        h.consumed(3, 1, Some(&msg("a", "2", false)), 0);
        h.consumed(3, 0, Some(&msg("a", "1", false)), 0);
        let a = h.read(3, "a", Query::Newest, 10, 0).unwrap();
        assert_eq!(seqs(&a), [1, 2], "from offset 0 the window is the whole partition; redelivery ignored");
        // A hole (offset 2..4 missing): the window restarts at 5.
        h.consumed(3, 5, Some(&msg("a", "3", false)), 0);
        assert!(h.read(3, "a", Query::Since(2), 10, 0).is_none());
        assert_eq!(seqs(&h.read(3, "a", Query::Since(5), 10, 0).unwrap()), [6]);
        assert_eq!(h.len(), 1);
        h.revoke(&[3]);
        assert!(h.read(3, "a", Query::Since(5), 10, 0).is_none());
        assert_eq!((h.bytes(), h.len(), h.walked()), (0, 0, 0));
    }

    #[test]
    fn a_keyed_message_that_may_be_a_later_copy_is_left_to_the_log() {
        let unsure = |id: &str| Arc::new(Envelope { maybe_stored_before: true, ..(*msg("a", id, true)).clone() });
        // A window that starts mid-partition (offset 10): an earlier copy may lie before it.
        let mut h = HotWindows::new(rules("*=100/1h"), 1 << 20);
        h.consumed(0, 10, Some(&msg("a", "n", false)), 0);
        h.consumed(0, 11, Some(&unsure("k-1")), 0);
        h.consumed(0, 12, Some(&msg("a", "m", false)), 0);
        assert!(h.read(0, "a", Query::Since(10), 10, 0).is_none(), "an answer holding it goes to the log");
        assert!(h.read(0, "a", Query::Since(11), 10, 0).is_none());
        assert_eq!(seqs(&h.read(0, "a", Query::Since(12), 10, 0).unwrap()), [13], "one without it is the window's");
        // A window holding its partition from offset 0 knows there is no earlier copy.
        let mut whole = HotWindows::new(rules("*=100/1h"), 1 << 20);
        whole.consumed(0, 0, Some(&unsure("k-1")), 0);
        assert_eq!(seqs(&whole.read(0, "a", Query::Since(0), 10, 0).unwrap()), [1]);
    }

    #[test]
    fn a_keyed_message_stored_twice_is_kept_once() {
        let mut h = HotWindows::new(rules("*=100/1h"), 1 << 20);
        h.consumed(0, 0, Some(&msg("a", "k-1", true)), 0);
        h.consumed(0, 1, Some(&msg("a", "n", false)), 0);
        h.consumed(0, 2, Some(&msg("a", "k-1", true)), 0);
        let a = h.read(0, "a", Query::Since(0), 10, 0).unwrap();
        assert_eq!(seqs(&a), [1, 2]);
        assert_eq!(a.messages[0].1.id, "k-1");
        assert_eq!(a.position, 3);
    }

    #[test]
    fn rules_and_the_budget_bound_memory_oldest_first() {
        let one = cost(&msg("a", "1", false));
        let mut h = HotWindows::new(rules("off:*=off,*=2/1s"), 3 * one);
        h.consumed(0, 0, Some(&msg("off:x", "0", false)), 0);
        assert!(h.read(0, "off:x", Query::Since(0), 10, 0).is_none(), "no rule: nothing kept");
        h.consumed(0, 1, Some(&msg("a", "1", false)), 0);
        h.consumed(1, 0, Some(&msg("b", "2", false)), 0);
        h.consumed(0, 2, Some(&msg("a", "3", false)), 0);
        h.consumed(0, 3, Some(&msg("a", "4", false)), 0);
        // Count: `a` keeps its last 2; the budget (3 entries) still holds.
        assert_eq!((h.len(), h.walked(), h.bytes()), (3, 3, 3 * one));
        assert!(h.read(0, "a", Query::Since(1), 10, 0).is_none(), "seq 2 was pushed out by the count");
        assert_eq!(seqs(&h.read(0, "a", Query::Since(2), 10, 0).unwrap()), [3, 4]);
        // One more anywhere evicts the globally oldest: `b`'s message on partition 1.
        h.consumed(1, 1, Some(&msg("c", "5", false)), 0);
        assert_eq!((h.len(), h.walked(), h.bytes()), (3, 3, 3 * one));
        assert!(h.read(1, "b", Query::Since(0), 10, 0).is_none());
        assert_eq!(seqs(&h.read(1, "c", Query::Since(1), 10, 0).unwrap()), [2]);
        // Age: after 1 s a read no longer finds them complete.
        assert!(h.read(0, "a", Query::Since(2), 10, 5000).is_none());
        assert_eq!((h.bytes(), h.len(), h.walked()), (one, 1, 1));
        assert!(h.order.len() <= 4);
    }
}
