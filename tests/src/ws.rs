//! WebSocket, token, HTTP and metrics helpers for tests.

use std::net::SocketAddr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

pub type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// The HS256 secret test gateways are started with.
pub const SECRET: &str = "test-secret-0123456789";
/// Upper bound for anything a test waits on.
pub const WAIT: Duration = Duration::from_secs(10);

pub fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs()
}

/// An `Authorization` value for `user`: a bearer [`token`] valid for an hour.
pub fn bearer(user: &str) -> String {
    format!("Bearer {}", token(json!({"sub": user, "exp": now() + 3600})))
}

/// An HS256 token signed with [`SECRET`].
pub fn token(claims: Value) -> String {
    let key = jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes()).unwrap();
    jsonwebtoken::encode(&jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256), &claims, &key).unwrap()
}

/// Next text frame as JSON (skips pings); panics after [`WAIT`].
pub async fn recv_json(ws: &mut Ws) -> Value {
    recv_json_within(ws, WAIT).await
}

/// Next text frame as JSON (skips pings); panics after `limit` of silence.
pub async fn recv_json_within(ws: &mut Ws, limit: Duration) -> Value {
    loop {
        match tokio::time::timeout(limit, ws.next()).await.expect("timed out waiting for a frame") {
            Some(Ok(Message::Text(t))) => {
                return serde_json::from_str(&t).expect("server sent JSON");
            }
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
            other => panic!("expected a text frame, got {other:?}"),
        }
    }
}

/// Next JSON frame of `type`, skipping others (e.g. join/leave).
pub async fn recv_type(ws: &mut Ws, kind: &str) -> Value {
    loop {
        let v = recv_json(ws).await;
        if v["type"] == kind {
            return v;
        }
    }
}

pub async fn send_json(ws: &mut Ws, v: Value) {
    ws.send(Message::text(v.to_string())).await.expect("send");
}

/// Sends a command with `ref` and returns the reply carrying that ref.
pub async fn call(ws: &mut Ws, mut cmd: Value) -> Value {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    let r = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed).to_string();
    cmd["ref"] = json!(r);
    send_json(ws, cmd).await;
    loop {
        let v = recv_json(ws).await;
        if v["ref"] == json!(r) {
            return v;
        }
    }
}

/// Reads until the server's close frame and returns it; panics on a plain drop.
pub async fn expect_close(ws: &mut Ws) -> CloseFrame {
    loop {
        match tokio::time::timeout(WAIT, ws.next()).await.expect("timed out waiting for close") {
            Some(Ok(Message::Close(Some(frame)))) => return frame,
            Some(Ok(Message::Close(None))) => panic!("close frame without a code"),
            Some(Ok(_)) => continue,
            other => panic!("connection ended without a close frame: {other:?}"),
        }
    }
}

/// Minimal HTTP/1.1 GET over a raw socket: (status, body).
pub async fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = TcpStream::connect(addr).await.expect("connect");
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    tokio::time::timeout(WAIT, s.read_to_end(&mut buf)).await.expect("http timeout").unwrap();
    let text = String::from_utf8_lossy(&buf).into_owned();
    let status = text.split(' ').nth(1).and_then(|s| s.parse().ok()).expect("status line");
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_owned()).unwrap_or_default();
    (status, body)
}

/// Value of a counter/gauge line in a Prometheus text page (sum over label sets matching `labels`).
pub fn metric(page: &str, name: &str, labels: &str) -> f64 {
    page.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']) && l.contains(labels))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Connects to `ws://addr/ws` as `user` with a valid token and returns the session and its welcome.
pub async fn connect(addr: SocketAddr, user: &str) -> (Ws, Value) {
    let t = token(json!({"sub": user, "exp": now() + 3600}));
    let (mut ws, _) = tokio_tungstenite::connect_async(format!("ws://{addr}/ws?token={t}"))
        .await
        .unwrap_or_else(|e| panic!("connect {addr} as {user}: {e}"));
    let welcome = recv_json(&mut ws).await;
    assert_eq!(welcome["type"], "welcome", "{welcome}");
    (ws, welcome)
}

/// A client frame exactly as written on the wire: `first` is the FIN/RSV/opcode byte, the
/// payload is masked with `mask` (for raw-socket tests and the load tool, which send
/// frames no WebSocket library would, or cheaper than one would).
pub fn masked_frame(first: u8, payload: &[u8], mask: [u8; 4]) -> Vec<u8> {
    let mut f = Vec::with_capacity(payload.len() + 14);
    f.push(first);
    match payload.len() {
        n if n < 126 => f.push(0x80 | n as u8),
        n if n < 65536 => {
            f.push(0x80 | 126);
            f.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            f.push(0x80 | 127);
            f.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    f.extend_from_slice(&mask);
    f.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    f
}
