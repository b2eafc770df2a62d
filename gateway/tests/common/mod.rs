//! Test harness: a real gateway on 127.0.0.1:0 (in-process, or as the built
//! binary), driven by tokio-tungstenite clients (not our framing code).
#![allow(dead_code, unreachable_pub)]

use std::net::SocketAddr;
use std::sync::OnceLock;
use std::time::Duration;

use clap::Parser;
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_util::sync::CancellationToken;

pub mod tls;

#[allow(unused_imports)]
pub use switchboard_tests::eventually;
pub use switchboard_tests::ws::*;

fn metrics_handle() -> metrics_exporter_prometheus::PrometheusHandle {
    static HANDLE: OnceLock<metrics_exporter_prometheus::PrometheusHandle> = OnceLock::new();
    HANDLE.get_or_init(|| kit::telemetry::init_metrics(gateway::metrics::BUCKETS).expect("recorder")).clone()
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
            gateway::run(settings, listeners, metrics, stop).await.expect("gateway run");
        });
        Self { client, grpc, admin, shutdown, task: Some(task) }
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
        req.headers_mut().insert("authorization", format!("Bearer {token}").parse().unwrap());
        tokio_tungstenite::connect_async(req).await.map(|(ws, _)| ws)
    }

    /// GET on the admin port; returns (status, body).
    pub async fn admin_get(&self, path: &str) -> (u16, String) {
        http_get(self.admin, path).await
    }

    /// Drains the gateway and waits for `run` to return.
    pub async fn stop(mut self) {
        self.shutdown.cancel();
        if let Some(t) = self.task.take() {
            tokio::time::timeout(Duration::from_secs(30), t).await.expect("gateway stops").expect("no panic");
        }
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// Upgrades a raw TCP stream by hand, for frames no WebSocket library will send.
pub async fn raw_session(gw: &Gateway) -> tokio::net::TcpStream {
    let (s, head) = raw_upgrade(gw, "raw", 60, &[]).await;
    assert!(head.contains("s3pPLMBiTxaQ9kYGzzhZRbK+xOo="), "RFC 6455 sample accept key: {head}");
    s
}

/// Upgrades a raw TCP stream as `user` (a token valid for `secs`), with these extra
/// request header lines; returns the stream and the 101 response's head.
pub async fn raw_upgrade(gw: &Gateway, user: &str, secs: u64, headers: &[String]) -> (tokio::net::TcpStream, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let t = token(json!({"sub": user, "exp": now() + secs}));
    let mut s = tokio::net::TcpStream::connect(gw.client).await.unwrap();
    let mut req = format!(
        "GET /ws?token={t} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
    );
    for h in headers {
        req.push_str(h);
        req.push_str("\r\n");
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        head.push(s.read_u8().await.unwrap());
    }
    let head = String::from_utf8(head).unwrap();
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    (s, head)
}

/// Reads server frames from a raw stream until a close frame; returns its code.
pub async fn raw_close_code(s: &mut tokio::net::TcpStream) -> u16 {
    use tokio::io::AsyncReadExt;
    tokio::time::timeout(WAIT, async {
        loop {
            let mut h = [0u8; 2];
            s.read_exact(&mut h).await.expect("a close frame before EOF");
            let len = match h[1] & 0x7f {
                126 => s.read_u16().await.unwrap() as usize,
                127 => s.read_u64().await.unwrap() as usize,
                n => n as usize,
            };
            let mut p = vec![0u8; len];
            s.read_exact(&mut p).await.unwrap();
            if h[0] & 0x0f == 0x8 {
                return u16::from_be_bytes([p[0], p[1]]);
            }
        }
    })
    .await
    .expect("no close frame")
}
