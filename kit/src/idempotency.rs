//! Idempotency keys: the first call with a key runs, concurrent and later calls
//! with the same key (within the window) get its answer instead of running
//! again. A call that fails is not remembered, so its retry runs. Bounded by
//! age and by count, oldest forgotten first.
//!
//! What the memory cannot vouch for is said too ([`Idempotency::may_have_run`]): a
//! key whose call failed (the failure may have been after the effect), or any key
//! while the memory does not reach back the whole window (just created, or a key
//! younger than the window forgotten by the count bound).

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::OnceCell;
use tokio::time::Instant;

/// Answers remembered by key for `window`, at most `max` keys.
#[derive(Debug)]
pub struct Idempotency<V> {
    inner: parking_lot::Mutex<Inner<V>>,
    window: Duration,
    max: usize,
    created: Instant,
}

#[derive(Debug)]
struct Inner<V> {
    map: HashMap<Box<str>, (Instant, Arc<OnceCell<V>>)>,
    order: VecDeque<(Instant, Box<str>)>,
    /// Keys whose call failed, and when (at most `max`, oldest dropped first).
    failed: HashMap<Box<str>, Instant>,
    failed_order: VecDeque<(Instant, Box<str>)>,
    /// When a key younger than the window was last forgotten by the count bound.
    forgot_young: Option<Instant>,
}

/// gRPC metadata a caller sets on a keyed call that repeats one whose answer was
/// ambiguous (it may have been stored, perhaps by another server): `switchboard-retry: 1`.
pub const RETRY_HEADER: &str = "switchboard-retry";

/// Longest key accepted, in bytes.
pub const MAX_KEY_BYTES: usize = 128;

/// Keys: 1 to 128 bytes of printable ASCII (no spaces).
pub fn valid_key(key: &str) -> bool {
    !key.is_empty() && key.len() <= MAX_KEY_BYTES && key.bytes().all(|b| (0x21..=0x7e).contains(&b))
}

impl<V: Clone> Idempotency<V> {
    pub fn new(window: Duration, max: usize) -> Self {
        let inner = Inner {
            map: HashMap::new(),
            order: VecDeque::new(),
            failed: HashMap::new(),
            failed_order: VecDeque::new(),
            forgot_young: None,
        };
        Self { inner: parking_lot::Mutex::new(inner), window, max, created: Instant::now() }
    }

    /// Whether a call with `key` that runs now may repeat an earlier one this memory
    /// does not hold: one with `key` failed within the window (perhaps after its
    /// effect), or the memory does not cover the whole window.
    pub fn may_have_run(&self, key: &str) -> bool {
        let now = Instant::now();
        let young = |at: Instant| now.duration_since(at) < self.window;
        let inner = self.inner.lock();
        young(self.created)
            || inner.forgot_young.is_some_and(young)
            || inner.failed.get(key).is_some_and(|&at| young(at))
    }

    fn failed(&self, key: &str) {
        let now = Instant::now();
        let mut inner = self.inner.lock();
        while inner.failed_order.len() >= self.max
            || inner.failed_order.front().is_some_and(|(at, _)| now.duration_since(*at) >= self.window)
        {
            let Some((at, k)) = inner.failed_order.pop_front() else { break };
            if inner.failed.get(&k) == Some(&at) {
                inner.failed.remove(&k);
            }
        }
        inner.failed.insert(key.into(), now);
        inner.failed_order.push_back((now, key.into()));
    }

    /// Runs `f` for the first call with `key` in the window, or returns the answer of
    /// the call that did (waiting for it if it is still running). The flag is true
    /// for a returned earlier answer.
    pub async fn run<F, Fut, E>(&self, key: &str, f: F) -> Result<(V, bool), E>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<V, E>>,
    {
        let cell = self.cell(key);
        let mut ran = false;
        let v = match cell
            .get_or_try_init(|| {
                ran = true;
                f()
            })
            .await
        {
            Ok(v) => v,
            Err(e) => {
                self.failed(key);
                return Err(e);
            }
        };
        Ok((v.clone(), !ran))
    }

    fn cell(&self, key: &str) -> Arc<OnceCell<V>> {
        let now = Instant::now();
        let mut inner = self.inner.lock();
        if let Some((at, cell)) = inner.map.get(key)
            && now.duration_since(*at) < self.window
        {
            return cell.clone();
        }
        // A new key: forget what is too old, and the oldest beyond the count bound.
        while let Some((at, _)) = inner.order.front() {
            if now.duration_since(*at) < self.window && inner.map.len() < self.max {
                break;
            }
            if let Some((at, k)) = inner.order.pop_front()
                && inner.map.get(&k).is_some_and(|(t, _)| *t == at)
            {
                inner.map.remove(&k);
                if now.duration_since(at) < self.window {
                    inner.forgot_young = Some(now);
                }
            }
        }
        let cell = Arc::new(OnceCell::new());
        inner.map.insert(key.into(), (now, cell.clone()));
        inner.order.push_back((now, key.into()));
        cell
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    #[tokio::test(start_paused = true)]
    async fn one_run_per_key_within_the_window_and_failures_are_not_kept() {
        let ids = Idempotency::<u32>::new(Duration::from_secs(60), 100);
        let runs = AtomicU32::new(0);
        let run = |v: u32| {
            let runs = &runs;
            async move {
                runs.fetch_add(1, Ordering::SeqCst);
                Ok::<_, ()>(v)
            }
        };
        assert_eq!(ids.run("k", || run(1)).await, Ok((1, false)));
        assert_eq!(ids.run("k", || run(2)).await, Ok((1, true)));
        assert_eq!(ids.run("other", || run(3)).await, Ok((3, false)));
        assert_eq!(runs.load(Ordering::SeqCst), 2);
        // A failure is forgotten: the retry runs.
        assert_eq!(ids.run("f", || async { Err::<u32, ()>(()) }).await, Err(()));
        assert_eq!(ids.run("f", || run(4)).await, Ok((4, false)));
        // After the window the key is new again.
        tokio::time::advance(Duration::from_secs(61)).await;
        assert_eq!(ids.run("k", || run(5)).await, Ok((5, false)));
    }

    #[tokio::test]
    async fn a_concurrent_call_waits_for_the_first_and_gets_its_answer() {
        let ids = Arc::new(Idempotency::<u32>::new(Duration::from_secs(60), 100));
        let (go, wait) = tokio::sync::oneshot::channel::<()>();
        let first = {
            let ids = ids.clone();
            tokio::spawn(async move {
                ids.run("k", || async move {
                    let _ = wait.await;
                    Ok::<_, ()>(7)
                })
                .await
            })
        };
        tokio::task::yield_now().await;
        let second = {
            let ids = ids.clone();
            tokio::spawn(async move { ids.run("k", || async { Ok::<_, ()>(8) }).await })
        };
        tokio::task::yield_now().await;
        go.send(()).unwrap();
        assert_eq!(first.await.unwrap(), Ok((7, false)));
        assert_eq!(second.await.unwrap(), Ok((7, true)));
    }

    #[tokio::test]
    async fn the_count_bound_forgets_the_oldest() {
        let ids = Idempotency::<u32>::new(Duration::from_secs(60), 2);
        for (k, v) in [("a", 1), ("b", 2), ("c", 3)] {
            ids.run(k, || async move { Ok::<_, ()>(v) }).await.unwrap();
        }
        assert_eq!(ids.run("a", || async { Ok::<_, ()>(9) }).await, Ok((9, false)));
        assert_eq!(ids.run("c", || async { Ok::<_, ()>(9) }).await, Ok((3, true)));
        assert!(valid_key("order-17") && !valid_key("") && !valid_key("a b") && !valid_key(&"x".repeat(129)));
    }

    #[tokio::test(start_paused = true)]
    async fn what_the_memory_cannot_vouch_for_is_said() {
        let ids = Idempotency::<u32>::new(Duration::from_secs(60), 2);
        // Just created: keys stored before it (by an earlier run of the process) are unknown.
        assert!(ids.may_have_run("a"));
        tokio::time::advance(Duration::from_secs(61)).await;
        assert!(!ids.may_have_run("a"));
        // A failed call may have had its effect: its retry is unsure, others are not.
        assert_eq!(ids.run("f", || async { Err::<u32, ()>(()) }).await, Err(()));
        assert!(ids.may_have_run("f") && !ids.may_have_run("a"));
        ids.run("f", || async { Ok::<_, ()>(1) }).await.unwrap();
        tokio::time::advance(Duration::from_secs(61)).await;
        assert!(!ids.may_have_run("f"));
        // A key younger than the window forgotten by the count bound: nothing is sure.
        for k in ["x", "y", "z"] {
            ids.run(k, || async { Ok::<_, ()>(2) }).await.unwrap();
        }
        assert!(ids.may_have_run("b"));
        tokio::time::advance(Duration::from_secs(61)).await;
        assert!(!ids.may_have_run("b"));
    }
}
