//! Logs and metrics set-up, done once at process start.

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tracing_subscriber::{EnvFilter, fmt, prelude::*};

use crate::args::LogFormat;

/// Installs the global tracing subscriber, writing to stderr (stdout carries the
/// one machine-readable `LISTENING` line). Fails if the filter does not parse.
pub fn init_logging(format: LogFormat, filter: &str) -> anyhow::Result<()> {
    let filter = EnvFilter::try_new(filter)?;
    let registry = tracing_subscriber::registry().with(filter);
    match format {
        LogFormat::Text => registry.with(fmt::layer().with_writer(std::io::stderr).with_target(false)).try_init()?,
        LogFormat::Json => registry
            .with(fmt::layer().with_writer(std::io::stderr).json().flatten_event(true).with_current_span(false))
            .try_init()?,
    }
    Ok(())
}

/// Installs the global Prometheus recorder and returns the handle that renders it.
///
/// Histograms listed in `buckets` (by metric name suffix) get those bucket bounds;
/// the others are summaries.
pub fn init_metrics(buckets: &[(&str, &[f64])]) -> anyhow::Result<PrometheusHandle> {
    let mut builder = PrometheusBuilder::new();
    for (suffix, bounds) in buckets {
        builder = builder
            .set_buckets_for_metric(metrics_exporter_prometheus::Matcher::Suffix((*suffix).to_owned()), bounds)?;
    }
    Ok(builder.install_recorder()?)
}

/// A recorder that is not installed globally, for tests that render metrics of one
/// run in isolation.
pub fn local_recorder() -> metrics_exporter_prometheus::PrometheusRecorder {
    PrometheusBuilder::new().build_recorder()
}

/// Publishes `<prefix>_runtime_alive_tasks` (tokio tasks alive in this process)
/// every 5 s, so that a task leak shows up as growth on a dashboard or in a soak.
pub fn spawn_runtime_sampler(prefix: &str) -> tokio::task::JoinHandle<()> {
    let name = format!("{prefix}_runtime_alive_tasks");
    metrics::describe_gauge!(name.clone(), "Tokio tasks alive in this process (a steady climb is a leak).");
    tokio::spawn(async move {
        let mut every = tokio::time::interval(std::time::Duration::from_secs(5));
        loop {
            every.tick().await;
            let n = tokio::runtime::Handle::current().metrics().num_alive_tasks();
            metrics::gauge!(name.clone()).set(n as f64);
        }
    })
}
