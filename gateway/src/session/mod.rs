//! The session core, whatever carries its frames: subscriptions, the send queue,
//! limits, presence, positions and recovery ([`commands`], [`recovery`]). A
//! transport (`crate::transport`: WebSocket, Server-Sent Events, long-polling)
//! only reads the client's commands and frames what the session queues for it.
//! The hub holds only a session's queue sender and control block.

pub(crate) mod commands;
mod recovery;

pub(crate) use recovery::subscribe;

use std::sync::Arc;
use std::time::Duration;

use crate::auth::{Identity, Verifier};
use crate::bus::Bus;
use crate::hub::{ConnRecord, Hub, SessionHandle};
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
    /// Longest a long-poll waits for a message.
    pub poll_timeout: Duration,
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
    /// Per-user limits and the memory budget of this node.
    pub admission: Arc<crate::admission::Admission>,
}

/// Session mode: the real protocol, or the conformance echo route.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Protocol,
    Echo,
}

/// The identity of a session awaiting `connect`: nobody. Its commands never run (the
/// first must be `connect`, which replaces it), so its empty claim is never read.
pub fn nobody() -> Identity {
    Identity { user: "".into(), channels: None, expires_at: None }
}

/// The wall clock, for token `exp` claims.
pub(crate) fn unix_now() -> Duration {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default()
}

/// Makes an authenticated session known: its welcome (echoing the `connect` command's
/// `ref`, if any) is queued, then it joins the hub and presence.
pub(crate) fn register(
    node: &Node,
    identity: &Identity,
    handle: &SessionHandle,
    r: Option<&serde_json::value::RawValue>,
) {
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
