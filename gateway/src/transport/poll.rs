//! Long-polling: `GET /poll?channels=a,b&cursor=…` (or `POST /poll` with the same
//! form in the body). Each poll is a short session of its own: it subscribes to
//! every channel at the cursor's position through the same recovery as a
//! WebSocket resubscribe (`crate::session::subscribe`), so what it answers is
//! everything after the cursor, in order, once, on any gateway (a cluster's history
//! comes from broker-bridge); when nothing is newer it waits, up to
//! `--poll-timeout`, for the next message. Nothing is kept between polls: the
//! answer's `cursor` is the next poll's.
//!
//! Presence is the exception, because a poller is not gone between two polls: the
//! node keeps one presence connection per polling user ([`Pollers`]), subscribed to
//! the channels its polls ask for, until no poll has asked for a channel for
//! `heartbeat_interval + heartbeat_timeout` (a WebSocket session that stops answering is
//! gone after as long). A client that polls continuously stays a member of its presence channels
//! with no leave/join between polls, and the cluster keeps routing its channels here.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use serde_json::value::RawValue;
use tokio::time::Instant;

use super::event_id::Cursor;
use super::http::{self as h, Body};
use super::{Opened, Transport};
use crate::handshake::HandshakeError;
use crate::hub::{ConnRecord, SessionCtl, SessionHandle};
use crate::metrics as m;
use crate::policy::CloseReason;
use crate::protocol::ErrorCode;
use crate::server::{Conn, NoSlot, Server};
use crate::session::{self, commands::Out};

/// Most events one answer carries; the cursor says where the next poll goes on.
pub const POLL_MAX_EVENTS: usize = 1000;
/// Largest `POST /poll` body (the form of a poll over many channels).
const POLL_BODY_MAX: usize = 256 << 10;

/// Is this frame news (the poll is answered), or only a complete recovery's ack?
fn news(json: &[u8]) -> bool {
    #[derive(serde::Deserialize)]
    struct Peek<'a> {
        #[serde(rename = "type", borrow)]
        kind: std::borrow::Cow<'a, str>,
        #[serde(default)]
        recovered: Option<bool>,
    }
    !matches!(serde_json::from_slice::<Peek<'_>>(json), Ok(p) if p.kind == "ack" && p.recovered == Some(true))
}

/// Is this frame a subscribe ack (the poll's own: it sends no other command)?
fn is_ack(json: &[u8]) -> bool {
    json.starts_with(br#"{"type":"ack""#)
}

/// `GET`/`POST /poll`.
pub(crate) async fn poll(
    server: Arc<Server>,
    req: Request<Incoming>,
    peer: std::net::IpAddr,
    conn: &Arc<Conn>,
) -> Response<Body> {
    let refuse = |e: HandshakeError| e.into_response().map(|b| b.boxed_unsync());
    if server.draining.is_cancelled() {
        return refuse(HandshakeError::Draining);
    }
    if server.node.admission.shedding() {
        crate::admission::Admission::shed("poll");
        return refuse(HandshakeError::Memory);
    }
    let identity = match h::admit(&server, &req) {
        Ok(id) => id,
        Err(e) => return refuse(e),
    };
    let invented = server.anonymous
        && crate::handshake::http_token(&req).0.is_none()
        && h::raw_param(req.uri().query(), "user").is_none();
    let header_cursor = req.headers().get("last-event-id").and_then(|v| v.to_str().ok()).map(str::to_owned);
    let form: String = if req.method() == Method::POST {
        match h::read_body(req, POLL_BODY_MAX).await {
            Ok(b) => match String::from_utf8(b.to_vec()) {
                Ok(s) => s,
                Err(_) => return h::error(ErrorCode::BadRequest, "the body is not UTF-8"),
            },
            Err(resp) => return resp,
        }
    } else {
        req.uri().query().unwrap_or("").to_owned()
    };
    let cfg = &server.node.config;
    let channels = match h::channels(h::raw_param(Some(&form), "channels"), cfg.max_subscriptions, &identity, false) {
        Ok(c) => c,
        Err(e) => return e.response(),
    };
    let raw_cursor = h::raw_param(Some(&form), "cursor").map(|c| crate::handshake::percent_decode(c).into_owned());
    let given = match raw_cursor.or(header_cursor).as_deref().map(Cursor::parse).transpose() {
        Ok(c) => c.unwrap_or_default(),
        Err(e) => return h::error(ErrorCode::BadRequest, &format!("cursor: {e}")),
    };
    let wait = match h::raw_param(Some(&form), "timeout_ms").map(str::parse::<u64>) {
        None => cfg.poll_timeout,
        Some(Ok(ms)) => Duration::from_millis(ms).min(cfg.poll_timeout),
        Some(Err(_)) => return h::error(ErrorCode::BadRequest, "timeout_ms must be an integer"),
    };
    // A waiting poll is a session: it holds a slot of the connection cap.
    let held = match conn.hold(peer) {
        Ok(held) => held,
        Err(NoSlot::Full) => return refuse(HandshakeError::Full),
        Err(NoSlot::PerIp) => return refuse(HandshakeError::PerIp),
    };
    // And a place in its user's count, and its channels in the user's subscription budget.
    let admission = &server.node.admission;
    let Some(_user_slot) = admission.try_user_slot(&identity) else {
        return refuse(HandshakeError::PerUser);
    };
    if !admission.take_subscriptions(&identity, channels.len()) {
        return h::error(ErrorCode::TooManySubscriptions, "subscription limit of this user on this node reached");
    }
    let _open = Opened::new(Transport::Poll);
    let conn_id = server.next_conn_id.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let (tx, mut rx) = crate::outbox::outbox(cfg.send_queue, cfg.slow_consumer_timeout);
    let handle = SessionHandle {
        id: conn_id,
        user: identity.user.clone(),
        connected_at_ms: 0,
        client_info: Arc::from(""),
        outbox: tx,
        ctl: Arc::new(SessionCtl::for_poll()),
    };
    let node = server.node.clone();
    let mut cursor = Cursor::new(&channels);
    for ch in &channels {
        if let Some(s) = given.get(ch) {
            cursor.set(ch, s.seq, &s.epoch);
        }
    }
    let subscribed: Vec<Arc<str>> = channels.iter().map(|c| Arc::from(c.as_str())).collect();
    // Ended with the node's sessions when they are told to resync (a stall, a lapsed
    // presence lease): what it would show after that may miss messages.
    node.hub.register_poll(conn_id, handle.ctl.clone());
    // A user the gateway named itself (`--anonymous` without `?user=`) is a new one on
    // every poll: nothing to keep present between polls.
    let _polling = if invented { None } else { Pollers::enter(&server, &identity.user, &subscribed) };
    // Also when the request is dropped (the client went away): the poll's subscriptions end.
    let mut cleanup = Cleanup {
        node: node.clone(),
        id: conn_id,
        identity: identity.clone(),
        channels: subscribed.clone(),
        done: false,
    };
    // Every channel at once: a channel's ack comes before its recovery lines up with the
    // live stream, which may wait for the cluster's route or read history in rounds
    // while messages keep coming; one channel's wait must not hold the others' acks.
    let subscribe = async {
        let out = Out::queue(&handle);
        let out = &out;
        futures_util::future::join_all(
            subscribed.iter().map(|channel| session::subscribe(&node, out, None, channel, given.get(channel).cloned())),
        )
        .await;
    };
    tokio::pin!(subscribe);
    let mut subscribing = true;
    let mut events: Vec<Bytes> = Vec::new();
    let mut batch: Vec<Bytes> = Vec::new();
    let mut answer = false;
    // Channels whose subscribe ack came: once all did, news is answered even while a
    // recovery is still lining up (the cursor moves only with what the answer shows).
    let mut acked = 0;
    let deadline = tokio::time::sleep_until(Instant::now() + wait);
    tokio::pin!(deadline);
    let outcome = loop {
        let all_acked = !subscribing || acked >= subscribed.len();
        if answer && all_acked {
            break "events";
        }
        tokio::select! {
            biased;
            () = &mut subscribe, if subscribing => subscribing = false,
            _ = rx.recv_many(&mut batch, 64) => {
                rx.written();
                for frame in batch.drain(..) {
                    if frame.first().map(|b| b & 0x0f) != Some(0x1) {
                        continue;
                    }
                    let json = Bytes::copy_from_slice(super::sse::payload(&frame));
                    cursor.observe(&json);
                    acked += usize::from(is_ack(&json));
                    // A complete recovery's ack says nothing the answer does not show.
                    if news(&json) {
                        answer = true;
                        events.push(json);
                    }
                }
                if events.len() >= POLL_MAX_EVENTS {
                    break "events";
                }
            }
            () = handle.ctl.wait() => break "closed",
            () = server.draining.cancelled() => break "drain",
            // Not before every channel's ack: an answer without one would leave the client
            // guessing whether its recovery is complete.
            () = &mut deadline, if all_acked => {
                break if answer { "events" } else { "timeout" }
            }
        }
    };
    // What is queued by now goes in the answer too.
    rx.take(&mut batch, POLL_MAX_EVENTS.saturating_sub(events.len()));
    for frame in batch.drain(..) {
        if frame.first().map(|b| b & 0x0f) == Some(0x1) {
            let json = Bytes::copy_from_slice(super::sse::payload(&frame));
            cursor.observe(&json);
            if news(&json) {
                events.push(json);
            }
        }
    }
    cleanup.done = true;
    drop(cleanup);
    drop(held);
    let outcome = match (outcome, handle.ctl.requested()) {
        ("drain", _) => {
            let text = session::drain_reason();
            events.push(super::sse::close_event(CloseReason::Drain, Some(&text)).into());
            "drain"
        }
        // Told to resync: the answer ends with what the session would have been told
        // (1001 `resync retry_ms=…`); the next poll recovers from its cursor.
        ("closed", Some((CloseReason::Stalled, text))) => {
            events.push(super::sse::close_event(CloseReason::Stalled, text.as_deref()).into());
            "resync"
        }
        ("closed", _) => "events",
        (o, _) => o,
    };
    metrics::counter!(m::POLLS, "outcome" => outcome).increment(1);
    h::json(StatusCode::OK, body(&cursor.encode(), &events))
}

/// `{"type":"poll","cursor":"…","events":[…]}`: the events are the frames a WebSocket
/// session would have got, in order.
fn body(cursor: &str, events: &[Bytes]) -> Vec<u8> {
    let raw: Vec<&RawValue> = events
        .iter()
        .filter_map(|e| std::str::from_utf8(e).ok())
        .filter_map(|s| serde_json::from_str(s).ok())
        .collect();
    serde_json::json!({"type": "poll", "cursor": cursor, "events": raw}).to_string().into_bytes()
}

/// Ends a poll's subscriptions, however the poll ends.
struct Cleanup {
    node: Arc<session::Node>,
    id: u64,
    identity: crate::auth::Identity,
    channels: Vec<Arc<str>>,
    /// Answered (else the client went away first).
    done: bool,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        self.node.hub.unregister(self.id, &self.identity.user, self.channels.iter().cloned());
        self.node.admission.give_subscriptions(&self.identity, self.channels.len());
        if !self.done {
            metrics::counter!(m::POLLS, "outcome" => "gone").increment(1);
        }
    }
}

/// The users long-polling this node, each one presence connection (see the module's
/// documentation).
#[derive(Debug, Default)]
pub struct Pollers {
    users: parking_lot::Mutex<HashMap<Arc<str>, Poller>>,
    sweeping: AtomicBool,
    /// The node stopped: no presence is kept for polls any more.
    closed: AtomicBool,
}

/// One polling user's presence connection.
#[derive(Debug)]
struct Poller {
    conn_id: u64,
    connected_at_ms: u64,
    /// Per channel: polls in flight that ask for it, and when the last one ended.
    channels: HashMap<Arc<str>, (usize, Instant)>,
}

impl Poller {
    /// What presence snapshots give of it (`Hub::set_extra_presence`).
    fn record(&self, user: &Arc<str>) -> ConnRecord {
        ConnRecord {
            conn_id: self.conn_id,
            user: user.clone(),
            connected_at_ms: self.connected_at_ms,
            client_info: Arc::from(POLLER_INFO),
            channels: self.channels.keys().cloned().collect(),
        }
    }
}

/// The client info presence shows for a polling user.
const POLLER_INFO: &str = "long-polling";

/// A poll in flight (for [`Pollers`]); its channels' linger starts when it drops.
pub(crate) struct Polling {
    server: Arc<Server>,
    user: Arc<str>,
    channels: Vec<Arc<str>>,
}

impl Pollers {
    /// A poll of `user` for `channels` begins: the user's presence connection (made on
    /// its first poll) is subscribed to them. `None` once the node stopped.
    pub(crate) fn enter(server: &Arc<Server>, user: &Arc<str>, channels: &[Arc<str>]) -> Option<Polling> {
        let pollers = &server.pollers;
        if pollers.closed.load(Ordering::Acquire) {
            return None;
        }
        let presence = &server.node.presence;
        if !pollers.sweeping.swap(true, Ordering::AcqRel) {
            server.tracker.spawn(sweep(server.clone()));
        }
        let now = Instant::now();
        let mut users = pollers.users.lock();
        let mut changed = false;
        let poller = users.entry(user.clone()).or_insert_with(|| {
            changed = true;
            let conn_id = server.next_conn_id.fetch_add(1, Ordering::Relaxed);
            let connected_at_ms = crate::session::unix_now().as_millis() as u64;
            let p = Poller { conn_id, connected_at_ms, channels: HashMap::new() };
            presence.connected(&p.record(user));
            p
        });
        for ch in channels {
            let entry = poller.channels.entry(ch.clone()).or_insert_with(|| {
                changed = true;
                presence.subscribed(poller.conn_id, ch);
                (0, now)
            });
            entry.0 += 1;
        }
        if changed {
            server.node.hub.set_extra_presence(poller.conn_id, Some(poller.record(user)));
        }
        Some(Polling { server: server.clone(), user: user.clone(), channels: channels.to_vec() })
    }

    /// Ends the presence of what no poll asked for in `linger` (all of it, and no more
    /// from now on, with `linger` zero); forgets users left with no channel.
    fn sweep(&self, node: &crate::session::Node, linger: Duration) {
        if linger.is_zero() {
            self.closed.store(true, Ordering::Release);
        }
        let now = Instant::now();
        self.users.lock().retain(|user, p| {
            let before = p.channels.len();
            p.channels.retain(|ch, (polls, ended)| {
                let keep = !linger.is_zero() && (*polls > 0 || now.duration_since(*ended) < linger);
                if !keep {
                    node.presence.unsubscribed(p.conn_id, ch);
                }
                keep
            });
            if p.channels.is_empty() {
                node.presence.disconnected(p.conn_id);
                node.hub.set_extra_presence(p.conn_id, None);
            } else if p.channels.len() != before {
                node.hub.set_extra_presence(p.conn_id, Some(p.record(user)));
            }
            !p.channels.is_empty()
        });
    }
}

impl Drop for Polling {
    fn drop(&mut self) {
        let now = Instant::now();
        let mut users = self.server.pollers.users.lock();
        if let Some(p) = users.get_mut(&self.user) {
            for ch in &self.channels {
                if let Some(entry) = p.channels.get_mut(ch) {
                    entry.0 = entry.0.saturating_sub(1);
                    entry.1 = now;
                }
            }
        }
    }
}

/// Every second, the presence of pollers that stopped polling ends; all of it when the
/// node stops. A poller is gone after as long as a WebSocket session that stops
/// answering: `heartbeat_interval + heartbeat_timeout`.
async fn sweep(server: Arc<Server>) {
    let cfg = &server.node.config;
    let linger = cfg.heartbeat_interval + cfg.heartbeat_timeout;
    let mut tick = tokio::time::interval(Duration::from_secs(1).min(linger.max(Duration::from_millis(10))));
    loop {
        tokio::select! {
            () = server.stop_sessions.cancelled() => break,
            _ = tick.tick() => server.pollers.sweep(&server.node, linger),
        }
    }
    server.pollers.sweep(&server.node, Duration::ZERO);
}
