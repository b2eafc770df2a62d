//! Flags shared by every binary. Each is also an environment variable; the
//! prefix is the binary's (`SWITCHBOARD_GATEWAY_…`), set by the caller's `#[command]`.

use std::net::SocketAddr;
use std::time::Duration;

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
    /// Mutual TLS on the internal gRPC APIs: this service's certificate (PEM), presented as
    /// server and as client. With `--internal-tls-key` and `--internal-tls-ca`; all three or none.
    /// Peers' addresses are then `https://` and must match their certificates.
    #[arg(long, env = "SWITCHBOARD_INTERNAL_TLS_CERT")]
    pub internal_tls_cert: Option<std::path::PathBuf>,
    /// Private key (PEM) of `--internal-tls-cert`.
    #[arg(long, env = "SWITCHBOARD_INTERNAL_TLS_KEY")]
    pub internal_tls_key: Option<std::path::PathBuf>,
    /// CA (PEM) that signs every internal service's certificate: callers without a
    /// certificate from it are refused, and servers must present one.
    #[arg(long, env = "SWITCHBOARD_INTERNAL_TLS_CA")]
    pub internal_tls_ca: Option<std::path::PathBuf>,
    /// Address of the admin endpoints (/metrics, /healthz, /readyz).
    #[arg(long, env = "SWITCHBOARD_ADMIN_ADDR", default_value = "127.0.0.1:9091")]
    pub admin_addr: SocketAddr,
}

/// Parses `250ms`, `10s`, `2m`, `1h` or a bare number of seconds (a clap value parser).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, unit) = match s.find(|c: char| !c.is_ascii_digit() && c != '.') {
        Some(i) => s.split_at(i),
        None => (s, "s"),
    };
    let n: f64 = num.parse().map_err(|_| format!("invalid duration `{s}`"))?;
    let secs = match unit {
        "ms" => n / 1000.0,
        "s" => n,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        _ => return Err(format!("invalid duration unit in `{s}` (use ms, s, m or h)")),
    };
    Duration::try_from_secs_f64(secs).map_err(|e| format!("invalid duration `{s}`: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse_duration("3"), Ok(Duration::from_secs(3)));
        assert!(parse_duration("3d").is_err());
        assert!(parse_duration("x").is_err());
    }
}
