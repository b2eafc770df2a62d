//! Every metric presence exports. Listed in docs/metrics.md.

use metrics::{describe_counter, describe_gauge};

pub const NODES: &str = "switchboard_presence_nodes";
pub const CONNECTIONS: &str = "switchboard_presence_connections";
pub const USERS: &str = "switchboard_presence_users";
pub const CHANNELS: &str = "switchboard_presence_channels";
pub const WATCHERS: &str = "switchboard_presence_watchers";
pub const COMPLETE: &str = "switchboard_presence_complete";
pub const SYNC_STREAMS: &str = "switchboard_presence_sync_streams_total";
pub const DELTAS: &str = "switchboard_presence_deltas_total";
pub const EVENTS: &str = "switchboard_presence_events_total";
pub const QUERIES: &str = "switchboard_presence_queries_total";
pub const LEASES_EXPIRED: &str = "switchboard_presence_leases_expired_total";

/// Label values, registered at zero at start (docs/metrics.md lists the same).
pub const EVENT_KINDS: &[&str] =
    &["node_up", "node_down", "interest", "join", "leave", "user_online", "user_offline", "count"];
pub const QUERY_METHODS: &[&str] = &["locate_users", "channel_nodes", "channel_members", "online_counts", "list_nodes"];

pub fn describe() {
    // Every series at zero from start, so alerts and rate() see 0 rather than nothing
    // before the first event.
    for c in [SYNC_STREAMS, DELTAS, LEASES_EXPIRED] {
        metrics::counter!(c).increment(0);
    }
    for g in [NODES, CONNECTIONS, USERS, CHANNELS, WATCHERS, COMPLETE] {
        metrics::gauge!(g).increment(0.0);
    }
    kit::telemetry::zero_counters(EVENTS, "kind", EVENT_KINDS);
    kit::telemetry::zero_counters(QUERIES, "method", QUERY_METHODS);
    describe_gauge!(NODES, "Gateway nodes holding a lease.");
    describe_gauge!(CONNECTIONS, "Client connections tracked.");
    describe_gauge!(USERS, "Distinct users with at least one connection.");
    describe_gauge!(CHANNELS, "Channels with at least one subscriber on some node.");
    describe_gauge!(WATCHERS, "Open Watch streams.");
    describe_gauge!(
        COMPLETE,
        "1 once this replica has been up for a lease (every live gateway has registered with it)."
    );
    describe_counter!(SYNC_STREAMS, "Gateway Sync streams accepted (hello).");
    describe_counter!(DELTAS, "Deltas applied from gateways.");
    describe_counter!(EVENTS, "Watch events published, by kind.");
    describe_counter!(QUERIES, "Queries answered, by method.");
    describe_counter!(LEASES_EXPIRED, "Nodes removed because their lease ran out.");
}

#[cfg(test)]
mod tests {
    /// Every metric is in docs/metrics.md and exported from start, before its first event.
    #[test]
    fn every_metric_is_documented_and_exported_from_start() {
        kit::telemetry::check_metrics_documented_and_exported(
            include_str!("../../docs/metrics.md"),
            include_str!("metrics.rs"),
            &[],
            super::describe,
            8,
        );
    }

    /// EVENT_KINDS (registered at zero, documented) is every kind `Shared::publish` and
    /// `publish_counts` count.
    #[test]
    fn event_kinds_are_the_ones_counted() {
        let src = include_str!("service.rs");
        let start = src.find("pub fn publish(").expect("Shared::publish in service.rs");
        let end = start + src[start..].find("/// Expires dead nodes").expect("end of publish_counts");
        let mut kinds: Vec<&str> = src[start..end].split("=> \"").skip(1).filter_map(|r| r.split('"').next()).collect();
        kinds.sort_unstable();
        let mut listed = super::EVENT_KINDS.to_vec();
        listed.sort_unstable();
        assert_eq!(kinds, listed, "update EVENT_KINDS and docs/metrics.md");
    }
}
