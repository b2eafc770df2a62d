//! Ingress: read frames, enforce framing rules and limits, run commands.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use tokio::time::Instant;

use super::frames::{BINARY, CLOSE, PING, PONG, ReadError, Reader, TEXT};
use crate::auth::{AuthError, Identity};
use crate::deflate::{InflateError, Twin};
use crate::hub::SessionHandle;
use crate::metrics as m;
use crate::policy::{AuthDeadline, AuthLimit, CloseReason};
use crate::protocol::{self, Command};
use crate::session::commands::{self, Out, Session};
use crate::session::{Mode, Node};
use crate::wire;

/// Per-session state owned by the ingress loop.
#[derive(Debug)]
pub(super) struct State {
    pub(super) core: commands::State,
    /// A fragmented message being reassembled: (is_text, is_compressed, bytes so far;
    /// compressed bytes are inflated once the message is complete).
    pub(super) fragments: Option<(bool, bool, Vec<u8>)>,
    /// The session's place in its user's count (given back when the session ends).
    pub(super) user_slot: Option<crate::admission::UserSlot>,
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
                            if !connect(node, identity, handle, &mut state.user_slot, auth, started, text) {
                                return false;
                            }
                            continue;
                        }
                        let session = Session { identity: &mut *identity, auth, started };
                        let out = Out::queue(handle);
                        // Boxed: a command's state exists only while it runs, not in every idle session.
                        let run = commands::command(node, session, &out, &mut state.core, text);
                        if let Err(reason) = Box::pin(run).await {
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

/// The first command of a session opened without a token: `connect` with a valid token
/// makes it a session like any other (welcome, hub, presence, token expiry); anything
/// else closes it with 4005; a user already at `--max-connections-per-user` here, with
/// 1013. False when the session is closing.
fn connect(
    node: &Node,
    identity: &mut Identity,
    handle: &mut SessionHandle,
    user_slot: &mut Option<crate::admission::UserSlot>,
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
    let Some(slot) = node.admission.try_user_slot(&proven) else {
        metrics::counter!(m::CONNECT, "outcome" => "user_limit").increment(1);
        handle.ctl.close(CloseReason::UserLimit, Some("too many connections for this user on this node"));
        return false;
    };
    *user_slot = Some(slot);
    // Tokens always carry `exp` (a required claim). Setting it ends "awaiting connect".
    auth.set(
        proven
            .expires_at
            .map_or(AuthLimit::Never, |exp| AuthLimit::token(exp, crate::session::unix_now(), started.elapsed())),
    );
    // The egress re-arms its timer for the new deadline.
    handle.outbox.nudge();
    *identity = proven;
    handle.user = identity.user.clone();
    crate::session::register(node, identity, handle, r);
    metrics::counter!(m::CONNECT, "outcome" => "ok").increment(1);
    tracing::debug!(conn.id = handle.id, user = %identity.user, "session authenticated by connect");
    true
}
