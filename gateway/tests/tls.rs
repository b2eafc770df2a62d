//! TLS on the client port: WebSocket, SSE over HTTP/2 (ALPN) and HTTP/1.1, the demo
//! page; the caps and per-address limits see the real client; the TLS handshake's
//! timeout; certificate reload on file change keeps sessions and serves the new pair.

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::tls::*;
use common::*;
use http_body_util::{BodyExt, Empty, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::json;
use tokio::io::AsyncReadExt;

const A_EXPIRES: (i32, u8, u8) = (2040, 1, 1);
const B_EXPIRES: (i32, u8, u8) = (2041, 6, 1);

async fn start(pki: &Pki, extra: &[&str]) -> Gateway {
    let args = pki.args();
    let mut flags: Vec<&str> = args.iter().map(String::as_str).collect();
    flags.extend_from_slice(extra);
    Gateway::start(&flags).await
}

fn with_a(pki: &Pki) -> (String, String) {
    let a = pki.leaf("cert A", A_EXPIRES);
    pki.install(&a.0, &a.1);
    a
}

async fn metrics(gw: &Gateway) -> String {
    gw.admin_get("/metrics").await.1
}

#[tokio::test]
async fn websocket_over_tls_subscribe_publish_receive() {
    let pki = Pki::new();
    with_a(&pki);
    let gw = start(&pki, &[]).await;
    let (mut alice, _) = wss(&pki, gw.client, "alice").await;
    assert_eq!(call_tls(&mut alice, json!({"op":"subscribe","channel":"news"})).await["type"], "ack");
    let (mut bob, _) = wss(&pki, gw.client, "bob").await;
    let ack = call_tls(&mut bob, json!({"op":"publish","channel":"news","data":"over tls"})).await;
    assert_eq!(ack["type"], "ack", "{ack}");
    let m = next_of(&mut alice, "message").await;
    assert_eq!(m["data"], "over tls");
    assert_eq!(m["seq"], ack["seq"]);

    // The demo page and the client library come over TLS too; plain HTTP gets no answer.
    let tls = pki.connect(gw.client, &[b"http/1.1"]).await;
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"http/1.1"[..]));
    let (mut h1, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls)).await.unwrap();
    tokio::spawn(conn);
    for path in ["/", "/switchboard.js"] {
        let req = http::Request::get(path).header("host", "localhost").body(Empty::<Bytes>::new()).unwrap();
        let resp = h1.send_request(req).await.unwrap();
        assert_eq!(resp.status(), 200, "{path}");
        assert!(!resp.into_body().collect().await.unwrap().to_bytes().is_empty(), "{path}");
    }
    let (status, _) = tokio::time::timeout(WAIT, async {
        let mut s = tokio::net::TcpStream::connect(gw.client).await.unwrap();
        tokio::io::AsyncWriteExt::write_all(&mut s, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
        let mut buf = Vec::new();
        let _ = s.read_to_end(&mut buf).await;
        (String::from_utf8_lossy(&buf).into_owned(), ())
    })
    .await
    .expect("a plaintext client is closed");
    assert!(!status.starts_with("HTTP/1.1 200"), "plaintext served on the TLS port: {status}");
}

#[tokio::test]
async fn sse_over_tls_with_http2_by_alpn_and_over_http11() {
    let pki = Pki::new();
    with_a(&pki);
    let gw = start(&pki, &[]).await;
    let auth = format!("Bearer {}", token(json!({"sub": "s", "exp": now() + 3600})));

    // HTTP/2, chosen by ALPN as a browser does: the stream and a command on one connection.
    let tls = pki.connect(gw.client, &[b"h2", b"http/1.1"]).await;
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let (mut h2, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls)).await.unwrap();
    tokio::spawn(conn);
    let req = http::Request::get("https://localhost/sse?channels=c")
        .header("authorization", &auth)
        .body(Full::new(Bytes::new()))
        .unwrap();
    let resp = h2.send_request(req).await.unwrap();
    assert_eq!((resp.status(), resp.version()), (http::StatusCode::OK, http::Version::HTTP_2));
    let mut body = resp.into_body();
    let cmd = |data: &str| json!({"op":"publish","channel":"c","data":data}).to_string();
    let req = http::Request::post("https://localhost/command")
        .header("authorization", &auth)
        .body(Full::new(Bytes::from(cmd("via h2"))))
        .unwrap();
    assert_eq!(h2.send_request(req).await.unwrap().status(), 200);
    let mut text = String::new();
    while !text.contains("via h2") {
        let f = tokio::time::timeout(WAIT, body.frame()).await.expect("an event in time").expect("open").unwrap();
        text.push_str(&String::from_utf8_lossy(&f.into_data().unwrap()));
    }

    // HTTP/1.1 (a client without h2): the same stream, chunked.
    let tls = pki.connect(gw.client, &[b"http/1.1"]).await;
    let (mut h1, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls)).await.unwrap();
    tokio::spawn(conn);
    let req = http::Request::get("/sse?channels=c")
        .header("host", "localhost")
        .header("authorization", &auth)
        .body(Empty::<Bytes>::new())
        .unwrap();
    let resp = h1.send_request(req).await.unwrap();
    assert_eq!((resp.status(), resp.version()), (http::StatusCode::OK, http::Version::HTTP_11));
    let mut body = resp.into_body();
    let mut text = String::new();
    while !text.contains("\"type\":\"ack\"") {
        let f = tokio::time::timeout(WAIT, body.frame()).await.expect("the subscribe ack").expect("open").unwrap();
        text.push_str(&String::from_utf8_lossy(&f.into_data().unwrap()));
    }
    let req = http::Request::post("https://localhost/command")
        .header("authorization", &auth)
        .body(Full::new(Bytes::from(cmd("via h1"))))
        .unwrap();
    assert_eq!(h2.send_request(req).await.unwrap().status(), 200);
    while !text.contains("via h1") {
        let f = tokio::time::timeout(WAIT, body.frame()).await.expect("an event in time").expect("open").unwrap();
        text.push_str(&String::from_utf8_lossy(&f.into_data().unwrap()));
    }
}

#[tokio::test]
async fn limits_see_the_real_client_address_and_a_full_node_answers_503() {
    let pki = Pki::new();
    with_a(&pki);
    let gw = start(&pki, &["--max-connections-per-ip", "1", "--max-connections", "2"]).await;
    let (_first, _) = wss(&pki, gw.client, "a").await;
    // Every TLS connection reaches the handler over 127.0.0.1; the cap counts the client's
    // own address: a second session from 127.0.0.1 is refused, one from 127.0.0.2 is not.
    assert_eq!(wss_from(&pki, [127, 0, 0, 1].into(), gw.client, "b").await.err(), Some(429));
    let (_other, _) = wss_from(&pki, [127, 0, 0, 2].into(), gw.client, "c").await.expect("another address");
    // The node's cap (2): refused as a plain client is, 503.
    assert_eq!(wss_from(&pki, [127, 0, 0, 3].into(), gw.client, "d").await.err(), Some(503));
    let page = metrics(&gw).await;
    assert_eq!(metric(&page, "switchboard_gateway_handshake_rejected_total", "reason=\"per_ip\""), 1.0);
    assert_eq!(metric(&page, "switchboard_gateway_handshake_rejected_total", "reason=\"full\""), 1.0);
}

#[tokio::test]
async fn a_silent_tls_client_is_closed_at_the_handshake_timeout() {
    let pki = Pki::new();
    with_a(&pki);
    let gw = start(&pki, &["--handshake-timeout", "300ms"]).await;
    let started = tokio::time::Instant::now();
    let mut s = tokio::net::TcpStream::connect(gw.client).await.unwrap();
    // Half a ClientHello record header, then nothing (slowloris on the TLS handshake).
    tokio::io::AsyncWriteExt::write_all(&mut s, &[0x16, 0x03]).await.unwrap();
    let mut buf = [0u8; 64];
    let n = tokio::time::timeout(WAIT, s.read(&mut buf)).await.expect("closed within the bound");
    assert!(matches!(n, Ok(0) | Err(_)), "{n:?}");
    assert!(started.elapsed() >= Duration::from_millis(300));
    let page = metrics(&gw).await;
    assert_eq!(metric(&page, "switchboard_gateway_tls_handshakes_total", "outcome=\"timeout\""), 1.0);
    // Still serving.
    wss(&pki, gw.client, "after").await;
}

#[tokio::test]
async fn a_changed_pair_serves_new_handshakes_and_keeps_sessions_and_a_bad_one_is_refused() {
    let pki = Pki::new();
    let (a, _) = with_a(&pki);
    let gw = start(&pki, &["--tls-reload-interval", "100ms"]).await;
    let expiry = |page: &str| metric(page, "switchboard_gateway_tls_cert_expiry_timestamp_seconds", "");
    assert_eq!(expiry(&metrics(&gw).await), 2_208_988_800.0, "2040-01-01: A's notAfter");
    assert_eq!(peer_leaf(&pki.connect(gw.client, &[b"http/1.1"]).await), der(&a));
    let (mut old, _) = wss(&pki, gw.client, "old").await;
    assert_eq!(call_tls(&mut old, json!({"op":"subscribe","channel":"news"})).await["type"], "ack");

    let (b, b_key) = pki.leaf("cert B", B_EXPIRES);
    pki.install(&b, &b_key);
    eventually!(peer_leaf(&pki.connect(gw.client, &[b"http/1.1"]).await) == der(&b), "new handshakes get B");
    let page = metrics(&gw).await;
    assert_eq!(expiry(&page), 2_253_657_600.0, "2041-06-01: B's notAfter");
    assert_eq!(metric(&page, "switchboard_gateway_tls_cert_reloads_total", "outcome=\"loaded\""), 1.0);
    // The session made with A still receives, from one made with B.
    let (mut new, _) = wss(&pki, gw.client, "new").await;
    let ack = call_tls(&mut new, json!({"op":"publish","channel":"news","data":"after reload"})).await;
    assert_eq!(ack["type"], "ack");
    assert_eq!(next_of(&mut old, "message").await["data"], "after reload");

    // A broken certificate file: refused (counted), B stays, sessions go on.
    pki.install("-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n", &b_key);
    eventually!(
        metric(&metrics(&gw).await, "switchboard_gateway_tls_cert_reloads_total", "outcome=\"failed\"") == 1.0,
        "the bad pair is reported"
    );
    assert_eq!(peer_leaf(&pki.connect(gw.client, &[b"http/1.1"]).await), der(&b));
    assert_eq!(expiry(&metrics(&gw).await), 2_253_657_600.0);
    let ack = call_tls(&mut new, json!({"op":"publish","channel":"news","data":"still here"})).await;
    assert_eq!(ack["type"], "ack");
    assert_eq!(next_of(&mut old, "message").await["data"], "still here");
}
