//! Test harness: a real gateway on 127.0.0.1:0 (in-process, or as the built
//! binary), driven by tokio-tungstenite clients (not our framing code).
#![allow(dead_code, unreachable_pub)]

use std::net::SocketAddr;
use std::sync::OnceLock;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use clap::Parser;
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
use tokio_util::sync::CancellationToken;

pub type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

pub const SECRET: &str = "test-secret-0123456789";
/// Upper bound for anything a test waits on.
pub const WAIT: Duration = Duration::from_secs(10);

fn metrics_handle() -> metrics_exporter_prometheus::PrometheusHandle {
    static HANDLE: OnceLock<metrics_exporter_prometheus::PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| kit::telemetry::init_metrics(gateway::metrics::BUCKETS).expect("recorder"))
        .clone()
}

/// A gateway running inside the test process; dropping it shuts it down.
pub struct Gateway {
    pub client: SocketAddr,
    pub grpc: SocketAddr,
    pub admin: SocketAddr,
    pub shutdown: CancellationToken,
    pub task: Option<tokio::task::JoinHandle<()>>,
}

impl Gateway {
    /// Starts a gateway with the HS256 secret, fast heartbeats and these extra flags.
    pub async fn start(extra: &[&str]) -> Self {
        let mut args = vec![
            "gateway",
            "--jwt-hs256-secret",
            SECRET,
            "--heartbeat-interval",
            "300ms",
            "--heartbeat-timeout",
            "300ms",
            "--node-id",
            "gw-test",
        ];
        args.extend_from_slice(extra);
        let cli = gateway::config::Cli::try_parse_from(args).expect("valid test flags");
        let settings = gateway::Settings::from_cli(&cli).expect("valid settings");
        let listeners = gateway::Listeners::bind(
            "127.0.0.1:0".parse().unwrap(),
            false,
            "127.0.0.1:0".parse().unwrap(),
            "127.0.0.1:0".parse().unwrap(),
        )
        .await
        .expect("bind");
        let client = listeners.client.local_addr().unwrap();
        let grpc = listeners.grpc.local_addr().unwrap();
        let admin = listeners.admin.local_addr().unwrap();
        let shutdown = CancellationToken::new();
        let stop = shutdown.clone();
        let metrics = Some(metrics_handle());
        let task = tokio::spawn(async move {
            gateway::run(settings, listeners, metrics, stop)
                .await
                .expect("gateway run");
        });
        Self {
            client,
            grpc,
            admin,
            shutdown,
            task: Some(task),
        }
    }

    pub fn url(&self, query: &str) -> String {
        format!("ws://{}/ws{query}", self.client)
    }

    /// Connects as `user` with a valid token (Authorization header) and reads the welcome.
    pub async fn ws(&self, user: &str) -> (Ws, Value) {
        let token = token(json!({"sub": user, "exp": now() + 3600}));
        let mut ws = self.ws_with_header(&token).await.expect("connect");
        let welcome = recv_json(&mut ws).await;
        assert_eq!(welcome["type"], "welcome", "{welcome}");
        (ws, welcome)
    }

    pub async fn ws_with_header(&self, token: &str) -> Result<Ws, tungstenite::Error> {
        let mut req = self.url("").into_client_request().unwrap();
        req.headers_mut()
            .insert("authorization", format!("Bearer {token}").parse().unwrap());
        tokio_tungstenite::connect_async(req)
            .await
            .map(|(ws, _)| ws)
    }

    /// GET on the admin port; returns (status, body).
    pub async fn admin_get(&self, path: &str) -> (u16, String) {
        http_get(self.admin, path).await
    }

    /// Drains the gateway and waits for `run` to return.
    pub async fn stop(mut self) {
        self.shutdown.cancel();
        if let Some(t) = self.task.take() {
            tokio::time::timeout(Duration::from_secs(30), t)
                .await
                .expect("gateway stops")
                .expect("no panic");
        }
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

pub fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// An HS256 token signed with [`SECRET`].
pub fn token(claims: Value) -> String {
    let key = jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes()).unwrap();
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &claims,
        &key,
    )
    .unwrap()
}

/// Next text frame as JSON (skips pings); panics after [`WAIT`].
pub async fn recv_json(ws: &mut Ws) -> Value {
    loop {
        match tokio::time::timeout(WAIT, ws.next())
            .await
            .expect("timed out waiting for a frame")
        {
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
    let r = NEXT
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        .to_string();
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
        match tokio::time::timeout(WAIT, ws.next())
            .await
            .expect("timed out waiting for close")
        {
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
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut buf = Vec::new();
    tokio::time::timeout(WAIT, s.read_to_end(&mut buf))
        .await
        .expect("http timeout")
        .unwrap();
    let text = String::from_utf8_lossy(&buf).into_owned();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("status line");
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

/// Value of a counter/gauge line in a Prometheus text page (sum over label sets matching `labels`).
pub fn metric(page: &str, name: &str, labels: &str) -> f64 {
    page.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| {
            l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']) && l.contains(labels)
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Polls `cond` every 20 ms until it holds, or panics after [`WAIT`].
#[macro_export]
macro_rules! eventually {
    ($cond:expr, $($msg:tt)+) => {{
        let deadline = tokio::time::Instant::now() + $crate::common::WAIT;
        loop {
            if $cond {
                break;
            }
            if tokio::time::Instant::now() > deadline {
                panic!($($msg)+);
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    }};
}
