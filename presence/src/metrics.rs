//! Every metric presence exports. Listed in docs/metrics.md.

use metrics::{describe_counter, describe_gauge};

pub const NODES: &str = "switchboard_presence_nodes";
pub const CONNECTIONS: &str = "switchboard_presence_connections";
pub const USERS: &str = "switchboard_presence_users";
pub const CHANNELS: &str = "switchboard_presence_channels";
pub const WATCHERS: &str = "switchboard_presence_watchers";
pub const SYNC_STREAMS: &str = "switchboard_presence_sync_streams_total";
pub const DELTAS: &str = "switchboard_presence_deltas_total";
pub const EVENTS: &str = "switchboard_presence_events_total";
pub const QUERIES: &str = "switchboard_presence_queries_total";
pub const LEASES_EXPIRED: &str = "switchboard_presence_leases_expired_total";

pub fn describe() {
    // Zero series, so alerts see 0 rather than nothing before the first event.
    for c in [SYNC_STREAMS, DELTAS, LEASES_EXPIRED] {
        metrics::counter!(c).increment(0);
    }
    describe_gauge!(NODES, "Gateway nodes holding a lease.");
    describe_gauge!(CONNECTIONS, "Client connections tracked.");
    describe_gauge!(USERS, "Distinct users with at least one connection.");
    describe_gauge!(CHANNELS, "Channels with at least one subscriber on some node.");
    describe_gauge!(WATCHERS, "Open Watch streams.");
    describe_counter!(SYNC_STREAMS, "Gateway Sync streams accepted (hello).");
    describe_counter!(DELTAS, "Deltas applied from gateways.");
    describe_counter!(EVENTS, "Watch events published, by kind.");
    describe_counter!(QUERIES, "Queries answered, by method.");
    describe_counter!(LEASES_EXPIRED, "Nodes removed because their lease ran out.");
}

#[cfg(test)]
mod tests {
    #[test]
    fn every_metric_is_documented() {
        let doc = include_str!("../../docs/metrics.md");
        let names: Vec<&str> = include_str!("metrics.rs")
            .lines()
            .filter_map(|l| l.trim().strip_prefix("pub const ")?.split('"').nth(1))
            .filter(|n| n.starts_with("switchboard_"))
            .collect();
        assert!(names.len() >= 8);
        for n in names {
            assert!(doc.contains(&format!("`{n}`")), "{n} missing from docs/metrics.md");
        }
    }
}
