//! Every way a handshake is accepted or refused, before the upgrade.

mod common;

use std::time::Duration;

use common::*;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::{self, http};

/// Connect and expect a refusal: returns (status, body, retry-after).
async fn refused(req: http::Request<()>) -> (u16, String, Option<String>) {
    match tokio_tungstenite::connect_async(req).await {
        Err(tungstenite::Error::Http(resp)) => {
            let body = resp.body().as_ref().map(|b| String::from_utf8_lossy(b).into_owned()).unwrap_or_default();
            let retry = resp.headers().get("retry-after").map(|v| v.to_str().unwrap().to_owned());
            (resp.status().as_u16(), body, retry)
        }
        Err(e) => panic!("expected an HTTP refusal, got {e}"),
        Ok(_) => panic!("expected an HTTP refusal, got an upgrade"),
    }
}

/// A token that is present but invalid is refused before the upgrade. (A request with no
/// token at all is upgraded and must authenticate with `connect`: tests/auth.rs.)
#[tokio::test]
async fn bad_tokens_get_401_with_a_reason() {
    let gw = Gateway::start(&["--jwt-issuer", "iss", "--jwt-audience", "aud"]).await;
    let good = json!({"sub": "a", "exp": now() + 60, "iss": "iss", "aud": "aud"});
    let with = |k: &str, v: serde_json::Value| {
        let mut c = good.clone();
        c[k] = v;
        token(c)
    };
    let without = |keys: &[&str]| {
        let mut c = good.clone();
        for k in keys {
            c.as_object_mut().unwrap().remove(*k);
        }
        token(c)
    };
    let cases = [
        (Some(without(&["iss"])), "missing issuer (iss claim required)"),
        (Some(without(&["aud"])), "missing audience (aud claim required)"),
        (Some(without(&["iss", "aud"])), "missing issuer (iss claim required)"),
        (Some("not.a.jwt".to_owned()), "malformed token"),
        (Some(with("exp", json!(now() - 3600))), "token expired"),
        (Some(with("nbf", json!(now() + 3600))), "token not yet valid"),
        (Some(with("aud", json!("other"))), "wrong audience"),
        (Some(with("iss", json!("other"))), "wrong issuer"),
        (Some("x".repeat(9000)), "token too large"),
        (
            Some(
                jsonwebtoken::encode(
                    &Header::new(Algorithm::HS256),
                    &good,
                    &EncodingKey::from_secret(b"wrong").unwrap(),
                )
                .unwrap(),
            ),
            "bad signature",
        ),
        (
            Some(
                jsonwebtoken::encode(
                    &Header::new(Algorithm::HS512),
                    &good,
                    &EncodingKey::from_secret(SECRET.as_bytes()).unwrap(),
                )
                .unwrap(),
            ),
            "algorithm not allowed",
        ),
    ];
    for (tok, reason) in cases {
        let mut req = gw.url("").into_client_request().unwrap();
        if let Some(t) = tok {
            req.headers_mut().insert("authorization", format!("Bearer {t}").parse().unwrap());
        }
        let (status, body, _) = refused(req).await;
        assert_eq!(status, 401, "{reason}");
        assert_eq!(body.trim(), format!("unauthorized: {reason}"));
    }
    // And the good one passes.
    let (mut ws, welcome) = {
        let mut ws = gw.ws_with_header(&token(good)).await.unwrap();
        let w = recv_json(&mut ws).await;
        (ws, w)
    };
    assert_eq!(welcome["user"], "a");
    assert_eq!(welcome["node"], "gw-test");
    assert_eq!(welcome["heartbeat_ms"], 300);
    assert_eq!(welcome["limits"]["max_message_bytes"], 65536);
    assert!(welcome["expires_at"].as_u64().unwrap() > now());
    ws.close(None).await.unwrap();
}

#[tokio::test]
async fn token_from_subprotocol_or_query_string() {
    let gw = Gateway::start(&[]).await;
    let t = token(json!({"sub": "bob", "exp": now() + 60}));

    let mut req = gw.url("").into_client_request().unwrap();
    req.headers_mut().insert("sec-websocket-protocol", format!("switchboard.v1, bearer.{t}").parse().unwrap());
    let (mut ws, resp) = tokio_tungstenite::connect_async(req).await.expect("subprotocol auth");
    assert_eq!(resp.headers().get("sec-websocket-protocol").unwrap(), "switchboard.v1");
    assert_eq!(recv_json(&mut ws).await["user"], "bob");

    let (mut ws, _) = tokio_tungstenite::connect_async(gw.url(&format!("?token={t}"))).await.expect("query auth");
    assert_eq!(recv_json(&mut ws).await["user"], "bob");
}

fn sign(alg: Algorithm, pem: &[u8], claims: &serde_json::Value) -> String {
    let key = match alg {
        Algorithm::RS256 => EncodingKey::from_rsa_pem(pem).unwrap(),
        _ => EncodingKey::from_ed_pem(pem).unwrap(),
    };
    jsonwebtoken::encode(&Header::new(alg), claims, &key).unwrap()
}

#[tokio::test]
async fn rs256_and_eddsa_keys_from_files() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/keys");
    let rs_pub = format!("{dir}/rs256.pub.pem");
    let ed_pub = format!("{dir}/ed25519.pub.pem");
    let gw = Gateway::start(&["--jwt-rs256-public-key", &rs_pub, "--jwt-eddsa-public-key", &ed_pub]).await;
    let claims = json!({"sub": "carol", "exp": now() + 60});
    let rs = sign(Algorithm::RS256, &std::fs::read(format!("{dir}/rs256.key.pem")).unwrap(), &claims);
    let ed = sign(Algorithm::EdDSA, &std::fs::read(format!("{dir}/ed25519.key.pem")).unwrap(), &claims);
    for t in [rs, ed] {
        let mut ws = gw.ws_with_header(&t).await.expect("asymmetric token accepted");
        assert_eq!(recv_json(&mut ws).await["user"], "carol");
    }
}

#[tokio::test]
async fn anonymous_mode_is_off_unless_configured() {
    // Without --anonymous, `?user=` names nobody: the session must `connect` first.
    let gw = Gateway::start(&[]).await;
    let (mut ws, _) = tokio_tungstenite::connect_async(gw.url("?user=alice")).await.unwrap();
    send_json(&mut ws, json!({"op":"ping"})).await;
    let close = expect_close(&mut ws).await;
    assert_eq!((u16::from(close.code), close.reason.as_str()), (4005, "connect required"));

    let gw = Gateway::start(&["--anonymous"]).await;
    let (mut ws, _) = tokio_tungstenite::connect_async(gw.url("?user=alice")).await.unwrap();
    assert_eq!(recv_json(&mut ws).await["user"], "alice");
    let (status, _, _) = refused(gw.url("?user=bad%20name").into_client_request().unwrap()).await;
    assert_eq!(status, 400);
}

#[tokio::test]
async fn foreign_origin_gets_403() {
    let gw = Gateway::start(&["--allowed-origins", "https://app.example"]).await;
    let t = token(json!({"sub": "a", "exp": now() + 60}));
    let mut req = gw.url(&format!("?token={t}")).into_client_request().unwrap();
    req.headers_mut().insert("origin", "https://evil.example".parse().unwrap());
    let (status, body, _) = refused(req).await;
    assert_eq!((status, body.trim()), (403, "forbidden: origin not allowed"));

    let mut req = gw.url(&format!("?token={t}")).into_client_request().unwrap();
    req.headers_mut().insert("origin", "https://app.example".parse().unwrap());
    tokio_tungstenite::connect_async(req).await.expect("allowed origin");
}

#[tokio::test]
async fn connection_cap_answers_503_with_retry_after() {
    let gw = Gateway::start(&["--max-connections", "2"]).await;
    let (_a, _) = gw.ws("a").await;
    let (b, _) = gw.ws("b").await;
    let t = token(json!({"sub": "c", "exp": now() + 60}));
    let (status, _, retry) = refused(gw.url(&format!("?token={t}")).into_client_request().unwrap()).await;
    assert_eq!(status, 503);
    assert!(retry.unwrap().parse::<u32>().unwrap() >= 1);
    // A slot frees when a session ends.
    drop(b);
    eventually!(tokio_tungstenite::connect_async(gw.url(&format!("?token={t}"))).await.is_ok(), "slot never freed");
    let (_, page) = gw.admin_get("/metrics").await;
    assert!(metric(&page, "switchboard_gateway_handshake_rejected_total", "reason=\"full\"") >= 1.0);
}

#[tokio::test]
async fn cap_defaults_below_the_open_files_limit() {
    let cli = <gateway::config::Cli as clap::Parser>::try_parse_from(["gateway", "--anonymous"]).unwrap();
    let s = gateway::Settings::from_cli(&cli).unwrap();
    assert!(s.max_sessions + s.max_pending + (gateway::server::FD_RESERVE as usize) <= s.nofile as usize);
    assert!(s.max_sessions > 0);
    let too_many = (s.nofile + 1).to_string();
    let cli = <gateway::config::Cli as clap::Parser>::try_parse_from([
        "gateway",
        "--anonymous",
        "--max-connections",
        &too_many,
    ])
    .unwrap();
    assert!(gateway::Settings::from_cli(&cli).is_err());
}

#[tokio::test]
async fn slowloris_is_cut_by_the_handshake_timeout() {
    let gw = Gateway::start(&["--handshake-timeout", "500ms"]).await;
    let mut s = tokio::net::TcpStream::connect(gw.client).await.unwrap();
    s.write_all(b"GET /ws HTTP/1.1\r\nHost: x\r\n").await.unwrap();
    let started = std::time::Instant::now();
    let mut buf = [0u8; 1024];
    // The server must end the connection on its own (we never finish the headers).
    let n = tokio::time::timeout(WAIT, async {
        let mut total = 0;
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return total,
                Ok(n) => total += n,
            }
        }
    })
    .await
    .expect("half-sent request kept open");
    assert!(started.elapsed() >= Duration::from_millis(400), "closed before the timeout");
    let _ = n;
}

#[tokio::test]
async fn not_an_upgrade_gets_400_and_unknown_paths_404() {
    let gw = Gateway::start(&[]).await;
    assert_eq!(http_get(gw.client, "/ws").await.0, 400);
    assert_eq!(http_get(gw.client, "/nope").await.0, 404);
    let (status, page) = http_get(gw.client, "/").await;
    assert_eq!(status, 200);
    assert!(page.contains("switchboard.js"));
    assert_eq!(http_get(gw.client, "/switchboard.js").await.0, 200);
    assert_eq!(gw.admin_get("/healthz").await.0, 200);
    assert_eq!(gw.admin_get("/readyz").await.0, 200);
}

#[tokio::test]
async fn per_address_cap_answers_429() {
    let gw = Gateway::start(&["--max-connections-per-ip", "2"]).await;
    let (_a, _) = gw.ws("a").await;
    let (b, _) = gw.ws("b").await;
    let t = token(json!({"sub": "c", "exp": now() + 60}));
    let (status, body, retry) = refused(gw.url(&format!("?token={t}")).into_client_request().unwrap()).await;
    assert_eq!((status, body.trim()), (429, "too many connections from this address"));
    assert!(retry.is_some());
    drop(b);
    eventually!(tokio_tungstenite::connect_async(gw.url(&format!("?token={t}"))).await.is_ok(), "slot never freed");
}

/// Sends an upgrade request with `key` (None: no key header) and returns the status line.
async fn raw_upgrade_status(gw: &Gateway, key: Option<&str>) -> String {
    let t = token(json!({"sub":"k","exp":now()+60}));
    let mut s = tokio::net::TcpStream::connect(gw.client).await.unwrap();
    let key = key.map(|k| format!("Sec-WebSocket-Key: {k}\r\n")).unwrap_or_default();
    let req = format!(
        "GET /ws?token={t} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         {key}Sec-WebSocket-Version: 13\r\n\r\n"
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut head = Vec::new();
    tokio::time::timeout(WAIT, async {
        while !head.ends_with(b"\r\n") {
            head.push(s.read_u8().await.unwrap());
        }
    })
    .await
    .expect("a status line");
    String::from_utf8(head).unwrap().trim().to_owned()
}

#[tokio::test]
async fn a_key_that_is_not_16_base64_bytes_gets_400() {
    let gw = Gateway::start(&[]).await;
    let huge = "A".repeat(16 * 1024);
    for key in
        [Some(""), Some("abc"), Some("!!!!!!!!!!!!!!!!!!!!!!=="), Some("AAAAAAAAAAAAAAAAAAAA"), Some(&huge), None]
    {
        let status = raw_upgrade_status(&gw, key).await;
        assert!(status.starts_with("HTTP/1.1 400"), "key {:?}: {status}", key.map(|k| &k[..k.len().min(30)]));
    }
    // 15 bytes ("AAAAAAAAAAAAAAAAAAAA" above is 15 bytes); a correct key still upgrades.
    assert!(raw_upgrade_status(&gw, Some("dGhlIHNhbXBsZSBub25jZQ==")).await.starts_with("HTTP/1.1 101"));
}

/// Opens `n` connections from 127.0.0.1 that send part of an upgrade request and stop.
async fn half_open(gw: &Gateway, n: usize) -> Vec<tokio::net::TcpStream> {
    let mut held = Vec::with_capacity(n);
    for chunk in 0..n.div_ceil(100) {
        let batch = (chunk * 100..n.min(chunk * 100 + 100)).map(|_| async {
            let mut s = tokio::net::TcpStream::connect(gw.client).await.expect("connect");
            s.write_all(b"GET /ws HTTP/1.1\r\nHost: x\r\n").await.expect("write");
            s
        });
        held.extend(futures_util::future::join_all(batch).await);
    }
    held
}

/// A well-behaved client from 127.0.0.2: the time to its 101, and the session.
async fn client_from_another_address(gw: &Gateway, user: &str) -> (Duration, Ws) {
    let start = std::time::Instant::now();
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.2:0".parse().unwrap()).expect("bind 127.0.0.2");
    let stream = socket.connect(gw.client).await.expect("connect from 127.0.0.2");
    let t = token(json!({"sub": user, "exp": now() + 60}));
    let (ws, _) = tokio_tungstenite::client_async(
        format!("ws://{}/ws?token={t}", gw.client),
        tokio_tungstenite::MaybeTlsStream::Plain(stream),
    )
    .await
    .expect("upgrade");
    (start.elapsed(), ws)
}

async fn pub_sub_works(gw: &Gateway) {
    let (took, mut sub) = client_from_another_address(gw, "sub").await;
    assert!(took < Duration::from_secs(1), "101 after {took:?}");
    assert_eq!(recv_json(&mut sub).await["type"], "welcome");
    call(&mut sub, json!({"op":"subscribe","channel":"c"})).await;
    let (_, mut publ) = client_from_another_address(gw, "pub").await;
    let ack = call(&mut publ, json!({"op":"publish","channel":"c","data":"hi"})).await;
    assert_eq!(ack["type"], "ack", "{ack}");
    let m = recv_type(&mut sub, "message").await;
    assert_eq!((m["data"].as_str(), &m["seq"]), (Some("hi"), &ack["seq"]));
}

#[tokio::test]
async fn two_thousand_half_open_connections_from_one_address_lock_nobody_out() {
    let gw = Gateway::start(&[]).await;
    let _held = half_open(&gw, 2000).await;
    pub_sub_works(&gw).await;
    let page = gw.admin_get("/metrics").await.1;
    let shed = metric(&page, "switchboard_gateway_half_open_shed_total", "reason=\"per_ip\"");
    assert!(shed >= 2000.0 - 64.0, "shed {shed}");
}

#[tokio::test]
async fn a_full_half_open_budget_sheds_the_oldest_instead_of_refusing() {
    // No per-address limit to speak of: the node's budget (512 here) is what fills up.
    let gw = Gateway::start(&["--max-pending-per-ip", "100000"]).await;
    let _held = half_open(&gw, 2000).await;
    pub_sub_works(&gw).await;
    let page = gw.admin_get("/metrics").await.1;
    assert!(metric(&page, "switchboard_gateway_half_open_shed_total", "reason=\"node\"") > 0.0);
}

#[tokio::test]
async fn a_cgroup_memory_limit_caps_sessions_below_it() {
    let root = std::env::temp_dir().join(format!("sb-cg-{}", std::process::id()));
    std::fs::create_dir_all(&root).unwrap();
    std::fs::write(root.join("memory.max"), "134217728\n").unwrap(); // 128 MiB
    let root_s = root.to_str().unwrap();
    let parse = |extra: &[&str]| {
        let mut args = vec!["gateway", "--anonymous", "--cgroup-root", root_s];
        args.extend_from_slice(extra);
        gateway::Settings::from_cli(&<gateway::config::Cli as clap::Parser>::try_parse_from(args).unwrap())
    };
    let s = parse(&[]).unwrap();
    // (128 - 64) MiB * 0.8 / 8 KiB per session, well below the open-files cap here.
    assert_eq!(s.max_sessions, 6553);
    assert_eq!(parse(&["--memory-per-session", "4096"]).unwrap().max_sessions, 13107);
    // An SSE stream or a waiting poll also holds hyper's 16 KiB of buffers.
    assert_eq!(s.http_session_weight, 3);
    assert_eq!(parse(&["--memory-per-session", "4096"]).unwrap().http_session_weight, 5);
    let err = parse(&["--max-connections", "7000"]).unwrap_err().to_string();
    assert!(err.contains("memory limit 134217728") && err.contains("6553"), "{err}");
    // A cap set by open files counts every session as one socket.
    std::fs::write(root.join("memory.max"), "max\n").unwrap();
    assert_eq!(parse(&[]).unwrap().http_session_weight, 1);
    std::fs::remove_dir_all(&root).unwrap();
}
