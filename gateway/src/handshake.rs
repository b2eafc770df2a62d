//! Handshake: route the HTTP request (`/ws`, `/sse`, `/poll`, `/command`, the demo
//! page), and for `/ws` decide before the upgrade (drain, connection cap, upgrade
//! headers, Origin, token), then upgrade.
//! One mapping from [`HandshakeError`] to an HTTP status.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use base64::Engine;
use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use sha1::{Digest, Sha1};
use tokio::net::TcpStream;

use crate::auth::{AuthError, Identity, valid_anonymous_name};
use crate::demo;
use crate::metrics as m;
use crate::server::{Conn, NoSlot, Server, SessionSlot};
use crate::session::{self, Mode};
use crate::transport::{self, http::Body};

/// Subprotocol a browser offers alongside `bearer.<jwt>`.
pub const SUBPROTOCOL: &str = "switchboard.v1";
const BEARER_PROTOCOL_PREFIX: &str = "bearer.";
const WS_GUID: &str = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";

/// Why an upgrade was refused.
#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    #[error("bad request: {0}")]
    BadRequest(&'static str),
    #[error("unauthorized: {0}")]
    Unauthorized(#[from] AuthError),
    #[error("forbidden: origin not allowed")]
    Origin,
    #[error("connection limit reached")]
    Full,
    #[error("too many connections from this address")]
    PerIp,
    #[error("too many connections for this user on this node")]
    PerUser,
    #[error("server is over its memory budget")]
    Memory,
    #[error("server is draining")]
    Draining,
}

impl HandshakeError {
    fn status(&self) -> StatusCode {
        match self {
            Self::BadRequest(_) => StatusCode::BAD_REQUEST,
            Self::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            Self::Origin => StatusCode::FORBIDDEN,
            Self::Full | Self::Draining | Self::Memory => StatusCode::SERVICE_UNAVAILABLE,
            Self::PerIp | Self::PerUser => StatusCode::TOO_MANY_REQUESTS,
        }
    }

    fn label(&self) -> &'static str {
        match self {
            Self::BadRequest(_) => "bad_request",
            Self::Unauthorized(e) => e.label(),
            Self::Origin => "origin",
            Self::Full => "full",
            Self::PerIp => "per_ip",
            Self::PerUser => "per_user",
            Self::Memory => "memory",
            Self::Draining => "draining",
        }
    }

    pub(crate) fn into_response(self) -> Response<Full<Bytes>> {
        metrics::counter!(m::HANDSHAKE_REJECTED, "reason" => self.label()).increment(1);
        let mut resp = text(self.status(), format!("{self}\n"));
        if matches!(self, Self::Full | Self::Draining | Self::PerIp | Self::PerUser | Self::Memory) {
            let secs = rand::random_range(1..=5u32);
            resp.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        resp
    }
}

fn text(status: StatusCode, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(body.into()));
    *resp.status_mut() = status;
    resp.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
    resp
}

/// Serves one HTTP request on the client port.
pub async fn handle(
    server: Arc<Server>,
    req: Request<Incoming>,
    peer: std::net::IpAddr,
    conn: &Arc<Conn>,
) -> Response<Body> {
    let boxed = |r: Response<Full<Bytes>>| r.map(|b| b.boxed_unsync());
    match (req.method(), req.uri().path()) {
        (&Method::GET, "/ws") => {
            boxed(upgrade(server, req, peer, Mode::Protocol).unwrap_or_else(HandshakeError::into_response))
        }
        (&Method::GET, "/echo") if server.echo_route => {
            boxed(upgrade(server, req, peer, Mode::Echo).unwrap_or_else(HandshakeError::into_response))
        }
        (&Method::OPTIONS, "/sse" | "/poll" | "/command") => transport::http::preflight(&server, &req),
        (&Method::GET, "/sse") => {
            let cors = transport::http::Cors::of(&server, &req);
            cors.apply(transport::sse::open(server, req, peer, conn))
        }
        (&Method::GET | &Method::POST, "/poll") => {
            let cors = transport::http::Cors::of(&server, &req);
            cors.apply(transport::poll::poll(server, req, peer, conn).await)
        }
        (&Method::POST, "/command") => {
            let cors = transport::http::Cors::of(&server, &req);
            cors.apply(transport::http::command(server, req).await)
        }
        (&Method::GET, path) => boxed(demo::asset(path).map_or_else(
            || text(StatusCode::NOT_FOUND, "not found\n"),
            |(ct, body)| {
                let mut resp = Response::new(Full::new(Bytes::from_static(body)));
                resp.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static(ct));
                resp.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
                resp
            },
        )),
        _ => boxed(text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n")),
    }
}

/// RFC 6455 §4.2.1: the key is the base64 encoding of a 16-byte value (24 characters).
fn valid_key(key: &[u8]) -> bool {
    let mut out = [0u8; 18];
    key.len() == 24 && matches!(base64::engine::general_purpose::STANDARD.decode_slice(key, &mut out), Ok(16))
}

fn header_has_token(req: &Request<Incoming>, name: header::HeaderName, token: &str) -> bool {
    req.headers()
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case(token))
}

fn query_param<'a>(req: &'a Request<Incoming>, key: &str) -> Option<std::borrow::Cow<'a, str>> {
    let query = req.uri().query()?;
    query.split('&').find_map(|kv| {
        let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
        (k == key).then(|| percent_decode(v))
    })
}

/// A query or form value, percent-decoded (`+` is a space).
pub(crate) fn percent_decode(s: &str) -> std::borrow::Cow<'_, str> {
    kit::percent_decode(s, true)
}

/// The token of a plain HTTP request (SSE, long-poll, commands): `Authorization:
/// Bearer`, then the `switchboard_token` cookie, then `?token=`.
pub(crate) fn http_token(req: &Request<Incoming>) -> (Option<String>, bool) {
    let bearer = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|a| a.strip_prefix("Bearer ").or_else(|| a.strip_prefix("bearer ")));
    if let Some(t) = bearer {
        return (Some(t.trim().to_owned()), false);
    }
    let cookie = req
        .headers()
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .find_map(|c| c.trim().strip_prefix("switchboard_token="));
    if let Some(t) = cookie {
        return (Some(t.to_owned()), true);
    }
    (query_param(req, "token").map(|t| t.into_owned()), false)
}

/// The token, the subprotocol to answer with, from header, subprotocol or query.
fn find_token(req: &Request<Incoming>) -> (Option<String>, bool) {
    let bearer = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|a| a.strip_prefix("Bearer ").or_else(|| a.strip_prefix("bearer ")));
    if let Some(t) = bearer {
        return (Some(t.trim().to_owned()), false);
    }
    let protocols: Vec<&str> = req
        .headers()
        .get_all(header::SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .collect();
    let offers_ours = protocols.contains(&SUBPROTOCOL);
    if let Some(t) = protocols.iter().find_map(|p| p.strip_prefix(BEARER_PROTOCOL_PREFIX)) {
        return (Some(t.to_owned()), offers_ours);
    }
    (query_param(req, "token").map(|t| t.into_owned()), offers_ours)
}

/// The identity a request proves; `None`: no token at all, so the session must send
/// `connect` first (unless the gateway is anonymous). A token present but invalid is a 401.
pub(crate) fn authenticate(
    server: &Server,
    req: &Request<Incoming>,
    token: Option<String>,
) -> Result<Option<Identity>, HandshakeError> {
    match token {
        Some(t) => Ok(Some(server.verifier.verify(&t)?)),
        None if server.anonymous => {
            let user = match query_param(req, "user") {
                Some(name) if valid_anonymous_name(&name) => name.into_owned(),
                Some(_) => return Err(HandshakeError::BadRequest("invalid user name")),
                None => format!("anon-{:08x}", rand::random::<u32>()),
            };
            Ok(Some(Identity { user: user.into(), channels: None, expires_at: None }))
        }
        None => Ok(None),
    }
}

/// The client's `User-Agent`, at most 128 bytes (presence shows it).
pub(crate) fn client_info(req: &Request<Incoming>) -> Arc<str> {
    req.headers()
        .get(header::USER_AGENT)
        .and_then(|v| v.to_str().ok())
        .map_or("", |ua| {
            let mut end = ua.len().min(128);
            while !ua.is_char_boundary(end) {
                end -= 1;
            }
            &ua[..end]
        })
        .into()
}

fn upgrade(
    server: Arc<Server>,
    mut req: Request<Incoming>,
    peer: std::net::IpAddr,
    mode: Mode,
) -> Result<Response<Full<Bytes>>, HandshakeError> {
    if server.draining.is_cancelled() {
        return Err(HandshakeError::Draining);
    }
    if server.node.admission.shedding() {
        crate::admission::Admission::shed("websocket");
        return Err(HandshakeError::Memory);
    }
    let slot = server.try_reserve_session(peer).map_err(|e| match e {
        NoSlot::Full => HandshakeError::Full,
        NoSlot::PerIp => HandshakeError::PerIp,
    })?;
    if !header_has_token(&req, header::UPGRADE, "websocket") || !header_has_token(&req, header::CONNECTION, "upgrade") {
        return Err(HandshakeError::BadRequest("not a websocket upgrade"));
    }
    if req.version() < http::Version::HTTP_11 {
        return Err(HandshakeError::BadRequest("a WebSocket upgrade needs HTTP/1.1"));
    }
    if req.headers().get(header::SEC_WEBSOCKET_VERSION).map(HeaderValue::as_bytes) != Some(b"13") {
        return Err(HandshakeError::BadRequest("Sec-WebSocket-Version must be 13"));
    }
    let key =
        req.headers().get(header::SEC_WEBSOCKET_KEY).ok_or(HandshakeError::BadRequest("missing Sec-WebSocket-Key"))?;
    if !valid_key(key.as_bytes()) {
        return Err(HandshakeError::BadRequest("Sec-WebSocket-Key must be the base64 encoding of 16 bytes"));
    }
    let accept = {
        let mut sha = Sha1::new();
        sha.update(key.as_bytes());
        sha.update(WS_GUID.as_bytes());
        base64::engine::general_purpose::STANDARD.encode(sha.finalize())
    };
    if !server.allowed_origins.is_empty() {
        let origin = req.headers().get(header::ORIGIN).and_then(|v| v.to_str().ok());
        if !origin.is_some_and(|o| server.allowed_origins.iter().any(|a| a == o)) {
            return Err(HandshakeError::Origin);
        }
    }
    let (identity, answer_protocol) = match mode {
        Mode::Echo => (Some(Identity { user: "echo".into(), channels: None, expires_at: None }), false),
        Mode::Protocol => {
            let (token, offers_ours) = find_token(&req);
            (authenticate(&server, &req, token)?, offers_ours)
        }
    };
    // The user is known now (a token-less upgrade's at its `connect`); echo sessions are
    // not counted.
    let user_slot = match &identity {
        Some(id) if mode == Mode::Protocol => {
            Some(server.node.admission.try_user_slot(id).ok_or(HandshakeError::PerUser)?)
        }
        _ => None,
    };

    let client_info = client_info(&req);
    // RFC 7692: the first offer we can honour, or none (answered without the extension).
    // (The answer is ASCII, always a valid header value.)
    let deflate = if server.node.config.permessage_deflate {
        crate::deflate::negotiate(
            req.headers().get_all(header::SEC_WEBSOCKET_EXTENSIONS).iter().filter_map(|v| v.to_str().ok()),
        )
        .and_then(|d| Some((HeaderValue::from_str(&d.response).ok()?, d.window_bits)))
    } else {
        None
    };
    let on_upgrade = hyper::upgrade::on(&mut req);
    let conn_id = server.next_conn_id.fetch_add(1, Ordering::Relaxed);
    let tracker = server.tracker.clone();
    // Unwrapped here, not in the session: both forms would be kept in every session's future.
    let awaiting_connect = identity.is_none();
    let identity = identity.unwrap_or_else(session::nobody);
    let window = deflate.as_ref().map_or(0, |(_, bits)| *bits);
    tracker.spawn(start_session(
        server,
        on_upgrade,
        identity,
        awaiting_connect,
        conn_id,
        client_info,
        (slot, user_slot),
        (mode, window),
    ));

    let mut resp = Response::new(Full::new(Bytes::new()));
    *resp.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let h = resp.headers_mut();
    h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    h.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
    // The accept value is base64: always a valid header value.
    h.insert(header::SEC_WEBSOCKET_ACCEPT, HeaderValue::from_str(&accept).unwrap_or(HeaderValue::from_static("")));
    if answer_protocol {
        h.insert(header::SEC_WEBSOCKET_PROTOCOL, HeaderValue::from_static(SUBPROTOCOL));
    }
    if let Some((answer, _)) = deflate {
        metrics::counter!(m::DEFLATE_SESSIONS).increment(1);
        h.insert(header::SEC_WEBSOCKET_EXTENSIONS, answer);
    }
    Ok(resp)
}

#[allow(clippy::too_many_arguments)]
async fn start_session(
    server: Arc<Server>,
    on_upgrade: hyper::upgrade::OnUpgrade,
    identity: Identity,
    awaiting_connect: bool,
    conn_id: u64,
    client_info: Arc<str>,
    (slot, user_slot): (SessionSlot, Option<crate::admission::UserSlot>),
    (mode, deflate): (Mode, u8),
) {
    let upgraded = match on_upgrade.await {
        Ok(u) => u,
        Err(e) => {
            tracing::debug!(error = %e, "upgrade failed");
            return;
        }
    };
    let parts = match upgraded.downcast::<TokioIo<TcpStream>>() {
        Ok(p) => p,
        Err(_) => {
            tracing::error!("upgraded connection is not a TCP stream");
            return;
        }
    };
    let stream = parts.io.into_inner();
    // `read_buf` is a view into hyper's whole read buffer: copy the few bytes
    // (usually none) so that buffer is freed now rather than held per session.
    let leftover = Bytes::copy_from_slice(&parts.read_buf);
    drop(parts.read_buf);
    crate::transport::ws::run(
        server.node.clone(),
        identity,
        awaiting_connect,
        conn_id,
        client_info,
        stream,
        leftover,
        mode,
        deflate,
        server.stop_sessions.clone(),
        user_slot,
    )
    .await;
    drop(slot);
}

#[cfg(test)]
mod tests {
    #[test]
    fn websocket_keys() {
        assert!(super::valid_key(b"dGhlIHNhbXBsZSBub25jZQ=="));
        for bad in
            [&b""[..], b"abc", b"!!!!!!!!!!!!!!!!!!!!!!==", b"AAAAAAAAAAAAAAAAAAAA", b"AAAAAAAAAAAAAAAAAAAAAAAAAAAA"]
        {
            assert!(!super::valid_key(bad), "{bad:?}");
        }
        // 15 bytes encode to 20 characters, 17 to 24 with one `=`: both refused.
        assert!(!super::valid_key(b"AAAAAAAAAAAAAAAAAAAAAAA="));
        assert!(!super::valid_key(&[b'A'; 16 * 1024]));
    }
}
