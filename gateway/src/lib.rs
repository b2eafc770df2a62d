//! Switchboard's WebSocket edge gateway.
//!
//! A standalone node is a complete real-time server: sessions, channels,
//! direct messages, presence queries and the Push API, all in-process. The
//! message path, one module per stage:
//!
//! - [`server`] (accept): listener, connection caps, HTTP/1 or HTTP/2 (h2c) with slowloris timeout, drain;
//!   [`admission`]: per-user limits and the memory budget;
//! - [`handshake`]: routing, Origin allow-list, JWT auth ([`auth`]), the upgrade;
//! - [`session`]: the session core (commands, limits ([`policy`]), recovery), whatever the transport;
//! - [`transport`] (ingress/egress): WebSocket, Server-Sent Events, long-polling: each frames
//!   and carries what the session produces;
//! - [`bus`] (publish): the seam where messages leave the session ([`bus::LocalBus`] here);
//! - [`delivery`] (deliver, cluster mode): messages streamed in by broker-bridge;
//! - [`hub`] (fanout): sharded channels and users, encode once, bounded queues ([`outbox`]);
//! - [`wire`] and [`protocol`]: server frames and the JSON client protocol; [`deflate`]: permessage-deflate;
//! - [`presence`]: the presence seam (local hub, or remote replicas over gRPC);
//! - [`tls`]: TLS on the client port, in front of the plain handler (the session core keeps its `TcpStream`);
//! - [`push`]: the gRPC Push API; [`demo`]: the embedded chat page.

pub mod admission;
pub mod auth;
pub mod bus;
pub mod config;
pub mod deflate;
pub mod delivery;
pub mod demo;
pub mod handshake;
pub mod history;
pub mod hub;
pub mod limits;
pub mod metrics;
pub mod outbox;
pub mod pending;
pub mod policy;
pub mod presence;
pub mod protocol;
pub mod push;
pub mod server;
pub mod session;
pub mod tls;
pub mod transport;
pub mod wire;

mod run;

pub use run::{Listeners, RunError, Settings, SettingsError, run};
