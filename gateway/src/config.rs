//! The gateway's configuration: every flag is also a `SWITCHBOARD_GATEWAY_*`
//! environment variable, parsed once into typed values.

use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;

/// Command line of the `gateway` binary.
#[derive(Debug, Clone, Parser)]
#[command(name = "gateway", version, about = "Switchboard WebSocket edge gateway", args_override_self = true)]
pub struct Cli {
    /// Address for WebSocket clients and the demo page.
    #[arg(long, env = "SWITCHBOARD_GATEWAY_LISTEN", default_value = "0.0.0.0:8080")]
    pub listen: SocketAddr,
    /// Open the client port with SO_REUSEPORT, so several gateway processes share it.
    #[arg(long, env = "SWITCHBOARD_GATEWAY_REUSE_PORT")]
    pub reuse_port: bool,
    /// PEM certificate chain (leaf first) for TLS on the client port; goes with `--tls-key`.
    /// Reloaded on SIGHUP and when the files change; without it the port is plain HTTP.
    #[arg(long, env = "SWITCHBOARD_GATEWAY_TLS_CERT")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1) of `--tls-cert`.
    #[arg(long, env = "SWITCHBOARD_GATEWAY_TLS_KEY")]
    pub tls_key: Option<PathBuf>,
    /// How often the `--tls-cert`/`--tls-key` files are checked for new contents (0s: on SIGHUP only).
    #[arg(long, env = "SWITCHBOARD_GATEWAY_TLS_RELOAD_INTERVAL", value_parser = parse_duration, default_value = "5s")]
    pub tls_reload_interval: Duration,
    /// Address of the gRPC Push API (standalone mode).
    #[arg(long, env = "SWITCHBOARD_GATEWAY_GRPC_ADDR", default_value = "127.0.0.1:9090")]
    pub grpc_addr: SocketAddr,
    /// This node's id, shown to clients and in message ids. Default: hostname-pid.
    #[arg(long, env = "SWITCHBOARD_GATEWAY_NODE_ID")]
    pub node_id: Option<String>,

    #[command(flatten)]
    pub common: kit::args::CommonArgs,

    /// Admit clients without a token (demo mode); the user id comes from `?user=`.
    #[arg(long, env = "SWITCHBOARD_GATEWAY_ANONYMOUS")]
    pub anonymous: bool,
    /// HS256 shared secret for client JWTs.
    #[arg(long, env = "SWITCHBOARD_GATEWAY_JWT_HS256_SECRET", hide_env_values = true)]
    pub jwt_hs256_secret: Option<String>,
    /// PEM file with an RS256 public key for client JWTs.
    #[arg(long, env = "SWITCHBOARD_GATEWAY_JWT_RS256_PUBLIC_KEY")]
    pub jwt_rs256_public_key: Option<PathBuf>,
    /// PEM file with an Ed25519 (EdDSA) public key for client JWTs.
    #[arg(long, env = "SWITCHBOARD_GATEWAY_JWT_EDDSA_PUBLIC_KEY")]
    pub jwt_eddsa_public_key: Option<PathBuf>,
    /// Required `iss` claim: a token without it, or with another value, is refused (401).
    #[arg(long, env = "SWITCHBOARD_GATEWAY_JWT_ISSUER")]
    pub jwt_issuer: Option<String>,
    /// Required `aud` claim: a token without it, or without this value, is refused (401).
    #[arg(long, env = "SWITCHBOARD_GATEWAY_JWT_AUDIENCE")]
    pub jwt_audience: Option<String>,
    /// Allowed `Origin` values, comma-separated; empty allows any origin.
    #[arg(long, env = "SWITCHBOARD_GATEWAY_ALLOWED_ORIGINS", value_delimiter = ',')]
    pub allowed_origins: Vec<String>,

    /// Maximum concurrent WebSocket sessions. Default: derived from the open-files limit.
    #[arg(long, env = "SWITCHBOARD_GATEWAY_MAX_CONNECTIONS")]
    pub max_connections: Option<NonZeroU32>,
    /// Sessions one client address may hold (0: no per-address cap; behind a proxy or NAT
    /// many clients share an address, so set it with care).
    #[arg(long, env = "SWITCHBOARD_GATEWAY_MAX_CONNECTIONS_PER_IP", default_value = "0")]
    pub max_connections_per_ip: u32,
    /// Sessions one user (a token's `sub`) may hold on this node, every transport counted
    /// (WebSocket, SSE, waiting polls); the newest attempt beyond it is refused (429).
    /// 0: no per-user cap. Anonymous sessions are not counted.
    #[arg(long, env = "SWITCHBOARD_GATEWAY_MAX_CONNECTIONS_PER_USER", default_value_t = crate::admission::DEFAULT_CONNECTIONS_PER_USER)]
    pub max_connections_per_user: u32,
    /// Channel subscriptions one user may hold on this node, summed over its sessions
    /// (beyond it: `too_many_subscriptions`). Default: 1000, or `--max-subscriptions` when
    /// that is more (one session may always use its own limit). 0: no per-user budget.
    #[arg(long, env = "SWITCHBOARD_GATEWAY_MAX_SUBSCRIPTIONS_PER_USER")]
    pub max_subscriptions_per_user: Option<u32>,
    /// Resident memory, in bytes, from which new sessions are refused (503) and commands
    /// that add work answered `unavailable`, until it is below 90 % of it again.
    /// Default: 85 % of the cgroup memory limit, none without one. 0: off.
    #[arg(long, env = "SWITCHBOARD_GATEWAY_MEMORY_BUDGET")]
    pub memory_budget: Option<u64>,
    /// Memory budget per session, in bytes, for the session cap derived from the
    /// cgroup memory limit (the lower of that and the open-files cap applies).
    #[arg(long, env = "SWITCHBOARD_GATEWAY_MEMORY_PER_SESSION", default_value_t = crate::limits::DEFAULT_PER_SESSION)]
    pub memory_per_session: u64,
    /// Where the cgroup file system is mounted (the memory limit is read there).
    #[arg(long, env = "SWITCHBOARD_GATEWAY_CGROUP_ROOT", default_value = "/sys/fs/cgroup")]
    pub cgroup_root: PathBuf,
    /// Connections one address may hold open without having sent a complete request;
    /// a new one beyond this closes that address's oldest. Raise it behind a proxy
    /// that forwards request headers unbuffered.
    #[arg(long, env = "SWITCHBOARD_GATEWAY_MAX_PENDING_PER_IP", default_value_t = crate::server::DEFAULT_PENDING_PER_IP)]
    pub max_pending_per_ip: usize,
    /// Time allowed for a client to send its HTTP upgrade request.
    #[arg(long, env = "SWITCHBOARD_GATEWAY_HANDSHAKE_TIMEOUT", value_parser = parse_duration, default_value = "10s")]
    pub handshake_timeout: Duration,
    /// Time a session opened without a token has to send `{"op":"connect","token":..}`
    /// before it is closed with 4005.
    #[arg(long, env = "SWITCHBOARD_GATEWAY_CONNECT_TIMEOUT", value_parser = parse_duration, default_value = "5s")]
    pub connect_timeout: Duration,
    /// Interval between server pings.
    #[arg(long, env = "SWITCHBOARD_GATEWAY_HEARTBEAT_INTERVAL", value_parser = parse_duration, default_value = "25s")]
    pub heartbeat_interval: Duration,
    /// Extra time after a ping for the pong (or any frame) to arrive.
    #[arg(long, env = "SWITCHBOARD_GATEWAY_HEARTBEAT_TIMEOUT", value_parser = parse_duration, default_value = "10s")]
    pub heartbeat_timeout: Duration,
    /// Largest client message, in bytes (frames and reassembled fragments).
    #[arg(long, env = "SWITCHBOARD_GATEWAY_MAX_MESSAGE_BYTES", default_value = "65536")]
    pub max_message_bytes: NonZeroU32,
    /// Channels one session may subscribe to.
    #[arg(long, env = "SWITCHBOARD_GATEWAY_MAX_SUBSCRIPTIONS", default_value = "128")]
    pub max_subscriptions: NonZeroU32,
    /// Sustained publish/send rate per session (commands per second).
    #[arg(long, env = "SWITCHBOARD_GATEWAY_PUBLISH_RATE", default_value = "50")]
    pub publish_rate: NonZeroU32,
    /// Publish/send burst per session.
    #[arg(long, env = "SWITCHBOARD_GATEWAY_PUBLISH_BURST", default_value = "100")]
    pub publish_burst: NonZeroU32,
    /// Outbound frames queued per session before its queue counts as congested:
    /// catch-up deliveries wait there for the client to read; the queue takes up
    /// to twice this from senders that cannot wait.
    #[arg(long, env = "SWITCHBOARD_GATEWAY_SEND_QUEUE", default_value = "1024")]
    pub send_queue: NonZeroU32,
    /// How long a session's send queue may stay congested before the session is
    /// closed as a slow consumer (4002).
    #[arg(long, env = "SWITCHBOARD_GATEWAY_SLOW_CONSUMER_TIMEOUT", value_parser = parse_duration, default_value = "5s")]
    pub slow_consumer_timeout: Duration,
    /// Longest a long-poll (`GET /poll`) waits for a message before it is answered
    /// empty; a poll's `timeout_ms` may ask for less.
    #[arg(long, env = "SWITCHBOARD_GATEWAY_POLL_TIMEOUT", value_parser = parse_duration, default_value = "25s")]
    pub poll_timeout: Duration,
    /// Channel patterns whose subscribers get join/leave events (comma-separated).
    #[arg(long, env = "SWITCHBOARD_GATEWAY_PRESENCE_CHANNELS", value_delimiter = ',', default_value = "room:*")]
    pub presence_channels: Vec<String>,
    /// Rooms with more members than this get `presence_count` frames instead of joins and leaves
    /// (standalone mode; with `--presence-addrs` the presence service decides).
    #[arg(long, env = "SWITCHBOARD_GATEWAY_LARGE_ROOM", default_value = "1000")]
    pub large_room: usize,
    /// Presence replicas (`http://host:port`, comma-separated; `dns+http://name:port` for every
    /// address `name` resolves to, re-resolved every 10 s). Empty: standalone, in-process presence.
    #[arg(long, env = "SWITCHBOARD_GATEWAY_PRESENCE_ADDRS", value_delimiter = ',')]
    pub presence_addrs: Vec<String>,
    /// broker-bridge Push API addresses (`http://host:port`, comma-separated). Empty: standalone,
    /// in-process bus. Requires `--presence-addrs` (the bridges route by presence).
    #[arg(long, env = "SWITCHBOARD_GATEWAY_BRIDGE_ADDRS", value_delimiter = ',')]
    pub bridge_addrs: Vec<String>,
    /// Address where this gateway takes deliveries from broker-bridge (reported to presence).
    /// Default: `http://<grpc address>` when that is a specific IP.
    #[arg(long, env = "SWITCHBOARD_GATEWAY_DELIVERY_ADDR", default_value = "")]
    pub delivery_addr: String,
    /// Window over which sessions are closed when draining.
    #[arg(long, env = "SWITCHBOARD_GATEWAY_DRAIN_WINDOW", value_parser = parse_duration, default_value = "10s")]
    pub drain_window: Duration,
    /// Time after the drain window before the process exits regardless.
    #[arg(long, env = "SWITCHBOARD_GATEWAY_DRAIN_GRACE", value_parser = parse_duration, default_value = "5s")]
    pub drain_grace: Duration,
    /// Channel history kept by a standalone gateway for recovery and `history`:
    /// comma-separated `PATTERN=COUNT/AGE` rules, the first matching a channel applies
    /// (`PATTERN=off`: none). In a cluster broker-bridge keeps the history (its own flag).
    #[arg(long, env = "SWITCHBOARD_GATEWAY_HISTORY", value_delimiter = ',', default_value = "*=10000/1h")]
    pub history: Vec<kit::history::Rule>,
    /// Bytes of history the node may hold in all; beyond it the oldest entries go first.
    #[arg(long, env = "SWITCHBOARD_GATEWAY_HISTORY_MEMORY", default_value_t = 64 << 20)]
    pub history_memory: usize,
    /// Most messages one recovery (subscribe with `since`) may send; more is `recovered: false`
    /// with reason `too_many`.
    #[arg(long, env = "SWITCHBOARD_GATEWAY_RECOVERY_MAX", default_value = "10000")]
    pub recovery_max: usize,
    /// Negotiate permessage-deflate (RFC 7692) with clients that offer it (browsers do):
    /// publications compressed once and shared, client messages inflated up to
    /// `--max-message-bytes`. `--permessage-deflate=false` answers every offer without it.
    #[arg(long, env = "SWITCHBOARD_GATEWAY_PERMESSAGE_DEFLATE", default_value_t = true, action = clap::ArgAction::Set, num_args = 0..=1, default_missing_value = "true")]
    pub permessage_deflate: bool,
    /// Serve `/echo`: a token-less WebSocket echo through the session code, for conformance suites.
    #[arg(long, env = "SWITCHBOARD_GATEWAY_ECHO_ROUTE")]
    pub echo_route: bool,
}

pub use kit::args::parse_duration;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_flag_has_an_env_var() {
        use clap::CommandFactory;
        for arg in Cli::command().get_arguments() {
            let id = arg.get_id().as_str();
            if id == "help" || id == "version" {
                continue;
            }
            assert!(arg.get_env().is_some(), "flag {id} has no environment variable");
        }
    }

    #[test]
    fn the_readme_names_every_env_var_that_is_not_switchboard_gateway() {
        use clap::CommandFactory;
        let readme = include_str!("../../README.md");
        assert!(readme.contains("`SWITCHBOARD_GATEWAY_…`"));
        for arg in Cli::command().get_arguments() {
            let Some(env) = arg.get_env().and_then(|e| e.to_str()) else { continue };
            if !env.starts_with("SWITCHBOARD_GATEWAY_") {
                assert!(readme.contains(&format!("`{env}`")), "README.md does not name {env}");
            }
        }
    }
}
