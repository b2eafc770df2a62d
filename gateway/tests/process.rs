//! The real `gateway` binary: SIGTERM drain, and the demo page in headless Chromium.

mod common;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use serde_json::json;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

/// The gateway binary as a child process; killed on drop.
struct Proc {
    child: Child,
    client: SocketAddr,
    admin: SocketAddr,
}

impl Proc {
    fn start(args: &[&str]) -> Self {
        let mut child = Command::new(env!("CARGO_BIN_EXE_gateway"))
            .args(["--listen", "127.0.0.1:0", "--grpc-addr", "127.0.0.1:0", "--admin-addr", "127.0.0.1:0"])
            .args(args)
            .env("SWITCHBOARD_LOG", "warn")
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn gateway");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).expect("LISTENING line");
        let field = |k: &str| -> SocketAddr {
            line.split_whitespace()
                .find_map(|kv| kv.strip_prefix(k))
                .unwrap_or_else(|| panic!("{k} in {line}"))
                .parse()
                .unwrap()
        };
        Self { client: field("client="), admin: field("admin="), child }
    }

    fn signal(&self, sig: &str) {
        let ok = Command::new("kill").args([sig, &self.child.id().to_string()]).status().unwrap().success();
        assert!(ok, "kill {sig} failed");
    }

    /// Waits for the process to exit, at most `limit`.
    fn wait_exit(&mut self, limit: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(Instant::now() < deadline, "gateway did not exit within {limit:?}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test]
async fn sigterm_drains_at_a_bounded_pace_and_exits() {
    let mut gw = Proc::start(&["--jwt-hs256-secret", SECRET, "--drain-window", "2s", "--drain-grace", "3s"]);
    const N: usize = 40;
    let mut clients = Vec::new();
    for i in 0..N {
        let mut req = format!("ws://{}/ws", gw.client).into_client_request().unwrap();
        let t = token(json!({"sub": format!("u{i}"), "exp": now() + 600}));
        req.headers_mut().insert("authorization", format!("Bearer {t}").parse().unwrap());
        let (mut ws, _) = tokio_tungstenite::connect_async(req).await.unwrap();
        recv_json(&mut ws).await;
        call(&mut ws, json!({"op":"subscribe","channel":"c"})).await;
        clients.push(ws);
    }
    assert_eq!(http_get(gw.admin, "/readyz").await.0, 200);
    let signalled = Instant::now();
    gw.signal("-TERM");

    eventually!(http_get(gw.admin, "/readyz").await.0 == 503, "readiness stayed true while draining");
    // New sessions are refused while draining (503, or the listener is already closed).
    let t = token(json!({"sub": "late", "exp": now() + 600}));
    assert!(tokio_tungstenite::connect_async(format!("ws://{}/ws?token={t}", gw.client)).await.is_err());

    let closes = futures_util::future::join_all(clients.iter_mut().map(|ws| async move {
        let c = expect_close(ws).await;
        (Instant::now(), u16::from(c.code), c.reason.to_string())
    }))
    .await;
    for (_, code, reason) in &closes {
        assert_eq!(*code, 1001);
        let ms: u32 = reason.strip_prefix("drain retry_ms=").expect("retry hint").parse().unwrap();
        assert!((250..2000).contains(&ms));
    }
    let first = closes.iter().map(|c| c.0).min().unwrap();
    let last = closes.iter().map(|c| c.0).max().unwrap();
    assert!(last - first >= Duration::from_millis(700), "closes not spread: {:?}", last - first);
    let status = gw.wait_exit(Duration::from_secs(15));
    assert!(status.success(), "{status:?}");
    assert!(signalled.elapsed() < Duration::from_secs(2 + 3 + 5));
}

/// Several gateway processes on one port (`--reuse-port`, the way past a per-process
/// open-files limit): the kernel spreads sessions over them, and draining one leaves the
/// port served by the others.
#[tokio::test]
async fn gateways_share_a_port_with_reuse_port_and_one_can_drain() {
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let listen = format!("127.0.0.1:{port}");
    let args = ["--jwt-hs256-secret", SECRET, "--listen", &listen, "--reuse-port", "--drain-window", "1s"];
    let mut a = Proc::start(&args);
    let b = Proc::start(&args);
    assert_eq!((a.client, b.client), (listen.parse().unwrap(), listen.parse().unwrap()));
    let active = |admin: SocketAddr| async move {
        metric(&http_get(admin, "/metrics").await.1, "switchboard_gateway_connections_active", "")
    };
    let mut clients = Vec::new();
    for i in 0..64 {
        clients.push(connect(a.client, &format!("u{i}")).await.0);
    }
    let (on_a, on_b) = (active(a.admin).await, active(b.admin).await);
    assert_eq!(on_a + on_b, 64.0);
    assert!(on_a > 0.0 && on_b > 0.0, "the kernel spread nothing: {on_a} / {on_b}");

    // Drain one: it exits cleanly, the other keeps its sessions and takes the new ones.
    a.signal("-TERM");
    assert!(a.wait_exit(Duration::from_secs(15)).success());
    for i in 0..16 {
        clients.push(connect(b.client, &format!("late{i}")).await.0);
    }
    assert_eq!(active(b.admin).await, on_b + 16.0);
}

#[test]
fn bad_config_exits_64_with_one_line() {
    let out = Command::new(env!("CARGO_BIN_EXE_gateway"))
        .args(["--listen", "127.0.0.1:0", "--grpc-addr", "127.0.0.1:0", "--admin-addr", "127.0.0.1:0"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no client authentication configured"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
}

#[tokio::test]
async fn demo_page_in_headless_chromium() {
    let gw = Proc::start(&["--anonymous"]);
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/..");
    let script = format!("{root}/tests/browser/demo.mjs");
    let out = tokio::process::Command::new("node")
        .arg(&script)
        .arg(format!("http://{}/", gw.client))
        .current_dir(root)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(90), out)
        .await
        .expect("browser test hung")
        .expect("node must be installed (the test command installs it with chromium and playwright-core)");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "browser test failed:\n{stdout}\n{stderr}");
    // Chromium offers permessage-deflate: both pages talked compressed (and the test passed).
    let (_, page) = http_get(gw.admin, "/metrics").await;
    assert!(metric(&page, "switchboard_gateway_deflate_sessions_total", "") >= 2.0, "Chromium negotiated deflate");
}

/// The JS client (gateway/static/switchboard.js) in Node against this binary:
/// tests/browser/resume.mjs (resume after a cut connection exactly once and in order, gap
/// events, duplicates, URL lists, getToken, connect-first and refresh).
#[tokio::test]
async fn js_client_node_tests() {
    node_suite(&["tests/browser/resume.mjs"], Duration::from_secs(120)).await;
}

/// Runs `node --test <args>` against this binary from the repository's root; fails with
/// its output unless every test passed within `limit`.
async fn node_suite(args: &[&str], limit: Duration) {
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/..");
    let out = tokio::process::Command::new("node")
        .arg("--test")
        .args(args)
        .env("GATEWAY_BIN", env!("CARGO_BIN_EXE_gateway"))
        .current_dir(root)
        .output();
    let out = tokio::time::timeout(limit, out)
        .await
        .expect("node tests hung")
        .expect("node must be installed (with ws and playwright-core: npm ci)");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "node --test {} failed:\n{stdout}\n{stderr}", args.join(" "));
}

/// The JS client's fallback transports against this binary: tests/browser/fallback.mjs
/// (SSE behind a proxy that refuses or drops upgrades, long-polling behind one that also
/// buffers, each with recovery and a gap after a restart, in Node and in Chromium; back to
/// WebSocket; a restarting gateway is not a blocked network; CORS; Chromium behind a
/// TLS-terminating HTTP/2 proxy).
#[tokio::test]
async fn js_client_fallback_tests() {
    node_suite(&["--test-concurrency=1", "tests/browser/fallback.mjs"], Duration::from_secs(240)).await;
}

/// `--anonymous` with no JWT key: there is no token to refresh, and the session goes on.
#[tokio::test]
async fn a_gateway_without_keys_refuses_refresh() {
    let gw = Proc::start(&["--anonymous"]);
    let (mut ws, _) = tokio_tungstenite::connect_async(format!("ws://{}/ws?user=lu", gw.client)).await.unwrap();
    assert_eq!(recv_json(&mut ws).await["user"], "lu");
    let t = token(json!({"sub": "lu", "exp": now() + 60}));
    let r = call(&mut ws, json!({"op":"refresh","token":t})).await;
    assert_eq!((&r["code"], &r["message"]), (&json!("bad_request"), &json!("this gateway does not use tokens")));
    assert_eq!(call(&mut ws, json!({"op":"ping"})).await["type"], "pong");
}
