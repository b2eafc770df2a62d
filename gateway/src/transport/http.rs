//! What the HTTP transports share: the response body type, the admission of a
//! request (drain, Origin, token: the same decisions as the WebSocket handshake),
//! the channel list, and `POST /command`, the client's commands for SSE and
//! long-poll clients.
//!
//! `publish`, `send`, `presence`, `history` and `ping` work on any gateway and need
//! no stream; `subscribe`, `unsubscribe` and `refresh` act on an SSE stream named by
//! `?stream=<id>` (its welcome's `conn_id`), which must be this gateway's and the
//! same user's, else 409 `unknown_stream`.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Request, Response, StatusCode, header};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use tokio::time::Instant;

use crate::auth::{AuthError, Identity};
use crate::handshake::{self, HandshakeError};
use crate::hub::{SessionCtl, SessionHandle};
use crate::policy::{AuthDeadline, AuthLimit, CloseReason, TokenBucket};
use crate::protocol::{self, ErrorCode};
use crate::server::Server;
use crate::session::commands::{self, Out, Session};

/// Every response body on the client port.
pub type Body = UnsyncBoxBody<Bytes, Infallible>;

/// Per-user publish buckets for commands that come without a stream.
#[derive(Debug, Default)]
pub struct Buckets(parking_lot::Mutex<HashMap<Arc<str>, TokenBucket>>);

/// Users whose buckets are kept before idle (refilled) ones are forgotten.
const BUCKETS_MAX: usize = 100_000;

impl Buckets {
    fn take(&self, user: &Arc<str>, cfg: &crate::session::SessionConfig) -> TokenBucket {
        let mut map = self.0.lock();
        map.remove(user).unwrap_or_else(|| TokenBucket::new(cfg.publish_rate, cfg.publish_burst, Instant::now()))
    }

    fn put(&self, user: Arc<str>, bucket: TokenBucket) {
        let mut map = self.0.lock();
        if map.len() >= BUCKETS_MAX {
            // A full bucket is the same as a new one: forget those.
            map.retain(|_, b| !b.is_full(Instant::now()));
        }
        map.insert(user, bucket);
    }
}

pub fn full(body: impl Into<Bytes>) -> Body {
    Full::new(body.into()).boxed_unsync()
}

/// A JSON response.
pub fn json(status: StatusCode, body: impl Into<Bytes>) -> Response<Body> {
    let mut resp = Response::new(full(body));
    *resp.status_mut() = status;
    resp.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp
}

/// The HTTP status for an error reply's code.
fn status_of(code: &str) -> StatusCode {
    match code {
        "unauthorized" => StatusCode::UNAUTHORIZED,
        "forbidden" => StatusCode::FORBIDDEN,
        "rate_limited" => StatusCode::TOO_MANY_REQUESTS,
        "unavailable" => StatusCode::SERVICE_UNAVAILABLE,
        "unknown_stream" | "too_many_subscriptions" => StatusCode::CONFLICT,
        "too_big" => StatusCode::PAYLOAD_TOO_LARGE,
        _ => StatusCode::BAD_REQUEST,
    }
}

/// A reply frame as an HTTP response: 200, or the status of its error code (with
/// `Retry-After` when it says when to retry).
fn answer(frame: Vec<u8>) -> Response<Body> {
    #[derive(serde::Deserialize)]
    struct Peek<'a> {
        #[serde(rename = "type", borrow)]
        kind: std::borrow::Cow<'a, str>,
        #[serde(borrow, default)]
        code: Option<std::borrow::Cow<'a, str>>,
        #[serde(default)]
        retry_after_ms: Option<u64>,
    }
    let (status, retry) = match serde_json::from_slice::<Peek<'_>>(&frame) {
        Ok(p) if p.kind == "error" => (status_of(p.code.as_deref().unwrap_or("")), p.retry_after_ms),
        _ => (StatusCode::OK, None),
    };
    let mut resp = json(status, frame);
    if let Some(ms) = retry {
        resp.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(ms.div_ceil(1000).max(1)));
    }
    resp
}

/// An error reply as a response, counted like a WebSocket session's.
pub(crate) fn error(code: ErrorCode, msg: &str) -> Response<Body> {
    metrics::counter!(crate::metrics::COMMAND_ERRORS, "code" => code.as_str()).increment(1);
    answer(protocol::error(None, code, msg, None))
}

/// A request's identity, decided like the WebSocket handshake's (drain aside):
/// `Origin` when one is sent (browsers send it on cross-origin requests) must be
/// allowed; the token comes from `Authorization: Bearer`, the `switchboard_token`
/// cookie or `?token=`. HTTP transports have no `connect`: no token is a 401.
///
/// A cookie is a credential the browser attaches by itself, also to requests another
/// site's page makes (a form posting to `/command` needs no CORS preflight): a request
/// authenticated by the cookie that comes from an origin is admitted only from the
/// gateway's own origin or one listed in `--allowed-origins` explicitly, even when that
/// list is empty (which admits any origin for tokens sent in `Authorization` or the URL,
/// that a foreign page cannot read).
pub(crate) fn admit(server: &Server, req: &Request<Incoming>) -> Result<Identity, HandshakeError> {
    let origin = req.headers().get(header::ORIGIN).map(|o| o.to_str().unwrap_or(""));
    let listed = |o: &str| server.allowed_origins.iter().any(|a| a == o);
    if let Some(o) = origin.filter(|_| !server.allowed_origins.is_empty())
        && !listed(o)
    {
        return Err(HandshakeError::Origin);
    }
    let (token, by_cookie) = handshake::http_token(req);
    if let Some(o) = origin.filter(|_| by_cookie)
        && !listed(o)
        && !same_origin(o, req)
    {
        return Err(HandshakeError::Origin);
    }
    // A navigation from another site (a link: no `Origin`) says so in `Sec-Fetch-Site`.
    let cross_site = req.headers().get("sec-fetch-site").is_some_and(|v| v.as_bytes() == b"cross-site");
    if by_cookie && origin.is_none() && cross_site {
        return Err(HandshakeError::Origin);
    }
    handshake::authenticate(server, req, token)?.ok_or(HandshakeError::Unauthorized(AuthError::Missing))
}

/// Is `origin` the gateway's own (`http(s)://` and the request's `Host`)?
fn same_origin(origin: &str, req: &Request<Incoming>) -> bool {
    let host = req
        .headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .or_else(|| req.uri().authority().map(|a| a.as_str()));
    let rest = origin.strip_prefix("https://").or_else(|| origin.strip_prefix("http://"));
    matches!((rest, host), (Some(r), Some(h)) if r.eq_ignore_ascii_case(h))
}

/// Cross-origin answers for the HTTP transports (a page served from another origin
/// than the gateway's, e.g. a list of gateways): an `Origin` the gateway admits
/// (`--allowed-origins`, or any when that is empty, as on `/ws`) is echoed in
/// `Access-Control-Allow-Origin`. Credentials (the `switchboard_token` cookie) are
/// allowed only for origins listed explicitly; a token in `Authorization` works from
/// any admitted origin. An origin that is not admitted gets no CORS headers (and the
/// request itself is refused 403 by [`admit`]).
#[derive(Debug, Default)]
pub(crate) struct Cors {
    origin: Option<HeaderValue>,
    credentials: bool,
}

/// Headers a cross-origin client may send and read.
const CORS_ALLOW_HEADERS: &str = "authorization, content-type, last-event-id";
const CORS_EXPOSE_HEADERS: &str = "retry-after";
/// How long a browser may cache a preflight answer, in seconds.
const CORS_MAX_AGE: &str = "600";

impl Cors {
    pub(crate) fn of(server: &Server, req: &Request<Incoming>) -> Self {
        let Some(origin) = req.headers().get(header::ORIGIN) else { return Self::default() };
        let listed = server.allowed_origins.iter().any(|a| a.as_bytes() == origin.as_bytes());
        if !listed && !server.allowed_origins.is_empty() {
            return Self::default();
        }
        Self { origin: Some(origin.clone()), credentials: listed }
    }

    pub(crate) fn apply(self, mut resp: Response<Body>) -> Response<Body> {
        let Some(origin) = self.origin else { return resp };
        let headers = resp.headers_mut();
        headers.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin);
        headers.insert(header::ACCESS_CONTROL_EXPOSE_HEADERS, HeaderValue::from_static(CORS_EXPOSE_HEADERS));
        if self.credentials {
            headers.insert(header::ACCESS_CONTROL_ALLOW_CREDENTIALS, HeaderValue::from_static("true"));
        }
        headers.append(header::VARY, HeaderValue::from_static("Origin"));
        resp
    }
}

/// `OPTIONS` on `/sse`, `/poll`, `/command`: the CORS preflight (a cross-origin request
/// with `Authorization` or a JSON body is preceded by one). 204 with what may be sent
/// for an admitted origin; 403 for one that is not.
pub(crate) fn preflight(server: &Server, req: &Request<Incoming>) -> Response<Body> {
    let cors = Cors::of(server, req);
    if cors.origin.is_none() && req.headers().contains_key(header::ORIGIN) {
        return HandshakeError::Origin.into_response().map(|b| b.boxed_unsync());
    }
    let mut resp = Response::new(full(Bytes::new()));
    *resp.status_mut() = StatusCode::NO_CONTENT;
    let headers = resp.headers_mut();
    headers.insert(header::ACCESS_CONTROL_ALLOW_METHODS, HeaderValue::from_static("GET, POST"));
    headers.insert(header::ACCESS_CONTROL_ALLOW_HEADERS, HeaderValue::from_static(CORS_ALLOW_HEADERS));
    headers.insert(header::ACCESS_CONTROL_MAX_AGE, HeaderValue::from_static(CORS_MAX_AGE));
    cors.apply(resp)
}

/// Why a channel list was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChannelsError {
    Missing,
    Invalid,
    TooMany,
    Forbidden,
}

impl ChannelsError {
    pub fn response(self) -> Response<Body> {
        match self {
            Self::Missing => error(ErrorCode::BadRequest, "channels required: ?channels=a,b"),
            Self::Invalid => error(
                ErrorCode::BadChannel,
                "channels is a comma-separated list of channel names (a comma inside a name is %2C)",
            ),
            Self::TooMany => error(ErrorCode::TooManySubscriptions, "more channels than limits.max_subscriptions"),
            Self::Forbidden => error(ErrorCode::Forbidden, "not allowed on a channel of the list"),
        }
    }
}

/// `channels=a,b`: names split at literal commas, each then percent-decoded; at most
/// `max`, no repeats, each allowed for `identity`. Empty or absent: `Missing` unless `optional`.
pub(crate) fn channels(
    raw: Option<&str>,
    max: usize,
    identity: &Identity,
    optional: bool,
) -> Result<Vec<String>, ChannelsError> {
    let raw = match raw {
        Some(r) if !r.is_empty() => r,
        _ if optional => return Ok(Vec::new()),
        _ => return Err(ChannelsError::Missing),
    };
    let mut out: Vec<String> = Vec::new();
    for part in raw.split(',') {
        if out.len() >= max {
            return Err(ChannelsError::TooMany);
        }
        let name = handshake::percent_decode(part).into_owned();
        if !protocol::valid_channel(&name) {
            return Err(ChannelsError::Invalid);
        }
        if !out.contains(&name) {
            out.push(name);
        }
    }
    if !out.iter().all(|c| identity.may_use(c)) {
        return Err(ChannelsError::Forbidden);
    }
    Ok(out)
}

/// A query parameter, raw (not decoded).
pub(crate) fn raw_param<'a>(query: Option<&'a str>, key: &str) -> Option<&'a str> {
    query?.split('&').find_map(|kv| {
        let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
        (k == key).then_some(v)
    })
}

/// Reads a request body of at most `max` bytes; `None` when it is larger (or broken).
pub(crate) async fn read_body(req: Request<Incoming>, max: usize) -> Result<Bytes, Response<Body>> {
    match Limited::new(req.into_body(), max).collect().await {
        Ok(b) => Ok(b.to_bytes()),
        Err(e) if e.downcast_ref::<http_body_util::LengthLimitError>().is_some() => {
            Err(error(ErrorCode::TooBig, "request body over limits.max_message_bytes"))
        }
        Err(_) => Err(error(ErrorCode::BadRequest, "the request body could not be read")),
    }
}

/// `POST /command`: one JSON command, its reply as the response.
pub(crate) async fn command(server: Arc<Server>, req: Request<Incoming>) -> Response<Body> {
    let identity = match admit(&server, &req) {
        Ok(id) => id,
        Err(e) => return e.into_response().map(|b| b.boxed_unsync()),
    };
    let stream_id = raw_param(req.uri().query(), "stream").map(|s| handshake::percent_decode(s).into_owned());
    let stream = match &stream_id {
        None => None,
        Some(id) => match server.streams.find(&server.node.config.node_id, id, &identity.user) {
            Some(s) => Some(s),
            None => return error(ErrorCode::UnknownStream, "no such stream on this gateway"),
        },
    };
    let node = server.node.clone();
    let body = match read_body(req, node.config.max_message_bytes).await {
        Ok(b) => b,
        Err(resp) => return resp,
    };
    let Ok(text) = std::str::from_utf8(&body) else {
        return error(ErrorCode::BadJson, "the body is not UTF-8");
    };
    let (needs_stream, unsubscribes) = match protocol::decode(text) {
        Ok(r) => match r.command {
            protocol::Command::Unsubscribe { channel } => (true, Some(channel.into_owned())),
            protocol::Command::Subscribe { .. } | protocol::Command::Refresh { .. } => (true, None),
            _ => (false, None),
        },
        Err(_) => (false, None),
    };
    let replies = parking_lot::Mutex::new(Vec::new());
    match stream {
        Some(stream) => {
            let mut st = stream.cmd.lock().await;
            let st = &mut *st;
            let out = Out::collect(&stream.handle, &replies);
            let session = Session { identity: &mut st.identity, auth: &stream.auth, started: stream.started };
            if let Err(reason) = Box::pin(commands::command(&node, session, &out, &mut st.core, text)).await {
                stream.handle.ctl.close(reason, None);
                return flooded();
            }
            // The stream's own event ids follow what it subscribes and unsubscribes.
            for frame in replies.lock().iter() {
                super::sse::note_reply(&stream.handle, frame);
            }
            if let Some(channel) = unsubscribes {
                stream.handle.deliver(&crate::wire::text(&super::sse::unsubscribed(&channel)));
            }
        }
        None if needs_stream => {
            return error(
                ErrorCode::BadRequest,
                "subscribe, unsubscribe and refresh need ?stream=<id> (an SSE stream)",
            );
        }
        None => {
            let handle = throwaway(&identity);
            let user = identity.user.clone();
            let mut core = commands::State::new(&node.config, Instant::now());
            core.bucket = server.buckets.take(&user, &node.config);
            let mut identity = identity;
            let auth = AuthDeadline::new(AuthLimit::Never);
            let out = Out::collect(&handle, &replies);
            let session = Session { identity: &mut identity, auth: &auth, started: Instant::now() };
            let r = Box::pin(commands::command(&node, session, &out, &mut core, text)).await;
            server.buckets.put(user, core.bucket);
            if r.is_err() {
                return flooded();
            }
        }
    }
    let mut replies = replies.into_inner();
    match replies.len() {
        0 => error(ErrorCode::BadRequest, "no reply"),
        _ => answer(replies.swap_remove(0)),
    }
}

/// Kept publishing while rate-limited (a WebSocket session would be closed 4003).
fn flooded() -> Response<Body> {
    let mut resp = error(ErrorCode::RateLimited, "publish rate exceeded (flood)");
    resp.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(5));
    resp
}

/// A handle for a command with no session behind it (nothing is queued to it).
fn throwaway(identity: &Identity) -> SessionHandle {
    let (outbox, _) = crate::outbox::outbox(1, Duration::from_secs(1));
    SessionHandle {
        id: 0,
        user: identity.user.clone(),
        connected_at_ms: 0,
        client_info: Arc::from(""),
        outbox,
        ctl: Arc::new(SessionCtl::with_deflate(0)),
    }
}

/// The retry hint of a close: what docs/protocol.md's close-code table says about
/// reconnecting, in milliseconds; `None`: do not reconnect.
pub(crate) fn retry_hint(reason: CloseReason, text: Option<&str>) -> Option<u64> {
    let from_text = text.and_then(|t| t.split_once("retry_ms=")).and_then(|(_, n)| n.trim().parse().ok());
    match reason {
        CloseReason::Drain | CloseReason::Stalled => Some(from_text.unwrap_or(1000)),
        CloseReason::SlowConsumer | CloseReason::HeartbeatTimeout | CloseReason::Internal | CloseReason::Gone => {
            Some(1000)
        }
        CloseReason::Flood => Some(5000),
        CloseReason::Kicked if text.is_some_and(|t| t.contains("reconnect")) => Some(1000),
        _ => None,
    }
}
