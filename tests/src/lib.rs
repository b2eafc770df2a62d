//! Test harness for Switchboard.
//!
//! - [`ws`]: WebSocket client helpers over tokio-tungstenite (an independent
//!   implementation, not our framing code), tokens, HTTP and metrics helpers;
//! - [`chaos`]: a seeded workload and nemesis over a whole cluster, whose history the checker judges;
//! - [`checker`]: the history checker of the chaos runs (what a workload did and saw, judged against the promises);
//! - [`cluster`]: the real binaries as child processes on free loopback ports,
//!   torn down on drop: `Cluster::builder().presence(1).kafka().bridges(2).gateways(3).start().await`;
//! - [`backbone`]: the backbones (Kafka, NATS, Redis), their servers for tests, and
//!   [`per_backbone!`] (one test body, a test per backbone);
//! - [`link`]: a TCP link between two services that can be cut, black-holed (a partition) or slowed;
//! - [`netns`]: a network namespace with a veth pair whose packets can all be dropped (a partition);
//! - [`kafka`]: tansu (a Kafka-protocol broker) behind a TCP proxy that can cut the path;
//! - [`tls`]: a throw-away PKI for mutual-TLS tests;
//! - [`http`]: plain HTTP/1.1 requests and a Server-Sent Events reader for the fallback transports;
//! - [`resume`]: an independent client that resumes with `since` across gateways, recording what it is shown;
//! - [`monitoring`]: docs/metrics.md tables, Prometheus text and PromQL taken apart for the monitoring tests.
#![allow(missing_debug_implementations)]

pub mod backbone;
pub mod chaos;
pub mod checker;
pub mod cluster;
pub mod http;
pub mod kafka;
pub mod link;
pub mod monitoring;
pub mod netns;
pub mod resume;
pub mod rr;
pub mod tls;
pub mod ws;

/// Polls `cond` every 20 ms until it holds, or panics with the message after [`ws::WAIT`].
#[macro_export]
macro_rules! eventually {
    ($cond:expr, $($msg:tt)+) => {{
        let deadline = tokio::time::Instant::now() + $crate::ws::WAIT;
        loop {
            if $cond {
                break;
            }
            if tokio::time::Instant::now() > deadline {
                panic!($($msg)+);
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    }};
}
