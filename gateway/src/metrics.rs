//! Every metric the gateway exports, described once. Listed in docs/metrics.md.

use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};

pub const CONNECTIONS_ACTIVE: &str = "switchboard_gateway_connections_active";
pub const CONNECTIONS_LIMIT: &str = "switchboard_gateway_connections_limit";
pub const CONNECTIONS_OPENED: &str = "switchboard_gateway_connections_opened_total";
pub const CONNECTIONS_CLOSED: &str = "switchboard_gateway_connections_closed_total";
pub const HANDSHAKE_REJECTED: &str = "switchboard_gateway_handshake_rejected_total";
pub const MESSAGES_IN: &str = "switchboard_gateway_messages_in_total";
pub const MESSAGES_OUT: &str = "switchboard_gateway_messages_out_total";
pub const COMMAND_ERRORS: &str = "switchboard_gateway_command_errors_total";
pub const FANOUT_DURATION: &str = "switchboard_gateway_fanout_duration_seconds";
pub const QUEUE_FULL: &str = "switchboard_gateway_queue_full_total";
pub const SUBSCRIPTIONS_ACTIVE: &str = "switchboard_gateway_subscriptions_active";
pub const ACCEPT_ERRORS: &str = "switchboard_gateway_accept_errors_total";
pub const HALF_OPEN_SHED: &str = "switchboard_gateway_half_open_shed_total";
pub const PUSH_REQUESTS: &str = "switchboard_gateway_push_requests_total";
pub const STALLS: &str = "switchboard_gateway_stalls_total";
pub const END_TO_END: &str = "switchboard_gateway_end_to_end_latency_seconds";
pub const DUPLICATES_DROPPED: &str = "switchboard_gateway_duplicates_dropped_total";
pub const DELIVERIES: &str = "switchboard_gateway_deliveries_total";
pub const DELIVERY_STREAMS: &str = "switchboard_gateway_delivery_streams";
pub const PACING: &str = "switchboard_gateway_delivery_pacing_total";
pub const PACING_WAIT: &str = "switchboard_gateway_delivery_pacing_wait_duration_seconds";
pub const PRESENCE_LINKS_UP: &str = "switchboard_gateway_presence_links_up";
pub const PRESENCE_RECONNECTS: &str = "switchboard_gateway_presence_reconnects_total";
pub const PRESENCE_RESYNCS: &str = "switchboard_gateway_presence_resyncs_total";
pub const PRESENCE_SENT_SEQ: &str = "switchboard_gateway_presence_sent_seq";
pub const PRESENCE_ACKED_SEQ: &str = "switchboard_gateway_presence_acked_seq";
pub const PRESENCE_FALLBACKS: &str = "switchboard_gateway_presence_fallbacks_total";
pub const HISTORY_BYTES: &str = "switchboard_gateway_history_bytes";
pub const HISTORY_BUDGET: &str = "switchboard_gateway_history_budget_bytes";
pub const HISTORY_EVICTIONS: &str = "switchboard_gateway_history_evictions_total";
pub const RECOVERIES: &str = "switchboard_gateway_recoveries_total";
pub const RECOVERY_GAPS: &str = "switchboard_gateway_recovery_gaps_total";
pub const AUTH_REFRESH: &str = "switchboard_gateway_auth_refresh_total";
pub const CONNECT: &str = "switchboard_gateway_connect_total";
pub const DEFLATE_SESSIONS: &str = "switchboard_gateway_deflate_sessions_total";
pub const DEFLATE_FRAMES: &str = "switchboard_gateway_deflate_frames_total";
pub const TRANSPORT_SESSIONS_ACTIVE: &str = "switchboard_gateway_transport_sessions_active";
pub const TRANSPORT_SESSIONS_OPENED: &str = "switchboard_gateway_transport_sessions_opened_total";
pub const POLLS: &str = "switchboard_gateway_polls_total";
pub const USER_LIMIT_REFUSALS: &str = "switchboard_gateway_user_limit_refusals_total";
pub const MEMORY_USED: &str = "switchboard_gateway_memory_resident_bytes";
pub const MEMORY_BUDGET: &str = "switchboard_gateway_memory_budget_bytes";
pub const MEMORY_SHEDDING: &str = "switchboard_gateway_memory_shedding";
pub const MEMORY_SHED: &str = "switchboard_gateway_memory_shed_total";
pub const TLS_HANDSHAKES: &str = "switchboard_gateway_tls_handshakes_total";
pub const TLS_CERT_RELOADS: &str = "switchboard_gateway_tls_cert_reloads_total";
pub const TLS_CERT_EXPIRY: &str = "switchboard_gateway_tls_cert_expiry_timestamp_seconds";

/// Histogram buckets, by metric-name suffix (any other histogram gets kit's defaults).
pub const BUCKETS: &[(&str, &[f64])] = &[
    ("_duration_seconds", &[0.000_01, 0.000_05, 0.000_1, 0.000_5, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0]),
    // Spans the bridge, Kafka and this gateway: milliseconds to seconds. 0.5 s is the
    // objective of SwitchboardEndToEndLatencyHigh, so it must be a bound.
    ("_end_to_end_latency_seconds", &[0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0]),
];

/// Label values, registered at zero at start (docs/metrics.md lists the same).
pub const OPS: &[&str] =
    &["subscribe", "unsubscribe", "publish", "send", "presence", "history", "ping", "connect", "refresh", "invalid"];
/// `recoveries_total` outcomes: a subscribe without `since`, a complete recovery, or why not.
pub const RECOVERY_OUTCOMES: &[&str] =
    &["none", "recovered", "epoch_changed", "too_old", "too_many", "ahead", "no_history", "unavailable"];
pub const FRAME_KINDS: &[&str] = &["message", "direct", "broadcast"];
/// The protocol's error codes (`protocol::ErrorCode::as_str`).
pub const ERROR_CODES: &[&str] = &[
    "bad_json",
    "unknown_op",
    "bad_request",
    "bad_channel",
    "forbidden",
    "too_many_subscriptions",
    "rate_limited",
    "unavailable",
    "unauthorized",
    "too_big",
    "unknown_stream",
];
/// How a long-poll ended: with events, empty at its timeout, cut by a drain or by a
/// resync (a stall, a lapsed presence lease), or the client went away.
pub const POLL_OUTCOMES: &[&str] = &["events", "timeout", "drain", "resync", "gone"];
/// What a per-user limit refused: a session, or subscriptions.
pub const USER_LIMITS: &[&str] = &["connections", "subscriptions"];
/// What the memory budget shed: new sessions by transport, or commands that add work.
pub const SHED_KINDS: &[&str] = &["websocket", "sse", "poll", "command"];
pub const PUSH_METHODS: &[&str] =
    &["send_to_user", "publish", "broadcast", "disconnect", "is_online", "channel_members", "history"];
pub const PUSH_OUTCOMES: &[&str] = &["ok", "invalid_argument"];
/// Outcomes of `refresh`: accepted, or the error code it was answered with.
pub const REFRESH_OUTCOMES: &[&str] = &["ok", "unauthorized", "forbidden", "rate_limited", "bad_request"];
/// Outcomes of a session opened without a token: authenticated by `connect`, a bad token,
/// another first message, no `connect` in time, the user's sessions at `--max-connections-per-user`.
pub const CONNECT_OUTCOMES: &[&str] = &["ok", "unauthorized", "connect_required", "timeout", "user_limit"];

/// Registers every series that alerts and dashboards use at zero, so that they are
/// exported before the first event (an absent series is not a zero to PromQL).
fn register_zeroes() {
    for c in [
        CONNECTIONS_OPENED,
        QUEUE_FULL,
        ACCEPT_ERRORS,
        DUPLICATES_DROPPED,
        DELIVERIES,
        PRESENCE_RECONNECTS,
        PRESENCE_RESYNCS,
        PRESENCE_FALLBACKS,
        STALLS,
        DEFLATE_SESSIONS,
        DEFLATE_FRAMES,
    ] {
        metrics::counter!(c).increment(0);
    }
    // `increment(0.0)` leaves a value already set (the connection cap) as it is.
    for g in [
        CONNECTIONS_ACTIVE,
        CONNECTIONS_LIMIT,
        SUBSCRIPTIONS_ACTIVE,
        DELIVERY_STREAMS,
        PRESENCE_LINKS_UP,
        PRESENCE_SENT_SEQ,
        PRESENCE_ACKED_SEQ,
    ] {
        metrics::gauge!(g).increment(0.0);
    }
    for g in [HISTORY_BYTES, HISTORY_BUDGET, MEMORY_USED, MEMORY_BUDGET, MEMORY_SHEDDING] {
        metrics::gauge!(g).increment(0.0);
    }
    kit::telemetry::zero_counters(RECOVERIES, "outcome", RECOVERY_OUTCOMES);
    kit::telemetry::zero_counters(RECOVERY_GAPS, "reason", &RECOVERY_OUTCOMES[2..]);
    kit::telemetry::zero_counters(HISTORY_EVICTIONS, "reason", &["count_or_age", "memory"]);
    kit::telemetry::zero_counters(MESSAGES_IN, "op", OPS);
    kit::telemetry::zero_counters(MESSAGES_OUT, "kind", FRAME_KINDS);
    kit::telemetry::zero_counters(COMMAND_ERRORS, "code", ERROR_CODES);
    kit::telemetry::zero_counters(AUTH_REFRESH, "outcome", REFRESH_OUTCOMES);
    kit::telemetry::zero_counters(CONNECT, "outcome", CONNECT_OUTCOMES);
    kit::telemetry::zero_counters(POLLS, "outcome", POLL_OUTCOMES);
    kit::telemetry::zero_counters(USER_LIMIT_REFUSALS, "limit", USER_LIMITS);
    kit::telemetry::zero_counters(MEMORY_SHED, "kind", SHED_KINDS);
    kit::telemetry::zero_counters(TLS_HANDSHAKES, "outcome", &["ok", "failed", "timeout"]);
    kit::telemetry::zero_counters(TLS_CERT_RELOADS, "outcome", &["loaded", "failed"]);
    metrics::gauge!(TLS_CERT_EXPIRY).increment(0.0);
    for t in crate::transport::Transport::ALL {
        metrics::counter!(TRANSPORT_SESSIONS_OPENED, "transport" => t.label()).increment(0);
        metrics::gauge!(TRANSPORT_SESSIONS_ACTIVE, "transport" => t.label()).increment(0.0);
    }
    for method in PUSH_METHODS {
        for outcome in PUSH_OUTCOMES {
            metrics::counter!(PUSH_REQUESTS, "method" => *method, "outcome" => *outcome).increment(0);
        }
    }
    for r in crate::policy::CloseReason::ALL {
        metrics::counter!(CONNECTIONS_CLOSED, "reason" => r.label()).increment(0);
    }
    for r in ["bad_request", "origin", "full", "per_ip", "per_user", "memory", "draining"]
        .into_iter()
        .chain(crate::auth::AuthError::ALL.iter().map(|e| e.label()))
    {
        metrics::counter!(HANDSHAKE_REJECTED, "reason" => r).increment(0);
    }
    for o in ["waited", "stalled", "slow"] {
        metrics::counter!(PACING, "outcome" => o).increment(0);
    }
    let _ = metrics::histogram!(PACING_WAIT);
    for r in ["node", "per_ip"] {
        metrics::counter!(HALF_OPEN_SHED, "reason" => r).increment(0);
    }
    let _ = metrics::histogram!(FANOUT_DURATION);
    let _ = metrics::histogram!(END_TO_END);
}

/// Registers help text and units for every metric, and the zero series.
pub fn describe() {
    register_zeroes();
    describe_gauge!(CONNECTIONS_ACTIVE, "Sessions open now (WebSocket and SSE streams).");
    describe_gauge!(
        TRANSPORT_SESSIONS_ACTIVE,
        "Sessions open now, by transport (websocket, sse, poll: waiting polls)."
    );
    describe_counter!(TRANSPORT_SESSIONS_OPENED, "Sessions opened, by transport (poll: every poll request admitted).");
    describe_counter!(POLLS, "Long-poll requests answered, by outcome.");
    describe_gauge!(CONNECTIONS_LIMIT, "Maximum concurrent sessions (connection cap).");
    describe_counter!(CONNECTIONS_OPENED, "Sessions opened (WebSocket and SSE streams).");
    describe_counter!(CONNECTIONS_CLOSED, "Sessions closed (WebSocket and SSE streams), by reason.");
    describe_counter!(HANDSHAKE_REJECTED, "Upgrade requests refused before the upgrade, by reason.");
    describe_counter!(DEFLATE_SESSIONS, "Upgrades that negotiated permessage-deflate.");
    describe_counter!(DEFLATE_FRAMES, "Frames compressed for permessage-deflate (at most one per publication).");
    describe_counter!(MESSAGES_IN, "Client commands received, by op.");
    describe_counter!(MESSAGES_OUT, "Frames queued to sessions, by kind (message, direct, broadcast).");
    describe_counter!(COMMAND_ERRORS, "Client commands answered with an error, by code.");
    describe_counter!(AUTH_REFRESH, "Token refreshes (`refresh` command), by outcome.");
    describe_counter!(
        CONNECT,
        "Sessions opened without a token: authenticated by `connect` (ok) or closed 4005, by outcome."
    );
    describe_histogram!(FANOUT_DURATION, Unit::Seconds, "Time to queue one publication to every local subscriber.");
    describe_counter!(QUEUE_FULL, "Sessions whose send queue overflowed (slow consumers).");
    describe_gauge!(SUBSCRIPTIONS_ACTIVE, "Channel subscriptions held by sessions now.");
    describe_counter!(ACCEPT_ERRORS, "Errors accepting TCP connections (e.g. EMFILE).");
    describe_counter!(
        HALF_OPEN_SHED,
        "Connections closed before sending a complete request to make room for a new one, by budget (node, per_ip)."
    );
    describe_counter!(PUSH_REQUESTS, "Push API calls, by method and outcome.");
    describe_histogram!(
        END_TO_END,
        Unit::Seconds,
        "Cluster mode: from the bridge accepting a message to its frame queued on local sockets."
    );
    describe_counter!(
        STALLS,
        "Cluster mode: times this gateway found itself frozen for over 5 s and asked its clients to reconnect."
    );
    describe_counter!(DUPLICATES_DROPPED, "Cluster mode: redelivered messages dropped (already delivered here).");
    describe_counter!(DELIVERIES, "Cluster mode: messages received from broker-bridge.");
    describe_counter!(
        PACING,
        "Cluster mode: delivery stream waits for congested sessions (waited), sessions not waited for because they took nothing for 1 s (stalled), and sessions closed 4002 after --slow-consumer-timeout of congestion (slow)."
    );
    describe_histogram!(
        PACING_WAIT,
        Unit::Seconds,
        "Cluster mode: time a delivery stream waited for congested sessions to drain."
    );
    describe_gauge!(DELIVERY_STREAMS, "Cluster mode: open delivery streams from broker-bridges.");
    describe_gauge!(PRESENCE_LINKS_UP, "Presence replicas this gateway is streaming to (connecting or connected).");
    describe_counter!(PRESENCE_RECONNECTS, "Presence links that broke and are being re-established.");
    describe_counter!(PRESENCE_RESYNCS, "Fresh snapshots sent on a live link because the delta queue overflowed.");
    describe_gauge!(PRESENCE_SENT_SEQ, "Last delta batch sequence sent to presence.");
    describe_gauge!(PRESENCE_ACKED_SEQ, "Last sequence presence acknowledged.");
    describe_counter!(PRESENCE_FALLBACKS, "Presence queries answered from local state because no replica answered.");
    describe_gauge!(HISTORY_BYTES, Unit::Bytes, "Standalone: bytes the channel history holds now.");
    describe_gauge!(HISTORY_BUDGET, Unit::Bytes, "Standalone: bytes the channel history may hold (--history-memory).");
    describe_counter!(
        HISTORY_EVICTIONS,
        "Standalone: history entries dropped, by reason (count_or_age: a --history rule; memory: the budget)."
    );
    describe_counter!(
        RECOVERIES,
        "Subscribes by outcome: none (no since), recovered, or why recovery was not possible."
    );
    describe_counter!(
        RECOVERY_GAPS,
        "Recoveries that started complete but could not be finished (a gap frame was sent), by reason."
    );
    describe_counter!(
        USER_LIMIT_REFUSALS,
        "Refused by a per-user limit of this node: a new session (connections) or a subscribe (subscriptions)."
    );
    describe_gauge!(MEMORY_USED, Unit::Bytes, "Resident memory of the process, sampled every 100 ms.");
    describe_gauge!(MEMORY_BUDGET, Unit::Bytes, "Resident memory at which new work is shed (--memory-budget; 0: off).");
    describe_gauge!(MEMORY_SHEDDING, "1 while the node is over its memory budget and sheds new work, else 0.");
    describe_counter!(
        MEMORY_SHED,
        "New work refused over the memory budget: sessions by transport (websocket, sse, poll) and commands."
    );
    describe_counter!(TLS_HANDSHAKES, "TLS handshakes on the client port, by outcome (ok, failed, timeout).");
    describe_counter!(
        TLS_CERT_RELOADS,
        "Client-port certificate reloads (SIGHUP or changed files): loaded, or failed (the previous pair stays)."
    );
    describe_gauge!(
        TLS_CERT_EXPIRY,
        Unit::Seconds,
        "notAfter of the client-port certificate in use, as Unix time (0: no TLS on the client port)."
    );
}

#[cfg(test)]
mod tests {
    /// Every metric is in docs/metrics.md and exported from start, before its first event
    /// (a series that appears late breaks `rate()` over the gap and `absent()` alerts).
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

    /// ERROR_CODES (registered at zero, documented) is the protocol's list.
    #[test]
    fn error_codes_are_the_protocols() {
        let src = include_str!("protocol.rs");
        let start = src.find("impl ErrorCode {").expect("impl ErrorCode in protocol.rs");
        let block = &src[start..start + src[start..].find("\n}\n").expect("end of impl")];
        let codes: Vec<&str> = block.split("=> \"").skip(1).filter_map(|r| r.split('"').next()).collect();
        assert_eq!(codes, super::ERROR_CODES, "update ERROR_CODES and docs/metrics.md");
    }

    /// The end-to-end latency is a histogram with its alert's objective (0.5 s) as a bound.
    #[test]
    fn end_to_end_latency_is_a_histogram() {
        let rec = kit::telemetry::local_recorder(super::BUCKETS).unwrap();
        metrics::with_local_recorder(&rec, || metrics::histogram!(super::END_TO_END).record(0.3));
        let page = rec.handle().render();
        assert!(page.contains(&format!("{}_bucket{{le=\"0.5\"}} 1", super::END_TO_END)), "{page}");
        assert!(page.contains(&format!("{}_bucket{{le=\"0.25\"}} 0", super::END_TO_END)), "{page}");
    }
}
