//! The WebSocket transport: an ingress loop (reads frames, runs commands) and an
//! egress loop (drains the bounded send queue, pings, closes), polled together
//! by one task.
//!
//! The ingress future is only ever dropped when the whole connection is being
//! thrown away (a frame half read would be lost).

mod egress;
#[cfg(test)]
pub(crate) use egress::try_write_now;
mod frames;
mod ingress;

use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use bytes::Bytes;
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::auth::Identity;
use crate::hub::{SessionCtl, SessionHandle};
use crate::metrics as m;
use crate::policy::{AuthDeadline, AuthLimit, CloseReason};
use crate::session::{self, Mode, Node, commands, unix_now};

/// How long the read side stays open after our close frame, waiting for the peer's.
const CLOSE_LINGER: Duration = Duration::from_secs(2);

/// Runs a session on an upgraded TCP stream until it ends.
/// `awaiting_connect`: opened without a token, `identity` is [`crate::session::nobody`] and the session is
/// not in the hub or presence, and gets no welcome, until its first command authenticates it.
/// `leftover` holds bytes the HTTP layer read past the upgrade request.
/// `stop` closes the session as part of a drain (the paced drain reaches
/// registered sessions one by one first; `stop` is the final sweep).
/// `deflate`: permessage-deflate was negotiated with this server window (bits), 0: not.
/// `user_slot`: the session's place in its user's count (taken at `connect` when the
/// session awaits one).
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
    user_slot: Option<crate::admission::UserSlot>,
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
        session::register(&node, &identity, &handle, None);
    }
    metrics::counter!(m::CONNECTIONS_OPENED).increment(1);
    metrics::gauge!(m::CONNECTIONS_ACTIVE).increment(1.0);
    let _open = super::Opened::new(super::Transport::WebSocket);

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

    let mut state = ingress::State { core: commands::State::new(cfg, started), fragments: None, user_slot };
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
    let subs = state.core.subscriptions.len();
    node.admission.give_subscriptions(&identity, subs);
    if mode == Mode::Protocol && !auth.awaiting_connect() {
        node.hub.unregister(conn_id, &identity.user, state.core.subscriptions.drain());
        node.presence.disconnected(conn_id);
    }
    metrics::gauge!(m::SUBSCRIPTIONS_ACTIVE).decrement(subs as f64);
    metrics::gauge!(m::CONNECTIONS_ACTIVE).decrement(1.0);
    metrics::counter!(m::CONNECTIONS_CLOSED, "reason" => reason.label()).increment(1);
    tracing::debug!(conn.id = conn_id, user = %identity.user, reason = reason.label(), "session closed");
}
