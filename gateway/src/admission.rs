//! Admission beyond the node's connection cap (`server.rs`): what one user may hold on
//! this node, and the node's memory budget.
//!
//! - **Sessions per user** (`--max-connections-per-user`): every transport of a user
//!   counts (WebSocket sessions, SSE streams, waiting polls); the newest attempt beyond
//!   the cap is refused (429 before the upgrade, or close 1013 after a `connect`), the
//!   user's existing sessions are never touched. A [`UserSlot`] is one session's place.
//! - **Subscriptions per user** (`--max-subscriptions-per-user`): the sum over the
//!   user's sessions on this node; a subscribe beyond it is `too_many_subscriptions`.
//!   Unsubscribes, revocations and session ends give the budget back.
//! - **Memory** (`--memory-budget`): the process's resident memory, sampled every
//!   [`SAMPLE_EVERY`] into an atomic ([`sample`]); at the budget the node sheds new work
//!   (503 for new sessions, `unavailable` for publish, send, subscribe, history) until
//!   it is back below [`LOW_WATERMARK`] of the budget. The hot path reads one atomic.
//!
//! Sessions without a token (`--anonymous` names, the echo route) are not counted per
//! user: anyone may claim any anonymous name, so a per-name cap would let one client lock
//! another out; the per-address cap (`--max-connections-per-ip`) covers them.

use std::collections::HashMap;
use std::hash::BuildHasher;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use parking_lot::Mutex;

use crate::metrics as m;

/// How often the resident memory is read.
pub const SAMPLE_EVERY: Duration = Duration::from_millis(100);
/// Shedding stops once the resident memory is below this share of the budget.
pub const LOW_WATERMARK: f64 = 0.9;
/// Share of the cgroup memory limit the budget defaults to: the rest is headroom for
/// what is admitted between two samples, what established sessions still queue while
/// they drain, and the kernel's socket buffers (charged to the cgroup too).
pub const DEFAULT_BUDGET_SHARE: f64 = 0.85;
/// Default `--max-connections-per-user`.
pub const DEFAULT_CONNECTIONS_PER_USER: u32 = 100;
/// Default `--max-subscriptions-per-user` (or `--max-subscriptions`, when that is more).
pub const DEFAULT_SUBSCRIPTIONS_PER_USER: u32 = 1000;

const SHARDS: usize = 16;

/// Counts per user, sharded so that admissions of different users rarely meet on a lock.
#[derive(Debug)]
struct PerUser {
    shards: [Mutex<HashMap<Arc<str>, u32>>; SHARDS],
    hasher: std::hash::RandomState,
}

impl PerUser {
    fn new() -> Self {
        Self { shards: std::array::from_fn(|_| Mutex::new(HashMap::new())), hasher: std::hash::RandomState::new() }
    }

    fn shard(&self, user: &str) -> &Mutex<HashMap<Arc<str>, u32>> {
        &self.shards[self.hasher.hash_one(user) as usize % SHARDS]
    }

    /// Adds `n` to the user's count if that stays within `max` (0: no cap).
    fn take(&self, user: &Arc<str>, n: u32, max: u32) -> bool {
        if n == 0 {
            return true;
        }
        let mut map = self.shard(user).lock();
        let held = map.get(user).copied().unwrap_or(0);
        if max != 0 && held.saturating_add(n) > max {
            return false;
        }
        map.insert(user.clone(), held + n);
        true
    }

    fn give(&self, user: &str, n: u32) {
        if n == 0 {
            return;
        }
        let mut map = self.shard(user).lock();
        if let Some(held) = map.get_mut(user) {
            *held = held.saturating_sub(n);
            if *held == 0 {
                map.remove(user);
            }
        }
    }

    fn get(&self, user: &str) -> u32 {
        self.shard(user).lock().get(user).copied().unwrap_or(0)
    }

    fn users(&self) -> usize {
        self.shards.iter().map(|s| s.lock().len()).sum()
    }
}

/// The hysteresis of the memory budget: shed from `budget` on, until below `low`.
/// Pure: fed with samples, says whether to shed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pressure {
    budget: u64,
    low: u64,
    shedding: bool,
}

impl Pressure {
    /// `budget` 0: never sheds.
    pub fn new(budget: u64) -> Self {
        Self { budget, low: (budget as f64 * LOW_WATERMARK) as u64, shedding: false }
    }

    /// Takes a sample of the memory in use; returns whether to shed now.
    pub fn observe(&mut self, used: u64) -> bool {
        if self.budget == 0 {
            return false;
        }
        self.shedding = if self.shedding { used >= self.low } else { used >= self.budget };
        self.shedding
    }
}

/// The per-user counts and the memory budget of one node.
#[derive(Debug)]
pub struct Admission {
    max_connections_per_user: u32,
    max_subscriptions_per_user: u32,
    connections: PerUser,
    subscriptions: PerUser,
    budget: u64,
    used: AtomicU64,
    shedding: AtomicBool,
}

/// Limits of an [`Admission`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Sessions per user on this node (0: no cap).
    pub connections_per_user: u32,
    /// Subscriptions per user on this node, over all of its sessions (0: no budget).
    pub subscriptions_per_user: u32,
    /// Resident bytes at which new work is shed (0: no budget).
    pub memory_budget: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            connections_per_user: DEFAULT_CONNECTIONS_PER_USER,
            subscriptions_per_user: DEFAULT_SUBSCRIPTIONS_PER_USER,
            memory_budget: 0,
        }
    }
}

impl Default for Admission {
    fn default() -> Self {
        Self::new(Limits::default())
    }
}

/// One session's place in its user's count; given back on drop.
#[derive(Debug)]
pub struct UserSlot {
    admission: Arc<Admission>,
    user: Option<Arc<str>>,
}

impl Drop for UserSlot {
    fn drop(&mut self) {
        if let Some(user) = self.user.take() {
            self.admission.connections.give(&user, 1);
        }
    }
}

/// Whether an identity counts per user: it came with a token (tokens always carry `exp`).
pub fn counted(identity: &crate::auth::Identity) -> bool {
    identity.expires_at.is_some()
}

impl Admission {
    pub fn new(limits: Limits) -> Self {
        metrics::gauge!(m::MEMORY_BUDGET).set(limits.memory_budget as f64);
        Self {
            max_connections_per_user: limits.connections_per_user,
            max_subscriptions_per_user: limits.subscriptions_per_user,
            connections: PerUser::new(),
            subscriptions: PerUser::new(),
            budget: limits.memory_budget,
            used: AtomicU64::new(0),
            shedding: AtomicBool::new(false),
        }
    }

    /// A session's place for `identity`'s user, or `None` when the user already holds
    /// `--max-connections-per-user` sessions here (counted). Identities without a token
    /// are not counted (an empty slot).
    pub fn try_user_slot(self: &Arc<Self>, identity: &crate::auth::Identity) -> Option<UserSlot> {
        if !counted(identity) {
            return Some(UserSlot { admission: self.clone(), user: None });
        }
        if !self.connections.take(&identity.user, 1, self.max_connections_per_user) {
            metrics::counter!(m::USER_LIMIT_REFUSALS, "limit" => "connections").increment(1);
            return None;
        }
        Some(UserSlot { admission: self.clone(), user: Some(identity.user.clone()) })
    }

    /// Takes `n` subscriptions of `identity`'s budget; false (counted) when they do not fit.
    pub fn take_subscriptions(&self, identity: &crate::auth::Identity, n: usize) -> bool {
        if !counted(identity) {
            return true;
        }
        let n = u32::try_from(n).unwrap_or(u32::MAX);
        if self.subscriptions.take(&identity.user, n, self.max_subscriptions_per_user) {
            return true;
        }
        metrics::counter!(m::USER_LIMIT_REFUSALS, "limit" => "subscriptions").increment(1);
        false
    }

    /// Gives back `n` subscriptions taken with [`Admission::take_subscriptions`].
    pub fn give_subscriptions(&self, identity: &crate::auth::Identity, n: usize) {
        if counted(identity) {
            self.subscriptions.give(&identity.user, u32::try_from(n).unwrap_or(u32::MAX));
        }
    }

    /// Sessions `user` holds on this node (as counted).
    pub fn user_connections(&self, user: &str) -> u32 {
        self.connections.get(user)
    }

    /// Subscriptions `user` holds on this node (as counted).
    pub fn user_subscriptions(&self, user: &str) -> u32 {
        self.subscriptions.get(user)
    }

    /// Users with a count (either kind): zero once every session ended (no leak).
    pub fn tracked_users(&self) -> usize {
        self.connections.users() + self.subscriptions.users()
    }

    /// Is the node over its memory budget (shedding new work)? One atomic load.
    pub fn shedding(&self) -> bool {
        self.shedding.load(Ordering::Relaxed)
    }

    /// The last resident-memory sample, in bytes.
    pub fn memory_used(&self) -> u64 {
        self.used.load(Ordering::Relaxed)
    }

    pub fn memory_budget(&self) -> u64 {
        self.budget
    }

    /// Counts one refused piece of new work (`kind`: websocket, sse, poll, command).
    pub fn shed(kind: &'static str) {
        metrics::counter!(m::MEMORY_SHED, "kind" => kind).increment(1);
    }
}

/// The resident memory of this process (`VmRSS` of `/proc/self/status`), in bytes.
pub fn resident_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    parse_vm_rss(&status)
}

fn parse_vm_rss(status: &str) -> Option<u64> {
    let line = status.lines().find_map(|l| l.strip_prefix("VmRSS:"))?;
    let kb: u64 = line.trim().strip_suffix("kB")?.trim().parse().ok()?;
    Some(kb * 1024)
}

/// Asks the allocator to return the freed pages of every arena to the kernel.
///
/// glibc's malloc keeps freed memory in its arenas and gives back only the top of the
/// main heap, so after a spike the resident memory stays near its peak though nothing
/// holds it: a node shedding on `VmRSS` would then shed long after its queues drained
/// (measured: 155 MB resident of a 160 MB budget with every queue empty, above the
/// 144 MB low watermark). `malloc_trim(0)` releases the free pages of all arenas
/// (glibc ≥ 2.8). It walks the free lists, so the sampler calls it only while shedding,
/// on a blocking thread. Elsewhere (musl, other allocators) it does nothing.
pub fn release_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    #[allow(unsafe_code)]
    // SAFETY: malloc_trim has no preconditions; it only reorganises the allocator's own
    // free lists under the allocator's locks. The one exception to the workspace's
    // unsafe_code lint beside broker-bridge/src/topic_id.rs; tested below.
    unsafe {
        unsafe extern "C" {
            fn malloc_trim(pad: usize) -> i32;
        }
        malloc_trim(0);
    }
}

/// Samples the resident memory every [`SAMPLE_EVERY`] until `stop`, and decides with
/// [`Pressure`] whether the node sheds. Without a budget it only exports the gauge.
pub async fn sample(admission: Arc<Admission>, stop: tokio_util::sync::CancellationToken) {
    let mut pressure = Pressure::new(admission.budget);
    let mut every = tokio::time::interval(SAMPLE_EVERY);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = every.tick() => {}
        }
        if admission.shedding.load(Ordering::Relaxed) {
            // What drained is only seen once the allocator hands it back (release_freed_memory).
            let _ = tokio::task::spawn_blocking(release_freed_memory).await;
        }
        let Some(used) = resident_bytes() else {
            if admission.budget != 0 {
                tracing::warn!("cannot read /proc/self/status: the memory budget is not enforced");
            }
            return;
        };
        admission.used.store(used, Ordering::Relaxed);
        metrics::gauge!(m::MEMORY_USED).set(used as f64);
        let shed = pressure.observe(used);
        if admission.shedding.swap(shed, Ordering::Relaxed) != shed {
            metrics::gauge!(m::MEMORY_SHEDDING).set(f64::from(u8::from(shed)));
            if shed {
                tracing::warn!(used, budget = admission.budget, "over the memory budget: shedding new work");
            } else {
                tracing::info!(used, budget = admission.budget, "back under the memory budget: admitting again");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::Identity;

    fn user(name: &str) -> Identity {
        Identity { user: name.into(), channels: None, expires_at: Some(1) }
    }

    #[test]
    fn pressure_has_hysteresis() {
        let mut p = Pressure::new(1000);
        assert!(!p.observe(999));
        assert!(p.observe(1000), "at the budget");
        assert!(p.observe(950), "still above the low watermark");
        assert!(p.observe(900));
        assert!(!p.observe(899), "below 90 %");
        assert!(!p.observe(999), "not again until the budget");
        assert!(p.observe(5000));
        assert!(!Pressure::new(0).observe(u64::MAX), "no budget, no shedding");
    }

    #[test]
    fn user_slots_count_and_give_back() {
        let a = Arc::new(Admission::new(Limits { connections_per_user: 2, ..Limits::default() }));
        let s1 = a.try_user_slot(&user("u")).unwrap();
        let s2 = a.try_user_slot(&user("u")).unwrap();
        assert!(a.try_user_slot(&user("u")).is_none(), "the newest beyond the cap");
        assert!(a.try_user_slot(&user("v")).is_some(), "another user is not affected");
        drop(s1);
        let s3 = a.try_user_slot(&user("u")).expect("room again");
        drop((s2, s3));
        assert_eq!(a.user_connections("u"), 0);
        let anonymous = Identity { user: "u".into(), channels: None, expires_at: None };
        let slots: Vec<_> = (0..5).map(|_| a.try_user_slot(&anonymous).unwrap()).collect();
        assert_eq!(a.user_connections("u"), 0, "anonymous names are not counted");
        drop(slots);
        assert_eq!(a.tracked_users(), 0);
        let unlimited = Arc::new(Admission::new(Limits { connections_per_user: 0, ..Limits::default() }));
        let many: Vec<_> = (0..1000).map(|_| unlimited.try_user_slot(&user("u")).unwrap()).collect();
        assert_eq!(unlimited.user_connections("u"), 1000);
        drop(many);
        assert_eq!(unlimited.tracked_users(), 0);
    }

    #[test]
    fn subscription_budget_is_all_or_nothing() {
        let a = Admission::new(Limits { subscriptions_per_user: 5, ..Limits::default() });
        assert!(a.take_subscriptions(&user("u"), 3));
        assert!(!a.take_subscriptions(&user("u"), 3), "3 + 3 > 5: none taken");
        assert_eq!(a.user_subscriptions("u"), 3);
        assert!(a.take_subscriptions(&user("u"), 2));
        assert!(!a.take_subscriptions(&user("u"), 1));
        a.give_subscriptions(&user("u"), 4);
        assert!(a.take_subscriptions(&user("u"), 4));
        a.give_subscriptions(&user("u"), 5);
        assert_eq!(a.tracked_users(), 0);
    }

    #[test]
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    fn freed_memory_goes_back_to_the_kernel() {
        // 64 MiB in 4 KiB blocks (below the mmap threshold: heap memory, as queued
        // frames are), then one block kept above them so that the heap's top cannot
        // shrink by itself: freeing the rest leaves it resident until trimmed.
        let blocks: Vec<Vec<u8>> = (0..16_384).map(|i| vec![i as u8; 4096]).collect();
        let keep = vec![1u8; 4096];
        drop(blocks);
        let before = resident_bytes().unwrap();
        release_freed_memory();
        let after = resident_bytes().unwrap();
        assert!(keep[0] == 1);
        assert!(before >= after + (32 << 20), "trim gave back {} bytes of {before}", before.saturating_sub(after));
    }

    #[test]
    fn reads_vm_rss() {
        assert_eq!(parse_vm_rss("Name:\tx\nVmRSS:\t   12345 kB\nVmData: 1 kB\n"), Some(12345 * 1024));
        assert_eq!(parse_vm_rss("Name:\tx\n"), None);
        assert!(resident_bytes().is_some_and(|b| b > 0), "this process has resident memory");
    }
}
