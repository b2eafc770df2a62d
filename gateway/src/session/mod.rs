//! One WebSocket session: an ingress loop (reads frames, runs commands) and an
//! egress loop (drains the bounded send queue, pings, closes), polled together
//! by one task. The hub holds only the session's queue sender and control block.
//!
//! The ingress future is only ever dropped when the whole connection is being
//! thrown away (a frame half read would be lost).

mod egress;
#[cfg(test)]
pub(crate) use egress::try_write_now;
mod frames;
mod ingress;
mod recovery;

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use bytes::Bytes;
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::auth::{Identity, Verifier};
use crate::bus::Bus;
use crate::hub::{ConnRecord, Hub, SessionCtl, SessionHandle};
use crate::metrics as m;
use crate::policy::{AuthDeadline, AuthLimit, CloseReason, TokenBucket};
use crate::presence::PresenceBackend;
use crate::wire;

/// Limits and timings that apply to every session.
#[derive(Debug, Clone)]
pub struct SessionConfig {
    pub node_id: Arc<str>,
    pub heartbeat_interval: Duration,
    pub heartbeat_timeout: Duration,
    pub max_message_bytes: usize,
    pub max_subscriptions: usize,
    pub publish_rate: u32,
    pub publish_burst: u32,
    pub send_queue: usize,
    /// How long a send queue may stay congested before the session is a slow consumer.
    pub slow_consumer_timeout: Duration,
    /// Most messages one recovery may send.
    pub recovery_max: usize,
    /// How long a session opened without a token may take to send `connect`.
    pub connect_timeout: Duration,
    /// Negotiate permessage-deflate with clients that offer it.
    pub permessage_deflate: bool,
}

/// What a session needs from the node.
#[derive(Debug)]
pub struct Node {
    pub hub: Arc<Hub>,
    pub bus: Arc<dyn Bus>,
    pub presence: Arc<dyn PresenceBackend>,
    /// Checks `connect` and `refresh` tokens, exactly like the handshake's.
    pub verifier: Verifier,
    pub config: SessionConfig,
}

/// Session mode: the real protocol, or the conformance echo route.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Protocol,
    Echo,
}

/// How long the read side stays open after our close frame, waiting for the peer's.
const CLOSE_LINGER: Duration = Duration::from_secs(2);

/// The identity of a session awaiting `connect`: nobody. Its commands never run (the
/// first must be `connect`, which replaces it), so its empty claim is never read.
pub fn nobody() -> Identity {
    Identity { user: "".into(), channels: None, expires_at: None }
}

/// Runs a session on an upgraded TCP stream until it ends.
/// `awaiting_connect`: opened without a token, `identity` is [`nobody`] and the session is
/// not in the hub or presence, and gets no welcome, until its first command authenticates it.
/// `leftover` holds bytes the HTTP layer read past the upgrade request.
/// `stop` closes the session as part of a drain (the paced drain reaches
/// registered sessions one by one first; `stop` is the final sweep).
/// `deflate`: permessage-deflate was negotiated with this server window (bits), 0: not.
#[allow(clippy::too_many_arguments)]
pub async fn run(
    node: Arc<Node>,
    mut identity: Identity,
    awaiting_connect: bool,
    conn_id: u64,
    client_info: Arc<str>,
    stream: TcpStream,
    leftover: Bytes,
    mode: Mode,
    deflate: u8,
    stop: CancellationToken,
) {
    let cfg = &node.config;
    let (tx, rx) = crate::outbox::outbox(cfg.send_queue, cfg.slow_consumer_timeout);
    let ctl = Arc::new(SessionCtl::with_deflate(deflate));
    let connected_at_ms =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64);
    let mut handle = SessionHandle {
        id: conn_id,
        user: identity.user.clone(),
        connected_at_ms,
        client_info,
        outbox: tx,
        ctl: ctl.clone(),
    };
    if mode == Mode::Protocol && !awaiting_connect {
        register(&node, &identity, &handle, None);
    }
    metrics::counter!(m::CONNECTIONS_OPENED).increment(1);
    metrics::gauge!(m::CONNECTIONS_ACTIVE).increment(1.0);

    let _ = stream.set_nodelay(true);
    // Shared by the reader, the egress and corked senders (outbox.rs).
    let stream = Arc::new(stream);
    handle.outbox.attach(stream.clone());
    let started = Instant::now();
    let last_seen = AtomicU64::new(0);
    let auth = AuthDeadline::new(match identity.expires_at {
        _ if awaiting_connect => AuthLimit::Connect(cfg.connect_timeout),
        Some(exp) => AuthLimit::token(exp, unix_now(), Duration::ZERO),
        None => AuthLimit::Never,
    });

    let mut state = ingress::State {
        subscriptions: HashSet::new(),
        bucket: TokenBucket::new(cfg.publish_rate, cfg.publish_burst, started),
        fragments: None,
    };
    let mut frames = frames::Reader::new(stream.clone(), &leftover);
    drop(leftover);
    let peer_done = {
        // Corked: what its publishes fan out is written by this task at the end of each
        // burst of commands, not by each subscriber's task (outbox.rs).
        let reader = crate::outbox::corked(ingress::run(
            &node,
            &mut identity,
            &mut handle,
            &mut state,
            &mut frames,
            &last_seen,
            &auth,
            started,
            mode,
        ));
        let writer = egress::run(cfg, &ctl, rx, stream, &last_seen, started, &auth, &stop);
        tokio::pin!(reader, writer);
        tokio::select! {
            peer_done = &mut reader => {
                writer.await;
                peer_done
            }
            () = &mut writer => {
                // Boxed: the linger timer would otherwise sit in every idle session.
                Box::pin(tokio::time::timeout(CLOSE_LINGER, reader)).await.unwrap_or(true)
            }
        }
    };
    if !peer_done {
        // Our close frame is written and our side shut down; read what the peer still
        // sends until it closes (or the linger ends), so the close is not a reset.
        Box::pin(frames.discard(CLOSE_LINGER)).await;
    }

    let reason = ctl.requested().map_or(CloseReason::Gone, |(r, _)| r);
    let subs = state.subscriptions.len();
    if mode == Mode::Protocol && !auth.awaiting_connect() {
        node.hub.unregister(conn_id, &identity.user, state.subscriptions.drain());
        node.presence.disconnected(conn_id);
    }
    metrics::gauge!(m::SUBSCRIPTIONS_ACTIVE).decrement(subs as f64);
    metrics::gauge!(m::CONNECTIONS_ACTIVE).decrement(1.0);
    metrics::counter!(m::CONNECTIONS_CLOSED, "reason" => reason.label()).increment(1);
    tracing::debug!(conn.id = conn_id, user = %identity.user, reason = reason.label(), "session closed");
}

/// The wall clock, for token `exp` claims.
fn unix_now() -> Duration {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default()
}

/// Makes an authenticated session known: its welcome (echoing the `connect` command's
/// `ref`, if any) is queued, then it joins the hub and presence.
fn register(node: &Node, identity: &Identity, handle: &SessionHandle, r: Option<&serde_json::value::RawValue>) {
    handle.deliver(&wire::text(&welcome(node, identity, handle.id, r)));
    node.hub.register(handle.clone());
    node.presence.connected(&ConnRecord {
        conn_id: handle.id,
        user: identity.user.clone(),
        connected_at_ms: handle.connected_at_ms,
        client_info: handle.client_info.clone(),
        channels: Vec::new(),
    });
}

fn welcome(node: &Node, identity: &Identity, conn_id: u64, r: Option<&serde_json::value::RawValue>) -> Vec<u8> {
    let c = &node.config;
    let mut v = serde_json::json!({
        "type": "welcome",
        "conn_id": format!("{}.{conn_id:x}", c.node_id),
        "user": &*identity.user,
        "node": &*c.node_id,
        "heartbeat_ms": c.heartbeat_interval.as_millis() as u64,
        "heartbeat_timeout_ms": c.heartbeat_timeout.as_millis() as u64,
        "limits": {
            "max_message_bytes": c.max_message_bytes,
            "max_subscriptions": c.max_subscriptions,
            "publish_per_sec": c.publish_rate,
            "publish_burst": c.publish_burst,
            "send_queue": c.send_queue,
        },
    });
    if let Some(exp) = identity.expires_at {
        v["expires_at"] = exp.into();
    }
    if let Some(r) = r.and_then(|r| serde_json::from_str::<serde_json::Value>(r.get()).ok()) {
        v["ref"] = r;
    }
    v.to_string().into_bytes()
}

/// Close reason text for a drain: reconnect elsewhere after a jittered delay.
pub fn drain_reason() -> String {
    format!("drain retry_ms={}", rand::random_range(250..2000u32))
}
