//! Wiring and lifetime of broker-bridge.

use std::sync::Arc;
use std::time::Duration;

use metrics_exporter_prometheus::PrometheusHandle;
use parking_lot::Mutex;
use proto::presence::v1::presence_client::PresenceClient;
use proto::push::v1::push_server::PushServer;
use rdkafka::consumer::{Consumer, StreamConsumer};
use tokio::net::TcpListener;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::config::Cli;
use crate::consume::{self, Ctx};
use crate::deliver::{Completer, Links};
use crate::history::{self, History, Readers};
use crate::hot::HotWindows;
use crate::ingest::{Ids, Producer, PushIngest};
use crate::log::leased::Leases;
use crate::log::{Backbone, Log};
use crate::offsets::Tracker;
use crate::route::{self, Routes};
use crate::{kafka, metrics as m};

/// Why the bridge could not run.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("configuration: {0}")]
    Config(String),
    #[error("kafka: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
    #[error("presence address: {0}")]
    Presence(tonic::transport::Error),
    #[error("grpc server: {0}")]
    Serve(tonic::transport::Error),
}

fn default_id() -> String {
    let host = std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/etc/hostname").ok())
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "bridge".into());
    format!("{host}-{}", std::process::id())
}

/// Runs the bridge until `shutdown`.
pub async fn run(
    cli: Cli,
    listener: TcpListener,
    admin: TcpListener,
    metrics: Option<PrometheusHandle>,
    shutdown: CancellationToken,
) -> Result<(), RunError> {
    m::describe();
    let sampler = kit::telemetry::spawn_runtime_sampler("switchboard_bridge");
    let readiness = kit::admin::Readiness::default();
    let stop_admin = CancellationToken::new();
    let admin_task = tokio::spawn(kit::admin::serve(
        admin,
        kit::admin::Admin { metrics, readiness: readiness.clone() },
        stop_admin.clone(),
    ));

    let backbone = Backbone::parse(cli.backbone.as_deref(), &cli.brokers).map_err(RunError::Config)?;
    let mut cli = cli;
    if let Backbone::Kafka(brokers) = &backbone {
        cli.brokers = brokers.clone();
    }
    let tracker = Arc::new(Mutex::new(Tracker::default()));
    // History: the hot windows the consumer feeds, the epochs it stamps, the log readers.
    let hot = Arc::new(Mutex::new(HotWindows::new(kit::history::Rules::new(cli.history.clone()), cli.history_memory)));
    metrics::gauge!(m::HISTORY_BUDGET).set(cli.history_memory as f64);
    let (log, source, kafka_consumer, leased_tx) = match &backbone {
        Backbone::Kafka(_) => {
            if cli.create_topics {
                kafka::ensure_topic(&cli).await.map_err(RunError::Config)?;
            }
            let producer = Arc::new(Producer::new(kafka::producer_config(&cli).map_err(RunError::Config)?)?);
            let readers = Arc::new(Readers::new(kafka::reader_config(&cli).map_err(RunError::Config)?, &cli.topic)?);
            let ctx = Ctx { tracker: tracker.clone(), hot: hot.clone(), topic: cli.topic.clone() };
            let consumer: Arc<StreamConsumer<Ctx>> =
                Arc::new(kafka::consumer_config(&cli).map_err(RunError::Config)?.create_with_context(ctx)?);
            // Subscribed once the routing cache is complete (below).
            let log = Log::Kafka { producer, readers, topic: cli.topic.clone() };
            (log, consume::Source::Kafka(consumer.clone()), Some(consumer), None)
        }
        other => {
            let log = Log::connect(other, &cli).await.map_err(RunError::Config)?;
            let (tx, rx) = tokio::sync::mpsc::channel(4096);
            (log, consume::Source::Leased(rx), None, Some(tx))
        }
    };
    let log = Arc::new(log);
    let epochs = {
        // A few tries; without an answer the bridge starts anyway (History is UNAVAILABLE
        // and deliveries carry no epoch until `refresh_epochs` learns the partitions).
        let mut found = None;
        for _ in 0..10 {
            match log.discover(&cli.topic_generation).await {
                Ok(d) => {
                    found = Some(d);
                    break;
                }
                Err(e) => tracing::warn!(error = %e, "log metadata not available yet"),
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let (partitions, incarnation) = found.unwrap_or((0, None));
        let e = history::epochs_of(partitions, incarnation, &cli.topic_generation, None);
        tracing::info!(epochs = ?e, "history epochs");
        Arc::new(parking_lot::RwLock::new(e))
    };
    let bridge_id = cli.bridge_id.clone().unwrap_or_else(default_id);

    let stop = CancellationToken::new();
    let routes = Arc::new(Routes::default());
    let (changes_tx, mut changes_rx) = tokio::sync::mpsc::unbounded_channel();
    let tls = kit::grpc::InternalTls::load(
        cli.common.internal_tls_cert.as_deref(),
        cli.common.internal_tls_key.as_deref(),
        cli.common.internal_tls_ca.as_deref(),
    )
    .map_err(RunError::Config)?;
    let bearer = kit::grpc::Bearer::new(cli.common.internal_token.as_deref())
        .map_err(|e| RunError::Config(e.to_string()))?
        .with_tls(tls.as_ref());
    let watch = tokio::spawn(route::watch(
        cli.presence_addrs.clone(),
        cli.presence_grace,
        bearer.clone(),
        routes.clone(),
        changes_tx,
        stop.clone(),
    ));
    let completer = Completer { tracker: tracker.clone(), progress: Arc::new(Notify::new()) };
    let links = Arc::new(Links::new(completer.clone(), cli.delivery_timeout, stop.clone(), bearer.clone()));
    let node_changes = {
        let links = links.clone();
        tokio::spawn(async move {
            while let Some(ch) = changes_rx.recv().await {
                links.node_change(&ch);
            }
        })
    };
    // Nothing is consumed before the routing cache is complete: a record routed to nobody
    // for want of routes would be committed, and lost for the subscribers presence had not
    // reported yet (a restarted bridge consumed its partitions within milliseconds of its
    // start, before the Watch's initial state: a chaos run found that). On Kafka the bridge
    // joins the consumer group only then, on NATS and Redis it takes no lease before.
    let routes_ready = {
        let (routes, stop) = (routes.clone(), stop.clone());
        async move {
            tokio::select! {
                () = routes.wait_complete() => true,
                () = stop.cancelled() => false,
            }
        }
    };
    let consume_stop = CancellationToken::new();
    let consumer_task = tokio::spawn(consume::run(
        source,
        cli.topic.clone(),
        routes,
        links,
        completer,
        consume::Continuity { hot: hot.clone(), epochs: epochs.clone() },
        cli.max_in_flight,
        consume_stop.clone(),
    ));
    let epochs_task = tokio::spawn(history::refresh_epochs(
        log.clone(),
        epochs.clone(),
        hot.clone(),
        cli.topic_generation.clone(),
        stop.clone(),
    ));
    // Commits: to the consumer group (Kafka), or in the partitions' leases (NATS, Redis).
    let commit_task = match (&kafka_consumer, leased_tx) {
        (Some(consumer), _) => {
            let (joining, topic) = (consumer.clone(), cli.topic.clone());
            tokio::spawn(async move {
                if routes_ready.await
                    && let Err(e) = joining.subscribe(&[&topic])
                {
                    tracing::error!(error = %e, topic, "cannot subscribe to the topic");
                }
            });
            tokio::spawn(consume::commit_loop(consumer.clone(), tracker, cli.topic.clone(), stop.clone()))
        }
        (None, Some(records)) => {
            let leases = Leases {
                log: log.clone(),
                me: bridge_id.clone(),
                lease: cli.lease,
                tracker,
                hot: hot.clone(),
                records,
            };
            let stop = stop.clone();
            tokio::spawn(async move {
                if routes_ready.await {
                    leases.run(stop).await;
                }
            })
        }
        (None, None) => tokio::spawn(async {}),
    };
    let lag_task = match &kafka_consumer {
        Some(consumer) => tokio::spawn(consume::lag_loop(consumer.clone(), cli.topic.clone(), stop.clone())),
        None => tokio::spawn(async {}),
    };

    let mut presence = Vec::new();
    for addr in &cli.presence_addrs {
        let ep = bearer.endpoint(addr).map_err(RunError::Presence)?;
        presence.push(PresenceClient::new(bearer.channel(ep.connect_timeout(Duration::from_secs(2)).connect_lazy())));
    }
    let ingest = PushIngest {
        log: log.clone(),
        topic: cli.topic.clone(),
        ids: Arc::new(Ids::new(&bridge_id)),
        produce_timeout: cli.produce_timeout,
        max_message_bytes: cli.max_message_bytes,
        presence,
        idempotency: Arc::new(kit::idempotency::Idempotency::new(
            crate::ingest::IDEMPOTENCY_WINDOW,
            crate::ingest::IDEMPOTENCY_KEYS,
        )),
        history: Some(Arc::new(History { hot, epochs, log, max_scan: cli.history_max_scan })),
    };
    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_serving::<PushServer<PushIngest>>().await;
    let (r1, r1a) = proto::reflection();
    readiness.set(true);
    tracing::info!(backbone = backbone.name(), topic = %cli.topic, group = %cli.group, "broker-bridge ready");
    let serve_stop = shutdown.clone();
    let mut server = tonic::transport::Server::builder();
    if let Some(tls) = tls {
        server = server.tls_config(tls.server).map_err(RunError::Serve)?;
    }
    let served = server
        .timeout(cli.produce_timeout + Duration::from_secs(5))
        .add_service(health_service)
        .add_service(r1)
        .add_service(r1a)
        .add_service(PushServer::with_interceptor(
            ingest,
            kit::grpc::RequireBearer::new(cli.common.internal_token.as_deref()),
        ))
        .serve_with_incoming_shutdown(tokio_stream::wrappers::TcpListenerStream::new(listener), async move {
            serve_stop.cancelled().await;
            readiness.set(false);
        })
        .await;

    // Shutdown: stop consuming, let deliveries finish briefly, commit what is complete.
    consume_stop.cancel();
    let _ = consumer_task.await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.cancel();
    let _ = commit_task.await;
    let _ = tokio::join!(watch, lag_task, epochs_task);
    node_changes.abort();
    sampler.abort();
    if let Some(consumer) = kafka_consumer {
        consumer.unsubscribe();
    }
    stop_admin.cancel();
    let _ = admin_task.await;
    served.map_err(RunError::Serve)
}
