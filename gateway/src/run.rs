//! Wiring: resolved settings, the listeners, and the node's lifetime from
//! start to the end of the drain.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use metrics_exporter_prometheus::PrometheusHandle;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::auth::Verifier;
use crate::bus::{LocalBus, RemoteBus};
use crate::config::Cli;
use crate::delivery::{Dedupe, DeliveryService};
use crate::hub::Hub;
use crate::presence::{LocalPresence, PresenceBackend, RemoteConfig, RemotePresence};
use crate::push::PushService;
use crate::server::{Drain, Server, caps_for_fds};
use crate::session::{Node, SessionConfig};
use tonic::service::interceptor::InterceptedService;

/// Configuration that cannot be used; the binary exits with code 64.
#[derive(Debug, thiserror::Error)]
pub enum SettingsError {
    #[error(
        "no client authentication configured: set --jwt-hs256-secret, --jwt-rs256-public-key, --jwt-eddsa-public-key, or --anonymous for a demo"
    )]
    NoAuth,
    #[error("cannot read {path}: {error}")]
    KeyFile { path: String, error: std::io::Error },
    #[error("invalid key in {path}: {error}")]
    Key { path: String, error: jsonwebtoken::errors::Error },
    #[error("--max-connections {asked} exceeds what the limits allow ({why}): at most {allowed}")]
    TooManyConnections { asked: u32, why: String, allowed: usize },
    #[error("--heartbeat-interval and --heartbeat-timeout must be above zero")]
    Heartbeat,
    #[error("--connect-timeout must be above zero")]
    ConnectTimeout,
    #[error("--bridge-addrs needs --presence-addrs: the bridges route messages by presence")]
    BridgeWithoutPresence,
    #[error("--internal-token must be printable ASCII")]
    Token,
    #[error("{0}")]
    Tls(String),
}

/// Everything `run` needs, checked.
/// How often standalone history is expired and held to its memory budget.
const HISTORY_SWEEP: Duration = Duration::from_millis(250);

#[derive(Debug, Clone)]
pub struct Settings {
    pub session: SessionConfig,
    pub verifier: Verifier,
    pub anonymous: bool,
    pub allowed_origins: Vec<String>,
    pub echo_route: bool,
    pub handshake_timeout: Duration,
    pub max_sessions: usize,
    /// Slots of `max_sessions` an SSE stream or a waiting poll takes: more than one when
    /// the memory limit set the cap (they hold hyper's buffers too), else one.
    pub http_session_weight: usize,
    pub max_pending: usize,
    pub max_per_ip: u32,
    /// Per-user limits and the memory budget (docs/design.md "Admission").
    pub admission: crate::admission::Limits,
    pub max_pending_per_ip: usize,
    pub presence_channels: Vec<String>,
    pub large_room: usize,
    /// Standalone history rules and memory budget (unused in a cluster).
    pub history: kit::history::Rules,
    pub history_memory: usize,
    pub presence_addrs: Vec<String>,
    pub delivery_addr: String,
    /// Credential of the internal gRPC APIs (sent and required).
    pub bearer: kit::grpc::Bearer,
    pub internal_token: Option<String>,
    /// Mutual TLS of the internal gRPC APIs (Push, Delivery; presence and bridge calls).
    pub tls: Option<kit::grpc::InternalTls>,
    /// TLS on the client port (`--tls-cert`, `--tls-key`).
    pub client_tls: Option<crate::tls::Settings>,
    pub bridge_addrs: Vec<String>,
    pub drain: Drain,
    pub nofile: u64,
    /// How the session cap was derived (logged at start).
    pub cap_reason: String,
}

fn read_key(path: &Path) -> Result<Vec<u8>, SettingsError> {
    std::fs::read(path).map_err(|error| SettingsError::KeyFile { path: path.display().to_string(), error })
}

fn default_node_id() -> String {
    let host = std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/etc/hostname").ok())
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "gateway".to_owned());
    format!("{host}-{}", std::process::id())
}

impl Settings {
    /// Resolves the command line: reads keys, raises and reads the open-files limit.
    pub fn from_cli(cli: &Cli) -> Result<Self, SettingsError> {
        let mut verifier = Verifier::new(cli.jwt_issuer.clone(), cli.jwt_audience.clone());
        if let Some(secret) = &cli.jwt_hs256_secret {
            verifier = verifier
                .with_hs256(secret.as_bytes())
                .map_err(|error| SettingsError::Key { path: "--jwt-hs256-secret".into(), error })?;
        }
        for (path, rs) in [(&cli.jwt_rs256_public_key, true), (&cli.jwt_eddsa_public_key, false)] {
            if let Some(path) = path {
                let pem = read_key(path)?;
                let v = verifier.clone();
                verifier = if rs { v.with_rs256_pem(&pem) } else { v.with_eddsa_pem(&pem) }
                    .map_err(|error| SettingsError::Key { path: path.display().to_string(), error })?;
            }
        }
        if !verifier.has_keys() && !cli.anonymous {
            return Err(SettingsError::NoAuth);
        }
        if cli.heartbeat_interval.is_zero() || cli.heartbeat_timeout.is_zero() {
            return Err(SettingsError::Heartbeat);
        }
        if cli.connect_timeout.is_zero() {
            return Err(SettingsError::ConnectTimeout);
        }
        let bridge_addrs: Vec<String> = cli.bridge_addrs.iter().filter(|a| !a.is_empty()).cloned().collect();
        if !bridge_addrs.is_empty() && cli.presence_addrs.iter().all(|a| a.is_empty()) {
            return Err(SettingsError::BridgeWithoutPresence);
        }
        // Raise the soft limit to the hard one; the caps derive from what we got.
        let tls = kit::grpc::InternalTls::load(
            cli.common.internal_tls_cert.as_deref(),
            cli.common.internal_tls_key.as_deref(),
            cli.common.internal_tls_ca.as_deref(),
        )
        .map_err(SettingsError::Tls)?;
        let nofile = rlimit::increase_nofile_limit(u64::MAX)
            .or_else(|_| rlimit::getrlimit(rlimit::Resource::NOFILE).map(|(soft, _)| soft))
            .unwrap_or(1024);
        let client_tls =
            crate::tls::Settings::from_flags(cli.tls_cert.as_deref(), cli.tls_key.as_deref(), cli.tls_reload_interval)
                .map_err(SettingsError::Tls)?;
        // A TLS connection holds three descriptors and rustls' buffers (tls/mod.rs).
        let (fds, tls_bytes) =
            if client_tls.is_some() { (crate::tls::FDS_PER_CONNECTION, crate::tls::CONNECTION_BYTES) } else { (1, 0) };
        let (by_files, max_pending) = caps_for_fds(nofile, fds);
        let per_session = cli.memory_per_session.max(1) + tls_bytes;
        let memory_limit = crate::limits::cgroup_memory_limit(&cli.cgroup_root);
        let by_memory = memory_limit.map(|limit| crate::limits::sessions_for_memory(limit, per_session));
        let derived = by_memory.map_or(by_files, |m| m.min(by_files));
        // Under a cap the operator set (`--max-connections`), every session is one.
        let http_session_weight = match (by_memory, cli.max_connections) {
            (Some(m), None) if m <= by_files => crate::limits::http_session_weight(per_session),
            _ => 1,
        };
        let why = match (memory_limit, by_memory) {
            (Some(limit), Some(m)) => format!(
                "open files {nofile} at {fds} per connection allow {by_files}; memory limit {limit} B at {per_session} B per session allows {m}"
            ),
            _ => format!("open files {nofile} at {fds} per connection allow {by_files}; no memory limit"),
        };
        let max_sessions = match cli.max_connections {
            Some(n) if n.get() as usize > derived => {
                return Err(SettingsError::TooManyConnections { asked: n.get(), why, allowed: derived });
            }
            Some(n) => n.get() as usize,
            None => derived,
        };
        Ok(Self {
            session: SessionConfig {
                node_id: cli.node_id.clone().unwrap_or_else(default_node_id).into(),
                heartbeat_interval: cli.heartbeat_interval,
                heartbeat_timeout: cli.heartbeat_timeout,
                max_message_bytes: cli.max_message_bytes.get() as usize,
                max_subscriptions: cli.max_subscriptions.get() as usize,
                publish_rate: cli.publish_rate.get(),
                publish_burst: cli.publish_burst.get(),
                send_queue: cli.send_queue.get() as usize,
                slow_consumer_timeout: cli.slow_consumer_timeout,
                recovery_max: cli.recovery_max,
                connect_timeout: cli.connect_timeout,
                permessage_deflate: cli.permessage_deflate,
                poll_timeout: cli.poll_timeout,
            },
            history: kit::history::Rules::new(cli.history.clone()),
            history_memory: cli.history_memory,
            verifier,
            anonymous: cli.anonymous,
            allowed_origins: cli.allowed_origins.iter().filter(|o| !o.is_empty()).cloned().collect(),
            echo_route: cli.echo_route,
            handshake_timeout: cli.handshake_timeout,
            max_sessions,
            http_session_weight,
            max_pending,
            max_per_ip: cli.max_connections_per_ip,
            admission: crate::admission::Limits {
                connections_per_user: cli.max_connections_per_user,
                subscriptions_per_user: cli
                    .max_subscriptions_per_user
                    .unwrap_or(crate::admission::DEFAULT_SUBSCRIPTIONS_PER_USER.max(cli.max_subscriptions.get())),
                // Default: a share of the cgroup limit (none without one).
                memory_budget: cli.memory_budget.unwrap_or_else(|| {
                    memory_limit.map_or(0, |l| (l as f64 * crate::admission::DEFAULT_BUDGET_SHARE) as u64)
                }),
            },
            max_pending_per_ip: cli.max_pending_per_ip.max(1),
            presence_channels: cli.presence_channels.iter().filter(|p| !p.is_empty()).cloned().collect(),
            large_room: cli.large_room,
            presence_addrs: cli.presence_addrs.iter().filter(|a| !a.is_empty()).cloned().collect(),
            delivery_addr: cli.delivery_addr.clone(),
            bridge_addrs,
            bearer: kit::grpc::Bearer::new(cli.common.internal_token.as_deref())
                .map_err(|_| SettingsError::Token)?
                .with_tls(tls.as_ref()),
            internal_token: cli.common.internal_token.clone(),
            tls,
            client_tls,
            drain: Drain { window: cli.drain_window, grace: cli.drain_grace },
            nofile,
            cap_reason: why,
        })
    }
}

/// The already-bound listeners (tests bind `127.0.0.1:0`).
#[derive(Debug)]
pub struct Listeners {
    pub client: TcpListener,
    pub grpc: TcpListener,
    pub admin: TcpListener,
}

impl Listeners {
    /// Binds all three; the client port optionally with SO_REUSEPORT.
    pub async fn bind(
        client: SocketAddr,
        reuse_port: bool,
        grpc: SocketAddr,
        admin: SocketAddr,
    ) -> std::io::Result<Self> {
        let client = if reuse_port { bind_reuse_port(client)? } else { TcpListener::bind(client).await? };
        Ok(Self { client, grpc: TcpListener::bind(grpc).await?, admin: TcpListener::bind(admin).await? })
    }
}

fn bind_reuse_port(addr: SocketAddr) -> std::io::Result<TcpListener> {
    use socket2::{Domain, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(4096)?;
    TcpListener::from_std(socket.into())
}

/// Why a gateway stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("--delivery-addr is required when the gRPC address ({0}) is not a specific IP")]
    DeliveryAddr(std::net::SocketAddr),
    #[error(transparent)]
    Grpc(#[from] tonic::transport::Error),
    #[error("cannot open the TLS loopback listener: {0}")]
    Loopback(std::io::Error),
}

/// Runs a gateway until `shutdown` is cancelled, then drains and returns.
pub async fn run(
    settings: Settings,
    listeners: Listeners,
    metrics: Option<PrometheusHandle>,
    shutdown: CancellationToken,
) -> Result<(), RunError> {
    crate::metrics::describe();
    let sampler = kit::telemetry::spawn_runtime_sampler("switchboard_gateway");
    let grpc_addr = listeners.grpc.local_addr().map_err(|_| RunError::DeliveryAddr(([0, 0, 0, 0], 0).into()))?;
    let delivery_addr = match settings.delivery_addr.as_str() {
        "" if grpc_addr.ip().is_unspecified() && !settings.bridge_addrs.is_empty() => {
            return Err(RunError::DeliveryAddr(grpc_addr));
        }
        "" => format!("{}://{grpc_addr}", kit::grpc::InternalTls::scheme(settings.tls.as_ref())),
        a => a.to_owned(),
    };
    let remote = !settings.presence_addrs.is_empty();
    // With remote presence, joins and leaves come from its Watch stream, not the hub.
    let patterns = if remote { Vec::new() } else { settings.presence_channels.clone() };
    // Live frames held for a recovering session fit in half its send queue, so that the
    // hand-over (after up to a queue's worth of recovered messages) never overflows it.
    let mut hub = Hub::new(patterns, settings.large_room).with_recovery_hold(settings.session.send_queue / 2);
    if settings.bridge_addrs.is_empty() {
        hub = hub.with_history(settings.history.clone(), settings.history_memory);
    }
    let hub = Arc::new(hub);
    let bus: Arc<dyn crate::bus::Bus> = if settings.bridge_addrs.is_empty() {
        Arc::new(LocalBus::new(hub.clone()))
    } else {
        // The bridge answers within its produce timeout (5 s by default); allow margin.
        Arc::new(RemoteBus::new(&settings.bridge_addrs, Duration::from_secs(8), &settings.bearer)?)
    };
    let stop_presence = CancellationToken::new();
    let presence: Arc<dyn PresenceBackend> = if remote {
        let boot_epoch =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64);
        let cfg = RemoteConfig {
            addrs: settings.presence_addrs.clone(),
            node_id: settings.session.node_id.to_string(),
            delivery_addr: delivery_addr.clone(),
            boot_epoch,
            bearer: settings.bearer.clone(),
        };
        RemotePresence::start(hub.clone(), cfg, stop_presence.clone())?
    } else {
        Arc::new(LocalPresence::new(hub.clone()))
    };
    let counts = {
        let hub = hub.clone();
        let stop = stop_presence.clone();
        tokio::spawn(async move {
            let mut every = tokio::time::interval(Duration::from_secs(1));
            let mut sweep = tokio::time::interval(HISTORY_SWEEP);
            loop {
                tokio::select! {
                    () = stop.cancelled() => return,
                    _ = every.tick() => hub.flush_counts(),
                    _ = sweep.tick() => hub.sweep_history(),
                }
            }
        })
    };
    let node = Arc::new(Node {
        hub: hub.clone(),
        bus: bus.clone(),
        presence: presence.clone(),
        verifier: settings.verifier.clone(),
        config: settings.session.clone(),
        admission: Arc::new(crate::admission::Admission::new(settings.admission)),
    });
    let budget = settings.admission.memory_budget;
    if budget != 0 && settings.bridge_addrs.is_empty() && settings.history_memory as u64 > budget / 2 {
        // History is kept at rest: a budget it fills sheds for as long as it is kept.
        tracing::warn!(
            budget,
            history_memory = settings.history_memory,
            "--history-memory is over half of --memory-budget"
        );
    }
    let stop_sampler = CancellationToken::new();
    let sampler_task = tokio::spawn(crate::admission::sample(node.admission.clone(), stop_sampler.clone()));
    let mut server = Server::new(
        node,
        settings.verifier.clone(),
        settings.anonymous,
        settings.allowed_origins.clone(),
        settings.echo_route,
        settings.handshake_timeout,
        settings.max_sessions,
        settings.max_pending,
    );
    server.max_per_ip = settings.max_per_ip;
    server.http_session_weight = settings.http_session_weight;
    server.set_max_pending_per_ip(settings.max_pending_per_ip);
    // TLS: the loopback pairs' listener and the certificate's reload, until the drain ends.
    let stop_tls = CancellationToken::new();
    let mut tls_tasks = Vec::new();
    if let Some(tls) = &settings.client_tls {
        let backlog = settings.max_pending.min(u32::MAX as usize) as u32;
        let (loopback, listener) = crate::tls::Loopback::bind(backlog).map_err(RunError::Loopback)?;
        tls.certs.report();
        server.tls = Some(crate::tls::Front::new(tls.config.clone(), loopback.clone()));
        tls_tasks.push(tokio::spawn(loopback.serve(listener, stop_tls.clone())));
        tls_tasks.push(tokio::spawn(crate::tls::watch(
            tls.certs.clone(),
            tls.reload_interval,
            crate::tls::hangups(),
            stop_tls.clone(),
        )));
    }
    let server = Arc::new(server);

    let readiness = kit::admin::Readiness::default();
    let stop_admin = CancellationToken::new();
    let admin = tokio::spawn(kit::admin::serve(
        listeners.admin,
        kit::admin::Admin { metrics, readiness: readiness.clone() },
        stop_admin.clone(),
    ));

    let push = PushService { hub, bus, presence, max_message_bytes: settings.session.max_message_bytes };
    let delivery = (!settings.bridge_addrs.is_empty())
        .then(|| DeliveryService { hub: server.node.hub.clone(), dedupe: Arc::new(Dedupe::new(200_000)) });
    let require = kit::grpc::RequireBearer::new(settings.internal_token.as_deref());
    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_serving::<proto::push::v1::push_server::PushServer<PushService>>().await;
    let (reflection_v1, reflection_v1alpha) = proto::reflection();
    let stop_grpc = CancellationToken::new();
    let grpc_stop = stop_grpc.clone();
    let mut grpc_server = tonic::transport::Server::builder();
    if let Some(tls) = &settings.tls {
        grpc_server = grpc_server.tls_config(tls.server.clone())?;
    }
    let grpc = grpc_server
        .timeout(Duration::from_secs(10))
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(proto::push::v1::push_server::PushServer::with_interceptor(push, require.clone()))
        .add_optional_service(delivery.map(|d| {
            InterceptedService::new(
                proto::bridge::v1::delivery_server::DeliveryServer::new(d).max_decoding_message_size(64 << 20),
                require.clone(),
            )
        }))
        .serve_with_incoming_shutdown(tokio_stream::wrappers::TcpListenerStream::new(listeners.grpc), async move {
            grpc_stop.cancelled().await
        });
    let grpc = tokio::spawn(grpc);

    let accept = tokio::spawn(server.clone().accept_loop(listeners.client));
    if !settings.bridge_addrs.is_empty() {
        tokio::spawn(stall_watchdog(server.clone(), stop_presence.clone()));
    }
    readiness.set(true);
    tracing::info!(
        node = %settings.session.node_id,
        max_connections = settings.max_sessions,
        nofile = settings.nofile,
        cap = %settings.cap_reason,
        memory_budget = settings.admission.memory_budget,
        tls = settings.client_tls.is_some(),
        "gateway ready"
    );

    shutdown.cancelled().await;
    readiness.set(false);
    health.set_not_serving::<proto::push::v1::push_server::PushServer<PushService>>().await;
    // The whole server too (service ""), which is what most health checkers ask.
    health.set_service_status("", tonic_health::ServingStatus::NotServing).await;
    server.draining.cancel();
    let _ = accept.await;
    server.drain(settings.drain).await;
    stop_tls.cancel();
    for t in tls_tasks {
        let _ = t.await;
    }
    // Tell presence we are gone (goodbye) now that every session has ended.
    stop_presence.cancel();
    let _ = counts.await;
    stop_sampler.cancel();
    let _ = sampler_task.await;
    stop_grpc.cancel();
    stop_admin.cancel();
    let grpc_result = grpc.await;
    let _ = admin.await;
    sampler.abort();
    tracing::info!("gateway stopped");
    match grpc_result {
        Ok(r) => r.map_err(RunError::from),
        Err(_) => Ok(()),
    }
}

/// Cluster mode: a gateway that was frozen (SIGSTOP, a VM pause, swap storms) longer than
/// [`STALL`] may have been dropped by presence and given up on by the bridges, so its
/// clients may have missed messages. It tells them: every session is closed with 1001
/// `resync retry_ms=…` so that clients reconnect and re-fetch (docs/design.md).
async fn stall_watchdog(server: Arc<Server>, stop: CancellationToken) {
    const TICK: Duration = Duration::from_millis(500);
    const STALL: Duration = Duration::from_secs(5);
    let mut last = tokio::time::Instant::now();
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(TICK) => {}
        }
        let now = tokio::time::Instant::now();
        let gap = now.duration_since(last);
        last = now;
        if gap > STALL {
            metrics::counter!(crate::metrics::STALLS).increment(1);
            let asked = server.node.hub.resync_all();
            tracing::warn!(gap = ?gap, sessions = asked, "gateway was stalled; asking clients to reconnect");
        }
    }
}
