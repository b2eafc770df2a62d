//! Commands: what a session does for each client command, whatever transport
//! carried it (docs/protocol.md "Client → server commands"). Replies go to the
//! session's queue, or, for a command that came over plain HTTP (`POST
//! /command`), to the HTTP response ([`Out::collect`]).

use std::collections::HashSet;
use std::sync::Arc;

use tokio::time::Instant;

use super::Node;
use crate::auth::Identity;
use crate::bus::BusError;
use crate::hub::SessionHandle;
use crate::metrics as m;
use crate::policy::{AuthDeadline, AuthLimit, CloseReason, RateDecision, TokenBucket};
use crate::protocol::{self, Command, ErrorCode};
use crate::wire;

/// Most users listed in a `presence` reply.
const PRESENCE_REPLY_MAX: usize = 1000;

/// Per-session command state, whatever the transport.
#[derive(Debug)]
pub(crate) struct State {
    pub(crate) subscriptions: HashSet<Arc<str>>,
    pub(crate) bucket: TokenBucket,
}

impl State {
    pub(crate) fn new(cfg: &super::SessionConfig, now: Instant) -> Self {
        Self { subscriptions: HashSet::new(), bucket: TokenBucket::new(cfg.publish_rate, cfg.publish_burst, now) }
    }
}

/// Where a command's replies go: the session's own queue (WebSocket, SSE's own
/// subscriptions, polls), or collected for an HTTP response.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Out<'a> {
    pub(crate) handle: &'a SessionHandle,
    collect: Option<&'a parking_lot::Mutex<Vec<Vec<u8>>>>,
}

impl<'a> Out<'a> {
    /// Replies are queued to the session.
    pub(crate) fn queue(handle: &'a SessionHandle) -> Self {
        Self { handle, collect: None }
    }

    /// Replies are kept in `into` (what the session's stream gets, recovered messages
    /// and live ones, still goes to its queue).
    pub(crate) fn collect(handle: &'a SessionHandle, into: &'a parking_lot::Mutex<Vec<Vec<u8>>>) -> Self {
        Self { handle, collect: Some(into) }
    }

    pub(crate) fn reply(&self, frame: Vec<u8>) {
        match self.collect {
            Some(c) => c.lock().push(frame),
            None => {
                self.handle.deliver(&wire::text(&frame));
            }
        }
    }
}

pub(crate) fn refuse(
    out: &Out<'_>,
    r: Option<&serde_json::value::RawValue>,
    code: ErrorCode,
    msg: &str,
    retry_ms: Option<u64>,
) {
    metrics::counter!(m::COMMAND_ERRORS, "code" => code.as_str()).increment(1);
    out.reply(protocol::error(r, code, msg, retry_ms));
}

/// Applies the publish rate limit: `Ok(true)` goes on, `Ok(false)` was refused
/// (the error reply is sent), `Err` closes a flooding session.
fn admit(out: &Out<'_>, state: &mut State, r: Option<&serde_json::value::RawValue>) -> Result<bool, CloseReason> {
    match state.bucket.take(Instant::now()) {
        RateDecision::Allow => Ok(true),
        RateDecision::Refuse { retry_after } => {
            let ms = retry_after.as_millis() as u64 + 1;
            refuse(out, r, ErrorCode::RateLimited, "publish rate exceeded", Some(ms));
            Ok(false)
        }
        RateDecision::Flood => Err(CloseReason::Flood),
    }
}

/// Over the node's memory budget, a command that adds work is answered `unavailable`
/// (retry later: nothing was done). True when it was refused.
fn shed(node: &Node, out: &Out<'_>, r: Option<&serde_json::value::RawValue>) -> bool {
    if !node.admission.shedding() {
        return false;
    }
    crate::admission::Admission::shed("command");
    refuse(out, r, ErrorCode::Unavailable, "the gateway is over its memory budget", Some(SHED_RETRY_MS));
    true
}

/// When a command refused over the memory budget may be tried again.
const SHED_RETRY_MS: u64 = 1000;

fn bus_refusal(out: &Out<'_>, r: Option<&serde_json::value::RawValue>, e: &BusError) {
    match e {
        BusError::Unavailable { message, ambiguous } => {
            let code = ErrorCode::Unavailable;
            metrics::counter!(m::COMMAND_ERRORS, "code" => code.as_str()).increment(1);
            out.reply(protocol::error_with(r, code, message, Some(1000), *ambiguous));
        }
        BusError::Invalid(m) => refuse(out, r, ErrorCode::BadRequest, m, None),
    }
}

/// The subscriptions `new` no longer allows, in name order.
fn revoked_by(subscriptions: &HashSet<Arc<str>>, new: &Identity) -> Vec<Arc<str>> {
    let mut revoked: Vec<Arc<str>> = subscriptions.iter().filter(|c| !new.may_use(c)).cloned().collect();
    revoked.sort_unstable();
    revoked
}

/// What `refresh` can change in a session: its claims and its expiry.
pub(crate) struct Session<'a> {
    pub(crate) identity: &'a mut Identity,
    pub(crate) auth: &'a AuthDeadline,
    pub(crate) started: Instant,
}

/// `refresh`: a new token for the same user moves the expiry and replaces the channel
/// claims (subscriptions it no longer allows are dropped and listed in the ack); a
/// refused one changes nothing. `Err` closes a flooding session.
fn refresh(
    node: &Node,
    session: Session<'_>,
    out: &Out<'_>,
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
        refuse(out, r, ErrorCode::BadRequest, why, None);
        return Ok(());
    }
    // The publish bucket: a signature check costs CPU.
    if !admit(out, state, r)? {
        outcome("rate_limited");
        return Ok(());
    }
    let new = match node.verifier.verify(token) {
        Ok(id) => id,
        Err(e) => {
            outcome("unauthorized");
            refuse(out, r, ErrorCode::Unauthorized, &e.to_string(), None);
            return Ok(());
        }
    };
    if new.user != session.identity.user {
        outcome("forbidden");
        refuse(out, r, ErrorCode::Forbidden, "token is for another user", None);
        return Ok(());
    }
    let revoked = revoked_by(&state.subscriptions, &new);
    node.admission.give_subscriptions(&new, revoked.len());
    for channel in &revoked {
        state.subscriptions.remove(channel);
        node.hub.unsubscribe(out.handle.id, &new.user, channel);
        node.presence.unsubscribed(out.handle.id, channel);
        metrics::gauge!(m::SUBSCRIPTIONS_ACTIVE).decrement(1.0);
    }
    let exp = new.expires_at.unwrap_or_default();
    session.auth.set(AuthLimit::token(exp, super::unix_now(), session.started.elapsed()));
    // The egress re-arms its timer for the new deadline.
    out.handle.outbox.nudge();
    *session.identity = new;
    outcome("ok");
    out.reply(protocol::refreshed(r, exp, &revoked));
    Ok(())
}

/// Runs one text command. `Err` closes the session with that reason.
pub(crate) async fn command(
    node: &Node,
    session: Session<'_>,
    out: &Out<'_>,
    state: &mut State,
    text: &str,
) -> Result<(), CloseReason> {
    let identity = &*session.identity;
    let req = match protocol::decode(text) {
        Ok(r) => r,
        Err(e) => {
            metrics::counter!(m::MESSAGES_IN, "op" => "invalid").increment(1);
            refuse(out, e.reference, e.code, e.message, None);
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
                refuse(out, r, ErrorCode::Forbidden, "not allowed on this channel", None);
            } else if state.subscriptions.contains(&*channel) {
                out.reply(protocol::subscribed(r, &channel, None, None));
            } else if state.subscriptions.len() >= node.config.max_subscriptions {
                refuse(out, r, ErrorCode::TooManySubscriptions, "subscription limit reached", None);
            } else if shed(node, out, r) {
                // Refused: over the memory budget.
            } else if node.admission.take_subscriptions(identity, 1) {
                let channel: Arc<str> = channel.into();
                state.subscriptions.insert(channel.clone());
                metrics::gauge!(m::SUBSCRIPTIONS_ACTIVE).increment(1.0);
                super::recovery::subscribe(node, out, r, &channel, since).await;
            } else {
                let why = "subscription limit of this user on this node reached";
                refuse(out, r, ErrorCode::TooManySubscriptions, why, None);
            }
        }
        Command::History { channel, since, limit } => {
            if !identity.may_use(&channel) {
                refuse(out, r, ErrorCode::Forbidden, "not allowed on this channel", None);
                return Ok(());
            }
            if shed(node, out, r) {
                return Ok(());
            }
            let since = since.map(|s| crate::history::Position { seq: s.seq, epoch: s.epoch.into() });
            match node.bus.history(&channel, since.as_ref(), limit, false).await {
                Ok(page) => out.reply(protocol::history(r, &channel, &page)),
                Err(e) => bus_refusal(out, r, &e),
            }
        }
        Command::Unsubscribe { channel } => {
            if state.subscriptions.remove(&*channel) {
                node.admission.give_subscriptions(identity, 1);
                node.hub.unsubscribe(out.handle.id, &identity.user, &channel);
                node.presence.unsubscribed(out.handle.id, &channel);
                metrics::gauge!(m::SUBSCRIPTIONS_ACTIVE).decrement(1.0);
            }
            out.reply(protocol::ack(r, None, None, None, false));
        }
        Command::Presence { channel } => {
            if identity.may_use(&channel) {
                let members = node.presence.members(&channel, "", PRESENCE_REPLY_MAX).await;
                let users: Vec<Arc<str>> = members.users.into_iter().map(Arc::from).collect();
                out.reply(protocol::presence(r, &channel, &users));
            } else {
                refuse(out, r, ErrorCode::Forbidden, "not allowed on this channel", None);
            }
        }
        Command::Ping => out.reply(protocol::pong(r)),
        Command::Connect { .. } => refuse(out, r, ErrorCode::BadRequest, "already connected", None),
        Command::Refresh { token } => return refresh(node, session, out, state, r, &token),
        Command::Publish { channel, data, key } => {
            if !identity.may_use(&channel) {
                refuse(out, r, ErrorCode::Forbidden, "not allowed on this channel", None);
                return Ok(());
            }
            if shed(node, out, r) || !admit(out, state, r)? {
                return Ok(());
            }
            match node.bus.publish(&channel, &identity.user, data.get(), key.as_deref()).await {
                Ok(a) => out.reply(protocol::ack(r, Some(&a.id), a.seq, None, a.duplicate)),
                Err(e) => bus_refusal(out, r, &e),
            }
        }
        Command::Send { user, data, key } => {
            if shed(node, out, r) || !admit(out, state, r)? {
                return Ok(());
            }
            match node.bus.send(&user, &identity.user, data.get(), key.as_deref()).await {
                Ok(a) => out.reply(protocol::ack(r, Some(&a.id), None, a.delivered, a.duplicate)),
                Err(e) => bus_refusal(out, r, &e),
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
