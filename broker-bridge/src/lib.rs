//! broker-bridge: the only client of the backbone (Kafka, NATS JetStream or Redis
//! Streams) in Switchboard.
//!
//! - [`log`]: the seam between the bridge and its backbone (append, read, commit,
//!   identity), and the partition leases of the backbones without a consumer group;
//! - [`ingest`] (publish): the Push API; ids, Kafka produce, ack after storage;
//! - [`consume`] (consume): the consumer group loop, commits after acknowledgement;
//! - [`route`] (route): the presence-fed routing cache;
//! - [`deliver`] (deliver): one gRPC stream per gateway, acks, redelivery;
//! - [`offsets`]: the pure commit-point tracker; [`kafka`]: client settings, topics;
//! - [`history`] (Push.History): hot window or Kafka read; [`hot`]: the hot windows the
//!   consumer feeds (pure); [`epoch`]: a channel's partition and epoch (pure);
//!   [`topic_id`]: Kafka's topic id through DescribeTopics (the one FFI module).

pub mod config;
pub mod consume;
pub mod deliver;
pub mod epoch;
pub mod history;
pub mod hot;
pub mod ingest;
pub mod kafka;
pub mod log;
pub mod metrics;
pub mod offsets;
pub mod route;
pub mod topic_id;

mod run;

pub use run::{RunError, run};
