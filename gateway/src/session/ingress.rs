//! Ingress: read frames, enforce framing rules and limits, run commands.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use tokio::time::Instant;

use super::frames::{BINARY, CLOSE, PING, PONG, ReadError, Reader, TEXT};
use super::{Mode, Node};
use crate::auth::Identity;
use crate::bus::BusError;
use crate::hub::SessionHandle;
use crate::metrics as m;
use crate::policy::{CloseReason, RateDecision, TokenBucket};
use crate::protocol::{self, Command, ErrorCode};
use crate::wire;

/// Most users listed in a `presence` reply.
const PRESENCE_REPLY_MAX: usize = 1000;

/// Per-session state owned by the ingress loop.
#[derive(Debug)]
pub(super) struct State {
    pub(super) subscriptions: HashSet<Arc<str>>,
    pub(super) bucket: TokenBucket,
    /// A fragmented message being reassembled: (is_text, bytes so far).
    pub(super) fragments: Option<(bool, Vec<u8>)>,
}

/// Reads and runs commands until the session ends. True when the peer is done
/// sending (its close frame or EOF was read); false when this side ended the
/// session while the peer may still be sending (the caller drains what arrives,
/// so that unread input does not turn the close into a TCP reset).
#[allow(clippy::too_many_arguments)]
pub(super) async fn run(
    node: &Node,
    identity: &Identity,
    handle: &SessionHandle,
    state: &mut State,
    reader: &mut Reader,
    last_seen: &AtomicU64,
    started: Instant,
    mode: Mode,
) -> bool {
    let cfg = &node.config;
    let ctl = &handle.ctl;
    loop {
        // A continuation may only bring the message up to the limit.
        let limit = cfg.max_message_bytes - state.fragments.as_ref().map_or(0, |(_, b)| b.len());
        let frame = match reader.next(limit).await {
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
                state.fragments = Some((frame.opcode == TEXT, frame.payload));
                continue;
            }
            TEXT | BINARY => (frame.opcode == TEXT, Bytes::from(frame.payload)),
            _ => {
                // CONTINUATION (the reader refuses every other opcode).
                let Some((_, buf)) = state.fragments.as_mut() else {
                    ctl.close(CloseReason::Protocol, Some("continuation without a message"));
                    return false;
                };
                buf.extend_from_slice(&frame.payload);
                if !frame.fin {
                    continue;
                }
                let Some((text, buf)) = state.fragments.take() else {
                    return false;
                };
                (text, Bytes::from(buf))
            }
        };
        match message {
            (true, bytes) => {
                let Ok(text) = std::str::from_utf8(&bytes) else {
                    ctl.close(CloseReason::InvalidUtf8, None);
                    return false;
                };
                match mode {
                    Mode::Echo => {
                        handle.deliver(&wire::text(text.as_bytes()));
                    }
                    Mode::Protocol => {
                        if !room_for_reply(handle).await {
                            continue;
                        }
                        // Boxed: a command's state exists only while it runs, not in every idle session.
                        if let Err(reason) = Box::pin(command(node, identity, handle, state, text)).await {
                            ctl.close(reason, None);
                            return false;
                        }
                    }
                }
            }
            (false, bytes) => match mode {
                Mode::Echo => {
                    handle.deliver(&wire::binary(&bytes));
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

/// Runs one text command. `Err` closes the session with that reason.
async fn command(
    node: &Node,
    identity: &Identity,
    handle: &SessionHandle,
    state: &mut State,
    text: &str,
) -> Result<(), CloseReason> {
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
