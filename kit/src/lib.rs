//! Plumbing shared by every Switchboard binary; no domain logic lives here.
//!
//! - [`args`]: command-line flags every binary takes (logging, admin address).
//! - [`telemetry`]: tracing subscriber (text or JSON) and the Prometheus recorder.
//! - [`admin`]: the admin HTTP endpoints `/metrics`, `/healthz`, `/readyz`.
//! - [`shutdown`]: SIGTERM/SIGINT turned into a cancellation token.
//! - [`grpc`]: the shared-token credential of the internal gRPC APIs.
//! - [`idempotency`]: answers remembered by idempotency key for a window.
//! - [`history`]: per-channel retention rules and the bounded ring a channel's history lives in.

pub mod admin;
pub mod args;
pub mod grpc;
pub mod history;
pub mod idempotency;
pub mod shutdown;
pub mod telemetry;

/// Exit code for bad configuration (`EX_USAGE`).
pub const EXIT_CONFIG: i32 = 64;

/// Glob match where `*` matches any run of characters (including none).
pub fn glob_match(pattern: &str, text: &str) -> bool {
    let (p, t) = (pattern.as_bytes(), text.as_bytes());
    let (mut pi, mut ti) = (0, 0);
    let (mut star, mut mark) = (None, 0);
    while ti < t.len() {
        if pi < p.len() && p[pi] == b'*' {
            star = Some(pi);
            mark = ti;
            pi += 1;
        } else if pi < p.len() && p[pi] == t[ti] {
            pi += 1;
            ti += 1;
        } else if let Some(s) = star {
            pi = s + 1;
            mark += 1;
            ti = mark;
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&c| c == b'*')
}
