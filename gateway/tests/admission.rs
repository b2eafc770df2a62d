//! Admission beyond the node cap, at the defaults: sessions per user (every transport
//! counted, the newest refused, the others untouched), the per-user subscription budget
//! (given back by unsubscribes, revocations and session ends), and the memory budget
//! pushed past for real on the gateway binary (new work shed, established sessions
//! served, admission back once the pressure is gone).

mod common;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::*;
use futures_util::StreamExt;
use serde_json::{Value, json};
use switchboard_tests::http::{Sse, request};
use tokio_tungstenite::tungstenite::{self, Message};

/// A WebSocket upgrade as `user` that must be refused: its status and `Retry-After`.
async fn refused_upgrade(addr: SocketAddr, user: &str) -> (u16, Option<String>) {
    let t = token(json!({"sub": user, "exp": now() + 3600}));
    match tokio_tungstenite::connect_async(format!("ws://{addr}/ws?token={t}")).await {
        Err(tungstenite::Error::Http(resp)) => {
            (resp.status().as_u16(), resp.headers().get("retry-after").and_then(|v| v.to_str().ok()).map(str::to_owned))
        }
        Ok(_) => panic!("the upgrade was accepted"),
        Err(e) => panic!("the upgrade failed otherwise: {e}"),
    }
}

async fn metrics_page(admin: SocketAddr) -> String {
    http_get(admin, "/metrics").await.1
}

async fn sse(addr: SocketAddr, user: &str, channels: &str) -> Result<Sse, switchboard_tests::http::Reply> {
    let auth = bearer(user);
    Sse::open(addr, &format!("/sse?channels={channels}"), &[("Authorization", auth.as_str())]).await
}

async fn poll(addr: SocketAddr, user: &str, query: &str) -> switchboard_tests::http::Reply {
    let auth = bearer(user);
    request(addr, "GET", &format!("/poll{query}"), &[("Authorization", &auth)], b"").await
}

/// Idle sessions must outlive the test's other steps: the default heartbeat, not the
/// harness's fast one.
const HEARTBEAT: &[&str] = &["--heartbeat-interval", "25s", "--heartbeat-timeout", "10s"];

#[tokio::test]
async fn the_newest_session_beyond_100_per_user_is_refused_on_every_transport() {
    let gw = Gateway::start(HEARTBEAT).await;
    let before = gw.admin_get("/metrics").await.1;
    let delta = |page: &str, name: &str, labels: &str| metric(page, name, labels) - metric(&before, name, labels);
    // 98 WebSocket sessions, one SSE stream and one waiting poll: 100, the default cap.
    let mut tabs = Vec::new();
    for _ in 0..98 {
        tabs.push(gw.ws("alice").await.0);
    }
    let mut stream = sse(gw.client, "alice", "news").await.expect("stream opens");
    assert_eq!(stream.json().await["type"], "welcome");
    let first = poll(gw.client, "alice", "?channels=news").await;
    assert_eq!(first.status, 200, "{}", first.body);
    let cursor = first.json()["cursor"].as_str().unwrap().to_owned();
    let addr = gw.client;
    let waiting = tokio::spawn(async move {
        poll(addr, "alice", &format!("?channels=news&cursor={}&timeout_ms=20000", urlencode(&cursor))).await
    });
    eventually!(
        metric(&gw.admin_get("/metrics").await.1, "switchboard_gateway_transport_sessions_active", "poll") == 1.0,
        "the poll waits"
    );

    // The 101st, whatever its transport: 429 with Retry-After before any upgrade.
    let (status, retry) = refused_upgrade(gw.client, "alice").await;
    assert_eq!(status, 429);
    assert!(retry.is_some_and(|s| s.parse::<u32>().is_ok_and(|s| s >= 1)), "Retry-After in seconds");
    let refused = sse(gw.client, "alice", "news").await.expect_err("SSE refused");
    assert_eq!(refused.status, 429, "{}", refused.body);
    assert!(refused.header("retry-after").is_some());
    let refused = poll(gw.client, "alice", "?channels=news").await;
    assert_eq!(refused.status, 429, "{}", refused.body);
    assert!(refused.header("retry-after").is_some());
    // A session opened without a token, whose `connect` names alice: close 1013.
    let (mut anon, _) = tokio_tungstenite::connect_async(gw.url("")).await.expect("token-less upgrade");
    let t = token(json!({"sub": "alice", "exp": now() + 3600}));
    send_json(&mut anon, json!({"op":"connect","token":t,"ref":"c"})).await;
    let close = expect_close(&mut anon).await;
    assert_eq!(u16::from(close.code), 1013, "{close:?}");

    // Another user is not affected; none of alice's sessions was disturbed.
    let (mut bob, _) = gw.ws("bob").await;
    assert_eq!(call(&mut bob, json!({"op":"ping"})).await["type"], "pong");
    for ws in &mut tabs {
        assert_eq!(call(ws, json!({"op":"ping"})).await["type"], "pong");
    }
    let reply = publish(&mut bob, "news").await;
    assert_eq!(reply["type"], "ack", "{reply}");
    assert_eq!(stream.until("message").await["channel"], "news", "the stream is served");
    let answered = waiting.await.unwrap();
    assert_eq!(answered.json()["events"][0]["type"], "message", "{}", answered.body);

    let page = gw.admin_get("/metrics").await.1;
    assert_eq!(delta(&page, "switchboard_gateway_handshake_rejected_total", "reason=\"per_user\""), 3.0);
    assert_eq!(delta(&page, "switchboard_gateway_user_limit_refusals_total", "limit=\"connections\""), 4.0);
    // Counted when the session's task ends (after its close handshake).
    eventually!(
        delta(
            &gw.admin_get("/metrics").await.1,
            "switchboard_gateway_connections_closed_total",
            "reason=\"user_limit\""
        ) == 1.0,
        "the 1013 close is counted"
    );

    // The poll ended (99 held): one more is admitted, then the cap holds again.
    tabs.push(gw.ws("alice").await.0);
    assert_eq!(refused_upgrade(gw.client, "alice").await.0, 429);
    // A session that ends gives its place back.
    drop(tabs.pop());
    eventually!(gw.ws_with_header(&token(json!({"sub": "alice", "exp": now() + 3600}))).await.is_ok(), "room again");
}

fn urlencode(s: &str) -> String {
    switchboard_tests::monitoring::url_encode(s)
}

async fn publish(ws: &mut Ws, channel: &str) -> Value {
    call(ws, json!({"op":"publish","channel":channel,"data":{"n":1}})).await
}

async fn subscribe(ws: &mut Ws, channel: &str) -> Value {
    call(ws, json!({"op":"subscribe","channel":channel})).await
}

/// Subscribes `ws` to `n` channels `prefix0..`; every one must be acknowledged.
async fn fill(ws: &mut Ws, prefix: &str, n: usize) {
    for i in 0..n {
        let a = subscribe(ws, &format!("{prefix}{i}")).await;
        assert_eq!(a["type"], "ack", "subscription {i} of {prefix}: {a}");
    }
}

#[tokio::test]
async fn one_user_holds_at_most_1000_subscriptions_on_a_node_and_gets_them_back() {
    let gw = Gateway::start(HEARTBEAT).await;
    // 7 sessions at the per-session limit (128) and 104 more: 1000, the default budget.
    let mut tabs = Vec::new();
    for t in 0..7 {
        let (mut ws, _) = gw.ws("alice").await;
        fill(&mut ws, &format!("t{t}-"), 128).await;
        tabs.push(ws);
    }
    let t = token(json!({"sub": "alice", "exp": now() + 3600}));
    let mut last = gw.ws_with_header(&t).await.unwrap();
    assert_eq!(recv_json(&mut last).await["type"], "welcome");
    fill(&mut last, "last-", 103).await;
    assert_eq!(subscribe(&mut last, "admin:x").await["type"], "ack");

    // The 1001st, on any session: too_many_subscriptions, and nothing else changes.
    let over = subscribe(&mut last, "one-more").await;
    assert_eq!(
        (over["type"].as_str(), over["code"].as_str()),
        (Some("error"), Some("too_many_subscriptions")),
        "{over}"
    );
    assert!(over["message"].as_str().unwrap().contains("this user"), "{over}");
    let (mut another, _) = gw.ws("alice").await;
    let over = subscribe(&mut another, "one-more").await;
    assert_eq!(over["code"], "too_many_subscriptions", "{over}");
    assert!(over["message"].as_str().unwrap().contains("this user"), "a session with none: {over}");
    drop(another);
    // The same channel again is no new subscription: still an ack.
    assert_eq!(subscribe(&mut last, "last-0").await["type"], "ack");
    // Over SSE and long-poll too (their channels come out of the same budget).
    let refused = sse(gw.client, "alice", "one-more").await.expect_err("stream refused");
    assert_eq!((refused.status, refused.json()["code"].as_str()), (409, Some("too_many_subscriptions")));
    let refused = poll(gw.client, "alice", "?channels=one-more").await;
    assert_eq!((refused.status, refused.json()["code"].as_str()), (409, Some("too_many_subscriptions")));
    // Another user has a budget of their own; alice's sessions are still subscribed.
    let (mut bob, _) = gw.ws("bob").await;
    assert_eq!(subscribe(&mut bob, "one-more").await["type"], "ack");
    assert_eq!(publish(&mut bob, "t0-5").await["type"], "ack");
    assert_eq!(recv_type(&mut tabs[0], "message").await["channel"], "t0-5");

    // An unsubscribe gives one back.
    assert_eq!(call(&mut last, json!({"op":"unsubscribe","channel":"last-0"})).await["type"], "ack");
    assert_eq!(subscribe(&mut last, "one-more").await["type"], "ack");
    assert_eq!(subscribe(&mut last, "two-more").await["code"], "too_many_subscriptions");
    // A refresh that revokes a subscription gives it back.
    let narrow = token(json!({"sub": "alice", "exp": now() + 3600, "channels": ["t*", "last-*", "one-*", "two-*"]}));
    let ack = call(&mut last, json!({"op":"refresh","token":narrow})).await;
    assert_eq!(ack["revoked"], json!(["admin:x"]), "{ack}");
    assert_eq!(subscribe(&mut last, "two-more").await["type"], "ack");
    assert_eq!(subscribe(&mut last, "three-more").await["code"], "too_many_subscriptions");

    // A session that ends gives back all it held (128): a stream takes 100 of them, a
    // poll then fits 28 channels, not 29.
    drop(tabs.pop());
    let mut stream = eventually_stream(&gw, "s", 100).await;
    assert_eq!(stream.json().await["type"], "welcome");
    let refused = poll(gw.client, "alice", &format!("?channels={}", channels("p", 29))).await;
    assert_eq!((refused.status, refused.json()["code"].as_str()), (409, Some("too_many_subscriptions")));
    let polled = poll(gw.client, "alice", &format!("?channels={}", channels("p", 28))).await;
    assert_eq!(polled.status, 200, "{}", polled.body);
    // The answered poll holds nothing any more; the stream still holds its 100: 28 free.
    let (mut another, _) = gw.ws("alice").await;
    fill(&mut another, "q", 28).await;
    assert_eq!(subscribe(&mut another, "q28").await["code"], "too_many_subscriptions");
    drop(stream);

    // Every session gone (bob's one subscription is all the node holds): nothing is left
    // of alice's (no leak), her whole budget is back, exactly.
    drop((tabs, last, another));
    // A stream's closed connection is noticed when the gateway writes to it: bob's
    // publishes to one of its channels (a few, within his rate) make it write.
    let deadline = tokio::time::Instant::now() + WAIT;
    while metric(&gw.admin_get("/metrics").await.1, "switchboard_gateway_subscriptions_active", "") != 1.0 {
        assert!(tokio::time::Instant::now() < deadline, "every session of alice ends");
        assert_eq!(publish(&mut bob, "s0").await["type"], "ack");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut again = Vec::new();
    for t in 0..7 {
        let (mut ws, _) = gw.ws("alice").await;
        fill(&mut ws, &format!("again{t}-"), 128).await;
        again.push(ws);
    }
    let (mut fresh, _) = gw.ws("alice").await;
    fill(&mut fresh, "fresh-", 104).await;
    assert_eq!(subscribe(&mut fresh, "over").await["code"], "too_many_subscriptions");
}

fn channels(prefix: &str, n: usize) -> String {
    (0..n).map(|i| format!("{prefix}{i}")).collect::<Vec<_>>().join(",")
}

/// An SSE stream of alice's with `n` channels, once her budget has room for them.
async fn eventually_stream(gw: &Gateway, prefix: &str, n: usize) -> Sse {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        match sse(gw.client, "alice", &channels(prefix, n)).await {
            Ok(s) => return s,
            Err(r) if r.status == 409 && tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(r) => panic!("stream refused: {} {}", r.status, r.body),
        }
    }
}

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
            .args(["--jwt-hs256-secret", SECRET])
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
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A session whose client reads nothing: a socket with a small receive buffer, so that
/// what the gateway sends piles up in its queue rather than in the kernel.
async fn slow_reader(addr: SocketAddr, user: &str, channel: &str) -> Ws {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let tcp = socket.connect(addr).await.unwrap();
    let t = token(json!({"sub": user, "exp": now() + 3600}));
    let tcp = tokio_tungstenite::MaybeTlsStream::Plain(tcp);
    let (mut ws, _) = tokio_tungstenite::client_async(format!("ws://{addr}/ws?token={t}"), tcp).await.unwrap();
    assert_eq!(recv_json(&mut ws).await["type"], "welcome");
    assert_eq!(call(&mut ws, json!({"op":"subscribe","channel":channel})).await["type"], "ack");
    ws
}

#[tokio::test]
async fn over_the_memory_budget_new_work_is_shed_and_established_sessions_drain() {
    const BUDGET: u64 = 160 << 20;
    const READERS: usize = 20;
    // A 60 KB message: under the default --max-message-bytes, and under glibc's mmap
    // threshold (so frames live in the heap, as chat-sized ones do).
    let payload = "x".repeat(60_000);
    // The history is a cache with its own budget, kept after the readers go: a small one
    // here, so that what grows is the slow readers' queues. Publishing fast needs a bucket
    // larger than the default's.
    let budget = BUDGET.to_string();
    let gw = Proc::start(&[
        "--memory-budget",
        &budget,
        "--history-memory",
        "1048576",
        "--publish-rate",
        "100000",
        "--publish-burst",
        "100000",
    ]);
    let resident = |page: &str| metric(page, "switchboard_gateway_memory_resident_bytes", "");
    eventually!(resident(&metrics_page(gw.admin).await) > 0.0, "resident memory sampled");
    let page = metrics_page(gw.admin).await;
    assert!(resident(&page) < (BUDGET / 2) as f64, "an idle gateway is far below the budget: {}", resident(&page));
    assert_eq!(metric(&page, "switchboard_gateway_memory_budget_bytes", ""), BUDGET as f64);

    let mut readers = Vec::new();
    for i in 0..READERS {
        readers.push(slow_reader(gw.client, &format!("reader{i}"), &format!("load{i}")).await);
    }
    let (mut publisher, _) = connect(gw.client, "publisher").await;
    // Round-robin 60 KB publishes to the readers' channels until the gateway refuses one
    // (at most 250 per reader: 300 MB, and under --send-queue, so no reader is a slow
    // consumer closed 4002: the pressure is what the node holds, not one queue).
    let mut published = [0usize; READERS];
    let refusal = 'load: {
        for round in 0..250 {
            for (i, n) in published.iter_mut().enumerate() {
                let reply =
                    call(&mut publisher, json!({"op":"publish","channel":format!("load{i}"),"data":payload})).await;
                match reply["type"].as_str() {
                    Some("ack") => *n += 1,
                    _ => break 'load reply,
                }
            }
            assert!(round < 249, "never shed: resident {}", resident(&metrics_page(gw.admin).await));
        }
        unreachable!()
    };
    assert_eq!(refusal["code"], "unavailable", "{refusal}");
    assert!(refusal["retry_after_ms"].as_u64().is_some_and(|ms| ms > 0), "{refusal}");
    assert!(refusal.get("ambiguous").is_none(), "nothing was stored: {refusal}");

    // What a user sees meanwhile: new sessions 503 with Retry-After on every transport,
    // commands that add work `unavailable`, commands that do not are served.
    let (status, retry) = refused_upgrade(gw.client, "newcomer").await;
    assert_eq!(status, 503);
    assert!(retry.is_some(), "Retry-After");
    let refused = sse(gw.client, "newcomer", "news").await.expect_err("SSE refused");
    assert_eq!(refused.status, 503);
    assert!(refused.header("retry-after").is_some());
    assert_eq!(poll(gw.client, "newcomer", "?channels=news").await.status, 503);
    let sub = call(&mut publisher, json!({"op":"subscribe","channel":"news"})).await;
    assert_eq!(sub["code"], "unavailable", "{sub}");
    let send = call(&mut publisher, json!({"op":"send","user":"reader0","data":{}})).await;
    assert_eq!(send["code"], "unavailable", "{send}");
    assert_eq!(call(&mut publisher, json!({"op":"ping"})).await["type"], "pong");
    let page = metrics_page(gw.admin).await;
    assert_eq!(metric(&page, "switchboard_gateway_memory_shedding", ""), 1.0);
    assert!(resident(&page) >= (BUDGET as f64) * 0.9, "{}", resident(&page));
    assert_eq!(metric(&page, "switchboard_gateway_memory_shed_total", "kind=\"websocket\""), 1.0);
    assert_eq!(metric(&page, "switchboard_gateway_memory_shed_total", "kind=\"sse\""), 1.0);
    assert_eq!(metric(&page, "switchboard_gateway_memory_shed_total", "kind=\"poll\""), 1.0);
    assert_eq!(metric(&page, "switchboard_gateway_memory_shed_total", "kind=\"command\""), 3.0);
    assert_eq!(metric(&page, "switchboard_gateway_handshake_rejected_total", "reason=\"memory\""), 3.0);
    assert_eq!(metric(&page, "switchboard_gateway_connections_active", ""), (READERS + 1) as f64, "none closed");

    // The established sessions drain: every reader gets every message it was sent, in
    // order; then the gateway admits again.
    for (i, ws) in readers.iter_mut().enumerate() {
        let mut last = 0;
        for k in 0..published[i] {
            let m = loop {
                match tokio::time::timeout(WAIT, ws.next()).await.expect("reader drains").expect("open") {
                    Ok(Message::Text(t)) => break serde_json::from_str::<Value>(&t).unwrap(),
                    Ok(Message::Ping(_) | Message::Pong(_)) => continue,
                    other => panic!("reader {i}, message {k}: {other:?}"),
                }
            };
            assert_eq!(m["type"], "message", "{m}");
            let seq = m["seq"].as_u64().unwrap();
            assert!(seq > last, "in order");
            last = seq;
        }
    }
    drop(readers);
    eventually!(
        metric(&metrics_page(gw.admin).await, "switchboard_gateway_memory_shedding", "") == 0.0,
        "back under the low watermark once the queues drained: resident {}",
        resident(&metrics_page(gw.admin).await)
    );
    let (mut newcomer, _) = connect(gw.client, "newcomer").await;
    assert_eq!(call(&mut newcomer, json!({"op":"subscribe","channel":"news"})).await["type"], "ack");
    assert_eq!(call(&mut publisher, json!({"op":"publish","channel":"news","data":{}})).await["type"], "ack");
    assert_eq!(recv_type(&mut newcomer, "message").await["channel"], "news");
}
