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

/// Bucket bounds (seconds) of every histogram that `buckets` gives none: the Prometheus
/// clients' default. With a default set, no histogram is ever exported as a summary
/// (whose quantiles cannot be aggregated across pods, and which has no `_bucket` series
/// for `histogram_quantile`).
pub const DEFAULT_BUCKETS: &[f64] = &[0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];

fn builder(buckets: &[(&str, &[f64])]) -> anyhow::Result<PrometheusBuilder> {
    let mut builder = PrometheusBuilder::new().set_buckets(DEFAULT_BUCKETS)?;
    for (suffix, bounds) in buckets {
        builder = builder
            .set_buckets_for_metric(metrics_exporter_prometheus::Matcher::Suffix((*suffix).to_owned()), bounds)?;
    }
    Ok(builder)
}

/// Installs the global Prometheus recorder and returns the handle that renders it.
///
/// Every histogram is a Prometheus histogram: those whose name ends in a suffix listed
/// in `buckets` get that entry's bounds, the others [`DEFAULT_BUCKETS`].
pub fn init_metrics(buckets: &[(&str, &[f64])]) -> anyhow::Result<PrometheusHandle> {
    Ok(builder(buckets)?.install_recorder()?)
}

/// A recorder configured as [`init_metrics`] configures the global one, not installed,
/// for tests that render the metrics of one run in isolation
/// (`metrics::with_local_recorder`).
pub fn local_recorder(buckets: &[(&str, &[f64])]) -> anyhow::Result<metrics_exporter_prometheus::PrometheusRecorder> {
    Ok(builder(buckets)?.build_recorder())
}

/// Publishes `<prefix>_runtime_alive_tasks` (tokio tasks alive in this process)
/// every 5 s, so that a task leak shows up as growth on a dashboard or in a soak.
pub fn spawn_runtime_sampler(prefix: &str) -> tokio::task::JoinHandle<()> {
    let name = format!("{prefix}_runtime_alive_tasks");
    metrics::describe_gauge!(name.clone(), "Tokio tasks alive in this process (a steady climb is a leak).");
    // Exported from the first scrape on, not from the sampler's first tick.
    metrics::gauge!(name.clone()).set(tokio::runtime::Handle::current().metrics().num_alive_tasks() as f64);
    tokio::spawn(async move {
        let mut every = tokio::time::interval(std::time::Duration::from_secs(5));
        loop {
            every.tick().await;
            let n = tokio::runtime::Handle::current().metrics().num_alive_tasks();
            metrics::gauge!(name.clone()).set(n as f64);
        }
    })
}

/// Registers `name` at zero for every value of `label`, so that each labelled series is
/// exported before its first event (an absent series is not a zero to PromQL).
pub fn zero_counters(name: &'static str, label: &'static str, values: &[&'static str]) {
    for v in values {
        metrics::counter!(name, label => *v).increment(0);
    }
}

/// For each crate's metrics test: every `pub const … = "switchboard_…"` name in
/// `metrics_src` is listed (as `` `name` ``) in `doc`, and is exported right after
/// `describe` ran on a fresh recorder (a series that appears late breaks `rate()`
/// over the gap and `absent()` alerts); no histogram is exported as a summary.
/// Panics with what is wrong.
pub fn check_metrics_documented_and_exported(
    doc: &str,
    metrics_src: &str,
    buckets: &[(&str, &[f64])],
    describe: impl FnOnce(),
    at_least: usize,
) {
    let names: Vec<&str> = metrics_src
        .lines()
        .filter_map(|l| l.trim().strip_prefix("pub const ")?.split('"').nth(1))
        .filter(|n| n.starts_with("switchboard_"))
        .collect();
    assert!(names.len() >= at_least, "{names:?}");
    let rec = local_recorder(buckets).expect("recorder");
    metrics::with_local_recorder(&rec, describe);
    let page = rec.handle().render();
    for n in names {
        assert!(doc.contains(&format!("`{n}`")), "{n} missing from docs/metrics.md");
        let exported = page.lines().any(|l| {
            l.strip_prefix(n).is_some_and(|rest| rest.starts_with([' ', '{']) || rest.starts_with("_bucket{"))
        });
        assert!(exported, "{n} is not exported at start:\n{page}");
    }
    assert!(!page.contains("quantile="), "a histogram is exported as a summary:\n{page}");
}

#[cfg(test)]
mod tests {
    #[test]
    fn every_histogram_gets_buckets_named_or_default() {
        let rec = super::local_recorder(&[("_duration_seconds", &[0.1, 1.0])]).unwrap();
        metrics::with_local_recorder(&rec, || {
            metrics::histogram!("t_fanout_duration_seconds").record(0.5);
            metrics::histogram!("t_end_to_end_latency_seconds").record(0.5);
        });
        let page = rec.handle().render();
        assert!(page.contains("t_fanout_duration_seconds_bucket{le=\"1\"} 1"), "{page}");
        assert!(!page.contains("t_fanout_duration_seconds_bucket{le=\"0.25\"}"), "{page}");
        // No suffix entry: the default bounds, never a summary.
        assert!(page.contains("t_end_to_end_latency_seconds_bucket{le=\"0.5\"} 1"), "{page}");
        assert!(!page.contains("quantile="), "{page}");
    }
}
