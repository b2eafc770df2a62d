//! Consume and route: read the messages topic in the consumer group, resolve
//! each record's target gateways, hand it to their delivery streams, and commit
//! an offset only once every target has acknowledged every record before it.

use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use prost::Message as _;
use proto::bridge::v1::{Envelope, envelope};
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer};
use rdkafka::message::Message as _;
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::deliver::{Completer, Item, Links};
use crate::epoch::Epochs;
use crate::hot::HotWindows;
use crate::log::Record;
use crate::metrics as m;
use crate::offsets::{Continuity as Gap, Gaps, Tracker};
use crate::route::Routes;

/// Consumer context: on a revoke, commit what is complete and forget the
/// partitions; on an assignment, start tracking them.
#[derive(Debug)]
pub struct Ctx {
    pub tracker: Arc<Mutex<Tracker>>,
    /// Hot history windows: dropped on a revoke, restarted on an assignment.
    pub hot: Arc<Mutex<HotWindows>>,
    pub topic: String,
}

impl ClientContext for Ctx {}

impl Ctx {
    fn partitions(&self, tpl: &TopicPartitionList) -> Vec<i32> {
        tpl.elements_for_topic(&self.topic).iter().map(|e| e.partition()).collect()
    }
}

impl ConsumerContext for Ctx {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Revoke(tpl) = rebalance {
            let parts = self.partitions(tpl);
            let points = self.tracker.lock().points_of(&parts);
            tracing::info!(?points, "committing before revoke");
            if let Some(tpl) = to_tpl(&self.topic, &points)
                && let Err(e) = consumer.commit(&tpl, CommitMode::Sync)
            {
                tracing::warn!(error = %e, "commit on revoke failed; records will be redelivered");
            }
            self.hot.lock().revoke(&parts);
            let mut tracker = self.tracker.lock();
            tracker.revoke(&parts);
            metrics::gauge!(m::ASSIGNED_PARTITIONS).set(tracker.assigned() as f64);
            drop(tracker);
            tracing::info!(partitions = ?parts, "partitions revoked");
        }
    }

    fn post_rebalance(&self, _: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Assign(tpl) = rebalance {
            let parts = self.partitions(tpl);
            self.hot.lock().assign(&parts);
            let mut tracker = self.tracker.lock();
            tracker.assign(&parts);
            metrics::gauge!(m::ASSIGNED_PARTITIONS).set(tracker.assigned() as f64);
            drop(tracker);
            tracing::info!(partitions = ?parts, "partitions assigned");
        }
    }
}

fn to_tpl(topic: &str, points: &[(i32, i64)]) -> Option<TopicPartitionList> {
    if points.is_empty() {
        return None;
    }
    let mut tpl = TopicPartitionList::new();
    for (p, off) in points {
        tpl.add_partition_offset(topic, *p, Offset::Offset(*off)).ok()?;
    }
    Some(tpl)
}

/// What the consume loop feeds besides deliveries: the hot history windows, and
/// the epochs it stamps on channel deliveries.
#[derive(Debug, Clone)]
pub struct Continuity {
    pub hot: Arc<Mutex<HotWindows>>,
    pub epochs: Arc<parking_lot::RwLock<Epochs>>,
}

fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

impl Continuity {
    /// Feeds one consumed record (in offset order) to the hot window.
    fn consumed(&self, partition: i32, offset: i64, env: Option<&Arc<Envelope>>) {
        let mut hot = self.hot.lock();
        hot.consumed(partition, offset, env, now_ms());
        let bytes = hot.bytes();
        drop(hot);
        metrics::gauge!(m::HISTORY_BYTES).set(bytes as f64);
    }
}

/// Where consumed records come from: Kafka's consumer group, or the readers of the
/// partitions this bridge holds leases for (NATS, Redis; `log::leased`).
pub enum Source {
    Kafka(Arc<StreamConsumer<Ctx>>),
    Leased(mpsc::Receiver<Record>),
}

impl std::fmt::Debug for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Kafka(_) => "Source::Kafka",
            Self::Leased(_) => "Source::Leased",
        })
    }
}

/// One consumed record: partition, offset, the lease generation it was read under
/// (leased sources), and its decoded envelope.
type Received = (i32, i64, Option<u64>, Option<Result<Envelope, prost::DecodeError>>);

impl Source {
    async fn recv(&mut self) -> Result<Received, String> {
        match self {
            Self::Kafka(consumer) => consumer
                .recv()
                .await
                .map(|msg| (msg.partition(), msg.offset(), None, msg.payload().map(Envelope::decode)))
                .map_err(|e| format!("kafka consume error: {e}")),
            Self::Leased(rx) => match rx.recv().await {
                Some(r) => Ok((r.partition, r.offset, Some(r.generation), Some(Envelope::decode(r.payload)))),
                None => std::future::pending().await,
            },
        }
    }
}

/// The consume loop; returns when `stop` is cancelled.
#[allow(clippy::too_many_arguments)]
pub async fn run(
    mut source: Source,
    topic: String,
    routes: Arc<Routes>,
    links: Arc<Links>,
    completer: Completer,
    continuity: Continuity,
    max_in_flight: usize,
    stop: CancellationToken,
) {
    let mut gaps = Gaps::default();
    loop {
        // Bounded memory: wait while too many records await acknowledgement.
        while completer.tracker.lock().in_flight() >= max_in_flight {
            tokio::select! {
                () = stop.cancelled() => return,
                () = completer.progress.notified() => {}
                () = tokio::time::sleep(Duration::from_millis(50)) => {}
            }
        }
        let received = tokio::select! {
            () = stop.cancelled() => return,
            m = source.recv() => m,
        };
        let (partition, offset, leased, decoded) = match received {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(error = %e, "consume error");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let generation = completer.tracker.lock().generation(partition);
        if let Some(read_under) = leased {
            // Read under a lease since lost or taken again: its reader is stopped.
            if generation != Some(read_under) {
                continue;
            }
        }
        metrics::counter!(m::CONSUMED).increment(1);
        let generation = generation.unwrap_or(0);
        // A leased reader reads one partition in order from one position: no holes to re-fetch.
        let check = if leased.is_some() {
            Gap::Accept
        } else {
            gaps.check(partition, generation, offset, std::time::Instant::now())
        };
        match check {
            Gap::Accept => {}
            Gap::Skip => continue,
            Gap::Refetch(from) => {
                tracing::warn!(partition, offset, from, "records missing before this offset; fetching again");
                metrics::counter!(m::OFFSET_GAPS, "outcome" => "refetched").increment(1);
                if let Source::Kafka(consumer) = &source
                    && let Err(e) = consumer.seek(&topic, partition, Offset::Offset(from), Duration::from_secs(1))
                {
                    tracing::warn!(partition, error = %e, "seek for a re-fetch failed");
                }
                continue;
            }
            Gap::AcceptGap => {
                tracing::error!(
                    partition,
                    offset,
                    "records missing before this offset after re-fetches; skipping them"
                );
                metrics::counter!(m::OFFSET_GAPS, "outcome" => "accepted").increment(1);
            }
        }
        let env = match decoded {
            Some(Ok(env)) => env,
            _ => {
                metrics::counter!(m::BAD_RECORDS).increment(1);
                tracing::warn!(partition, offset, "record is not an envelope; skipped");
                completer.tracker.lock().consumed(partition, offset, 0);
                continuity.consumed(partition, offset, None);
                continue;
            }
        };
        let targets = routes.resolve(&env);
        metrics::histogram!(m::FANOUT_WIDTH).record(targets.len() as f64);
        let record = completer.tracker.lock().consumed(partition, offset, targets.len());
        let (channel_seq, epoch) = match env.target {
            Some(envelope::Target::Channel(_)) => (offset as u64 + 1, continuity.epochs.read().of(partition).cloned()),
            _ => (0, None),
        };
        let envelope = Arc::new(env);
        continuity.consumed(partition, offset, Some(&envelope));
        for (node, addr) in targets {
            links
                .send(&node, &addr, Item { envelope: envelope.clone(), channel_seq, epoch: epoch.clone(), record })
                .await;
        }
        metrics::gauge!(m::IN_FLIGHT).set(completer.tracker.lock().in_flight() as f64);
    }
}

/// Commits complete offsets every 200 ms; a last commit when `stop` is cancelled.
pub async fn commit_loop(
    consumer: Arc<StreamConsumer<Ctx>>,
    tracker: Arc<Mutex<Tracker>>,
    topic: String,
    stop: CancellationToken,
) {
    let mut every = tokio::time::interval(Duration::from_millis(200));
    loop {
        let last = tokio::select! {
            () = stop.cancelled() => true,
            _ = every.tick() => false,
        };
        let points = tracker.lock().commit_points();
        if !points.is_empty() {
            tracing::debug!(?points, "committing");
        }
        if let Some(tpl) = to_tpl(&topic, &points) {
            let mode = if last { CommitMode::Sync } else { CommitMode::Async };
            match consumer.commit(&tpl, mode) {
                Ok(()) => metrics::counter!(m::COMMITS, "outcome" => "ok").increment(1),
                Err(e) => {
                    metrics::counter!(m::COMMITS, "outcome" => "error").increment(1);
                    tracing::debug!(error = %e, "offset commit failed; will retry");
                }
            }
        }
        if last {
            return;
        }
    }
}

/// Reports consumer lag (high watermark − position) every 5 s.
pub async fn lag_loop(consumer: Arc<StreamConsumer<Ctx>>, topic: String, stop: CancellationToken) {
    let mut every = tokio::time::interval(Duration::from_secs(5));
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = every.tick() => {}
        }
        let c = consumer.clone();
        let t = topic.clone();
        let lag = tokio::task::spawn_blocking(move || {
            let position = c.position().ok()?;
            let mut lag = 0i64;
            for e in position.elements_for_topic(&t) {
                let (_, high) = c.fetch_watermarks(&t, e.partition(), Duration::from_secs(1)).ok()?;
                if let Offset::Offset(pos) = e.offset() {
                    lag += (high - pos).max(0);
                }
            }
            Some(lag)
        })
        .await;
        if let Ok(Some(lag)) = lag {
            metrics::gauge!(m::CONSUMER_LAG).set(lag as f64);
        }
    }
}
