//! Switchboard presence: a gRPC registry of which gateway node holds which
//! user, which nodes have subscribers on which channel, and who is in a
//! presence channel. Soft state only, rebuilt from the gateways' Sync streams.
//!
//! - [`registry`]: the pure state machine (hello, snapshot, deltas, leases, queries);
//! - [`service`]: the tonic service over it (Sync, queries, Watch);
//! - [`guard`]: tower layers (load shedding, concurrency limit, timeout);
//! - [`run`]: wiring, health, reflection, the expiry ticker.

pub mod config;
pub mod guard;
pub mod metrics;
pub mod registry;
pub mod service;

mod run;

pub use run::run;
