//! Push.History on broker-bridge: a channel's messages after a position, or its
//! newest ones, from the hot window when this bridge consumes the channel's
//! partition and the window reaches back far enough, else read from Kafka.
//!
//! The decisions are pure ([`plan_since`], [`plan_newest`], [`Collector`]); the
//! Kafka side ([`Readers`]) is a small pool of consumers outside the group,
//! assigned by hand to one partition per read, at most [`CONCURRENT_READS`] at
//! a time and [`QUEUED_READS`] waiting (beyond that: UNAVAILABLE).

use std::collections::{HashSet, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use parking_lot::{Mutex, RwLock};
use pb::history_response::Lost;
use prost::Message as _;
use proto::bridge::v1::{Envelope, envelope};
use proto::push::v1 as pb;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::Message as _;
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use tokio::sync::Semaphore;
use tonic::Status;

use crate::epoch::Epochs;
use crate::hot::{self, HotWindows, Msg, Query};
use crate::metrics as m;

/// Kafka reads running at once.
pub const CONCURRENT_READS: usize = 4;
/// Kafka reads waiting for a slot; more get UNAVAILABLE.
pub const QUEUED_READS: usize = 64;
/// Default and largest `limit`.
pub const DEFAULT_LIMIT: usize = 100;
pub const MAX_LIMIT: usize = 1000;
/// Longest one Kafka read may take.
pub const READ_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a `since` beyond the partition's high watermark is given to become real
/// before the answer is `ahead`: a position another gateway has just shown can be a
/// little ahead of the watermark this bridge reads (seen in chaos runs: a poller on the
/// next gateway 5 ms later got `ahead` for the message it had been shown, and was then
/// shown it again). A forged future position pays this wait once.
pub const AHEAD_SETTLE: Duration = Duration::from_millis(500);
/// Between two reads of the watermarks while a `since` is ahead.
const AHEAD_RETRY: Duration = Duration::from_millis(25);

/// The offsets to read for "after `since`": `[since, high)`, decided from the
/// partition's watermarks before reading anything.
pub fn plan_since(since: u64, low: i64, high: i64, max_scan: u64) -> Result<(i64, i64), Lost> {
    let high_seq = high.max(0) as u64;
    if since > high_seq {
        return Err(Lost::Ahead);
    }
    // `since` is the next offset the reader needs (seq = offset + 1).
    if (since as i64) < low {
        return Err(Lost::TooOld);
    }
    if high_seq - since > max_scan {
        return Err(Lost::TooMany);
    }
    Ok((since as i64, high))
}

/// The offsets to read for "the newest": the last `max_scan` records at most.
pub fn plan_newest(low: i64, high: i64, max_scan: u64) -> (i64, i64) {
    (low.max(high - max_scan.min(i64::MAX as u64) as i64).max(0), high)
}

/// Collects a channel's messages from records read in offset order.
#[derive(Debug)]
pub struct Collector {
    channel: String,
    limit: usize,
    newest: bool,
    /// Messages accepted before this (unix ms) are past the rule's age.
    cutoff_ms: u64,
    keyed: HashSet<String>,
    pub messages: VecDeque<(u64, Envelope)>,
    pub more: bool,
    pub too_old: bool,
    /// Looking back (not collecting): the ids of the channel's keyed messages to find.
    look_for: Option<HashSet<String>>,
    /// Looking back: the ids found, and the oldest acceptance time of any record read.
    pub found: HashSet<String>,
    pub oldest_ms: u64,
}

impl Collector {
    /// After a position: the first `limit` (and whether there are more).
    pub fn since(channel: &str, limit: usize, cutoff_ms: u64) -> Self {
        Self::new(channel, limit, false, cutoff_ms)
    }

    /// The newest `limit`.
    pub fn newest(channel: &str, limit: usize, cutoff_ms: u64) -> Self {
        Self::new(channel, limit, true, cutoff_ms)
    }

    fn new(channel: &str, limit: usize, newest: bool, cutoff_ms: u64) -> Self {
        Self {
            channel: channel.into(),
            limit,
            newest,
            cutoff_ms,
            keyed: HashSet::new(),
            messages: VecDeque::new(),
            more: false,
            too_old: false,
            look_for: None,
            found: HashSet::new(),
            oldest_ms: u64::MAX,
        }
    }

    /// Looks for earlier copies of the channel's keyed messages `ids` (see
    /// [`History::drop_later_copies`]).
    pub fn lookback(channel: &str, ids: HashSet<String>) -> Self {
        Self { look_for: Some(ids), ..Self::new(channel, 0, false, 0) }
    }

    /// Takes the record at `offset`; false when nothing later can change the answer.
    pub fn offer(&mut self, offset: i64, env: Envelope) -> bool {
        let is_ours = matches!(&env.target, Some(envelope::Target::Channel(c)) if *c == self.channel)
            && env.kind == envelope::Kind::Message as i32;
        if let Some(ids) = &self.look_for {
            self.oldest_ms = self.oldest_ms.min(env.published_at_ms);
            if is_ours && env.idempotent && ids.contains(&env.id) {
                self.found.insert(env.id);
            }
            return true;
        }
        if !is_ours {
            return true;
        }
        // A keyed message stored twice (a retry through another bridge): the first stands.
        if env.idempotent && !self.keyed.insert(env.id.clone()) {
            return true;
        }
        if env.published_at_ms < self.cutoff_ms {
            if self.newest {
                return true; // older than the rule keeps: not shown
            }
            self.too_old = true;
            return false;
        }
        if self.newest {
            self.messages.push_back((offset as u64 + 1, env));
            if self.messages.len() > self.limit {
                self.messages.pop_front();
            }
            return true;
        }
        if self.messages.len() == self.limit {
            self.more = true;
            return false;
        }
        self.messages.push_back((offset as u64 + 1, env));
        true
    }
}

fn message(seq: u64, env: &Envelope) -> pb::HistoryMessage {
    pb::HistoryMessage {
        id: env.id.clone(),
        from: env.from.clone(),
        seq,
        data_json: String::from_utf8_lossy(&env.payload).into_owned(),
        published_at_ms: env.published_at_ms,
        idempotent: env.idempotent,
    }
}

fn count(source: &'static str, outcome: &'static str) {
    metrics::counter!(m::HISTORY_READS, "source" => source, "outcome" => outcome).increment(1);
}

fn outcome(lost: Lost) -> &'static str {
    match lost {
        Lost::None => "ok",
        Lost::EpochChanged => "epoch_changed",
        Lost::TooOld => "too_old",
        Lost::TooMany => "too_many",
        Lost::Ahead => "ahead",
        Lost::NoHistory => "no_history",
    }
}

/// Consumers outside the group for history reads and watermarks.
pub struct Readers {
    config: ClientConfig,
    topic: String,
    /// Watermarks and metadata.
    meta: BaseConsumer,
    idle: Mutex<Vec<BaseConsumer>>,
    /// Held by a read until its blocking part ends (also when its caller went away).
    slots: Arc<Semaphore>,
    waiting: AtomicUsize,
    read_timeout: Duration,
    /// Recent high watermarks per partition, for position-only answers.
    recent_high: Mutex<std::collections::HashMap<i32, (std::time::Instant, i64)>>,
}

/// How long a high watermark may answer a position-only request. A stale one is only
/// lower than the truth, which is safe: the gateway then checks (and if needed reads)
/// the span up to its first live message. It spares the broker one request per
/// subscribe in a reconnect storm.
pub const POSITION_CACHE: Duration = Duration::from_millis(250);

impl std::fmt::Debug for Readers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Readers").field("topic", &self.topic).finish_non_exhaustive()
    }
}

fn unavailable(e: impl std::fmt::Display) -> Status {
    Status::unavailable(format!("history: kafka: {e}"))
}

impl Readers {
    pub fn new(config: ClientConfig, topic: &str) -> Result<Self, KafkaError> {
        Ok(Self {
            meta: config.create()?,
            config,
            topic: topic.into(),
            idle: Mutex::new(Vec::new()),
            slots: Arc::new(Semaphore::new(CONCURRENT_READS)),
            waiting: AtomicUsize::new(0),
            read_timeout: READ_TIMEOUT,
            recent_high: Mutex::new(std::collections::HashMap::new()),
        })
    }

    /// The high watermark of `partition`, at most [`POSITION_CACHE`] old.
    pub async fn recent_high(self: &Arc<Self>, partition: i32) -> Result<i64, Status> {
        if let Some(&(at, high)) = self.recent_high.lock().get(&partition)
            && at.elapsed() < POSITION_CACHE
        {
            return Ok(high);
        }
        let (_, high) = self.watermarks(partition).await?;
        self.recent_high.lock().insert(partition, (std::time::Instant::now(), high));
        Ok(high)
    }

    /// Another bound for one read (default [`READ_TIMEOUT`]).
    pub fn with_read_timeout(mut self, t: Duration) -> Self {
        self.read_timeout = t;
        self
    }

    /// (reads running, reads waiting for a slot).
    pub fn load(&self) -> (usize, usize) {
        (CONCURRENT_READS - self.slots.available_permits(), self.waiting.load(Ordering::Acquire))
    }

    /// The client watermarks and metadata go through (also for DescribeTopics).
    pub fn meta(&self) -> &BaseConsumer {
        &self.meta
    }

    /// (low, high) watermarks of `partition`, asked from the broker now.
    pub async fn watermarks(self: &Arc<Self>, partition: i32) -> Result<(i64, i64), Status> {
        let me = self.clone();
        tokio::task::spawn_blocking(move || me.meta.fetch_watermarks(&me.topic, partition, Duration::from_secs(5)))
            .await
            .map_err(unavailable)?
            .map_err(unavailable)
    }

    /// Partition count of the topic.
    pub fn partitions(&self, timeout: Duration) -> Result<i32, KafkaError> {
        let md = self.meta.fetch_metadata(Some(&self.topic), timeout)?;
        Ok(md.topics().iter().find(|t| t.name() == self.topic).map_or(0, |t| t.partitions().len() as i32))
    }

    /// Reads `[from, to)` of `partition`, handing each record to `c`.
    pub async fn scan(self: &Arc<Self>, partition: i32, from: i64, to: i64, c: Collector) -> Result<Collector, Status> {
        if from >= to {
            return Ok(c);
        }
        /// Counts a caller waiting for a slot, also when its future is dropped while waiting.
        struct Waiting<'a>(&'a AtomicUsize);
        impl Drop for Waiting<'_> {
            fn drop(&mut self) {
                self.0.fetch_sub(1, Ordering::AcqRel);
            }
        }
        let waiting = Waiting(&self.waiting);
        if self.waiting.fetch_add(1, Ordering::AcqRel) >= QUEUED_READS {
            return Err(Status::unavailable("history: too many reads in progress; retry in 1 s"));
        }
        let permit = self.slots.clone().acquire_owned().await;
        drop(waiting);
        let permit = permit.map_err(unavailable)?;
        let me = self.clone();
        tokio::task::spawn_blocking(move || {
            let _permit = permit;
            me.scan_blocking(partition, from, to, c)
        })
        .await
        .map_err(unavailable)?
    }

    fn scan_blocking(&self, partition: i32, from: i64, to: i64, mut c: Collector) -> Result<Collector, Status> {
        let consumer = match self.idle.lock().pop() {
            Some(c) => c,
            None => self.config.create().map_err(unavailable)?,
        };
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(&self.topic, partition, Offset::Offset(from)).map_err(unavailable)?;
        consumer.assign(&tpl).map_err(unavailable)?;
        let deadline = Instant::now() + self.read_timeout;
        let result = loop {
            if Instant::now() > deadline {
                break Err(Status::unavailable("history: kafka read timed out"));
            }
            match consumer.poll(Duration::from_millis(100)) {
                Some(Ok(msg)) => {
                    let offset = msg.offset();
                    if msg.partition() != partition || offset < from {
                        continue; // left over from an earlier assignment
                    }
                    if offset >= to {
                        break Ok(());
                    }
                    let go_on = match msg.payload().map(Envelope::decode) {
                        Some(Ok(env)) => c.offer(offset, env),
                        _ => true,
                    };
                    if !go_on || offset + 1 >= to {
                        break Ok(());
                    }
                }
                // The end only if this assignment's position reached `to`: a pooled consumer
                // can still hand out the end-of-partition event of its previous read of the
                // same partition, and a broker may report a high watermark a moment before
                // it serves the records below it (seen on tansu in chaos runs: an answer
                // "complete through" its high watermark lacked a message below it).
                Some(Err(KafkaError::PartitionEOF(p))) if p == partition && reached(&consumer, &self.topic, p, to) => {
                    break Ok(());
                }
                Some(Err(KafkaError::PartitionEOF(_))) | None => {}
                // Retention deleted `from` after the watermarks were taken.
                Some(Err(e)) if gone(&e) => {
                    c.too_old = true;
                    break Ok(());
                }
                Some(Err(e)) => break Err(unavailable(e)),
            }
        };
        // Back to the pool only when it ended cleanly (its fetch state is then known).
        if result.is_ok() && consumer.unassign().is_ok() {
            self.idle.lock().push(consumer);
        }
        result.map(|()| c)
    }
}

/// Whether `consumer`'s fetch position in `partition` is at or beyond `to`.
fn reached(consumer: &BaseConsumer, topic: &str, partition: i32, to: i64) -> bool {
    consumer.position().ok().and_then(|tpl| tpl.find_partition(topic, partition).map(|e| e.offset())).is_some_and(|o| {
        match o {
            Offset::Offset(o) => o >= to,
            _ => false,
        }
    })
}

/// The offset asked for is no longer in the log.
fn gone(e: &KafkaError) -> bool {
    use rdkafka::error::RDKafkaErrorCode as C;
    matches!(e.rdkafka_error_code(), Some(C::OffsetOutOfRange | C::AutoOffsetReset))
}

/// Everything History needs.
#[derive(Debug)]
pub struct History {
    pub hot: Arc<Mutex<HotWindows>>,
    pub epochs: Arc<RwLock<Epochs>>,
    /// The backbone's log (reads and watermarks).
    pub log: Arc<crate::log::Log>,
    pub max_scan: u64,
}

fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

fn lost(lost: Lost, position: pb::Position) -> pb::HistoryResponse {
    count("log", outcome(lost));
    pb::HistoryResponse { messages: Vec::new(), position: Some(position), more: false, lost: lost as i32 }
}

impl History {
    /// Answers a validated request (`limit` already defaulted and bounded).
    pub async fn answer(
        &self,
        channel: &str,
        since: Option<pb::Position>,
        limit: usize,
        position_only: bool,
    ) -> Result<pb::HistoryResponse, Status> {
        let Some((partition, epoch)) = self.epochs.read().channel(channel) else {
            count("log", "error");
            return Err(Status::unavailable("history: the topic's partitions are not known yet"));
        };
        let rule = self.hot.lock().rules().for_channel(channel).cloned();
        let now = now_ms();
        // The hot window first: it needs no request to Kafka.
        if !position_only && rule.is_some() && since.as_ref().is_none_or(|s| s.epoch == *epoch) {
            let query = since.as_ref().map_or(Query::Newest, |s| Query::Since(s.seq));
            let hot = self.hot.lock().read(partition, channel, query, limit, now);
            if let Some(a) = hot {
                count("hot", "ok");
                return Ok(hot_response(a, &epoch));
            }
        }
        if position_only {
            let high = self.log.recent_high(partition).await.inspect_err(|_| count("log", "error"))?;
            count("log", "ok");
            let position = pb::Position { seq: high.max(0) as u64, epoch: epoch.to_string() };
            return Ok(pb::HistoryResponse { position: Some(position), ..Default::default() });
        }
        let settle = tokio::time::Instant::now() + AHEAD_SETTLE;
        let mut waited = false;
        let (low, high) = loop {
            let (low, high) = match self.log.watermarks(partition).await {
                Ok(w) => w,
                Err(e) => {
                    count("log", "error");
                    return Err(e);
                }
            };
            let ahead = since.as_ref().is_some_and(|s| s.epoch == *epoch && s.seq > high.max(0) as u64);
            if !ahead || tokio::time::Instant::now() >= settle {
                break (low, high);
            }
            if !waited {
                waited = true;
                metrics::counter!(m::AHEAD_WAITS).increment(1);
            }
            tokio::time::sleep(AHEAD_RETRY).await;
        };
        let current = pb::Position { seq: high.max(0) as u64, epoch: epoch.to_string() };
        if since.as_ref().is_some_and(|s| s.epoch != *epoch) {
            return Ok(lost(Lost::EpochChanged, current));
        }
        let Some(rule) = rule else { return Ok(lost(Lost::NoHistory, current)) };
        let cutoff = now.saturating_sub(rule.max_age.as_millis() as u64);
        let (from, to, collector) = match &since {
            Some(s) => match plan_since(s.seq, low, high, self.max_scan) {
                Ok((from, to)) => (from, to, Collector::since(channel, limit, cutoff)),
                Err(l) => return Ok(lost(l, current)),
            },
            None => {
                let (from, to) = plan_newest(low, high, self.max_scan);
                (from, to, Collector::newest(channel, limit.min(rule.max_messages), cutoff))
            }
        };
        let c = match self.log.scan(partition, from, to, collector).await {
            Ok(c) => c,
            Err(e) => {
                count("log", if e.message().contains("too many reads") { "busy" } else { "error" });
                return Err(e);
            }
        };
        if c.too_old {
            return Ok(lost(Lost::TooOld, current));
        }
        let mut c = c;
        let position = if c.more { c.messages.back().map_or(current.seq, |m| m.0) } else { current.seq };
        if since.is_some() {
            self.drop_later_copies(partition, channel, low, from, &mut c).await?;
        }
        count("log", "ok");
        Ok(pb::HistoryResponse {
            messages: c.messages.iter().map(|(seq, env)| message(*seq, env)).collect(),
            position: Some(pb::Position { seq: position, epoch: epoch.to_string() }),
            more: c.more,
            lost: Lost::None as i32,
        })
    }
}

impl History {
    /// A keyed message marked `maybe_stored_before` in an answer that starts at `from`
    /// may be a later copy of one stored before `from` (a retry stored again): what the
    /// client was shown before its `since`. Reads back from `from`, a chunk at a time,
    /// until every such id is found, the records read are older than the idempotency
    /// window before the oldest of them, the log's start, or `max_scan` records; the
    /// copies found are left out of the answer (the position it is complete through
    /// stays).
    async fn drop_later_copies(
        &self,
        partition: i32,
        channel: &str,
        low: i64,
        from: i64,
        c: &mut Collector,
    ) -> Result<(), Status> {
        let unsure: HashSet<String> = c
            .messages
            .iter()
            .filter(|(_, e)| e.idempotent && e.maybe_stored_before)
            .map(|(_, e)| e.id.clone())
            .collect();
        let Some(horizon) = c
            .messages
            .iter()
            .filter(|(_, e)| unsure.contains(&e.id))
            .map(|(_, e)| e.published_at_ms)
            .min()
            .map(|t| t.saturating_sub(crate::ingest::IDEMPOTENCY_WINDOW.as_millis() as u64))
        else {
            return Ok(());
        };
        let mut found = HashSet::new();
        let mut to = from;
        let mut read = 0u64;
        while to > low.max(0) && read < self.max_scan && found.len() < unsure.len() {
            let lo = (to - LOOKBACK_CHUNK).max(low.max(0));
            let look = Collector::lookback(channel, unsure.clone());
            let look = self.log.scan(partition, lo, to, look).await?;
            found.extend(look.found);
            read += (to - lo) as u64;
            to = lo;
            if look.oldest_ms < horizon {
                break;
            }
        }
        if !found.is_empty() {
            let before = c.messages.len();
            c.messages.retain(|(_, e)| !(e.idempotent && found.contains(&e.id)));
            metrics::counter!(m::KEYED_COPIES_DROPPED).increment((before - c.messages.len()) as u64);
        }
        Ok(())
    }
}

/// Records read per step when looking back for earlier copies of keyed messages.
const LOOKBACK_CHUNK: i64 = 1000;

fn hot_response(a: hot::Answer, epoch: &str) -> pb::HistoryResponse {
    pb::HistoryResponse {
        messages: a.messages.iter().map(|(seq, env): &(u64, Msg)| message(*seq, env)).collect(),
        position: Some(pb::Position { seq: a.position, epoch: epoch.into() }),
        more: a.more,
        lost: Lost::None as i32,
    }
}

/// What the broker says about the topic: partition count, and its id (None when
/// DescribeTopics failed; all zero when the broker has no topic ids). Blocking.
pub fn discover(readers: &Readers, topic: &str) -> Result<(i32, Option<[u8; 16]>), String> {
    let partitions = readers.partitions(Duration::from_secs(5)).map_err(|e| format!("metadata of {topic}: {e}"))?;
    if partitions < 1 {
        return Err(format!("topic {topic} has no partitions (yet)"));
    }
    let id = match crate::topic_id::describe(readers.meta().client().native_client(), topic, Duration::from_secs(3)) {
        Ok(id) => Some(id),
        Err(e) => {
            tracing::warn!(error = %e, "kafka did not tell the topic id (DescribeTopics)");
            None
        }
    };
    Ok((partitions, id))
}

/// The epochs from a discovery; `current` keeps its incarnation when the id is unknown now.
pub fn epochs_from(partitions: i32, id: Option<[u8; 16]>, generation: &str, current: Option<&Epochs>) -> Epochs {
    let incarnation = id.map(|id| {
        if id == [0; 16] {
            crate::epoch::Incarnation::Generation(generation.to_owned())
        } else {
            crate::epoch::Incarnation::TopicId(id)
        }
    });
    epochs_of(partitions, incarnation, generation, current)
}

/// The epochs for what the log reported: its identity when it has one, else the one
/// known (a failed look-up changes nothing), else the generation.
pub fn epochs_of(
    partitions: i32,
    incarnation: Option<crate::epoch::Incarnation>,
    generation: &str,
    current: Option<&Epochs>,
) -> Epochs {
    match (incarnation, current) {
        (Some(i), _) => Epochs::new(i, partitions),
        (None, Some(c)) => Epochs::new(c.incarnation.clone(), partitions),
        (None, None) => Epochs::new(crate::epoch::Incarnation::Generation(generation.to_owned()), partitions),
    }
}

/// Looks at the log's partitions and identity every 30 s (every second while unknown);
/// new epochs (a re-created or re-partitioned log) drop the hot windows.
pub async fn refresh_epochs(
    log: Arc<crate::log::Log>,
    epochs: Arc<RwLock<Epochs>>,
    hot: Arc<Mutex<HotWindows>>,
    generation: String,
    stop: tokio_util::sync::CancellationToken,
) {
    loop {
        let period = if epochs.read().partitions < 1 { Duration::from_secs(1) } else { Duration::from_secs(30) };
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(period) => {}
        }
        let Ok((partitions, incarnation)) = log.discover(&generation).await else { continue };
        let next = epochs_of(partitions, incarnation, &generation, Some(&epochs.read()));
        if *epochs.read() != next {
            tracing::warn!(?next, "the log's epochs changed (re-created or re-partitioned); history windows dropped");
            *epochs.write() = next;
            hot.lock().clear();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn epochs_keep_their_incarnation_when_the_id_is_unknown_for_a_while() {
        use crate::epoch::Incarnation;
        let first = epochs_from(4, Some([1; 16]), "g", None);
        assert_eq!(first.incarnation, Incarnation::TopicId([1; 16]));
        assert_eq!(epochs_from(4, None, "g", Some(&first)), first, "a failed DescribeTopics changes nothing");
        assert_ne!(epochs_from(6, None, "g", Some(&first)), first, "re-partitioned");
        assert_ne!(epochs_from(4, Some([2; 16]), "g", Some(&first)), first, "re-created");
        let none = epochs_from(4, Some([0; 16]), "7", None);
        assert_eq!(none.incarnation, Incarnation::Generation("7".into()), "no topic ids: the generation");
        assert_eq!(epochs_from(4, None, "7", None), none);
    }

    #[test]
    fn since_is_decided_from_the_watermarks_before_reading() {
        // Partition holds offsets 100..1000 (seq 101..=1000).
        assert_eq!(plan_since(500, 100, 1000, 10_000), Ok((500, 1000)));
        assert_eq!(plan_since(1000, 100, 1000, 10_000), Ok((1000, 1000)), "up to date: nothing to read");
        assert_eq!(plan_since(1001, 100, 1000, 10_000), Err(Lost::Ahead));
        assert_eq!(plan_since(100, 100, 1000, 10_000), Ok((100, 1000)), "the first retained offset is next");
        assert_eq!(plan_since(99, 100, 1000, 10_000), Err(Lost::TooOld), "offset 99 is gone");
        assert_eq!(plan_since(0, 100, 1000, 10_000), Err(Lost::TooOld));
        assert_eq!(plan_since(500, 100, 1000, 500), Ok((500, 1000)));
        assert_eq!(plan_since(500, 100, 1000, 499), Err(Lost::TooMany));
        assert_eq!(plan_since(0, 0, 0, 0), Ok((0, 0)), "empty partition");
        assert_eq!(plan_newest(100, 1000, 300), (700, 1000));
        assert_eq!(plan_newest(100, 1000, 5000), (100, 1000));
        assert_eq!(plan_newest(0, 0, u64::MAX), (0, 0));
    }

    fn env(channel: &str, id: &str, at: u64, keyed: bool) -> Envelope {
        Envelope {
            id: id.into(),
            target: Some(envelope::Target::Channel(channel.into())),
            published_at_ms: at,
            idempotent: keyed,
            ..Default::default()
        }
    }

    fn seqs(c: &Collector) -> Vec<u64> {
        c.messages.iter().map(|m| m.0).collect()
    }

    #[test]
    fn the_collector_filters_the_channel_pages_and_keeps_keyed_copies_once() {
        let mut c = Collector::since("a", 2, 0);
        assert!(c.offer(10, env("b", "1", 5, false)));
        assert!(c.offer(11, env("a", "k", 5, true)));
        assert!(c.offer(12, env("a", "k", 5, true)), "second copy skipped");
        let user = Envelope { target: Some(envelope::Target::User("a".into())), ..Default::default() };
        assert!(c.offer(13, user));
        assert!(c.offer(14, env("a", "2", 5, false)));
        assert!(!c.offer(15, env("a", "3", 5, false)), "a third message means more");
        assert_eq!((seqs(&c), c.more, c.too_old), (vec![12, 15], true, false));
        let mut n = Collector::newest("a", 2, 0);
        for (o, id) in [(1, "x"), (2, "k"), (3, "y"), (4, "k"), (5, "z")] {
            assert!(n.offer(o, env("a", id, 5, id == "k")));
        }
        assert_eq!((seqs(&n), n.more), (vec![4, 6], false));
    }

    #[test]
    fn looking_back_finds_the_channels_keyed_ids_and_the_oldest_time_read() {
        let ids: HashSet<String> = ["k".to_string(), "j".to_string()].into();
        let mut c = Collector::lookback("a", ids);
        assert!(c.offer(1, env("b", "k", 30, true)), "another channel's copy is not ours");
        assert!(c.offer(2, env("a", "k", 20, false)), "nor an unkeyed message with the id");
        assert!(c.found.is_empty());
        assert!(c.offer(3, env("a", "k", 40, true)));
        assert!(c.offer(4, env("a", "x", 50, true)));
        assert_eq!(c.found, ["k".to_string()].into());
        assert_eq!(c.oldest_ms, 20);
        assert!(c.messages.is_empty(), "nothing is collected");
    }

    #[test]
    fn the_rules_age_bounds_reads_from_the_log() {
        let mut c = Collector::since("a", 10, 100);
        assert!(!c.offer(1, env("a", "1", 99, false)));
        assert!(c.too_old && c.messages.is_empty());
        let mut n = Collector::newest("a", 10, 100);
        n.offer(1, env("a", "1", 99, false));
        n.offer(2, env("a", "2", 100, false));
        assert_eq!(seqs(&n), [3]);
    }
}
