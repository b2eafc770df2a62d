//! Server-Sent Events: `GET /sse?channels=a,b`. The session is the same as a
//! WebSocket one (hub, presence, queue, limits, recovery); this transport frames
//! what it queues as `text/event-stream` events. Each frame is one event (`data:`
//! the JSON frame); frames that move a channel's position carry an `id:` naming the
//! position of every channel followed ([`super::event_id`]), so that the browser's
//! `EventSource` reconnect (`Last-Event-ID`) resumes through history by itself.
//! Heartbeats are comment lines. Every end the server decides is a final `close`
//! event with the reason and a retry hint (`retry:`), then the end of the stream.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use futures_util::StreamExt;
use http::{HeaderValue, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::{Frame, Incoming};
use tokio::sync::mpsc;
use tokio::time::{Instant, sleep_until};
use tokio_stream::wrappers::ReceiverStream;

use super::event_id::Cursor;
use super::http::{self as h, Body};
use super::{Opened, Transport};
use crate::auth::Identity;
use crate::handshake::HandshakeError;
use crate::hub::{SessionCtl, SessionHandle};
use crate::metrics as m;
use crate::outbox::OutboxRx;
use crate::policy::{AuthDeadline, AuthLimit, CloseReason};
use crate::protocol::ErrorCode;
use crate::server::{Conn, Held, NoSlot, Server};
use crate::session::{self, commands};

/// Frames taken from the queue per chunk written.
const BATCH: usize = 64;
/// Time the final events may take to be taken by the connection.
const CLOSE_WRITE_TIMEOUT: Duration = Duration::from_secs(1);

/// A stream's command state, shared by its own task and `POST /command?stream=`.
#[derive(Debug)]
pub(crate) struct StreamState {
    pub(crate) identity: Identity,
    pub(crate) core: commands::State,
}

/// One open SSE stream, as `POST /command` finds it.
#[derive(Debug)]
pub(crate) struct Stream {
    pub(crate) handle: SessionHandle,
    pub(crate) cmd: tokio::sync::Mutex<StreamState>,
    pub(crate) auth: AuthDeadline,
    pub(crate) started: Instant,
}

/// The streams open on this gateway, by connection id.
#[derive(Debug, Default)]
pub struct Streams(parking_lot::Mutex<HashMap<u64, Arc<Stream>>>);

impl Streams {
    /// The stream `id` (`<node>.<hex id>`) of `user` on this node `node`.
    pub(crate) fn find(&self, node: &str, id: &str, user: &str) -> Option<Arc<Stream>> {
        let (n, hex) = id.rsplit_once('.')?;
        let conn = u64::from_str_radix(hex, 16).ok().filter(|_| n == node)?;
        self.0.lock().get(&conn).filter(|s| &*s.handle.user == user).cloned()
    }
}

/// A reply to a command on this stream that moves what it follows is also queued to
/// the stream (its next event ids then name the channel): a subscribe's ack, and for
/// an unsubscribe `{"type":"unsubscribed","channel":…}`.
pub(crate) fn note_reply(handle: &SessionHandle, frame: &[u8]) {
    #[derive(serde::Deserialize)]
    struct Peek<'a> {
        #[serde(rename = "type", borrow)]
        kind: std::borrow::Cow<'a, str>,
        #[serde(borrow, default)]
        channel: Option<std::borrow::Cow<'a, str>>,
        #[serde(default)]
        position: Option<serde::de::IgnoredAny>,
    }
    if let Ok(p) = serde_json::from_slice::<Peek<'_>>(frame)
        && p.kind == "ack"
        && p.channel.is_some()
        && p.position.is_some()
    {
        handle.deliver(&crate::wire::text(frame));
    }
}

/// What the stream task says when it unsubscribes a channel from a command.
pub(crate) fn unsubscribed(channel: &str) -> Vec<u8> {
    serde_json::json!({"type": "unsubscribed", "channel": channel}).to_string().into_bytes()
}

/// The JSON text of a queued frame (the queue holds WebSocket frames, unmasked).
pub(crate) fn payload(frame: &[u8]) -> &[u8] {
    match frame.get(1).map(|b| b & 0x7f) {
        Some(126) => frame.get(4..).unwrap_or(&[]),
        Some(127) => frame.get(10..).unwrap_or(&[]),
        Some(_) => &frame[2..],
        None => &[],
    }
}

/// Appends one event: `id:` when given, the JSON as `data:` lines (a raw newline in
/// JSON is whitespace; `\r` too, and SSE would read it as a line break).
pub(crate) fn event(out: &mut BytesMut, id: Option<&str>, json: &[u8]) {
    if let Some(id) = id {
        out.put_slice(b"id: ");
        out.put_slice(id.as_bytes());
        out.put_u8(b'\n');
    }
    for line in json.split(|&b| b == b'\n') {
        out.put_slice(b"data: ");
        out.extend(line.iter().map(|&b| if b == b'\r' { b' ' } else { b }));
        out.put_u8(b'\n');
    }
    out.put_u8(b'\n');
}

/// The final event of a stream: `{"type":"close","code":…,"reason":…,"message":…,
/// "retry_ms":…}` (`retry_ms` absent: do not reconnect), with `retry:` for EventSource.
pub(crate) fn close_event(reason: CloseReason, text: Option<&str>) -> Vec<u8> {
    let retry = h::retry_hint(reason, text);
    let mut v = serde_json::json!({
        "type": "close",
        "code": reason.code(),
        "reason": reason.label(),
        "message": text.unwrap_or(reason.label()),
    });
    if let Some(ms) = retry {
        v["retry_ms"] = ms.into();
    }
    v.to_string().into_bytes()
}

/// `GET /sse`: admits the request like a WebSocket upgrade, then starts the stream.
pub(crate) fn open(
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
        crate::admission::Admission::shed("sse");
        return refuse(HandshakeError::Memory);
    }
    let identity = match h::admit(&server, &req) {
        Ok(id) => id,
        Err(e) => return refuse(e),
    };
    let cfg = &server.node.config;
    let query = req.uri().query();
    let last = req
        .headers()
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
        .or_else(|| h::raw_param(query, "last_event_id").map(|v| crate::handshake::percent_decode(v).into_owned()));
    let resumed = match last.as_deref().map(Cursor::parse).transpose() {
        Ok(c) => c.unwrap_or_default(),
        Err(e) => return h::error(ErrorCode::BadRequest, &format!("Last-Event-ID: {e}")),
    };
    // The channels of the URL, then those the last event id names (subscribed later).
    let mut channels = match h::channels(h::raw_param(query, "channels"), cfg.max_subscriptions, &identity, true) {
        Ok(c) => c,
        Err(e) => return e.response(),
    };
    let mut cursor = Cursor::new(&channels);
    for ch in resumed.channels() {
        if !channels.iter().any(|c| c == ch) && identity.may_use(ch) && channels.len() < cfg.max_subscriptions {
            channels.push(ch.to_owned());
            cursor.follow(ch);
        }
    }
    let held = match conn.hold(peer) {
        Ok(held) => held,
        Err(NoSlot::Full) => return refuse(HandshakeError::Full),
        Err(NoSlot::PerIp) => return refuse(HandshakeError::PerIp),
    };
    let admission = &server.node.admission;
    let Some(user_slot) = admission.try_user_slot(&identity) else {
        return refuse(HandshakeError::PerUser);
    };
    // The stream's channels come out of the user's budget before it starts (the run
    // loop subscribes them); all of them or none.
    if !admission.take_subscriptions(&identity, channels.len()) {
        return h::error(ErrorCode::TooManySubscriptions, "subscription limit of this user on this node reached");
    }
    let client_info: Arc<str> = crate::handshake::client_info(&req);
    let conn_id = server.next_conn_id.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let (tx, rx) = crate::outbox::outbox(cfg.send_queue, cfg.slow_consumer_timeout);
    let connected_at_ms =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64);
    let handle = SessionHandle {
        id: conn_id,
        user: identity.user.clone(),
        connected_at_ms,
        client_info,
        outbox: tx,
        ctl: Arc::new(SessionCtl::with_deflate(0)),
    };
    let started = Instant::now();
    let auth = AuthDeadline::new(match identity.expires_at {
        Some(exp) => AuthLimit::token(exp, session::unix_now(), Duration::ZERO),
        None => AuthLimit::Never,
    });
    // The welcome (which names the stream: `conn_id`) is the first event.
    session::register(&server.node, &identity, &handle, None);
    let stream = Arc::new(Stream {
        handle,
        cmd: tokio::sync::Mutex::new(StreamState { identity, core: commands::State::new(cfg, started) }),
        auth,
        started,
    });
    server.streams.0.lock().insert(conn_id, stream.clone());
    // Event ids start from where the client resumed: until a channel moves here, the id
    // names the position its `Last-Event-ID` gave (the client was shown everything through
    // it), never `channel=-`, from which a reconnect would subscribe it afresh and skip what
    // was published meanwhile.
    for ch in &channels {
        if let Some(s) = resumed.get(ch) {
            cursor.set(ch, s.seq, &s.epoch);
        }
    }
    let since: Vec<(String, Option<crate::protocol::Since>)> = channels
        .into_iter()
        .map(|c| {
            let s = resumed.get(&c).cloned();
            (c, s)
        })
        .collect();
    let (body_tx, body_rx) = mpsc::channel::<Bytes>(1);
    server.tracker.spawn(run(server.clone(), stream, rx, cursor, since, body_tx, (held, user_slot), conn.clone()));

    let body = StreamBody::new(ReceiverStream::new(body_rx).map(|b| Ok(Frame::data(b))));
    let mut resp = Response::new(body.boxed_unsync());
    *resp.status_mut() = StatusCode::OK;
    let hd = resp.headers_mut();
    hd.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
    hd.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    // nginx: do not buffer the stream.
    hd.insert("x-accel-buffering", HeaderValue::from_static("no"));
    resp
}

/// Sends `chunk` to the connection unless the session closes first. False: it ends.
async fn send(body: &mpsc::Sender<Bytes>, chunk: Bytes, ctl: &SessionCtl) -> bool {
    tokio::select! {
        r = body.send(chunk) => r.is_ok(),
        () = ctl.wait() => false,
    }
}

#[allow(clippy::too_many_arguments)]
async fn run(
    server: Arc<Server>,
    stream: Arc<Stream>,
    mut rx: OutboxRx,
    mut cursor: Cursor,
    since: Vec<(String, Option<crate::protocol::Since>)>,
    body: mpsc::Sender<Bytes>,
    (held, user_slot): (Held, crate::admission::UserSlot),
    conn: Arc<Conn>,
) {
    let _open = Opened::new(Transport::Sse);
    metrics::counter!(m::CONNECTIONS_OPENED).increment(1);
    metrics::gauge!(m::CONNECTIONS_ACTIVE).increment(1.0);
    let node = server.node.clone();
    let cfg = &node.config;
    let handle = &stream.handle;
    let ctl = &*handle.ctl;
    let subscribe = async {
        let mut st = stream.cmd.lock().await;
        for (channel, since) in since {
            let channel: Arc<str> = channel.into();
            if st.core.subscriptions.insert(channel.clone()) {
                metrics::gauge!(m::SUBSCRIPTIONS_ACTIVE).increment(1.0);
                session::subscribe(&node, &commands::Out::queue(handle), None, &channel, since).await;
            } else {
                // Taken from the user's budget in `open`, not held.
                node.admission.give_subscriptions(&st.identity, 1);
            }
        }
    };
    let egress = async {
        let mut batch: Vec<Bytes> = Vec::new();
        let hb = cfg.heartbeat_interval;
        let mut wake = stream.started + hb;
        let deadline = |wake: Instant| stream.auth.get().at(stream.started).map_or(wake, |e| e.min(wake));
        let timer = sleep_until(deadline(wake));
        let closing = ctl.wait();
        let draining = server.stop_sessions.cancelled();
        tokio::pin!(timer, closing, draining);
        loop {
            tokio::select! {
                biased;
                () = &mut closing => break,
                () = &mut draining => {
                    ctl.close(CloseReason::Drain, Some(&session::drain_reason()));
                    break;
                }
                () = body.closed() => {
                    ctl.close(CloseReason::Gone, None);
                    break;
                }
                _ = rx.recv_many(&mut batch, BATCH) => {
                    let chunk = events(&mut cursor, &mut batch);
                    rx.written();
                    if !chunk.is_empty() && !send(&body, chunk, ctl).await {
                        ctl.close(CloseReason::Gone, None);
                        break;
                    }
                    timer.as_mut().reset(deadline(wake));
                }
                () = &mut timer => {
                    let now = Instant::now();
                    if stream.auth.get().due(stream.started, now) {
                        ctl.close(CloseReason::TokenExpired, Some("token expired"));
                        break;
                    }
                    if now >= wake {
                        // A heartbeat; a full connection is not waited for (the queue's
                        // congestion decides about a client that does not read).
                        match body.try_send(Bytes::from_static(b": heartbeat\n\n")) {
                            Err(mpsc::error::TrySendError::Closed(_)) => {
                                ctl.close(CloseReason::Gone, None);
                                break;
                            }
                            _ => wake = now + hb,
                        }
                    }
                    timer.as_mut().reset(deadline(wake));
                }
            }
        }
        finish(&mut rx, &mut cursor, &body, ctl).await
    };
    let (_, clean) = tokio::join!(subscribe, egress);
    drop(body);
    let (reason, _) = ctl.requested().unwrap_or((CloseReason::Gone, None));
    if !clean {
        // The client is not taking what is written: do not wait for it.
        conn.abort_stalled();
    }
    server.streams.0.lock().remove(&handle.id);
    let st = stream.cmd.lock().await;
    let subs = st.core.subscriptions.len();
    node.admission.give_subscriptions(&st.identity, subs);
    node.hub.unregister(handle.id, &st.identity.user, st.core.subscriptions.iter().cloned());
    node.presence.disconnected(handle.id);
    drop(st);
    drop((held, user_slot));
    metrics::gauge!(m::SUBSCRIPTIONS_ACTIVE).decrement(subs as f64);
    metrics::gauge!(m::CONNECTIONS_ACTIVE).decrement(1.0);
    metrics::counter!(m::CONNECTIONS_CLOSED, "reason" => reason.label()).increment(1);
    tracing::debug!(conn.id = handle.id, reason = reason.label(), "sse stream closed");
}

/// Frames `batch` as events (clearing it).
fn events(cursor: &mut Cursor, batch: &mut Vec<Bytes>) -> Bytes {
    let mut out = BytesMut::new();
    for frame in batch.drain(..) {
        if frame.first().map(|b| b & 0x0f) != Some(0x1) {
            continue;
        }
        let json = payload(&frame);
        let id = cursor.observe(json).then(|| cursor.encode());
        event(&mut out, id.as_deref(), json);
    }
    out.freeze()
}

/// What is still queued (unless the session is a slow consumer), then the close
/// event. True when the connection took it in time.
async fn finish(rx: &mut OutboxRx, cursor: &mut Cursor, body: &mpsc::Sender<Bytes>, ctl: &SessionCtl) -> bool {
    rx.seal();
    let (reason, text) = ctl.requested().unwrap_or((CloseReason::Gone, None));
    if reason == CloseReason::Gone {
        return true;
    }
    let mut batch = Vec::new();
    if reason != CloseReason::SlowConsumer {
        rx.take(&mut batch, usize::MAX);
    }
    let mut chunk = BytesMut::from(&events(cursor, &mut batch)[..]);
    if let Some(ms) = h::retry_hint(reason, text.as_deref()) {
        chunk.put_slice(format!("retry: {ms}\n").as_bytes());
    }
    event(&mut chunk, None, &close_event(reason, text.as_deref()));
    let sent = tokio::time::timeout(CLOSE_WRITE_TIMEOUT, body.send(chunk.freeze())).await;
    matches!(sent, Ok(Ok(()))) && reason != CloseReason::SlowConsumer
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A stream's ids from a cursor preset with the resumed positions (as `open` does).
    fn ids(channels: &[&str], resumed: &str, frames: &[&[u8]]) -> Vec<Option<String>> {
        let resumed = Cursor::parse(resumed).unwrap();
        let mut cursor = Cursor::new(&channels.iter().map(|c| c.to_string()).collect::<Vec<_>>());
        for ch in channels {
            if let Some(s) = resumed.get(ch) {
                cursor.set(ch, s.seq, &s.epoch);
            }
        }
        frames.iter().map(|f| cursor.observe(f).then(|| cursor.encode())).collect()
    }

    #[test]
    fn ids_keep_the_resumed_position_of_a_channel_until_it_moves() {
        // Both recoveries complete; a message of `a` only: `b` is still where it resumed.
        let got = ids(
            &["a", "b"],
            "a=1@e,b=2@e",
            &[
                br#"{"type":"ack","channel":"a","position":{"seq":2,"epoch":"e"},"recovered":true}"#,
                br#"{"type":"ack","channel":"b","position":{"seq":2,"epoch":"e"},"recovered":true}"#,
                br#"{"type":"message","channel":"a","id":"x","from":"u","seq":3,"epoch":"e","data":{}}"#,
            ],
        );
        assert_eq!(got, [None, None, Some("a=3@e,b=2@e".into())]);
        // A refused recovery's ack moves `b` (here back: the id was ahead of the stream).
        let ahead =
            br#"{"type":"ack","channel":"b","position":{"seq":1,"epoch":"e"},"recovered":false,"reason":"ahead"}"#;
        assert_eq!(ids(&["b"], "b=9@e", &[ahead]), [Some("b=1@e".into())]);
        // An unsubscribed channel is not named again.
        let gone = br#"{"type":"unsubscribed","channel":"b"}"#;
        assert_eq!(ids(&["a", "b"], "a=1@e,b=2@e", &[gone]), [Some("a=1@e".into())]);
    }
}
