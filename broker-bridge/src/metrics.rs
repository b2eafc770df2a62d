//! Every metric broker-bridge exports. Listed in docs/metrics.md.

use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};

pub const PRODUCED: &str = "switchboard_bridge_produced_total";
pub const PRODUCE_ERRORS: &str = "switchboard_bridge_produce_errors_total";
pub const PRODUCE_DURATION: &str = "switchboard_bridge_produce_duration_seconds";
pub const PRODUCER_RESETS: &str = "switchboard_bridge_producer_resets_total";
pub const CONSUMED: &str = "switchboard_bridge_consumed_total";
pub const CONSUMER_LAG: &str = "switchboard_bridge_consumer_lag_messages";
pub const IN_FLIGHT: &str = "switchboard_bridge_in_flight_messages";
pub const FANOUT_WIDTH: &str = "switchboard_bridge_fanout_width_nodes";
pub const DELIVERED: &str = "switchboard_bridge_delivered_total";
pub const REDELIVERIES: &str = "switchboard_bridge_redeliveries_total";
pub const GIVEN_UP: &str = "switchboard_bridge_deliveries_given_up_total";
pub const GATEWAY_LINKS: &str = "switchboard_bridge_gateway_links";
pub const COMMITS: &str = "switchboard_bridge_commits_total";
pub const OFFSET_GAPS: &str = "switchboard_bridge_offset_gaps_total";
pub const BAD_RECORDS: &str = "switchboard_bridge_bad_records_total";
pub const PUSH_REQUESTS: &str = "switchboard_bridge_push_requests_total";
pub const ROUTE_NODES: &str = "switchboard_bridge_route_nodes";
pub const ROUTES_COMPLETE: &str = "switchboard_bridge_routes_complete";
pub const ASSIGNED_PARTITIONS: &str = "switchboard_bridge_assigned_partitions";
pub const HISTORY_BYTES: &str = "switchboard_bridge_history_bytes";
pub const HISTORY_BUDGET: &str = "switchboard_bridge_history_budget_bytes";
pub const HISTORY_READS: &str = "switchboard_bridge_history_reads_total";
pub const KEYED_UNSURE: &str = "switchboard_bridge_keyed_unsure_total";
pub const KEYED_COPIES_DROPPED: &str = "switchboard_bridge_history_keyed_copies_dropped_total";
pub const AHEAD_WAITS: &str = "switchboard_bridge_history_ahead_waits_total";

pub const BUCKETS: &[(&str, &[f64])] = &[
    ("_duration_seconds", &[0.000_5, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0]),
    ("_width_nodes", &[0.0, 1.0, 2.0, 3.0, 5.0, 10.0, 20.0, 50.0, 100.0]),
];

pub fn describe() {
    register_zeroes();
    // Zero series, so alerts see 0 rather than nothing before the first event.
    for c in [
        PRODUCE_ERRORS,
        PRODUCER_RESETS,
        CONSUMED,
        DELIVERED,
        REDELIVERIES,
        GIVEN_UP,
        BAD_RECORDS,
        KEYED_UNSURE,
        KEYED_COPIES_DROPPED,
        AHEAD_WAITS,
    ] {
        metrics::counter!(c).increment(0);
    }
    for g in [CONSUMER_LAG, IN_FLIGHT, GATEWAY_LINKS] {
        metrics::gauge!(g).increment(0.0);
    }
    let _ = metrics::histogram!(PRODUCE_DURATION);
    describe_counter!(PRODUCED, "Messages Kafka acknowledged, by target kind.");
    describe_counter!(PRODUCE_ERRORS, "Messages Kafka did not store (the caller got UNAVAILABLE).");
    describe_histogram!(PRODUCE_DURATION, Unit::Seconds, "Time from accepting a message to Kafka's acknowledgement.");
    describe_counter!(PRODUCER_RESETS, "Producers recreated after a fatal idempotence error (e.g. fenced epoch).");
    describe_counter!(CONSUMED, "Records consumed from the messages topic.");
    describe_gauge!(ASSIGNED_PARTITIONS, "Partitions of the messages topic assigned to this bridge's consumer now.");
    metrics::gauge!(ASSIGNED_PARTITIONS).set(0.0);
    describe_gauge!(CONSUMER_LAG, "High watermark minus the next offset to consume, summed over assigned partitions.");
    describe_gauge!(IN_FLIGHT, "Consumed messages not yet acknowledged by every target gateway.");
    describe_histogram!(FANOUT_WIDTH, "Target gateways per consumed message.");
    describe_counter!(DELIVERED, "Deliveries acknowledged by gateways.");
    describe_counter!(REDELIVERIES, "Deliveries sent again after a gateway stream broke.");
    describe_counter!(GIVEN_UP, "Deliveries abandoned because the gateway left or stayed unreachable.");
    describe_gauge!(GATEWAY_LINKS, "Open delivery streams to gateways.");
    describe_counter!(COMMITS, "Offset commits, by outcome.");
    describe_counter!(
        OFFSET_GAPS,
        "Holes in a partition's consumed offsets, by outcome (refetched, accepted after retries)."
    );
    describe_counter!(BAD_RECORDS, "Records that are not a valid envelope (skipped).");
    describe_counter!(PUSH_REQUESTS, "Push API calls, by method and outcome.");
    describe_gauge!(ROUTE_NODES, "Gateway nodes known to the routing cache.");
    describe_gauge!(
        ROUTES_COMPLETE,
        "1 once the routing cache holds a complete presence state; the bridge consumes only then."
    );
    describe_gauge!(HISTORY_BYTES, Unit::Bytes, "Bytes the hot history windows hold now.");
    describe_gauge!(HISTORY_BUDGET, Unit::Bytes, "The hot history windows' memory budget (--history-memory).");
    describe_counter!(HISTORY_READS, "History answers, by source (hot window or log) and outcome.");
    describe_counter!(
        KEYED_UNSURE,
        "Keyed messages stored marked maybe_stored_before (a retry, or a key memory that does not cover the window)."
    );
    describe_counter!(
        KEYED_COPIES_DROPPED,
        "Later copies of a keyed message left out of history answers (found by looking back before the read)."
    );
    describe_counter!(
        AHEAD_WAITS,
        "History reads whose since was past the watermark at first, waiting up to the settle time for it."
    );
    metrics::gauge!(HISTORY_BYTES).set(0.0);
}

/// Label values, registered at zero at start (docs/metrics.md lists the same).
pub const PRODUCE_TARGETS: &[&str] = &["channel", "user", "broadcast"];
pub const COMMIT_OUTCOMES: &[&str] = &["ok", "error"];
pub const GAP_OUTCOMES: &[&str] = &["refetched", "accepted"];
pub const PUSH_METHODS: &[&str] =
    &["send_to_user", "publish", "broadcast", "disconnect", "is_online", "channel_members", "history"];
pub const PUSH_OUTCOMES: &[&str] = &["ok", "invalid_argument", "unavailable", "duplicate"];

pub const HISTORY_SOURCES: &[&str] = &["hot", "log"];
pub const HISTORY_OUTCOMES: &[&str] =
    &["ok", "epoch_changed", "too_old", "too_many", "ahead", "no_history", "busy", "error"];

/// The series that would otherwise appear only at their first event (labelled counters,
/// the routing gauge, the fanout histogram), at zero from start, so that `rate()` and
/// `absent()` see them.
fn register_zeroes() {
    kit::telemetry::zero_counters(PRODUCED, "target", PRODUCE_TARGETS);
    kit::telemetry::zero_counters(COMMITS, "outcome", COMMIT_OUTCOMES);
    kit::telemetry::zero_counters(OFFSET_GAPS, "outcome", GAP_OUTCOMES);
    for method in PUSH_METHODS {
        for outcome in PUSH_OUTCOMES {
            metrics::counter!(PUSH_REQUESTS, "method" => *method, "outcome" => *outcome).increment(0);
        }
    }
    for source in HISTORY_SOURCES {
        for outcome in HISTORY_OUTCOMES {
            metrics::counter!(HISTORY_READS, "source" => *source, "outcome" => *outcome).increment(0);
        }
    }
    metrics::gauge!(HISTORY_BUDGET).increment(0.0);
    metrics::gauge!(ROUTE_NODES).increment(0.0);
    metrics::gauge!(ROUTES_COMPLETE).increment(0.0);
    let _ = metrics::histogram!(FANOUT_WIDTH);
}

#[cfg(test)]
mod tests {
    /// Every metric is in docs/metrics.md and exported from start, before its first event.
    #[test]
    fn every_metric_is_documented_and_exported_from_start() {
        kit::telemetry::check_metrics_documented_and_exported(
            include_str!("../../docs/metrics.md"),
            include_str!("metrics.rs"),
            super::BUCKETS,
            super::describe,
            10,
        );
    }
}
