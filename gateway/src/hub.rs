//! The local fanout hub: who is connected, who is subscribed to what, and the
//! delivery of encoded frames to session queues.
//!
//! Sharded: channels, users and sessions each live in one of [`SHARDS`] maps
//! chosen by hash, so there is no global lock on the message path. A channel's
//! sequence number is assigned and its frame queued to every subscriber while
//! that channel's own lock is held: all subscribers see one order.
//!
//! Standalone sequence numbers come from one node-wide counter, so they exist for
//! every publish (also to a channel nobody follows) and strictly increase within
//! each channel for the life of the process, with no per-channel state to keep
//! for channels without subscribers; they are not contiguous within a channel.
//! They count in the node's epoch, drawn at start.
//!
//! History (standalone): a channel matching a `--history` rule keeps its recent
//! frames in a ring under the same lock, so a read and the live stream cut the
//! channel at one point. Channels with history stay in the map without
//! subscribers until the sweeper finds them empty. A node-wide budget bounds the
//! bytes held; the sweeper evicts the globally oldest entries beyond it.
//!
//! Recovery: a session that subscribes with a position first sits in the
//! channel's `recovering` list, where live frames for it are held back while it
//! is sent what it missed; `finish_recovery` then hands it the held frames newer
//! than what it was sent and makes it a plain subscriber, under the lock.

use std::collections::HashMap;
use std::hash::{BuildHasher, Hash};
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicU64, AtomicUsize, Ordering};

use kit::history::{Entry, Ring, Rules};

use bytes::Bytes;
use parking_lot::{Mutex, RwLock};
use tokio::sync::Notify;

use crate::deflate::Twin;
use crate::outbox::{Outbox, Queued, SendError};

use crate::history::{Item, Lost, Page, Position};
use crate::metrics as m;
use crate::policy::CloseReason;
use crate::{protocol, wire};

/// Number of shards per map.
pub const SHARDS: usize = 64;

/// Control block shared between a session and everyone who may end it.
#[derive(Debug, Default)]
pub struct SessionCtl {
    close: AtomicU8,
    reason: parking_lot::Mutex<Option<Box<str>>>,
    notify: Notify,
    /// permessage-deflate: 0 not negotiated, else the window bits allowed (in the
    /// padding after `close`: the block is no larger for it).
    deflate: u8,
    /// A long-poll: presence knows its user through the node's pollers
    /// (`transport::poll::Pollers`), not through this short session.
    poll: bool,
}

impl SessionCtl {
    /// The control block of a session that negotiated permessage-deflate with this
    /// window (`0`: it did not).
    pub fn with_deflate(deflate: u8) -> Self {
        Self { deflate, ..Self::default() }
    }

    /// permessage-deflate: 0 not negotiated, else the server window bits allowed.
    pub fn deflate(&self) -> u8 {
        self.deflate
    }

    /// The control block of one long-poll.
    pub fn for_poll() -> Self {
        Self { poll: true, ..Self::default() }
    }

    /// Does presence hear of this session's subscriptions (every session but a poll)?
    pub fn in_presence(&self) -> bool {
        !self.poll
    }

    /// Asks the session to close; the first reason wins.
    pub fn close(&self, reason: CloseReason, text: Option<&str>) {
        if self.close.compare_exchange(0, reason.to_u8(), Ordering::AcqRel, Ordering::Acquire).is_ok() {
            if let Some(t) = text {
                *self.reason.lock() = Some(t.into());
            }
            // Every waiter (the egress loop and a write in progress both wait).
            self.notify.notify_waiters();
        }
    }

    /// The close requested so far, if any.
    pub fn requested(&self) -> Option<(CloseReason, Option<Box<str>>)> {
        CloseReason::from_u8(self.close.load(Ordering::Acquire)).map(|r| (r, self.reason.lock().clone()))
    }

    /// Waits until a close is requested.
    pub async fn wait(&self) {
        loop {
            let notified = self.notify.notified();
            if self.requested().is_some() {
                return;
            }
            notified.await;
        }
    }
}

/// What the hub holds of a session: where to send frames, how to close it.
#[derive(Debug, Clone)]
pub struct SessionHandle {
    pub id: u64,
    pub user: Arc<str>,
    /// Unix milliseconds.
    pub connected_at_ms: u64,
    /// The client's User-Agent (truncated), shared with presence.
    pub client_info: Arc<str>,
    pub outbox: Outbox,
    pub ctl: Arc<SessionCtl>,
}

impl SessionHandle {
    /// Queues a frame; a slow consumer's queue refuses it and the session is
    /// closed (4002). Returns whether the frame was queued.
    pub fn deliver(&self, frame: &Bytes) -> bool {
        self.offer(frame).is_some()
    }

    /// Queues a frame like [`Self::deliver`], and adds this session to `congested` when
    /// its queue is now congested, for a sender that paces itself (see `outbox.rs`).
    pub fn deliver_paced(&self, frame: &Bytes, congested: &mut Vec<SessionHandle>) -> bool {
        match self.offer(frame) {
            Some(Queued::Congested) => {
                congested.push(self.clone());
                true
            }
            Some(Queued::Clear) => true,
            None => false,
        }
    }

    fn offer(&self, frame: &Bytes) -> Option<Queued> {
        match self.outbox.try_send(frame.clone()) {
            Ok(q) => Some(q),
            Err(SendError::Full) => {
                self.slow();
                None
            }
            Err(SendError::Closed) => None,
        }
    }

    /// Closes the session as a slow consumer (4002).
    pub fn slow(&self) {
        if self.ctl.requested().is_none() {
            metrics::counter!(m::QUEUE_FULL).increment(1);
        }
        self.ctl.close(CloseReason::SlowConsumer, None);
    }
}

#[derive(Debug, Default)]
struct ChannelState {
    seq: u64,
    /// Cluster: the epoch `seq` counts in (a delivery in another epoch starts over).
    epoch: Option<Arc<str>>,
    subs: HashMap<u64, SessionHandle>,
    /// user → number of their sessions subscribed (recovering ones included).
    users: HashMap<Arc<str>, u32>,
    /// Standalone history.
    history: Option<Box<Ring<Bytes>>>,
    /// Sessions being recovered: live frames for them wait here.
    recovering: Vec<Recovery>,
    /// Cluster: subscribers that were sent history beyond what was delivered live
    /// here yet (the log is read ahead of the delivery stream): live frames up to
    /// their floor are not sent to them again. Emptied as the live stream passes.
    floors: Vec<(u64, u64)>,
    /// Cluster: the live position (seq, epoch) this channel had here when its last
    /// subscriber left, less than [`LEFT_KEPT`] before this entry was made: a subscribe
    /// starts after it. Only positions use it: it proves no route (that is `seq`).
    left: Option<(u64, Arc<str>)>,
}

impl ChannelState {
    /// Queues `frame` (at `seq`) to every subscriber and holds it for every recovering session.
    fn fan_out(&mut self, seq: u64, frame: &Bytes, congested: Option<&mut Vec<SessionHandle>>) -> u64 {
        let mut delivered = 0;
        let floors = &self.floors;
        let fresh = |sub: &SessionHandle| floors.iter().all(|&(id, floor)| id != sub.id || seq > floor);
        let twin = Twin::new(frame);
        match congested {
            Some(c) => {
                for sub in self.subs.values().filter(|s| fresh(s)) {
                    delivered += u64::from(sub.deliver_paced(twin.pick(sub.ctl.deflate), c));
                }
            }
            None => {
                for sub in self.subs.values().filter(|s| fresh(s)) {
                    delivered += u64::from(sub.deliver(twin.pick(sub.ctl.deflate)));
                }
            }
        }
        if !self.floors.is_empty() {
            self.floors.retain(|&(_, floor)| floor > seq);
        }
        for r in &mut self.recovering {
            r.hold(seq, frame);
        }
        delivered
    }

    /// Cluster: `id` was sent the log of `epoch` through `sent_through`; live frames up
    /// to there are not sent to it again. The floor names the stream it counts in: on
    /// a channel that has had no live frame here yet, that stream becomes the
    /// channel's, so that its first live frames (behind the history read) are
    /// recognised as already sent rather than taken for a new stream.
    fn raise_floor(&mut self, id: u64, sent_through: u64, epoch: Option<&str>) {
        let Some(epoch) = epoch else { return };
        if sent_through <= self.seq {
            return;
        }
        match self.epoch.as_deref() {
            None => self.epoch = Some(Arc::from(epoch)),
            Some(e) if e != epoch => return,
            Some(_) => {}
        }
        self.floors.push((id, sent_through));
    }

    fn idle(&self) -> bool {
        self.subs.is_empty() && self.recovering.is_empty() && self.history.as_ref().is_none_or(|h| h.is_empty())
    }
}

/// Most live frames held back for one recovering session; beyond it they are
/// dropped and read again from history (`Finish::More`).
pub const RECOVERY_HOLD: usize = 1024;

#[derive(Debug)]
struct Recovery {
    handle: SessionHandle,
    held: Vec<(u64, Bytes)>,
    /// Presence events for it (queued at the hand-over, after what it recovered).
    events: Vec<Bytes>,
    /// Most frames held (half the send queue, so that the hand-over fits in the queue).
    cap: usize,
    /// The channel's epoch changed while it recovered: every held frame is new.
    epoch_reset: bool,
    /// Frames were dropped from `held`: what follows the last sent must be read again.
    overflowed: bool,
    notify: Arc<Notify>,
}

impl Recovery {
    fn hold(&mut self, seq: u64, frame: &Bytes) {
        if self.held.len() >= self.cap {
            self.held = Vec::new();
            self.overflowed = true;
        } else if !self.overflowed {
            self.held.push((seq, frame.clone()));
        }
        self.notify.notify_one();
    }

    fn event(&mut self, frame: &Bytes) {
        // Presence events are not positioned: beyond this many, later ones are dropped
        // (the next `presence` query or count frame tells the state).
        if self.events.len() < self.cap / 4 + 1 {
            self.events.push(frame.clone());
        }
    }

    /// Queues the held events and the held frames newer than `sent_through` (all of
    /// them after an epoch change).
    fn release(self, sent_through: u64) -> SessionHandle {
        let floor = if self.epoch_reset { 0 } else { sent_through };
        for frame in &self.events {
            self.handle.deliver(frame);
        }
        for (seq, frame) in &self.held {
            if *seq > floor {
                self.handle.deliver(frame);
            }
        }
        self.handle
    }
}

/// What `finish_recovery` decided.
#[derive(Debug)]
pub enum Finish {
    /// The session is a plain subscriber now.
    Done,
    /// Messages after this seq may be missing from what was sent: read them first.
    More { since: u64 },
    /// The channel's epoch changed during the recovery: what was read counts in the
    /// old stream. Report a gap and hand over (`abandon_recovery` sends every frame held
    /// since the change).
    EpochChanged,
    /// Nothing was held yet and the cluster's route to this node is not proven:
    /// wait for the first live frame (or a bounded time) and finish again.
    Wait(Arc<Notify>),
}

#[derive(Debug, Default)]
struct Channel {
    state: Mutex<ChannelState>,
}

type Sharded<K, V> = Box<[RwLock<HashMap<K, V>>]>;

/// Result of a publish.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Published {
    pub seq: u64,
    pub delivered: u64,
}

/// The sharded registry of sessions, users and channels.
#[derive(Debug)]
pub struct Hub {
    hasher: std::hash::RandomState,
    channels: Sharded<Arc<str>, Arc<Channel>>,
    users: Sharded<Arc<str>, Vec<SessionHandle>>,
    sessions: Sharded<u64, SessionHandle>,
    presence_patterns: Vec<String>,
    large_room: usize,
    /// Large presence channels whose member count changed since the last flush.
    dirty_counts: Mutex<std::collections::HashSet<Arc<str>>>,
    /// Presence connections that are not sessions here (long-polling users: see
    /// `transport::poll::Pollers`), in every presence snapshot.
    extra: Mutex<HashMap<u64, ConnRecord>>,
    /// Long-polls in flight: not sessions (presence knows their users through the
    /// node's pollers), but ended with the sessions when those are told to resync.
    polls: Mutex<HashMap<u64, Arc<SessionCtl>>>,
    /// The last sequence number given to a standalone publish (node-wide).
    last_seq: AtomicU64,
    /// This process's epoch (standalone positions).
    epoch: Arc<str>,
    /// Standalone history rules (empty in a cluster, where broker-bridge keeps history).
    rules: Rules,
    /// Bytes the rings hold, and the most they may hold.
    history_bytes: AtomicUsize,
    history_budget: usize,
    /// The highest seq a forgotten (swept) channel had lost: a new ring cannot vouch
    /// for anything up to it.
    forgotten_through: AtomicU64,
    /// Positions are this node's (standalone), not the cluster log's.
    standalone: bool,
    /// Most live frames held for one recovering session.
    recovery_hold: usize,
    /// Cluster: the last live position of channels whose last subscriber left recently
    /// (kept [`LEFT_KEPT`]), so that one subscribing again soon starts after what was
    /// shown here rather than at the bridge's older watermark.
    left: Mutex<HashMap<Arc<str>, Left>>,
}

/// A channel's last live position (seq, epoch) and when its last subscriber left.
type Left = (u64, Arc<str>, std::time::Instant);

/// How long a channel's last live position is kept after its last subscriber left.
pub const LEFT_KEPT: std::time::Duration = std::time::Duration::from_secs(2);
/// Most channels remembered that way (older ones are forgotten first when over).
const LEFT_MAX: usize = 65_536;

/// One connection as presence sees it (for snapshots).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnRecord {
    pub conn_id: u64,
    pub user: Arc<str>,
    pub connected_at_ms: u64,
    pub client_info: Arc<str>,
    pub channels: Vec<Arc<str>>,
}

fn sharded<K, V>() -> Sharded<K, V> {
    (0..SHARDS).map(|_| RwLock::new(HashMap::new())).collect()
}

impl Hub {
    /// A hub whose channels matching `presence_patterns` emit join/leave events
    /// (counts instead, once they have more than `large_room` members). An empty
    /// list turns local presence events off (presence is then remote).
    pub fn new(presence_patterns: Vec<String>, large_room: usize) -> Self {
        Self {
            hasher: std::hash::RandomState::new(),
            channels: sharded(),
            users: sharded(),
            sessions: sharded(),
            presence_patterns,
            large_room,
            dirty_counts: Mutex::new(std::collections::HashSet::new()),
            extra: Mutex::new(HashMap::new()),
            polls: Mutex::new(HashMap::new()),
            last_seq: AtomicU64::new(0),
            epoch: new_epoch(),
            rules: Rules::default(),
            history_bytes: AtomicUsize::new(0),
            history_budget: 0,
            forgotten_through: AtomicU64::new(0),
            standalone: false,
            recovery_hold: RECOVERY_HOLD,
            left: Mutex::new(HashMap::new()),
        }
    }

    /// Holds at most `n` live frames per recovering session (half its send queue).
    pub fn with_recovery_hold(mut self, n: usize) -> Self {
        self.recovery_hold = n.max(1);
        self
    }

    /// Standalone: positions are this node's; history kept by `rules` within `budget`
    /// bytes node-wide (0: none).
    pub fn with_history(mut self, rules: Rules, budget: usize) -> Self {
        self.standalone = true;
        self.rules = if budget > 0 { rules } else { Rules::default() };
        self.history_budget = budget;
        metrics::gauge!(m::HISTORY_BUDGET).set(budget as f64);
        self
    }

    /// This node's epoch (standalone).
    pub fn epoch(&self) -> &Arc<str> {
        &self.epoch
    }

    fn shard<K: Hash + ?Sized>(&self, key: &K) -> usize {
        (self.hasher.hash_one(key) as usize) % SHARDS
    }

    fn is_presence_channel(&self, channel: &str) -> bool {
        self.presence_patterns.iter().any(|p| crate::auth::glob_match(p, channel))
    }

    /// Adds a new session.
    pub fn register(&self, handle: SessionHandle) {
        self.users[self.shard(&*handle.user)].write().entry(handle.user.clone()).or_default().push(handle.clone());
        self.sessions[self.shard(&handle.id)].write().insert(handle.id, handle);
    }

    /// Removes a session and every subscription it held.
    pub fn unregister(&self, id: u64, user: &Arc<str>, channels: impl IntoIterator<Item = Arc<str>>) {
        for channel in channels {
            self.unsubscribe(id, user, &channel);
        }
        let mut users = self.users[self.shard(&**user)].write();
        if let Some(list) = users.get_mut(user) {
            list.retain(|h| h.id != id);
            if list.is_empty() {
                users.remove(user);
            }
        }
        drop(users);
        self.sessions[self.shard(&id)].write().remove(&id);
        self.polls.lock().remove(&id);
    }

    /// A long-poll begins (ended by [`Self::unregister`]).
    pub fn register_poll(&self, id: u64, ctl: Arc<SessionCtl>) {
        self.polls.lock().insert(id, ctl);
    }

    /// Asks every session and long-poll to reconnect and recover: 1001 `resync
    /// retry_ms=…`, spread over 250–2000 ms (after a stall, or when this node's route
    /// in the cluster may have lapsed: what they were shown since may miss messages).
    /// Returns how many were asked.
    pub fn resync_all(&self) -> usize {
        let polls: Vec<Arc<SessionCtl>> = self.polls.lock().values().cloned().collect();
        let ctls = self.sessions().into_iter().map(|s| s.ctl).chain(polls);
        let mut n = 0;
        for ctl in ctls {
            let reason = format!("resync retry_ms={}", rand::random_range(250..2000u32));
            ctl.close(CloseReason::Stalled, Some(&reason));
            n += 1;
        }
        n
    }

    /// Subscribes a session; returns false if it already was.
    pub fn subscribe(&self, handle: &SessionHandle, channel: &Arc<str>) -> bool {
        self.join(handle, channel, false).is_some()
    }

    /// Subscribes a session in recovery: live frames for it are held until
    /// [`Self::finish_recovery`]. Returns the channel's position at this moment
    /// (standalone: the node's last seq; cluster: the last seq delivered here, in
    /// its epoch), or `None` if the session already was subscribed.
    pub fn subscribe_recovering(&self, handle: &SessionHandle, channel: &Arc<str>) -> Option<Position> {
        self.join(handle, channel, true)
    }

    /// A new channel entry; in a cluster, at the live position it had when its last
    /// subscriber left, if that was less than [`LEFT_KEPT`] ago.
    fn entry_after_leaving(&self, channel: &str) -> Arc<Channel> {
        let ch = Arc::new(Channel::default());
        if let Some((seq, epoch, at)) = self.left.lock().remove(channel)
            && at.elapsed() < LEFT_KEPT
        {
            ch.state.lock().left = Some((seq, epoch));
        }
        ch
    }

    fn remember_left(&self, channel: &str, seq: u64, epoch: Arc<str>) {
        let mut left = self.left.lock();
        if left.len() >= LEFT_MAX {
            left.retain(|_, (_, _, at)| at.elapsed() < LEFT_KEPT);
            if left.len() >= LEFT_MAX {
                left.clear();
            }
        }
        left.insert(Arc::from(channel), (seq, epoch, std::time::Instant::now()));
    }

    fn join(&self, handle: &SessionHandle, channel: &Arc<str>, recovering: bool) -> Option<Position> {
        let mut shard = self.channels[self.shard(&**channel)].write();
        let ch = shard.entry(channel.clone()).or_insert_with(|| self.entry_after_leaving(channel)).clone();
        let mut st = ch.state.lock();
        drop(shard);
        if st.subs.contains_key(&handle.id) || st.recovering.iter().any(|r| r.handle.id == handle.id) {
            return None;
        }
        let position = if self.standalone {
            Position { seq: self.last_seq.load(Ordering::Relaxed), epoch: self.epoch.clone() }
        } else {
            match (&st.epoch, &st.left) {
                (None, Some((seq, epoch))) => Position { seq: *seq, epoch: epoch.clone() },
                _ => Position { seq: st.seq, epoch: st.epoch.clone().unwrap_or_else(|| Arc::from("")) },
            }
        };
        if recovering {
            st.recovering.push(Recovery {
                handle: handle.clone(),
                held: Vec::new(),
                events: Vec::new(),
                cap: self.recovery_hold,
                epoch_reset: false,
                overflowed: false,
                notify: Arc::new(Notify::new()),
            });
        } else {
            st.subs.insert(handle.id, handle.clone());
        }
        let count = st.users.entry(handle.user.clone()).or_insert(0);
        *count += 1;
        if *count == 1 && self.is_presence_channel(channel) {
            if st.users.len() > self.large_room {
                self.dirty_counts.lock().insert(channel.clone());
            } else {
                let frame = wire::text(&protocol::membership(true, channel, &handle.user));
                for sub in st.subs.values() {
                    sub.deliver(&frame);
                }
                for r in &mut st.recovering {
                    r.event(&frame);
                }
            }
        }
        Some(position)
    }

    /// Standalone: whether this hub keeps history itself.
    fn rules_active(&self) -> bool {
        self.history_budget > 0
    }

    /// Ends a session's recovery: when nothing can be missing between what it was
    /// sent (complete through `sent_through`) and the frames held for it, queues the
    /// held frames newer than `sent_through` and makes it a plain subscriber. `gapless`: the held frames
    /// follow the history read with nothing in between (standalone). `settled`: stop
    /// waiting for proof that the cluster routes this channel here.
    pub fn finish_recovery(
        &self,
        id: u64,
        channel: &str,
        sent: (u64, Option<&str>),
        gapless: bool,
        settled: bool,
    ) -> Finish {
        let (sent_through, epoch) = sent;
        let ch = self.channels[self.shard(channel)].read().get(channel).cloned();
        let Some(ch) = ch else { return Finish::Done };
        let mut st = ch.state.lock();
        let Some(i) = st.recovering.iter().position(|r| r.handle.id == id) else {
            return Finish::Done;
        };
        let route_unproven = st.seq == 0;
        let live_ahead = st.seq > sent_through && st.epoch.as_deref() == epoch;
        let r = &mut st.recovering[i];
        if r.epoch_reset {
            return Finish::EpochChanged;
        }
        if r.overflowed {
            r.overflowed = false;
            return Finish::More { since: sent_through };
        }
        if !gapless {
            match r.held.first() {
                // In a cluster a seq is a partition offset + 1: a held frame right after
                // the read proves nothing is missing; otherwise read the span between.
                // Also from 0: an empty partition's position is 0, and what was published
                // on it before the route reached this node is read, not skipped.
                Some(&(first, _)) if first > sent_through + 1 => {
                    return Finish::More { since: sent_through };
                }
                // Nothing held, but frames after what was read already went out here live
                // before the session was registered (the read's position lagged this
                // node's live stream): they would be skipped; read the span.
                None if !route_unproven && live_ahead => {
                    return Finish::More { since: sent_through };
                }
                None if !settled && route_unproven => return Finish::Wait(r.notify.clone()),
                _ => {}
            }
        }
        let handle = st.recovering.swap_remove(i).release(sent_through);
        if !gapless {
            st.raise_floor(handle.id, sent_through, epoch);
        }
        st.subs.insert(handle.id, handle);
        Finish::Done
    }

    /// Ends a recovery whatever was held: queues every held frame newer than
    /// `sent_through` (after a `gap` was reported, or when nothing more can be read).
    pub fn abandon_recovery(&self, id: u64, channel: &str, sent: (u64, Option<&str>)) {
        let (sent_through, epoch) = sent;
        let ch = self.channels[self.shard(channel)].read().get(channel).cloned();
        let Some(ch) = ch else { return };
        let mut st = ch.state.lock();
        let Some(i) = st.recovering.iter().position(|r| r.handle.id == id) else { return };
        let reset = st.recovering[i].epoch_reset;
        let handle = st.recovering.swap_remove(i).release(sent_through);
        if !self.standalone && !reset {
            st.raise_floor(handle.id, sent_through, epoch);
        }
        st.subs.insert(handle.id, handle);
    }

    /// Unsubscribes a session; returns false if it was not subscribed.
    pub fn unsubscribe(&self, id: u64, user: &Arc<str>, channel: &str) -> bool {
        let mut shard = self.channels[self.shard(channel)].write();
        let Some(ch) = shard.get(channel).cloned() else {
            return false;
        };
        let mut st = ch.state.lock();
        st.floors.retain(|&(sid, _)| sid != id);
        let recovering = st.recovering.iter().position(|r| r.handle.id == id);
        if let Some(i) = recovering {
            st.recovering.swap_remove(i);
        } else if st.subs.remove(&id).is_none() {
            return false;
        }
        if st.idle() {
            self.forget(&st);
            shard.remove(channel);
            let last = match (&st.epoch, &st.left) {
                (Some(epoch), _) => Some((st.seq, epoch.clone())),
                (None, left) => left.clone(),
            };
            if let (false, Some((seq, epoch))) = (self.standalone, last) {
                self.remember_left(channel, seq, epoch);
            }
        }
        drop(shard);
        let large = st.users.len() > self.large_room;
        let left = match st.users.get_mut(user) {
            Some(n) if *n > 1 => {
                *n -= 1;
                false
            }
            Some(_) => {
                st.users.remove(user);
                true
            }
            None => false,
        };
        if left && large && self.is_presence_channel(channel) {
            self.dirty_counts.lock().insert(Arc::from(channel));
        } else if left && !(st.subs.is_empty() && st.recovering.is_empty()) && self.is_presence_channel(channel) {
            let frame = wire::text(&protocol::membership(false, channel, user));
            for sub in st.subs.values() {
                sub.deliver(&frame);
            }
            for r in &mut st.recovering {
                r.event(&frame);
            }
        }
        true
    }

    /// Publishes to a channel: assigns the next sequence number, encodes the
    /// frame once and queues it to every subscriber, in one critical section.
    pub fn publish(&self, channel: &str, id: &str, from: &str, data: &str) -> Published {
        let rule = self.rules.for_channel(channel);
        let shard = &self.channels[self.shard(channel)];
        // The channel's lock is taken before the shard's is released, so that the entry
        // cannot be dropped (by an unsubscribe or the sweeper) between the two.
        let read = shard.read();
        if let Some(ch) = read.get(channel).cloned() {
            let st = ch.state.lock();
            drop(read);
            return self.publish_locked(channel, id, from, data, rule, st);
        }
        drop(read);
        if rule.is_none() {
            return Published { seq: self.last_seq.fetch_add(1, Ordering::Relaxed) + 1, delivered: 0 };
        }
        let mut write = shard.write();
        let ch = write.entry(Arc::from(channel)).or_default().clone();
        let st = ch.state.lock();
        drop(write);
        self.publish_locked(channel, id, from, data, rule, st)
    }

    fn publish_locked(
        &self,
        channel: &str,
        id: &str,
        from: &str,
        data: &str,
        rule: Option<&kit::history::Rule>,
        mut st: parking_lot::MutexGuard<'_, ChannelState>,
    ) -> Published {
        // Taken under the channel's lock: the channel's order is its seq order.
        let seq = self.last_seq.fetch_add(1, Ordering::Relaxed) + 1;
        st.seq = seq;
        let frame = wire::text(&protocol::message(channel, id, from, seq, &self.epoch, data));
        if let Some(rule) = rule {
            let forgotten = self.forgotten_through.load(Ordering::Relaxed);
            let ring = st.history.get_or_insert_with(|| Box::new(Ring::new(forgotten)));
            let cost = frame.len() + ENTRY_OVERHEAD;
            let (added, freed) = ring.push(Entry { seq, at_ms: now_ms(), cost, value: frame.clone() }, rule);
            self.account(added, freed);
            if freed > 0 {
                metrics::counter!(m::HISTORY_EVICTIONS, "reason" => "count_or_age").increment(1);
            }
        }
        let delivered = st.fan_out(seq, &frame, None);
        drop(st);
        metrics::counter!(m::MESSAGES_OUT, "kind" => "message").increment(delivered);
        Published { seq, delivered }
    }

    /// A channel entry is dropped: a ring made for it later cannot vouch for what this one lost.
    fn forget(&self, st: &ChannelState) {
        if let Some(ring) = st.history.as_ref() {
            self.forgotten_through.fetch_max(ring.lost_through(), Ordering::Relaxed);
        }
    }

    fn account(&self, added: usize, freed: usize) {
        if added >= freed {
            self.history_bytes.fetch_add(added - freed, Ordering::Relaxed);
        } else {
            self.history_bytes.fetch_sub(freed - added, Ordering::Relaxed);
        }
    }

    /// Bytes the standalone history holds.
    pub fn history_bytes(&self) -> usize {
        self.history_bytes.load(Ordering::Relaxed)
    }

    /// Standalone history: the messages after `since` (or the newest `limit`), at
    /// most `limit`, or only the position.
    pub fn history(&self, channel: &str, since: Option<&Position>, limit: usize, position_only: bool) -> Page {
        let now = Position { seq: self.last_seq.load(Ordering::Relaxed), epoch: self.epoch.clone() };
        if let Some(s) = since {
            if s.epoch != self.epoch {
                return Page::lost(Lost::EpochChanged, Some(now));
            }
            if s.seq > now.seq {
                return Page::lost(Lost::Ahead, Some(now));
            }
        }
        if position_only {
            return Page { items: Vec::new(), position: Some(now), more: false, lost: None };
        }
        let Some(rule) = self.rules.for_channel(channel) else {
            return Page::lost(Lost::NoHistory, Some(now));
        };
        let ch = self.channels[self.shard(channel)].read().get(channel).cloned();
        let Some(ch) = ch else {
            // Nothing retained: complete if nothing after `since` can have been forgotten.
            let forgotten = self.forgotten_through.load(Ordering::Relaxed);
            if since.is_some_and(|s| s.seq < forgotten) {
                return Page::lost(Lost::TooOld, Some(now));
            }
            return Page { items: Vec::new(), position: Some(now), more: false, lost: None };
        };
        let mut st = ch.state.lock();
        // The position is read under the channel's lock: nothing newer is in the ring.
        let now = Position { seq: self.last_seq.load(Ordering::Relaxed), epoch: self.epoch.clone() };
        let forgotten = self.forgotten_through.load(Ordering::Relaxed);
        let ring = st.history.get_or_insert_with(|| Box::new(Ring::new(forgotten)));
        let freed = ring.expire(now_ms(), rule.max_age);
        self.account(0, freed);
        let item = |e: &Entry<Bytes>| Item { seq: e.seq, frame: e.value.clone(), meta: None };
        let items: Vec<Item> = match since {
            Some(s) => match ring.after(s.seq, limit + 1) {
                Ok(it) => it.map(item).collect(),
                Err(kit::history::Lost::TooOld) => return Page::lost(Lost::TooOld, Some(now)),
            },
            None => ring.last(limit).map(item).collect(),
        };
        let mut items = items;
        let more = items.len() > limit;
        items.truncate(limit);
        let position = match (more, items.last()) {
            (true, Some(last)) => Position { seq: last.seq, epoch: self.epoch.clone() },
            _ => now,
        };
        Page { items, position: Some(position), more, lost: None }
    }

    /// Expires history past its age, keeps the rings within the budget (evicting
    /// the globally oldest entries) and forgets idle channels. Run periodically.
    pub fn sweep_history(&self) {
        if !self.rules_active() {
            return;
        }
        let now = now_ms();
        let mut fronts = Vec::new();
        for shard in self.channels.iter() {
            let mut map = shard.write();
            map.retain(|name, ch| {
                let mut st = ch.state.lock();
                if let (Some(ring), Some(rule)) = (st.history.as_mut(), self.rules.for_channel(name)) {
                    let freed = ring.expire(now, rule.max_age);
                    if freed > 0 {
                        self.account(0, freed);
                        metrics::counter!(m::HISTORY_EVICTIONS, "reason" => "count_or_age").increment(1);
                    }
                }
                if st.idle() {
                    self.forget(&st);
                    return false;
                }
                // Standalone seqs come from one node-wide counter: the oldest seq is the oldest entry.
                if let Some(first) = st.history.as_ref().and_then(|r| r.first_seq()) {
                    fronts.push((first, ch.clone()));
                }
                true
            });
        }
        let target = self.history_budget - self.history_budget / 10;
        if self.history_bytes() > self.history_budget {
            // Oldest first, one entry at a time, until under 90 % of the budget.
            let channels: Vec<Arc<Channel>> = fronts.iter().map(|(_, ch)| ch.clone()).collect();
            let mut heap: std::collections::BinaryHeap<_> =
                fronts.into_iter().enumerate().map(|(i, (at, _))| std::cmp::Reverse((at, i))).collect();
            while self.history_bytes() > target {
                let Some(std::cmp::Reverse((_, i))) = heap.pop() else { break };
                let mut st = channels[i].state.lock();
                let Some(ring) = st.history.as_mut() else { continue };
                if let Some(freed) = ring.pop_oldest() {
                    self.account(0, freed);
                    metrics::counter!(m::HISTORY_EVICTIONS, "reason" => "memory").increment(1);
                }
                if let Some(first) = ring.first_seq() {
                    drop(st);
                    heap.push(std::cmp::Reverse((first, i)));
                }
            }
        }
        metrics::gauge!(m::HISTORY_BYTES).set(self.history_bytes() as f64);
    }

    /// Delivers a channel message whose sequence number was assigned upstream
    /// (cluster mode: Kafka offset + 1). A sequence not above the channel's last
    /// one is a duplicate or a late redelivery and is dropped: `None`. Sessions
    /// whose queue is congested afterwards are added to `congested`.
    #[allow(clippy::too_many_arguments)]
    pub fn publish_at(
        &self,
        channel: &str,
        id: &str,
        from: &str,
        seq: u64,
        epoch: &str,
        data: &str,
        congested: &mut Vec<SessionHandle>,
    ) -> Option<u64> {
        let ch = self.channels[self.shard(channel)].read().get(channel).cloned();
        let Some(ch) = ch else { return Some(0) };
        let mut st = ch.state.lock();
        if st.epoch.as_deref() != Some(epoch) {
            // A new stream (the log was re-created or re-partitioned): its seqs start over.
            let changed = st.epoch.is_some();
            st.epoch = Some(Arc::from(epoch));
            st.seq = 0;
            st.floors.clear();
            // What recovering sessions were read so far counts in the old epoch.
            for r in st.recovering.iter_mut().filter(|_| changed) {
                r.held.clear();
                r.overflowed = false;
                r.epoch_reset = true;
            }
        }
        if seq <= st.seq {
            return None;
        }
        st.seq = seq;
        let frame = wire::text(&protocol::message(channel, id, from, seq, epoch, data));
        let delivered = st.fan_out(seq, &frame, Some(congested));
        drop(st);
        metrics::counter!(m::MESSAGES_OUT, "kind" => "message").increment(delivered);
        Some(delivered)
    }

    /// Queues a frame (no sequence number: presence events) to every local
    /// subscriber of `channel`; returns how many took it.
    pub fn deliver_to_channel(&self, channel: &str, frame: &Bytes) -> u64 {
        let ch = self.channels[self.shard(channel)].read().get(channel).cloned();
        ch.map_or(0, |c| {
            let mut st = c.state.lock();
            for r in &mut st.recovering {
                r.event(frame);
            }
            st.subs.values().map(|s| u64::from(s.deliver(frame))).sum()
        })
    }

    /// Whether any local session is subscribed to `channel`.
    pub fn has_subscribers(&self, channel: &str) -> bool {
        let ch = self.channels[self.shard(channel)].read().get(channel).cloned();
        ch.is_some_and(|c| {
            let st = c.state.lock();
            !st.subs.is_empty() || !st.recovering.is_empty()
        })
    }

    /// Sends `presence_count` frames for large rooms whose membership changed.
    pub fn flush_counts(&self) {
        let dirty = std::mem::take(&mut *self.dirty_counts.lock());
        for channel in dirty {
            let ch = self.channels[self.shard(&*channel)].read().get(&*channel).cloned();
            if let Some(ch) = ch {
                let st = ch.state.lock();
                let frame = wire::text(&protocol::member_count(&channel, st.users.len() as u64));
                for sub in st.subs.values() {
                    sub.deliver(&frame);
                }
            }
        }
    }

    /// Every local connection with its channels, for a presence snapshot.
    pub fn presence_snapshot(&self) -> Vec<ConnRecord> {
        let mut by_id: HashMap<u64, ConnRecord> = HashMap::new();
        for shard in self.sessions.iter() {
            for h in shard.read().values() {
                by_id.insert(
                    h.id,
                    ConnRecord {
                        conn_id: h.id,
                        user: h.user.clone(),
                        connected_at_ms: h.connected_at_ms,
                        client_info: h.client_info.clone(),
                        channels: Vec::new(),
                    },
                );
            }
        }
        for shard in self.channels.iter() {
            let channels: Vec<(Arc<str>, Arc<Channel>)> =
                shard.read().iter().map(|(k, v)| (k.clone(), v.clone())).collect();
            for (name, ch) in channels {
                let st = ch.state.lock();
                for id in st.subs.keys().chain(st.recovering.iter().map(|r| &r.handle.id)) {
                    if let Some(rec) = by_id.get_mut(id) {
                        rec.channels.push(name.clone());
                    }
                }
            }
        }
        by_id.extend(self.extra.lock().iter().map(|(id, r)| (*id, r.clone())));
        by_id.into_values().collect()
    }

    /// A presence connection that is not a session here, as the next snapshot gives it
    /// (`None`: gone).
    pub fn set_extra_presence(&self, conn_id: u64, record: Option<ConnRecord>) {
        let mut extra = self.extra.lock();
        match record {
            Some(r) => extra.insert(conn_id, r),
            None => extra.remove(&conn_id),
        };
    }

    /// Queues a frame to every session of `user`; returns how many took it. Sessions
    /// whose queue is congested afterwards are added to `congested`.
    pub fn send_to_user(&self, user: &str, frame: &Bytes, congested: &mut Vec<SessionHandle>) -> u64 {
        let twin = Twin::new(frame);
        let users = self.users[self.shard(user)].read();
        let delivered = users.get(user).map_or(0, |list| {
            list.iter().map(|h| u64::from(h.deliver_paced(twin.pick(h.ctl.deflate), congested))).sum()
        });
        drop(users);
        metrics::counter!(m::MESSAGES_OUT, "kind" => "direct").increment(delivered);
        delivered
    }

    /// Queues a frame to every session. Sessions whose queue is congested
    /// afterwards are added to `congested`.
    pub fn broadcast(&self, frame: &Bytes, congested: &mut Vec<SessionHandle>) -> u64 {
        let mut delivered = 0;
        let twin = Twin::new(frame);
        for shard in self.sessions.iter() {
            delivered += shard
                .read()
                .values()
                .map(|h| u64::from(h.deliver_paced(twin.pick(h.ctl.deflate), congested)))
                .sum::<u64>();
        }
        metrics::counter!(m::MESSAGES_OUT, "kind" => "broadcast").increment(delivered);
        delivered
    }

    /// Closes every session of `user` with 4004; returns how many.
    pub fn disconnect_user(&self, user: &str, reason: &str) -> u64 {
        let users = self.users[self.shard(user)].read();
        let list = users.get(user).cloned().unwrap_or_default();
        drop(users);
        for h in &list {
            h.ctl.close(CloseReason::Kicked, Some(reason));
        }
        list.len() as u64
    }

    /// Number of live sessions of `user`.
    pub fn user_connections(&self, user: &str) -> u32 {
        self.users[self.shard(user)].read().get(user).map_or(0, |l| l.len() as u32)
    }

    /// The users subscribed to `channel`, sorted.
    pub fn channel_users(&self, channel: &str) -> Vec<Arc<str>> {
        let ch = self.channels[self.shard(channel)].read().get(channel).cloned();
        let mut users: Vec<Arc<str>> = ch.map(|c| c.state.lock().users.keys().cloned().collect()).unwrap_or_default();
        users.sort();
        users
    }

    /// A snapshot of every session (for draining).
    pub fn sessions(&self) -> Vec<SessionHandle> {
        self.sessions.iter().flat_map(|s| s.read().values().cloned().collect::<Vec<_>>()).collect()
    }

    /// Number of live sessions.
    pub fn session_count(&self) -> usize {
        self.sessions.iter().map(|s| s.read().len()).sum()
    }
}

/// Bytes an entry costs beyond its frame (the entry, the Bytes header, the frame's allocation).
pub const ENTRY_OVERHEAD: usize = 96;

fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// A fresh epoch: `s` and 16 hex digits, drawn from the clock and the process.
fn new_epoch() -> Arc<str> {
    use std::hash::Hasher;
    let mut h = std::hash::RandomState::new().build_hasher();
    h.write_u64(now_ms());
    h.write_u32(std::process::id());
    Arc::from(format!("s{:016x}", h.finish()))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::outbox::OutboxRx;

    /// A registered session with a queue of `cap` (for this crate's unit tests).
    pub(crate) fn session(hub: &Hub, id: u64, user: &str, cap: usize) -> (SessionHandle, OutboxRx) {
        let (tx, rx) = crate::outbox::outbox(cap, std::time::Duration::from_secs(5));
        let h = SessionHandle {
            id,
            user: user.into(),
            connected_at_ms: 0,
            client_info: "test".into(),
            outbox: tx,
            ctl: Arc::default(),
        };
        hub.register(h.clone());
        (h, rx)
    }

    #[test]
    fn the_deflate_flag_costs_a_session_nothing() {
        // It sits in the control block's padding.
        type Without = (AtomicU8, parking_lot::Mutex<Option<Box<str>>>, Notify);
        assert_eq!(std::mem::size_of::<SessionCtl>(), std::mem::size_of::<Without>());
    }

    fn text_of(frame: &Bytes) -> serde_json::Value {
        // Small frames only in these tests: 2-byte header.
        serde_json::from_slice(&frame[2..]).unwrap()
    }

    /// The seqs of every message frame queued for a session, in order.
    fn seqs(rx: &mut OutboxRx) -> Vec<u64> {
        std::iter::from_fn(|| rx.try_recv()).map(|f| text_of(&f)["seq"].as_u64().unwrap()).collect()
    }

    #[test]
    fn publish_reaches_subscribers_in_one_order() {
        let hub = Hub::new(vec![], 1000);
        let (a, mut ra) = session(&hub, 1, "a", 16);
        let (b, mut rb) = session(&hub, 2, "b", 16);
        let ch: Arc<str> = "c".into();
        assert!(hub.subscribe(&a, &ch));
        assert!(!hub.subscribe(&a, &ch));
        assert!(hub.subscribe(&b, &ch));
        assert_eq!(hub.publish("c", "m1", "a", "1"), Published { seq: 1, delivered: 2 });
        assert_eq!(hub.publish("c", "m2", "a", "2"), Published { seq: 2, delivered: 2 });
        for rx in [&mut ra, &mut rb] {
            assert_eq!(text_of(&rx.try_recv().unwrap())["seq"], 1);
            assert_eq!(text_of(&rx.try_recv().unwrap())["seq"], 2);
        }
        assert!(hub.unsubscribe(1, &a.user, "c"));
        assert_eq!(hub.publish("c", "m3", "a", "3").delivered, 1);
    }

    #[test]
    fn every_publish_gets_a_seq_that_increases_per_channel() {
        let hub = Hub::new(vec![], 1000);
        // Nobody subscribed: still a position, never 0, and increasing.
        let p1 = hub.publish("empty", "m1", "a", "1");
        let p2 = hub.publish("empty", "m2", "a", "1");
        assert_eq!(p1.delivered, 0);
        assert!(p1.seq >= 1 && p2.seq > p1.seq, "{p1:?} {p2:?}");
        // A channel that loses its last subscriber does not start again at 1.
        let (a, _ra) = session(&hub, 1, "a", 16);
        let ch: Arc<str> = "c".into();
        hub.subscribe(&a, &ch);
        let before = hub.publish("c", "m3", "a", "1").seq;
        hub.unsubscribe(1, &a.user, "c");
        hub.subscribe(&a, &ch);
        let after = hub.publish("c", "m4", "a", "1").seq;
        assert!(after > before, "{before} then {after}");
    }

    #[test]
    fn full_queue_closes_only_the_slow_session() {
        let hub = Hub::new(vec![], 1000);
        let (slow, _keep) = session(&hub, 1, "s", 1);
        let (fast, mut rf) = session(&hub, 2, "f", 8);
        let ch: Arc<str> = "c".into();
        hub.subscribe(&slow, &ch);
        hub.subscribe(&fast, &ch);
        for i in 0..3 {
            hub.publish("c", &format!("m{i}"), "x", "0");
        }
        assert_eq!(slow.ctl.requested().map(|r| r.0), Some(CloseReason::SlowConsumer));
        assert!(fast.ctl.requested().is_none());
        assert_eq!((0..3).filter(|_| rf.try_recv().is_some()).count(), 3);
    }

    #[test]
    fn presence_joins_once_per_user_and_leaves_with_last_session() {
        let hub = Hub::new(vec!["room:*".into()], 1000);
        let (watcher, mut rw) = session(&hub, 1, "w", 16);
        let (tab1, _r1) = session(&hub, 2, "u", 16);
        let (tab2, _r2) = session(&hub, 3, "u", 16);
        let ch: Arc<str> = "room:1".into();
        hub.subscribe(&watcher, &ch);
        assert_eq!(text_of(&rw.try_recv().unwrap())["type"], "join"); // own join
        hub.subscribe(&tab1, &ch);
        hub.subscribe(&tab2, &ch);
        let j = text_of(&rw.try_recv().unwrap());
        assert_eq!((j["type"].as_str(), j["user"].as_str()), (Some("join"), Some("u")));
        assert!(rw.try_recv().is_none(), "second tab must not join again");
        assert_eq!(hub.channel_users("room:1").len(), 2);
        hub.unregister(2, &tab1.user, [ch.clone()]);
        assert!(rw.try_recv().is_none());
        hub.unregister(3, &tab2.user, [ch.clone()]);
        assert_eq!(text_of(&rw.try_recv().unwrap())["type"], "leave");
        assert_eq!(hub.channel_users("room:1").iter().map(|u| &**u).collect::<Vec<_>>(), vec!["w"]);
        assert_eq!(hub.user_connections("u"), 0);
    }

    #[test]
    fn large_rooms_get_counts_and_snapshots_list_channels() {
        let hub = Hub::new(vec!["room:*".into()], 2);
        let ch: Arc<str> = "room:big".into();
        let mut rxs = Vec::new();
        for i in 0..4 {
            let (h, rx) = session(&hub, i, &format!("u{i}"), 64);
            hub.subscribe(&h, &ch);
            rxs.push(rx);
        }
        // u0 saw joins of u0, u1 (2 members max), then nothing per member.
        let kinds: Vec<String> =
            std::iter::from_fn(|| rxs[0].try_recv()).map(|f| text_of(&f)["type"].to_string()).collect();
        assert_eq!(kinds, vec!["\"join\"", "\"join\""]);
        hub.flush_counts();
        let c = text_of(&rxs[0].try_recv().unwrap());
        assert_eq!((c["type"].as_str(), c["members"].as_u64()), (Some("presence_count"), Some(4)));
        let mut snap = hub.presence_snapshot();
        snap.sort_by_key(|r| r.conn_id);
        assert_eq!(snap.len(), 4);
        assert_eq!(snap[3].channels, vec![ch.clone()]);
        assert_eq!(&*snap[3].user, "u3");
    }

    #[test]
    fn direct_and_disconnect_reach_every_session_of_a_user() {
        let hub = Hub::new(vec![], 1000);
        let (t1, mut r1) = session(&hub, 1, "u", 4);
        let (t2, mut r2) = session(&hub, 2, "u", 4);
        let (_o, mut ro) = session(&hub, 3, "o", 4);
        let frame = Bytes::from_static(b"\x81\x02{}");
        assert_eq!(hub.send_to_user("u", &frame, &mut Vec::new()), 2);
        assert!(r1.try_recv().is_some() && r2.try_recv().is_some() && ro.try_recv().is_none());
        assert_eq!(hub.broadcast(&frame, &mut Vec::new()), 3);
        assert_eq!(hub.disconnect_user("u", "bye"), 2);
        assert_eq!(t1.ctl.requested().map(|r| r.0), Some(CloseReason::Kicked));
        assert_eq!(t2.ctl.requested().unwrap().1.as_deref(), Some("bye"));
        assert_eq!(hub.session_count(), 3);
    }

    fn history_hub(rules: &str, budget: usize) -> Hub {
        let rules = rules.split(',').map(|r| r.parse().unwrap()).collect();
        Hub::new(vec![], 1000).with_history(Rules::new(rules), budget)
    }

    #[test]
    fn held_frames_follow_the_recovery_once_and_an_overflow_reads_again() {
        let hub = history_hub("*=10000/1h", 1 << 30);
        let (a, mut ra) = session(&hub, 1, "a", 4096);
        let ch: Arc<str> = "c".into();
        let at = hub.subscribe_recovering(&a, &ch).unwrap();
        assert!(hub.subscribe_recovering(&a, &ch).is_none(), "already subscribed");
        let p1 = hub.publish("c", "m1", "x", "1");
        let p2 = hub.publish("c", "m2", "x", "2");
        assert!(ra.try_recv().is_none(), "held while recovering");
        // The session was sent history through p1: only p2 follows.
        assert!(matches!(hub.finish_recovery(1, "c", (p1.seq, None), true, true), Finish::Done));
        assert_eq!(text_of(&ra.try_recv().unwrap())["seq"], p2.seq);
        assert!(ra.try_recv().is_none());
        assert!(at.seq < p1.seq);
        // Live now.
        let p3 = hub.publish("c", "m3", "x", "3");
        assert_eq!(text_of(&ra.try_recv().unwrap())["seq"], p3.seq);

        let (b, mut rb) = session(&hub, 2, "b", 4096);
        hub.subscribe_recovering(&b, &ch).unwrap();
        for i in 0..=RECOVERY_HOLD {
            hub.publish("c", &format!("o{i}"), "x", "0");
        }
        match hub.finish_recovery(2, "c", (p3.seq, None), true, true) {
            Finish::More { since } => assert_eq!(since, p3.seq),
            other => panic!("{other:?}"),
        }
        assert!(rb.try_recv().is_none());
    }

    #[test]
    fn a_cluster_recovery_reads_the_span_before_the_first_held_frame() {
        let hub = Hub::new(vec![], 1000);
        let (a, mut ra) = session(&hub, 1, "a", 64);
        let ch: Arc<str> = "c".into();
        hub.subscribe_recovering(&a, &ch).unwrap();
        // No live frame yet on a channel new here: wait for proof of the route.
        assert!(matches!(hub.finish_recovery(1, "c", (10, Some("k.0")), false, false), Finish::Wait(_)));
        // The first live frame is at 15: 11..14 may exist; read from 10.
        hub.publish_at("c", "m", "x", 15, "k.0", "1", &mut Vec::new());
        match hub.finish_recovery(1, "c", (10, Some("k.0")), false, false) {
            Finish::More { since } => assert_eq!(since, 10),
            other => panic!("{other:?}"),
        }
        // Complete through 14 now: 15 follows directly.
        assert!(matches!(hub.finish_recovery(1, "c", (14, Some("k.0")), false, false), Finish::Done));
        assert_eq!(text_of(&ra.try_recv().unwrap())["seq"], 15);
        // Another epoch starts the channel's seqs over.
        assert_eq!(hub.publish_at("c", "m", "x", 3, "k.1", "1", &mut Vec::new()), Some(1));
        assert_eq!(text_of(&ra.try_recv().unwrap())["epoch"], "k.1");
    }

    #[test]
    fn a_cluster_recovery_on_an_empty_partition_reads_from_its_start() {
        // A channel never published on: the bridge's position is 0. Messages 1..4 went out
        // before the cluster routed the channel here; the first held frame is 5.
        let hub = Hub::new(vec![], 1000);
        let (a, _ra) = session(&hub, 1, "a", 64);
        let ch: Arc<str> = "c".into();
        hub.subscribe_recovering(&a, &ch).unwrap();
        hub.publish_at("c", "m", "x", 5, "k.0", "1", &mut Vec::new());
        match hub.finish_recovery(1, "c", (0, Some("k.0")), false, false) {
            Finish::More { since } => assert_eq!(since, 0),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_recovery_read_behind_the_live_stream_reads_the_span_it_missed() {
        // Another session keeps the channel live here through 12. A poll resumes at 8;
        // the bridge's read answers complete through 10 (a lagging position): 11 and 12
        // went out before the session was registered and are not held.
        let hub = Hub::new(vec![], 1000);
        let (a, _ra) = session(&hub, 1, "a", 64);
        let (b, _rb) = session(&hub, 2, "b", 64);
        let ch: Arc<str> = "c".into();
        hub.subscribe(&a, &ch);
        for seq in [9, 11, 12] {
            hub.publish_at("c", "m", "x", seq, "k.0", "1", &mut Vec::new());
        }
        hub.subscribe_recovering(&b, &ch).unwrap();
        match hub.finish_recovery(2, "c", (10, Some("k.0")), false, false) {
            Finish::More { since } => assert_eq!(since, 10),
            other => panic!("{other:?}"),
        }
        // Once the read reaches the live position, the session goes live.
        assert!(matches!(hub.finish_recovery(2, "c", (12, Some("k.0")), false, false), Finish::Done));
    }

    #[test]
    fn a_channel_subscribed_again_soon_starts_after_its_last_frame_but_still_proves_its_route() {
        let hub = Hub::new(vec![], 1000);
        let (a, _ra) = session(&hub, 1, "a", 64);
        let ch: Arc<str> = "c".into();
        hub.subscribe(&a, &ch);
        hub.publish_at("c", "m", "x", 20, "k.0", "1", &mut Vec::new());
        assert!(hub.unsubscribe(1, &a.user, "c"));
        // The last subscriber left: the route here may be withdrawn. Subscribing again
        // within LEFT_KEPT starts after 20 (not shown again), yet waits for the route.
        let position = hub.subscribe_recovering(&a, &ch).expect("subscribed again");
        assert_eq!((position.seq, &*position.epoch), (20, "k.0"));
        assert!(matches!(hub.finish_recovery(1, "c", (20, Some("k.0")), false, false), Finish::Wait(_)));
    }

    #[test]
    fn the_memory_budget_evicts_the_oldest_across_channels() {
        let frame_cost = 200;
        let hub = history_hub("*=1000/1h", 50 * frame_cost);
        let mut first = Vec::new();
        for c in 0..20 {
            first.push(hub.publish(&format!("c{c}"), "id", "x", "1").seq);
            for _ in 0..4 {
                hub.publish(&format!("c{c}"), "id", "x", "1");
            }
        }
        assert!(hub.history_bytes() > 50 * frame_cost, "{}", hub.history_bytes());
        hub.sweep_history();
        assert!(hub.history_bytes() <= 50 * frame_cost, "{}", hub.history_bytes());
        let epoch = hub.epoch().clone();
        let from = |seq: u64| Position { seq: seq - 1, epoch: epoch.clone() };
        // The oldest channels lost their start; the newest are whole.
        assert_eq!(hub.history("c0", Some(&from(first[0])), 100, false).lost, Some(Lost::TooOld));
        let newest = hub.history("c19", Some(&from(first[19])), 100, false);
        assert_eq!((newest.lost, newest.items.len()), (None, 5));
    }

    #[test]
    fn history_read_ahead_of_the_live_stream_is_not_shown_again() {
        let hub = Hub::new(vec![], 1000);
        let (a, mut ra) = session(&hub, 1, "a", 64);
        let (b, mut rb) = session(&hub, 2, "b", 64);
        let ch: Arc<str> = "c".into();
        hub.subscribe(&a, &ch);
        hub.publish_at("c", "m10", "x", 10, "k.0", "1", &mut Vec::new());
        hub.subscribe_recovering(&b, &ch).unwrap();
        // b was sent history through 20 from the log; live delivery here is at 10.
        assert!(matches!(hub.finish_recovery(2, "c", (20, Some("k.0")), false, true), Finish::Done));
        for seq in [15, 20, 21] {
            hub.publish_at("c", "m", "x", seq, "k.0", "1", &mut Vec::new());
        }
        assert_eq!(seqs(&mut ra), [10, 15, 20, 21]);
        assert_eq!(seqs(&mut rb), [21], "15 and 20 were in its history");
    }

    #[test]
    fn history_read_before_any_live_frame_here_is_not_shown_again() {
        let hub = Hub::new(vec![], 1000);
        let (b, mut rb) = session(&hub, 2, "b", 64);
        let ch: Arc<str> = "c".into();
        hub.subscribe_recovering(&b, &ch).unwrap();
        // b was sent 1 and 3 from the log; the route wait ended with nothing live here yet.
        assert!(matches!(hub.finish_recovery(2, "c", (3, Some("k.0")), false, true), Finish::Done));
        for seq in [1, 3, 5] {
            hub.publish_at("c", "m", "x", seq, "k.0", "1", &mut Vec::new());
        }
        assert_eq!(seqs(&mut rb), [5], "1 and 3 were in its history");
        // A live stream in another epoch than the one read is new: nothing of it is suppressed.
        let (a, mut ra) = session(&hub, 3, "a", 64);
        let other: Arc<str> = "d".into();
        hub.subscribe_recovering(&a, &other).unwrap();
        assert!(matches!(hub.finish_recovery(3, "d", (3, Some("k.0")), false, true), Finish::Done));
        hub.publish_at("d", "m", "x", 2, "k.1", "1", &mut Vec::new());
        assert_eq!(text_of(&ra.try_recv().unwrap())["seq"], 2);
    }

    #[test]
    fn an_epoch_change_during_a_recovery_is_reported_and_the_new_stream_kept() {
        let hub = Hub::new(vec![], 1000);
        let (b, mut rb) = session(&hub, 2, "b", 64);
        let ch: Arc<str> = "c".into();
        hub.subscribe_recovering(&b, &ch).unwrap();
        hub.publish_at("c", "old", "x", 1051, "k.0", "1", &mut Vec::new());
        // The topic was re-created: the new stream starts again at small seqs.
        for seq in 1..=3 {
            hub.publish_at("c", "new", "x", seq, "k.1", "1", &mut Vec::new());
        }
        assert!(matches!(hub.finish_recovery(2, "c", (1050, Some("k.0")), false, true), Finish::EpochChanged));
        hub.abandon_recovery(2, "c", (1050, Some("k.0")));
        assert_eq!(seqs(&mut rb), [1, 2, 3], "the new epoch's frames, none suppressed by the old position");
        hub.publish_at("c", "new", "x", 4, "k.1", "1", &mut Vec::new());
        assert_eq!(text_of(&rb.try_recv().unwrap())["seq"], 4, "no floor from the old epoch");
    }

    #[test]
    fn a_channel_dropped_by_its_last_unsubscribe_keeps_its_lost_mark() {
        let hub = history_hub("*=2/1h", 1 << 30);
        let (a, _ra) = session(&hub, 1, "a", 64);
        let ch: Arc<str> = "c".into();
        hub.subscribe(&a, &ch);
        let first = hub.publish("c", "m", "x", "1").seq;
        for _ in 0..2 {
            hub.publish("c", "m", "x", "1");
        }
        // Empty the ring by age as the sweeper would, then the last subscriber leaves.
        {
            let entry = hub.channels[hub.shard("c")].read().get("c").cloned().unwrap();
            let mut st = entry.state.lock();
            let freed = st.history.as_mut().unwrap().expire(u64::MAX, std::time::Duration::ZERO);
            hub.account(0, freed);
        }
        hub.unsubscribe(1, &a.user, "c");
        let epoch = hub.epoch().clone();
        let page = hub.history("c", Some(&Position { seq: first, epoch }), 10, false);
        assert_eq!(page.lost, Some(Lost::TooOld), "what the dropped ring lost is not vouched for");
    }
}
