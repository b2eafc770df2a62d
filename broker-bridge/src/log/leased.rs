//! Partition ownership on the backbones without a consumer group: each bridge
//! takes a fair share of the partitions' leases ([`super::lease`]), reads its
//! partitions in order from the committed offset into the consume loop, and
//! commits (renewing the lease in the same write). A lost lease, or one it could
//! not renew for half the lease time, stops its readers at once: the record's
//! generation no longer matches the tracker's, so nothing more is delivered or
//! committed for it.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::lease::{Decision, Held, Lease, Stored, Watch, share};
use super::{Log, Record, nats, redis};
use crate::hot::HotWindows;
use crate::metrics as m;
use crate::offsets::Tracker;

/// The lease records of a leased backbone.
#[derive(Debug, Clone, Copy)]
pub enum Store<'a> {
    Nats(&'a nats::NatsLog),
    Redis(&'a redis::RedisLog),
}

impl Store<'_> {
    async fn get(&self, p: i32) -> Result<Option<Stored>, String> {
        match self {
            Self::Nats(n) => n.lease(p).await,
            Self::Redis(r) => r.lease(p).await,
        }
    }

    async fn cas(&self, p: i32, expect: Option<u64>, lease: &Lease) -> Result<Option<u64>, String> {
        match self {
            Self::Nats(n) => n.cas(p, expect, lease).await,
            Self::Redis(r) => r.cas(p, expect, lease).await,
        }
    }

    async fn beat(&self, me: &str) -> Result<usize, String> {
        match self {
            Self::Nats(n) => n.beat(me).await,
            Self::Redis(r) => r.beat(me).await,
        }
    }

    async fn reader(&self, p: i32, from: i64) -> Result<Reader, String> {
        match self {
            Self::Nats(n) => n.reader(p, from).await.map(|r| Reader::Nats(Box::new(r))),
            Self::Redis(r) => r.reader(p, from).await.map(Reader::Redis),
        }
    }
}

/// An ordered reader of one partition.
#[derive(Debug)]
enum Reader {
    Nats(Box<nats::Reader>),
    Redis(redis::Reader),
}

impl Reader {
    async fn next(&mut self) -> Result<Vec<(i64, bytes::Bytes)>, String> {
        match self {
            Self::Nats(r) => r.next().await,
            Self::Redis(r) => r.next().await,
        }
    }
}

/// One held partition: its lease, and its reader's stop and deadline.
#[derive(Debug)]
struct Partition {
    held: Held,
    stop: CancellationToken,
    fresh: Arc<Mutex<std::time::Instant>>,
}

/// The lease keeper of one bridge.
#[derive(Debug)]
pub struct Leases {
    pub log: Arc<Log>,
    pub me: String,
    pub lease: Duration,
    pub tracker: Arc<Mutex<Tracker>>,
    pub hot: Arc<Mutex<HotWindows>>,
    pub records: mpsc::Sender<Record>,
}

impl Leases {
    /// Keeps leases, commits and readers until `stop`; then commits once more and releases.
    pub async fn run(self, stop: CancellationToken) {
        let Some(store) = self.log.leases() else { return };
        let partitions = self.log.partitions();
        let mut held: HashMap<i32, Partition> = HashMap::new();
        let mut watch = Watch::default();
        let mut every = tokio::time::interval(Duration::from_millis(200));
        let mut next_share = Instant::now();
        loop {
            let last = tokio::select! {
                () = stop.cancelled() => true,
                _ = every.tick() => false,
            };
            self.commit(&store, &mut held).await;
            if last {
                let mine: Vec<i32> = held.keys().copied().collect();
                for p in mine {
                    self.release(&store, &mut held, p).await;
                }
                return;
            }
            if Instant::now() < next_share {
                continue;
            }
            next_share = Instant::now() + self.lease / 5;
            let Ok(members) = store.beat(&self.me).await else { continue };
            let want = share(partitions, members);
            // Too many: release the highest ones (their commit point goes with them).
            while held.len() > want {
                let Some(&p) = held.keys().max() else { break };
                self.release(&store, &mut held, p).await;
            }
            // Too few: take free or expired leases, starting at a place of our own.
            let start = crate::epoch::crc32(self.me.as_bytes()) as i32;
            for i in 0..partitions {
                if held.len() >= want {
                    break;
                }
                let p = (start.rem_euclid(partitions.max(1)) + i) % partitions;
                if held.contains_key(&p) {
                    watch.forget(p);
                    continue;
                }
                let Ok(stored) = store.get(p).await else { continue };
                let now = std::time::Instant::now();
                if let Decision::Take { expect, lease } = watch.decide(&self.me, p, stored.as_ref(), self.lease, now)
                    && let Ok(Some(revision)) = store.cas(p, expect, &lease).await
                {
                    let h = Held { revision, generation: lease.generation, committed: lease.offset, written: now };
                    self.assign(&mut held, p, h);
                }
            }
        }
    }

    /// Writes every held lease whose commit point moved or whose renewal is due.
    async fn commit(&self, store: &Store<'_>, held: &mut HashMap<i32, Partition>) {
        let mine: Vec<i32> = held.keys().copied().collect();
        let points: HashMap<i32, i64> = self.tracker.lock().points_of(&mine).into_iter().collect();
        for p in mine {
            let Some(part) = held.get_mut(&p) else { continue };
            let now = std::time::Instant::now();
            let point = points.get(&p).copied().unwrap_or(part.held.committed).max(part.held.committed);
            if !part.held.due(point, self.lease, now) {
                continue;
            }
            let lease = Lease { owner: self.me.clone(), generation: part.held.generation, offset: point };
            match store.cas(p, Some(part.held.revision), &lease).await {
                Ok(Some(revision)) => {
                    metrics::counter!(m::COMMITS, "outcome" => "ok").increment(1);
                    part.held.revision = revision;
                    part.held.committed = point;
                    part.held.written = now;
                    *part.fresh.lock() = part.held.fresh_until(self.lease);
                }
                Ok(None) => {
                    tracing::warn!(partition = p, "partition lease taken by another bridge");
                    self.revoke(held, p);
                }
                Err(e) => {
                    metrics::counter!(m::COMMITS, "outcome" => "error").increment(1);
                    tracing::debug!(partition = p, error = %e, "lease write failed; will retry");
                    if now > part.held.fresh_until(self.lease) {
                        tracing::warn!(partition = p, "partition lease not renewed in time; stopped consuming it");
                        self.revoke(held, p);
                    }
                }
            }
        }
    }

    /// Gives a partition up: its commit point is written with no owner, free to take.
    async fn release(&self, store: &Store<'_>, held: &mut HashMap<i32, Partition>, p: i32) {
        let Some(part) = held.get(&p) else { return };
        let point = self.tracker.lock().points_of(&[p]).first().map_or(part.held.committed, |x| x.1);
        let lease =
            Lease { owner: String::new(), generation: part.held.generation, offset: point.max(part.held.committed) };
        if let Err(e) = store.cas(p, Some(part.held.revision), &lease).await {
            tracing::warn!(partition = p, error = %e, "releasing a lease failed; it expires instead");
        }
        self.revoke(held, p);
        tracing::info!(partition = p, "partition released");
    }

    fn assign(&self, held: &mut HashMap<i32, Partition>, p: i32, h: Held) {
        self.hot.lock().assign(&[p]);
        let mut tracker = self.tracker.lock();
        tracker.assign(&[p]);
        let generation = tracker.generation(p).unwrap_or(0);
        drop(tracker);
        let stop = CancellationToken::new();
        let fresh = Arc::new(Mutex::new(h.fresh_until(self.lease)));
        tracing::info!(partition = p, offset = h.committed, lease = h.generation, "partition assigned");
        tokio::spawn(read(
            self.log.clone(),
            p,
            h.committed,
            generation,
            self.records.clone(),
            stop.clone(),
            fresh.clone(),
        ));
        held.insert(p, Partition { held: h, stop, fresh });
        metrics::gauge!(m::ASSIGNED_PARTITIONS).set(held.len() as f64);
    }

    fn revoke(&self, held: &mut HashMap<i32, Partition>, p: i32) {
        if let Some(part) = held.remove(&p) {
            part.stop.cancel();
        }
        self.hot.lock().revoke(&[p]);
        self.tracker.lock().revoke(&[p]);
        metrics::gauge!(m::ASSIGNED_PARTITIONS).set(held.len() as f64);
    }
}

/// Reads partition `p` from `from` into the consume loop while the lease is fresh.
async fn read(
    log: Arc<Log>,
    p: i32,
    from: i64,
    generation: u64,
    records: mpsc::Sender<Record>,
    stop: CancellationToken,
    fresh: Arc<Mutex<std::time::Instant>>,
) {
    let mut next = from;
    while !stop.is_cancelled() {
        let Some(store) = log.leases() else { return };
        let opened = tokio::select! {
            () = stop.cancelled() => return,
            r = store.reader(p, next) => r,
        };
        let mut reader = match opened {
            Ok(r) => r,
            Err(e) => {
                tracing::debug!(partition = p, error = %e, "cannot read the partition yet");
                tokio::select! {
                    () = stop.cancelled() => return,
                    () = tokio::time::sleep(Duration::from_millis(200)) => {}
                }
                continue;
            }
        };
        loop {
            let batch = tokio::select! {
                () = stop.cancelled() => return,
                b = reader.next() => b,
            };
            let batch = match batch {
                Ok(b) => b,
                Err(e) => {
                    tracing::debug!(partition = p, error = %e, "partition read failed; reading again");
                    break;
                }
            };
            for (offset, payload) in batch {
                if offset < next {
                    continue;
                }
                // Deliver as owner only while the lease is surely ours.
                while std::time::Instant::now() > *fresh.lock() {
                    tokio::select! {
                        () = stop.cancelled() => return,
                        () = tokio::time::sleep(Duration::from_millis(20)) => {}
                    }
                }
                let r = Record { partition: p, offset, generation, payload };
                tokio::select! {
                    () = stop.cancelled() => return,
                    sent = records.send(r) => if sent.is_err() { return },
                }
                next = offset + 1;
            }
        }
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(Duration::from_millis(100)) => {}
        }
    }
}
