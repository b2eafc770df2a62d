//! Flags shared by every binary. Each is also an environment variable; the
//! prefix is the binary's (`SWITCHBOARD_GATEWAY_…`), set by the caller's `#[command]`.

use std::net::SocketAddr;

/// How logs are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line, for log pipelines.
    Json,
}

/// Logging and admin flags common to all services.
#[derive(Debug, Clone, clap::Args)]
pub struct CommonArgs {
    /// Log format.
    #[arg(long, env = "SWITCHBOARD_LOG_FORMAT", value_enum, default_value = "text")]
    pub log_format: LogFormat,
    /// Log filter, in `tracing_subscriber::EnvFilter` syntax.
    #[arg(long, env = "SWITCHBOARD_LOG", default_value = "info")]
    pub log_filter: String,
    /// Credential of the internal gRPC APIs (Push, Delivery, presence): required from callers
    /// as `authorization: Bearer <token>` and sent to the other services. Empty: no credential
    /// (rely on network policies).
    #[arg(long, env = "SWITCHBOARD_INTERNAL_TOKEN", hide_env_values = true)]
    pub internal_token: Option<String>,
    /// Address of the admin endpoints (/metrics, /healthz, /readyz).
    #[arg(long, env = "SWITCHBOARD_ADMIN_ADDR", default_value = "127.0.0.1:9091")]
    pub admin_addr: SocketAddr,
}
