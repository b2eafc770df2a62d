//! Ingress: read frames, enforce framing rules and limits, run commands.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use tokio::time::Instant;

use super::frames::{BINARY, CLOSE, PING, PONG, ReadError, Reader, TEXT};
use super::{Mode, Node};
use crate::auth::{AuthError, Identity};
use crate::bus::BusError;
use crate::deflate::{InflateError, Twin};
use crate::hub::SessionHandle;
use crate::metrics as m;
use crate::policy::{AuthDeadline, AuthLimit, CloseReason, RateDecision, TokenBucket};
use crate::protocol::{self, Command, ErrorCode};
use crate::wire;

/// Most users listed in a `presence` reply.
const PRESENCE_REPLY_MAX: usize = 1000;

/// Per-session state owned by the ingress loop.
#[derive(Debug)]
pub(super) struct State {
    pub(super) subscriptions: HashSet<Arc<str>>,
    pub(super) bucket: TokenBucket,
    /// A fragmented message being reassembled: (is_text, is_compressed, bytes so far;
    /// compressed bytes are inflated once the message is complete).
    pub(super) fragments: Option<(bool, bool, Vec<u8>)>,
}

/// Reads and runs commands until the session ends. True when the peer is done
/// sending (its close frame or EOF was read); false when this side ended the
/// session while the peer may still be sending (the caller drains what arrives,
/// so that unread input does not turn the close into a TCP reset).
#[allow(clippy::too_many_arguments)]
pub(super) async fn run(
    node: &Node,
    identity: &mut Identity,
    handle: &mut SessionHandle,
    state: &mut State,
    reader: &mut Reader,
    last_seen: &AtomicU64,
    auth: &AuthDeadline,
    started: Instant,
    mode: Mode,
) -> bool {
    let cfg = &node.config;
    // Owned: `connect` sets the handle's user.
    let ctl = Arc::clone(&handle.ctl);
    let deflate = ctl.deflate() != 0;
    loop {
        // A continuation may only bring the message up to the limit (a compressed
        // message: on the wire, and again once inflated).
        let limit = cfg.max_message_bytes - state.fragments.as_ref().map_or(0, |(_, _, b)| b.len());
        let frame = match reader.next(limit, deflate).await {
            Ok(f) => f,
            Err(e) => {
                let (reason, why) = match e {
                    ReadError::Protocol(why) => (CloseReason::Protocol, Some(why)),
                    ReadError::TooBig => (CloseReason::TooBig, None),
                    ReadError::Gone => {
                        ctl.close(CloseReason::Gone, None);
                        return true;
                    }
                };
                ctl.close(reason, why);
                return false;
            }
        };
        last_seen.store(started.elapsed().as_millis() as u64, Ordering::Relaxed);
        if ctl.requested().is_some() {
            // Closing: discard everything until the peer's close or EOF.
            if frame.opcode == CLOSE {
                return true;
            }
            continue;
        }
        let message = match frame.opcode {
            CLOSE => {
                ctl.close(close_answer(&frame.payload), None);
                return true;
            }
            PING => {
                // Only the latest unanswered ping gets its pong (RFC 6455 §5.5.3):
                // a ping flood costs one queued pong, never the queue.
                handle.outbox.set_pong(wire::pong(&frame.payload));
                continue;
            }
            PONG => continue,
            TEXT | BINARY if state.fragments.is_some() => {
                ctl.close(CloseReason::Protocol, Some("new message inside a fragmented one"));
                return false;
            }
            TEXT | BINARY if !frame.fin => {
                state.fragments = Some((frame.opcode == TEXT, frame.rsv1, frame.payload));
                continue;
            }
            TEXT | BINARY => (frame.opcode == TEXT, frame.rsv1, frame.payload),
            _ => {
                // CONTINUATION (the reader refuses every other opcode).
                let Some((_, _, buf)) = state.fragments.as_mut() else {
                    ctl.close(CloseReason::Protocol, Some("continuation without a message"));
                    return false;
                };
                buf.extend_from_slice(&frame.payload);
                if !frame.fin {
                    continue;
                }
                let Some(message) = state.fragments.take() else {
                    return false;
                };
                message
            }
        };
        let message = match message {
            (text, false, buf) => (text, Bytes::from(buf)),
            (text, true, buf) => match crate::deflate::inflate(&buf, cfg.max_message_bytes) {
                Ok(plain) => (text, Bytes::from(plain)),
                Err(e) => {
                    let (reason, why) = match e {
                        InflateError::TooBig => (CloseReason::TooBig, None),
                        InflateError::Invalid => (CloseReason::Protocol, Some("invalid compressed data")),
                    };
                    ctl.close(reason, why);
                    return false;
                }
            },
        };
        match message {
            (true, bytes) => {
                let Ok(text) = std::str::from_utf8(&bytes) else {
                    ctl.close(CloseReason::InvalidUtf8, None);
                    return false;
                };
                match mode {
                    Mode::Echo => {
                        handle.deliver(Twin::new(&wire::text(text.as_bytes())).pick(ctl.deflate()));
                    }
                    Mode::Protocol => {
                        if !room_for_reply(handle).await {
                            continue;
                        }
                        // Opened without a token: the first command must be `connect`.
                        if auth.awaiting_connect() {
                            if !connect(node, identity, handle, auth, started, text) {
                                return false;
                            }
                            continue;
                        }
                        let session = Session { identity: &mut *identity, auth, started };
                        // Boxed: a command's state exists only while it runs, not in every idle session.
                        if let Err(reason) = Box::pin(command(node, session, handle, state, text)).await {
                            ctl.close(reason, None);
                            return false;
                        }
                    }
                }
            }
            (false, bytes) => match mode {
                Mode::Echo => {
                    handle.deliver(Twin::new(&wire::binary(&bytes)).pick(ctl.deflate()));
                }
                Mode::Protocol if auth.awaiting_connect() => {
                    metrics::counter!(m::CONNECT, "outcome" => "connect_required").increment(1);
                    ctl.close(CloseReason::Unauthenticated, Some("connect required"));
                    return false;
                }
                Mode::Protocol => {
                    ctl.close(CloseReason::Binary, Some("binary frames are not supported"));
                    return false;
                }
            },
        }
    }
}

/// Waits for room in the session's send queue before a command runs, so that a
/// client pipelining commands is paced by its own reading rather than closed as
/// a slow consumer for the replies it asked for (broadcast traffic it does not
/// read still overflows the queue: that is the 4002 close). False when the
/// session is closing meanwhile.
async fn room_for_reply(handle: &SessionHandle) -> bool {
    tokio::select! {
        biased; // room first: when there is room, no close waiter is registered
        room = handle.outbox.room() => room && handle.ctl.requested().is_none(),
        () = handle.ctl.wait() => false,
    }
}

/// The code of the client's close frame decides nothing: we answer 1000
/// unless the frame itself is malformed.
fn close_answer(payload: &[u8]) -> CloseReason {
    match payload.len() {
        0 => CloseReason::Normal,
        1 => CloseReason::Protocol,
        _ => {
            let code = u16::from_be_bytes([payload[0], payload[1]]);
            let valid_code = matches!(code, 1000..=1003 | 1007..=1011 | 3000..=4999);
            if !valid_code {
                CloseReason::Protocol
            } else if std::str::from_utf8(&payload[2..]).is_err() {
                CloseReason::InvalidUtf8
            } else {
                CloseReason::Normal
            }
        }
    }
}

fn reply(handle: &SessionHandle, frame: Vec<u8>) {
    handle.deliver(&wire::text(&frame));
}

fn refuse(
    handle: &SessionHandle,
    r: Option<&serde_json::value::RawValue>,
    code: ErrorCode,
    msg: &str,
    retry_ms: Option<u64>,
) {
    metrics::counter!(m::COMMAND_ERRORS, "code" => code.as_str()).increment(1);
    reply(handle, protocol::error(r, code, msg, retry_ms));
}

/// Applies the publish rate limit: `Ok(true)` goes on, `Ok(false)` was refused
/// (the error reply is sent), `Err` closes a flooding session.
fn admit(
    handle: &SessionHandle,
    state: &mut State,
    r: Option<&serde_json::value::RawValue>,
) -> Result<bool, CloseReason> {
    match state.bucket.take(Instant::now()) {
        RateDecision::Allow => Ok(true),
        RateDecision::Refuse { retry_after } => {
            let ms = retry_after.as_millis() as u64 + 1;
            refuse(handle, r, ErrorCode::RateLimited, "publish rate exceeded", Some(ms));
            Ok(false)
        }
        RateDecision::Flood => Err(CloseReason::Flood),
    }
}

fn bus_refusal(handle: &SessionHandle, r: Option<&serde_json::value::RawValue>, e: &BusError) {
    match e {
        BusError::Unavailable { message, ambiguous } => {
            let code = ErrorCode::Unavailable;
            metrics::counter!(m::COMMAND_ERRORS, "code" => code.as_str()).increment(1);
            reply(handle, protocol::error_with(r, code, message, Some(1000), *ambiguous));
        }
        BusError::Invalid(m) => refuse(handle, r, ErrorCode::BadRequest, m, None),
    }
}

/// The first command of a session opened without a token: `connect` with a valid token
/// makes it a session like any other (welcome, hub, presence, token expiry); anything
/// else closes it with 4005. False when the session is closing.
fn connect(
    node: &Node,
    identity: &mut Identity,
    handle: &mut SessionHandle,
    auth: &AuthDeadline,
    started: Instant,
    text: &str,
) -> bool {
    let close = |outcome: &'static str, why: &str| {
        metrics::counter!(m::CONNECT, "outcome" => outcome).increment(1);
        handle.ctl.close(CloseReason::Unauthenticated, Some(why));
        false
    };
    let (r, token) = match protocol::decode(text) {
        Ok(protocol::Request { reference, command: Command::Connect { token } }) => (reference, token),
        _ => return close("connect_required", "connect required"),
    };
    metrics::counter!(m::MESSAGES_IN, "op" => "connect").increment(1);
    let verified = match token {
        Some(t) => node.verifier.verify(&t),
        None => Err(AuthError::Missing),
    };
    let proven = match verified {
        Ok(id) => id,
        Err(e) => return close("unauthorized", &format!("unauthorized: {e}")),
    };
    // Tokens always carry `exp` (a required claim). Setting it ends "awaiting connect".
    auth.set(
        proven.expires_at.map_or(AuthLimit::Never, |exp| AuthLimit::token(exp, super::unix_now(), started.elapsed())),
    );
    // The egress re-arms its timer for the new deadline.
    handle.outbox.nudge();
    *identity = proven;
    handle.user = identity.user.clone();
    super::register(node, identity, handle, r);
    metrics::counter!(m::CONNECT, "outcome" => "ok").increment(1);
    tracing::debug!(conn.id = handle.id, user = %identity.user, "session authenticated by connect");
    true
}

/// The subscriptions `new` no longer allows, in name order.
fn revoked_by(subscriptions: &HashSet<Arc<str>>, new: &Identity) -> Vec<Arc<str>> {
    let mut revoked: Vec<Arc<str>> = subscriptions.iter().filter(|c| !new.may_use(c)).cloned().collect();
    revoked.sort_unstable();
    revoked
}

/// What `refresh` can change in a session: its claims and its expiry.
pub(super) struct Session<'a> {
    identity: &'a mut Identity,
    auth: &'a AuthDeadline,
    started: Instant,
}

/// `refresh`: a new token for the same user moves the expiry and replaces the channel
/// claims (subscriptions it no longer allows are dropped and listed in the ack); a
/// refused one changes nothing. `Err` closes a flooding session.
fn refresh(
    node: &Node,
    session: Session<'_>,
    handle: &SessionHandle,
    state: &mut State,
    r: Option<&serde_json::value::RawValue>,
    token: &str,
) -> Result<(), CloseReason> {
    let outcome = |o: &'static str| metrics::counter!(m::AUTH_REFRESH, "outcome" => o).increment(1);
    // Tokens always carry `exp`: a session without one was not opened with a token.
    if !node.verifier.has_keys() || session.identity.expires_at.is_none() {
        outcome("bad_request");
        let why = if node.verifier.has_keys() {
            "this session was not opened with a token"
        } else {
            "this gateway does not use tokens"
        };
        refuse(handle, r, ErrorCode::BadRequest, why, None);
        return Ok(());
    }
    // The publish bucket: a signature check costs CPU.
    if !admit(handle, state, r)? {
        outcome("rate_limited");
        return Ok(());
    }
    let new = match node.verifier.verify(token) {
        Ok(id) => id,
        Err(e) => {
            outcome("unauthorized");
            refuse(handle, r, ErrorCode::Unauthorized, &e.to_string(), None);
            return Ok(());
        }
    };
    if new.user != session.identity.user {
        outcome("forbidden");
        refuse(handle, r, ErrorCode::Forbidden, "token is for another user", None);
        return Ok(());
    }
    let revoked = revoked_by(&state.subscriptions, &new);
    for channel in &revoked {
        state.subscriptions.remove(channel);
        node.hub.unsubscribe(handle.id, &new.user, channel);
        node.presence.unsubscribed(handle.id, channel);
        metrics::gauge!(m::SUBSCRIPTIONS_ACTIVE).decrement(1.0);
    }
    let exp = new.expires_at.unwrap_or_default();
    session.auth.set(AuthLimit::token(exp, super::unix_now(), session.started.elapsed()));
    // The egress re-arms its timer for the new deadline.
    handle.outbox.nudge();
    *session.identity = new;
    outcome("ok");
    reply(handle, protocol::refreshed(r, exp, &revoked));
    Ok(())
}

/// Runs one text command. `Err` closes the session with that reason.
async fn command(
    node: &Node,
    session: Session<'_>,
    handle: &SessionHandle,
    state: &mut State,
    text: &str,
) -> Result<(), CloseReason> {
    let identity = &*session.identity;
    let req = match protocol::decode(text) {
        Ok(r) => r,
        Err(e) => {
            metrics::counter!(m::MESSAGES_IN, "op" => "invalid").increment(1);
            refuse(handle, e.reference, e.code, e.message, None);
            return Ok(());
        }
    };
    let r = req.reference;
    let op = match &req.command {
        Command::Subscribe { .. } => "subscribe",
        Command::Unsubscribe { .. } => "unsubscribe",
        Command::Publish { .. } => "publish",
        Command::Send { .. } => "send",
        Command::Presence { .. } => "presence",
        Command::History { .. } => "history",
        Command::Ping => "ping",
        Command::Connect { .. } => "connect",
        Command::Refresh { .. } => "refresh",
    };
    metrics::counter!(m::MESSAGES_IN, "op" => op).increment(1);
    match req.command {
        Command::Subscribe { channel, since } => {
            if !identity.may_use(&channel) {
                refuse(handle, r, ErrorCode::Forbidden, "not allowed on this channel", None);
            } else if state.subscriptions.contains(&*channel) {
                reply(handle, protocol::subscribed(r, &channel, None, None));
            } else if state.subscriptions.len() >= node.config.max_subscriptions {
                refuse(handle, r, ErrorCode::TooManySubscriptions, "subscription limit reached", None);
            } else {
                let channel: Arc<str> = channel.into();
                state.subscriptions.insert(channel.clone());
                metrics::gauge!(m::SUBSCRIPTIONS_ACTIVE).increment(1.0);
                super::recovery::subscribe(node, handle, r, &channel, since).await;
            }
        }
        Command::History { channel, since, limit } => {
            if !identity.may_use(&channel) {
                refuse(handle, r, ErrorCode::Forbidden, "not allowed on this channel", None);
                return Ok(());
            }
            let since = since.map(|s| crate::history::Position { seq: s.seq, epoch: s.epoch.into() });
            match node.bus.history(&channel, since.as_ref(), limit, false).await {
                Ok(page) => reply(handle, protocol::history(r, &channel, &page)),
                Err(e) => bus_refusal(handle, r, &e),
            }
        }
        Command::Unsubscribe { channel } => {
            if state.subscriptions.remove(&*channel) {
                node.hub.unsubscribe(handle.id, &identity.user, &channel);
                node.presence.unsubscribed(handle.id, &channel);
                metrics::gauge!(m::SUBSCRIPTIONS_ACTIVE).decrement(1.0);
            }
            reply(handle, protocol::ack(r, None, None, None, false));
        }
        Command::Presence { channel } => {
            if identity.may_use(&channel) {
                let members = node.presence.members(&channel, "", PRESENCE_REPLY_MAX).await;
                let users: Vec<Arc<str>> = members.users.into_iter().map(Arc::from).collect();
                reply(handle, protocol::presence(r, &channel, &users));
            } else {
                refuse(handle, r, ErrorCode::Forbidden, "not allowed on this channel", None);
            }
        }
        Command::Ping => reply(handle, protocol::pong(r)),
        Command::Connect { .. } => refuse(handle, r, ErrorCode::BadRequest, "already connected", None),
        Command::Refresh { token } => return refresh(node, session, handle, state, r, &token),
        Command::Publish { channel, data, key } => {
            if !identity.may_use(&channel) {
                refuse(handle, r, ErrorCode::Forbidden, "not allowed on this channel", None);
                return Ok(());
            }
            if !admit(handle, state, r)? {
                return Ok(());
            }
            match node.bus.publish(&channel, &identity.user, data.get(), key.as_deref()).await {
                Ok(a) => reply(handle, protocol::ack(r, Some(&a.id), a.seq, None, a.duplicate)),
                Err(e) => bus_refusal(handle, r, &e),
            }
        }
        Command::Send { user, data, key } => {
            if !admit(handle, state, r)? {
                return Ok(());
            }
            match node.bus.send(&user, &identity.user, data.get(), key.as_deref()).await {
                Ok(a) => reply(handle, protocol::ack(r, Some(&a.id), None, a.delivered, a.duplicate)),
                Err(e) => bus_refusal(handle, r, &e),
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn identity(channels: Option<&[&str]>) -> Identity {
        Identity {
            user: "u".into(),
            channels: channels.map(|c| c.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>().into()),
            expires_at: Some(1),
        }
    }

    #[test]
    fn a_refresh_revokes_what_the_new_claims_do_not_allow() {
        let subs: HashSet<Arc<str>> = ["room:2", "admin:x", "room:1", "ops"].into_iter().map(Arc::from).collect();
        let names = |v: Vec<Arc<str>>| v.iter().map(|c| c.to_string()).collect::<Vec<_>>();
        assert_eq!(names(revoked_by(&subs, &identity(Some(&["room:*"])))), ["admin:x", "ops"]);
        assert_eq!(names(revoked_by(&subs, &identity(Some(&["room:*", "ops", "admin:*"])))), Vec::<String>::new());
        assert!(revoked_by(&subs, &identity(None)).is_empty(), "no claim allows every channel");
        assert_eq!(names(revoked_by(&subs, &identity(Some(&[])))), ["admin:x", "ops", "room:1", "room:2"]);
    }
}
