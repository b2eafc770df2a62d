//! Wiring and lifetime of the presence service.

use std::sync::Arc;

use metrics_exporter_prometheus::PrometheusHandle;
use proto::presence::v1::presence_server::PresenceServer;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::config::Cli;
use crate::guard::Guarded;
use crate::registry::Registry;
use crate::service::{PresenceService, Shared, tick_interval};

/// Serves presence on `listener` (with mutual TLS when `tls` is set) until `shutdown`;
/// admin endpoints on `admin`.
pub async fn run(
    cli: Cli,
    tls: Option<kit::grpc::InternalTls>,
    listener: TcpListener,
    admin: TcpListener,
    metrics: Option<PrometheusHandle>,
    shutdown: CancellationToken,
) -> Result<(), tonic::transport::Error> {
    crate::metrics::describe();
    let sampler = kit::telemetry::spawn_runtime_sampler("switchboard_presence");
    let registry = Registry::new(cli.lease, cli.presence_channels.clone(), cli.large_room);
    let shared: Arc<Shared> = Shared::new(registry);

    let readiness = kit::admin::Readiness::default();
    let stop_admin = CancellationToken::new();
    let admin_task = tokio::spawn(kit::admin::serve(
        admin,
        kit::admin::Admin { metrics, readiness: readiness.clone() },
        stop_admin.clone(),
    ));

    let ticker = {
        let shared = shared.clone();
        let stop = shutdown.clone();
        let every = tick_interval(cli.lease);
        tokio::spawn(async move {
            let mut expiry = tokio::time::interval(every);
            let mut counts = tokio::time::interval(std::time::Duration::from_secs(1));
            loop {
                tokio::select! {
                    () = stop.cancelled() => return,
                    _ = expiry.tick() => shared.tick(tokio::time::Instant::now()),
                    _ = counts.tick() => shared.publish_counts(),
                }
            }
        })
    };

    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_serving::<PresenceServer<PresenceService>>().await;
    let (r1, r1a) = proto::reflection();
    let service = tonic::service::interceptor::InterceptedService::new(
        Guarded::new(PresenceServer::new(PresenceService { shared: shared.clone() }), cli.max_concurrent, cli.timeout),
        kit::grpc::RequireBearer::new(cli.common.internal_token.as_deref()),
    );
    readiness.set(true);
    tracing::info!(addr = %listener.local_addr().map(|a| a.to_string()).unwrap_or_default(), lease = ?cli.lease, "presence ready");
    let stop = shutdown.clone();
    let mut server = tonic::transport::Server::builder();
    if let Some(tls) = tls {
        server = server.tls_config(tls.server)?;
    }
    let result = server
        .http2_keepalive_interval(Some(std::time::Duration::from_secs(10)))
        .add_service(health_service)
        .add_service(r1)
        .add_service(r1a)
        .add_service(service)
        .serve_with_incoming_shutdown(tokio_stream::wrappers::TcpListenerStream::new(listener), async move {
            stop.cancelled().await;
            readiness.set(false);
        })
        .await;
    ticker.abort();
    sampler.abort();
    stop_admin.cancel();
    let _ = admin_task.await;
    result
}
