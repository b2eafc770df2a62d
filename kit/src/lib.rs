//! Plumbing shared by every Switchboard binary; no domain logic lives here.
//!
//! - [`args`]: command-line flags every binary takes (logging, admin address).
//! - [`telemetry`]: tracing subscriber (text or JSON) and the Prometheus recorder.
//! - [`admin`]: the admin HTTP endpoints `/metrics`, `/healthz`, `/readyz`.
//! - [`shutdown`]: SIGTERM/SIGINT turned into a cancellation token.
//! - [`grpc`]: the shared-token credential of the internal gRPC APIs.
//! - [`idempotency`]: answers remembered by idempotency key for a window.

pub mod admin;
pub mod args;
pub mod grpc;
pub mod idempotency;
pub mod shutdown;
pub mod telemetry;

/// Exit code for bad configuration (`EX_USAGE`).
pub const EXIT_CONFIG: i32 = 64;
