//! The log: the one seam between the bridge and its backbone. Ingest appends to
//! it (with a durable acknowledgement), consume reads it per partition in order
//! and commits, history reads it from a position, and its identity names the
//! epochs. Three backbones implement it, dispatched by [`Log`]:
//!
//! - Kafka (rdkafka): the topic's partitions, the consumer group (rebalances by
//!   the broker), offsets committed to the group; code in `kafka.rs`, `consume.rs`
//!   (the group's consumer), `history.rs` (`Readers`) and `topic_id.rs`;
//! - NATS JetStream ([`nats`]): one stream per partition, sequence − 1 = offset,
//!   a KV bucket for the identity, leases and committed offsets;
//! - Redis Streams ([`redis`]): one stream per partition, entry id `<offset>-1`,
//!   a hash per partition for its lease and committed offset.
//!
//! NATS and Redis have no consumer group: [`leased`] shares their partitions
//! among the bridges with leases ([`lease`], pure).

pub mod lease;
pub mod leased;
pub mod nats;
pub mod redis;

use std::sync::Arc;
use std::time::Duration;

use tonic::Status;

use crate::config::Cli;
use crate::epoch::{self, Incarnation};
use crate::history::{Collector, Readers};
use crate::ingest::Producer;

/// Which backbone, from `--backbone` (or `--brokers` for Kafka).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Backbone {
    /// Kafka bootstrap servers, `host:port,...`.
    Kafka(String),
    /// A NATS server URL, `nats://host:port`.
    Nats(String),
    /// A Redis URL, `redis://host:port[/db]`.
    Redis(String),
}

/// `url` with its credentials (`user:pass@`) hidden, for messages and logs.
pub(crate) fn redact(url: &str) -> String {
    match url.split_once("://").and_then(|(scheme, rest)| Some((scheme, rest.rsplit_once('@')?.1))) {
        Some((scheme, host)) => format!("{scheme}://***@{host}"),
        None => url.to_owned(),
    }
}

impl Backbone {
    /// `kafka://host:port,...`, `nats://host:port`, `redis://host:port[/db]`; none: Kafka at `brokers`.
    pub fn parse(url: Option<&str>, brokers: &str) -> Result<Self, String> {
        let Some(url) = url.map(str::trim).filter(|u| !u.is_empty()) else {
            return Ok(Self::Kafka(brokers.to_owned()));
        };
        let shown = redact(url);
        let (scheme, rest) = url
            .split_once("://")
            .ok_or_else(|| format!("--backbone `{shown}`: expected kafka://, nats:// or redis://"))?;
        let hosts: Vec<&str> = rest.trim_end_matches('/').split(',').collect();
        let valid_host = |h: &str| {
            let h = h.split('/').next().unwrap_or_default();
            let h = h.rsplit('@').next().unwrap_or_default();
            h.rsplit_once(':').is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p > 0))
        };
        if hosts.iter().any(|h| !valid_host(h)) {
            return Err(format!("--backbone `{shown}`: expected host:port after {scheme}://"));
        }
        match scheme {
            "kafka" => Ok(Self::Kafka(hosts.join(","))),
            "nats" if hosts.len() == 1 => Ok(Self::Nats(url.to_owned())),
            "redis" if hosts.len() == 1 => Ok(Self::Redis(url.to_owned())),
            "nats" | "redis" => Err(format!("--backbone `{shown}`: one {scheme} server address")),
            other => Err(format!("--backbone `{shown}`: unknown scheme `{other}` (kafka, nats or redis)")),
        }
    }

    /// The backbone's name (logs).
    pub fn name(&self) -> &'static str {
        match self {
            Self::Kafka(_) => "kafka",
            Self::Nats(_) => "nats",
            Self::Redis(_) => "redis",
        }
    }
}

/// The log of one bridge, on one backbone.
pub enum Log {
    Kafka { producer: Arc<Producer>, readers: Arc<Readers>, topic: String },
    Nats(Box<nats::NatsLog>),
    Redis(Box<redis::RedisLog>),
}

impl std::fmt::Debug for Log {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Kafka { topic, .. } => f.debug_struct("Log::Kafka").field("topic", topic).finish_non_exhaustive(),
            Self::Nats(n) => n.fmt(f),
            Self::Redis(r) => r.fmt(f),
        }
    }
}

/// Why an append was not acknowledged; either way it may have been stored.
#[derive(Debug, thiserror::Error)]
pub enum AppendError {
    #[error("{0} did not acknowledge the message ({1})")]
    Failed(&'static str, String),
    #[error("{0} did not answer in time")]
    TimedOut(&'static str),
}

/// A record read back: its partition, offset and payload (an encoded `Envelope`).
#[derive(Debug, Clone)]
pub struct Record {
    pub partition: i32,
    pub offset: i64,
    /// The lease generation the record was read under (leased backbones).
    pub generation: u64,
    pub payload: bytes::Bytes,
}

impl Log {
    /// Connects to a NATS or Redis backbone and makes sure its streams exist (Kafka is
    /// set up in `run`, as before the seam). Errors are configuration errors (exit 64).
    pub async fn connect(backbone: &Backbone, cli: &Cli) -> Result<Self, String> {
        match backbone {
            Backbone::Kafka(_) => Err("kafka is set up by run".into()),
            Backbone::Nats(url) => nats::NatsLog::connect(url, cli).await.map(|n| Self::Nats(Box::new(n))),
            Backbone::Redis(url) => redis::RedisLog::connect(url, cli).await.map(|r| Self::Redis(Box::new(r))),
        }
    }

    /// Appends `payload` under `key` (the partition follows the key); returns the record's
    /// offset once the backbone has stored it.
    pub async fn append(
        &self,
        key: &str,
        payload: Vec<u8>,
        dedup_id: Option<&str>,
        timeout: Duration,
    ) -> Result<i64, AppendError> {
        let timeout = bounded(timeout);
        match self {
            Self::Kafka { producer, topic, .. } => producer.append(topic, key, &payload, timeout).await,
            Self::Nats(n) => n.append(key, payload, dedup_id, timeout).await,
            Self::Redis(r) => r.append(key, payload, timeout).await,
        }
    }

    /// (low, high) watermarks of `partition`: the first retained offset and the next offset.
    pub async fn watermarks(&self, partition: i32) -> Result<(i64, i64), Status> {
        match self {
            Self::Kafka { readers, .. } => readers.watermarks(partition).await,
            Self::Nats(n) => n.watermarks(partition).await.map_err(unavailable),
            Self::Redis(r) => r.watermarks(partition).await.map_err(unavailable),
        }
    }

    /// The high watermark, possibly slightly old (position-only answers).
    pub async fn recent_high(&self, partition: i32) -> Result<i64, Status> {
        match self {
            Self::Kafka { readers, .. } => readers.recent_high(partition).await,
            _ => self.watermarks(partition).await.map(|(_, h)| h),
        }
    }

    /// Reads `[from, to)` of `partition`, handing each record to `c`.
    pub async fn scan(&self, partition: i32, from: i64, to: i64, c: Collector) -> Result<Collector, Status> {
        match self {
            Self::Kafka { readers, .. } => readers.scan(partition, from, to, c).await,
            Self::Nats(n) => n.reads.run(n.scan(partition, from, to, c)).await,
            Self::Redis(r) => r.reads.run(r.scan(partition, from, to, c)).await,
        }
    }

    /// Partition count and identity of the log (for the epochs).
    pub async fn discover(&self, generation: &str) -> Result<(i32, Option<Incarnation>), String> {
        match self {
            Self::Kafka { readers, topic, .. } => {
                let (r, t) = (readers.clone(), topic.clone());
                let (partitions, id) = tokio::task::spawn_blocking(move || crate::history::discover(&r, &t))
                    .await
                    .map_err(|e| e.to_string())??;
                let incarnation = id.map(|id| {
                    if id == [0; 16] {
                        Incarnation::Generation(generation.to_owned())
                    } else {
                        Incarnation::TopicId(id)
                    }
                });
                Ok((partitions, incarnation))
            }
            Self::Nats(n) => n.discover().await.map(|(p, id)| (p, Some(Incarnation::Log('n', id)))),
            Self::Redis(r) => r.discover().await.map(|(p, id)| (p, Some(Incarnation::Log('r', id)))),
        }
    }

    /// The lease store of a leased backbone (None for Kafka, which has its consumer group).
    pub fn leases(&self) -> Option<leased::Store<'_>> {
        match self {
            Self::Kafka { .. } => None,
            Self::Nats(n) => Some(leased::Store::Nats(n)),
            Self::Redis(r) => Some(leased::Store::Redis(r)),
        }
    }

    /// Partitions of a leased backbone (fixed when its log was first created).
    pub fn partitions(&self) -> i32 {
        match self {
            Self::Kafka { .. } => 0,
            Self::Nats(n) => n.partitions,
            Self::Redis(r) => r.partitions,
        }
    }
}

/// Bounds History reads from a NATS or Redis log as Kafka's `Readers` do: at most
/// [`CONCURRENT_READS`](crate::history::CONCURRENT_READS) at once and
/// [`QUEUED_READS`](crate::history::QUEUED_READS) waiting; beyond that, UNAVAILABLE at once.
#[derive(Debug)]
pub struct Reads {
    slots: tokio::sync::Semaphore,
    waiting: std::sync::atomic::AtomicUsize,
}

impl Default for Reads {
    fn default() -> Self {
        Self {
            slots: tokio::sync::Semaphore::new(crate::history::CONCURRENT_READS),
            waiting: std::sync::atomic::AtomicUsize::new(0),
        }
    }
}

impl Reads {
    async fn run<T>(&self, read: impl std::future::Future<Output = Result<T, String>>) -> Result<T, Status> {
        use std::sync::atomic::Ordering;
        /// Counts a caller waiting for a slot, also when its future is dropped while waiting.
        struct Waiting<'a>(&'a std::sync::atomic::AtomicUsize);
        impl Drop for Waiting<'_> {
            fn drop(&mut self) {
                self.0.fetch_sub(1, Ordering::AcqRel);
            }
        }
        let waiting = Waiting(&self.waiting);
        if self.waiting.fetch_add(1, Ordering::AcqRel) >= crate::history::QUEUED_READS {
            return Err(Status::unavailable("history: too many reads in progress; retry in 1 s"));
        }
        let permit = self.slots.acquire().await.map_err(|e| unavailable(e.to_string()))?;
        drop(waiting);
        let out = read.await.map_err(unavailable);
        drop(permit);
        out
    }
}

fn unavailable(e: String) -> Status {
    Status::unavailable(format!("history: {e}"))
}

/// The partition of `key` among `partitions` (the one Kafka's producer picks too).
pub fn partition_of(key: &str, partitions: i32) -> i32 {
    epoch::partition_for(key.as_bytes(), partitions)
}

/// A stream, bucket or key name part from the topic: `[A-Za-z0-9_-]` only.
pub fn safe_name(topic: &str) -> String {
    topic.chars().map(|c| if c.is_ascii_alphanumeric() || c == '-' || c == '_' { c } else { '_' }).collect()
}

/// A wait for the backbone, at least 100 ms (a zero timeout would refuse everything).
pub fn bounded(d: Duration) -> Duration {
    d.max(Duration::from_millis(100))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_stay_out_of_messages() {
        assert_eq!(redact("redis://u:secret@h:1/2"), "redis://***@h:1/2");
        assert_eq!(redact("nats://h:1"), "nats://h:1");
        let e = Backbone::parse(Some("redis://u:secret@h"), "x").unwrap_err();
        assert!(!e.contains("secret") && e.contains("***@h"), "{e}");
    }

    #[test]
    fn backbone_urls_parse_or_say_why_not() {
        assert_eq!(Backbone::parse(None, "b:9092"), Ok(Backbone::Kafka("b:9092".into())));
        assert_eq!(Backbone::parse(Some("kafka://a:1,b:2"), "x"), Ok(Backbone::Kafka("a:1,b:2".into())));
        assert_eq!(
            Backbone::parse(Some("nats://127.0.0.1:4222"), "x"),
            Ok(Backbone::Nats("nats://127.0.0.1:4222".into()))
        );
        assert_eq!(Backbone::parse(Some("redis://r:6379/2"), "x"), Ok(Backbone::Redis("redis://r:6379/2".into())));
        for bad in ["amqp://h:1", "nats://", "redis://h", "h:1", "nats://a:1,b:2", "kafka://h:0"] {
            let e = Backbone::parse(Some(bad), "x").unwrap_err();
            assert!(e.starts_with("--backbone") && !e.contains('\n'), "{bad}: {e}");
        }
        assert_eq!(safe_name("sb.test-1_x"), "sb_test-1_x");
        assert_eq!(partition_of("c:room:1", 4), epoch::partition_for(b"c:room:1", 4));
    }
}
