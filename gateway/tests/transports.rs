//! The fallback transports against a real gateway, driven by a plain HTTP/1.1
//! client written against the wire (tests/src/http.rs): Server-Sent Events (resume
//! by `Last-Event-ID`, every close reason as a final event), `POST /command` (the
//! protocol's errors as HTTP statuses), long-polling (at once, waiting, the cursor),
//! limits counted across transports, and HTTP/2 cleartext.

mod common;

use std::time::Duration;

use common::*;
use serde_json::{Value, json};
use switchboard_tests::http::{Reply, Sse, request};
use switchboard_tests::monitoring::url_encode as urlencode;

async fn sse(gw: &Gateway, user: &str, query: &str, extra: &[(&str, &str)]) -> Result<Sse, Reply> {
    let auth = bearer(user);
    let mut headers = vec![("Authorization", auth.as_str())];
    headers.extend_from_slice(extra);
    Sse::open(gw.client, &format!("/sse{query}"), &headers).await
}

/// A stream that opened: its welcome (naming the stream) comes first.
async fn stream(gw: &Gateway, user: &str, query: &str) -> (Sse, String) {
    let mut s = sse(gw, user, query, &[]).await.expect("stream opens");
    let welcome = s.json().await;
    assert_eq!(welcome["type"], "welcome", "{welcome}");
    assert_eq!(welcome["user"], user);
    (s, welcome["conn_id"].as_str().unwrap().to_owned())
}

async fn command(gw: &Gateway, user: &str, stream: Option<&str>, cmd: Value) -> Reply {
    let path = stream.map_or("/command".to_owned(), |s| format!("/command?stream={s}"));
    let auth = bearer(user);
    request(
        gw.client,
        "POST",
        &path,
        &[("Authorization", &auth), ("Content-Type", "application/json")],
        cmd.to_string().as_bytes(),
    )
    .await
}

async fn publish(gw: &Gateway, user: &str, channel: &str, data: Value) -> u64 {
    let r = command(gw, user, None, json!({"op":"publish","channel":channel,"data":data})).await;
    assert_eq!(r.status, 200, "{}", r.body);
    r.json()["seq"].as_u64().expect("publish ack with seq")
}

async fn poll(gw: &Gateway, user: &str, query: &str) -> Reply {
    let auth = bearer(user);
    request(gw.client, "GET", &format!("/poll{query}"), &[("Authorization", &auth)], b"").await
}

#[tokio::test]
async fn sse_delivers_and_resumes_through_history_by_last_event_id() {
    let gw = Gateway::start(&[]).await;
    let (mut s, _) = stream(&gw, "alice", "?channels=room:1,news").await;
    let mut acks = Vec::new();
    while acks.len() < 2 {
        let ev = s.next().await.unwrap();
        let v = ev.json();
        if v["type"] == "join" {
            continue; // room:* is a presence channel: alice's own join
        }
        assert_eq!(v["type"], "ack", "{v}");
        assert!(ev.id.is_some(), "a subscribe ack carries the position as the event id");
        acks.push(v["channel"].as_str().unwrap().to_owned());
    }
    acks.sort();
    assert_eq!(acks, ["news", "room:1"]);
    let first = publish(&gw, "bob", "room:1", json!({"n": 1})).await;
    let ev = s.next().await.unwrap();
    let m = ev.json();
    assert_eq!(
        (m["type"].as_str(), m["seq"].as_u64(), m["data"]["n"].as_u64()),
        (Some("message"), Some(first), Some(1))
    );
    let id = ev.id.expect("a message event has an id");
    assert!(id.contains(&format!("room:1={first}@")) && id.contains("news="), "{id}");
    drop(s);

    // Missed while away: the reconnect with Last-Event-ID gets them, in order, once.
    let mut missed = Vec::new();
    for n in 2..5 {
        missed.push(publish(&gw, "bob", "room:1", json!({"n": n})).await);
    }
    let mut s = sse(&gw, "alice", "?channels=room:1,news", &[("Last-Event-ID", &id)]).await.unwrap();
    assert_eq!(s.json().await["type"], "welcome");
    let mut got = Vec::new();
    while got.len() < 3 {
        let v = s.json().await;
        match v["type"].as_str() {
            Some("ack") => assert_eq!(v["recovered"], true, "{v}"),
            Some("message") => got.push(v["seq"].as_u64().unwrap()),
            _ => panic!("unexpected {v}"),
        }
    }
    assert_eq!(got, missed);
    // Nothing more (no duplicate): the next message is the next one published.
    let next = publish(&gw, "bob", "room:1", json!({"n": 5})).await;
    assert_eq!(s.until("message").await["seq"].as_u64(), Some(next));
}

#[tokio::test]
async fn bad_event_ids_and_channel_lists_get_defined_answers() {
    let gw = Gateway::start(&["--max-subscriptions", "8"]).await;
    let r = sse(&gw, "a", "?channels=c", &[("Last-Event-ID", "garbage")]).await.unwrap_err();
    assert_eq!(r.status, 400);
    assert_eq!(r.json()["code"], "bad_request");
    // Another epoch: subscribed afresh, and told so.
    let mut s = sse(&gw, "a", "?channels=c", &[("Last-Event-ID", "c=5@s0000000000000000")]).await.unwrap();
    assert_eq!(s.json().await["type"], "welcome");
    let ack = s.json().await;
    assert_eq!((ack["recovered"].as_bool(), ack["reason"].as_str()), (Some(false), Some("epoch_changed")), "{ack}");
    for (query, status, code) in [
        ("?channels=a,,b", 400, "bad_channel"),
        ("?channels=a%20b", 400, "bad_channel"),
        ("?channels=1,2,3,4,5,6,7,8,9", 409, "too_many_subscriptions"),
    ] {
        let r = sse(&gw, "a", query, &[]).await.unwrap_err();
        assert_eq!((r.status, r.json()["code"].as_str()), (status, Some(code)), "{query}: {}", r.body);
        let r = poll(&gw, "a", query).await;
        assert_eq!((r.status, r.json()["code"].as_str()), (status, Some(code)), "poll {query}: {}", r.body);
    }
    // A poll over thousands of channels: refused, not held.
    let many: Vec<String> = (0..5000).map(|i| format!("ch{i}")).collect();
    let form = format!("channels={}", many.join(","));
    let auth = bearer("a");
    let r = request(gw.client, "POST", "/poll", &[("Authorization", &auth)], form.as_bytes()).await;
    assert_eq!((r.status, r.json()["code"].as_str()), (409, Some("too_many_subscriptions")), "{}", r.body);
    let r = poll(&gw, "a", "").await;
    assert_eq!((r.status, r.json()["code"].as_str()), (400, Some("bad_request")));
    let r = poll(&gw, "a", "?channels=c&cursor=c=x").await;
    assert_eq!((r.status, r.json()["code"].as_str()), (400, Some("bad_request")));
}

#[tokio::test]
async fn commands_over_http_answer_with_the_protocols_errors() {
    let gw = Gateway::start(&["--max-message-bytes", "1024", "--publish-rate", "1", "--publish-burst", "2"]).await;
    let none = request(gw.client, "POST", "/command", &[], br#"{"op":"ping"}"#).await;
    assert_eq!(none.status, 401, "{}", none.body);
    let bad = request(gw.client, "POST", "/command", &[("Authorization", "Bearer x.y.z")], br#"{"op":"ping"}"#).await;
    assert_eq!(bad.status, 401);
    assert!(bad.body.starts_with("unauthorized:"), "{}", bad.body);
    let r = command(&gw, "a", None, json!({"op":"ping","ref":1})).await;
    assert_eq!((r.status, r.json()["type"].as_str(), r.json()["ref"].as_u64()), (200, Some("pong"), Some(1)));
    let auth = bearer("a");
    let r = request(gw.client, "POST", "/command", &[("Authorization", &auth)], b"{nope").await;
    assert_eq!((r.status, r.json()["code"].as_str()), (400, Some("bad_json")));
    let r = command(&gw, "a", None, json!({"op":"subscribe","channel":"c"})).await;
    assert_eq!((r.status, r.json()["code"].as_str()), (400, Some("bad_request")));
    let r = command(&gw, "a", Some("gw-test.ffff"), json!({"op":"subscribe","channel":"c"})).await;
    assert_eq!((r.status, r.json()["code"].as_str()), (409, Some("unknown_stream")));
    let r = command(&gw, "a", Some("gw-other.1"), json!({"op":"subscribe","channel":"c"})).await;
    assert_eq!((r.status, r.json()["code"].as_str()), (409, Some("unknown_stream")));
    let (_s, id) = stream(&gw, "a", "").await;
    let r = command(&gw, "mallory", Some(&id), json!({"op":"subscribe","channel":"c"})).await;
    assert_eq!((r.status, r.json()["code"].as_str()), (409, Some("unknown_stream")), "another user's stream");
    let big = json!({"op":"publish","channel":"c","data":"x".repeat(2000)});
    let r = command(&gw, "a", None, big).await;
    assert_eq!((r.status, r.json()["code"].as_str()), (413, Some("too_big")));
    let claims = token(json!({"sub": "c", "exp": now() + 60, "channels": ["room:*"]}));
    let auth = format!("Bearer {claims}");
    let body = json!({"op":"publish","channel":"admin","data":1}).to_string();
    let r = request(gw.client, "POST", "/command", &[("Authorization", &auth)], body.as_bytes()).await;
    assert_eq!((r.status, r.json()["code"].as_str()), (403, Some("forbidden")));
    // The publish rate limit, per user, like a session's.
    let mut statuses = Vec::new();
    for i in 0..4 {
        let r = command(&gw, "b", None, json!({"op":"publish","channel":"c","data":i})).await;
        if r.status == 429 {
            assert_eq!(r.json()["code"], "rate_limited");
            assert!(r.header("retry-after").is_some(), "{}", r.head);
        }
        statuses.push(r.status);
    }
    assert_eq!(&statuses[..2], [200, 200]);
    assert!(statuses[2..].contains(&429), "{statuses:?}");
}

#[tokio::test]
async fn an_sse_stream_subscribes_and_unsubscribes_through_commands() {
    let gw = Gateway::start(&[]).await;
    let (mut s, id) = stream(&gw, "alice", "").await;
    let r = command(&gw, "alice", Some(&id), json!({"op":"subscribe","channel":"later","ref":"s"})).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!((r.json()["type"].as_str(), r.json()["ref"].as_str()), (Some("ack"), Some("s")));
    let ev = s.next().await.unwrap();
    assert_eq!(ev.json()["type"], "ack");
    assert!(ev.id.as_deref().is_some_and(|i| i.starts_with("later=")), "{ev:?}");
    let seq = publish(&gw, "bob", "later", json!("hi")).await;
    assert_eq!(s.until("message").await["seq"].as_u64(), Some(seq));
    let r = command(&gw, "alice", Some(&id), json!({"op":"unsubscribe","channel":"later"})).await;
    assert_eq!(r.status, 200);
    let ev = s.next().await.unwrap();
    assert_eq!(ev.json()["type"], "unsubscribed");
    assert_eq!(ev.id.as_deref(), Some(""), "the id no longer names the channel");
    publish(&gw, "bob", "later", json!("unseen")).await;
    let r = command(&gw, "alice", None, json!({"op":"send","user":"alice","data":"direct"})).await;
    assert_eq!(r.status, 200);
    let d = s.json().await;
    assert_eq!((d["type"].as_str(), d["data"].as_str()), (Some("direct"), Some("direct")), "{d}");
}

#[tokio::test]
async fn long_polls_answer_at_once_or_wait_for_the_next_message() {
    let gw = Gateway::start(&[]).await;
    // No cursor: answered at once with the position to poll from.
    let r = poll(&gw, "p", "?channels=c").await;
    assert_eq!(r.status, 200, "{}", r.body);
    let v = r.json();
    assert_eq!(v["type"], "poll");
    assert_eq!(v["events"][0]["type"], "ack");
    let cursor = v["cursor"].as_str().unwrap().to_owned();
    assert!(cursor.starts_with("c="), "{cursor}");
    // Nothing newer: waits; empty at the timeout.
    let started = tokio::time::Instant::now();
    let r = poll(&gw, "p", &format!("?channels=c&timeout_ms=300&cursor={}", urlencode(&cursor))).await;
    assert!(started.elapsed() >= Duration::from_millis(300), "waited for the timeout");
    assert_eq!(r.json()["events"].as_array().unwrap().len(), 0, "{}", r.body);
    assert_eq!(r.json()["cursor"], cursor.as_str());
    // A message published while it waits answers it.
    let g = gw.client;
    let c2 = cursor.clone();
    let waiting = tokio::spawn(async move {
        let auth = bearer("p");
        request(g, "GET", &format!("/poll?channels=c&cursor={}", urlencode(&c2)), &[("Authorization", &auth)], b"")
            .await
    });
    eventually!(poll_waiting(&gw).await == 1.0, "the poll waits");
    let page = gw.admin_get("/metrics").await.1;
    assert!(metric(&page, "switchboard_gateway_polls_total", "outcome=\"timeout\"") >= 1.0, "{page}");
    let seq = publish(&gw, "q", "c", json!("wake")).await;
    let r = waiting.await.unwrap();
    let v = r.json();
    let events = v["events"].as_array().unwrap();
    assert_eq!(events.iter().filter(|e| e["type"] == "message").count(), 1, "{v}");
    assert_eq!(events.iter().find(|e| e["type"] == "message").unwrap()["seq"].as_u64(), Some(seq));
    // Behind: everything newer at once, in order, and then the cursor is at the last one.
    let mut later = Vec::new();
    for i in 0..3 {
        later.push(publish(&gw, "q", "c", json!(i)).await);
    }
    let r = poll(&gw, "p", &format!("?channels=c&cursor={}", urlencode(v["cursor"].as_str().unwrap()))).await;
    let v = r.json();
    let seqs: Vec<u64> = v["events"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["type"] == "message")
        .map(|e| e["seq"].as_u64().unwrap())
        .collect();
    assert_eq!(seqs, later);
    assert!(v["cursor"].as_str().unwrap().starts_with(&format!("c={}@", later[2])), "{v}");
}

async fn poll_waiting(gw: &Gateway) -> f64 {
    let page = gw.admin_get("/metrics").await.1;
    metric(&page, "switchboard_gateway_transport_sessions_active", "transport=\"poll\"")
}

#[tokio::test]
async fn every_server_close_is_a_final_event_with_its_reason() {
    let gw = Gateway::start(&["--publish-rate", "1", "--publish-burst", "1"]).await;
    // Token expiry.
    let short = format!("Bearer {}", token(json!({"sub": "t", "exp": now() + 1})));
    let mut s = Sse::open(gw.client, "/sse", &[("Authorization", &short)]).await.unwrap();
    let close = s.until("close").await;
    assert_eq!((close["code"].as_u64(), close["reason"].as_str()), (Some(4001), Some("token_expired")), "{close}");
    assert!(close.get("retry_ms").is_none(), "not to be retried with the same token: {close}");
    assert!(s.ends_within(WAIT).await, "the stream ends after its close event");
    // A flood of commands on the stream.
    let (mut s, id) = stream(&gw, "f", "").await;
    for i in 0..6 {
        let r = command(&gw, "f", Some(&id), json!({"op":"publish","channel":"c","data":i})).await;
        if r.status == 429 && r.json()["message"].as_str().is_some_and(|m| m.contains("flood")) {
            break;
        }
    }
    let close = s.until("close").await;
    assert_eq!((close["code"].as_u64(), close["reason"].as_str()), (Some(4003), Some("flood")), "{close}");
    assert_eq!(close["retry_ms"].as_u64(), Some(5000));
    assert!(s.ends_within(WAIT).await);
    // Disconnected by an internal service (Push API).
    let (mut s, _) = stream(&gw, "kick", "").await;
    let mut push =
        proto::push::v1::push_client::PushClient::connect(format!("http://{}", gw.grpc)).await.expect("push api");
    push.disconnect(proto::push::v1::DisconnectRequest { user: "kick".into(), reason: "bye".into() })
        .await
        .expect("disconnect");
    let close = s.until("close").await;
    assert_eq!((close["code"].as_u64(), close["reason"].as_str()), (Some(4004), Some("kicked")), "{close}");
    assert!(s.ends_within(WAIT).await);
}

#[tokio::test]
async fn a_drain_ends_streams_and_waiting_polls_with_its_reason() {
    let gw = Gateway::start(&["--drain-window", "200ms", "--drain-grace", "2s"]).await;
    let (mut s, _) = stream(&gw, "d", "?channels=c").await;
    let cursor = poll(&gw, "d", "?channels=c").await.json()["cursor"].as_str().unwrap().to_owned();
    let g = gw.client;
    let waiting = tokio::spawn(async move {
        let auth = bearer("d");
        request(g, "GET", &format!("/poll?channels=c&cursor={}", urlencode(&cursor)), &[("Authorization", &auth)], b"")
            .await
    });
    eventually!(poll_waiting(&gw).await == 1.0, "the poll waits");
    gw.stop().await;
    let ev = loop {
        let ev = s.next().await.expect("a close event before the end");
        if ev.json()["type"] == "close" {
            break ev;
        }
    };
    let close = ev.json();
    assert_eq!((close["code"].as_u64(), close["reason"].as_str()), (Some(1001), Some("drain")), "{close}");
    let retry = close["retry_ms"].as_u64().expect("a retry hint");
    assert_eq!(ev.retry, Some(retry), "EventSource's own retry field says the same");
    assert!(s.ends_within(WAIT).await);
    let v = waiting.await.unwrap().json();
    let last = v["events"].as_array().unwrap().last().cloned().unwrap_or_default();
    assert_eq!((last["type"].as_str(), last["reason"].as_str()), (Some("close"), Some("drain")), "{v}");
}

#[tokio::test]
async fn one_connection_cap_and_address_cap_count_every_transport() {
    let gw = Gateway::start(&["--max-connections", "2"]).await;
    let (_a, _) = stream(&gw, "a", "").await;
    let (_ws, _) = gw.ws("b").await;
    let r = sse(&gw, "c", "", &[]).await.unwrap_err();
    assert_eq!(r.status, 503);
    assert!(r.header("retry-after").is_some());
    let r = poll(&gw, "c", "?channels=x").await;
    assert_eq!(r.status, 503);
    assert!(gw.ws_with_header(&token(json!({"sub":"c","exp":now()+60}))).await.is_err(), "WebSocket refused too");

    let gw = Gateway::start(&["--max-connections-per-ip", "1", "--allowed-origins", "http://good.example"]).await;
    let (s, _) = stream(&gw, "a", "").await;
    let r = sse(&gw, "a", "", &[]).await.unwrap_err();
    assert_eq!(r.status, 429);
    drop(s);
    let r = sse(&gw, "a", "", &[("Origin", "http://evil.example")]).await.unwrap_err();
    assert_eq!(r.status, 403);
    let r = Sse::open(gw.client, "/sse", &[]).await.unwrap_err();
    assert_eq!(r.status, 401, "no token: no connect step on HTTP transports");
    // The slot of a closed stream comes back.
    let deadline = tokio::time::Instant::now() + WAIT;
    let mut reopened = loop {
        match sse(&gw, "a", "", &[("Origin", "http://good.example")]).await {
            Ok(s) => break s,
            Err(r) => {
                assert!(tokio::time::Instant::now() < deadline, "the closed stream's slot comes back: {}", r.status)
            }
        }
        tokio::task::yield_now().await;
    };
    assert_eq!(reopened.json().await["type"], "welcome");
}

/// The token also comes from the `switchboard_token` cookie (what an `EventSource`, which
/// sets no headers, sends) or `?token=`; a cookie, which the browser attaches by itself,
/// counts only from the gateway's own origin or one listed explicitly, even when the list is
/// empty (a foreign page cannot read a token to put in a header or the URL).
#[tokio::test]
async fn a_cookie_token_works_from_its_own_origin_and_not_from_a_foreign_one() {
    let gw = Gateway::start(&[]).await;
    let jwt = token(json!({"sub":"kim","exp":now()+600}));
    let cookie = format!("theme=dark; switchboard_token={jwt}");
    let mut s = Sse::open(gw.client, "/sse?channels=c", &[("Cookie", cookie.as_str())]).await.expect("cookie stream");
    assert_eq!(s.json().await["user"], "kim");
    let r = poll(&gw, "ignored", "?channels=c").await; // the bearer helper: a header token
    assert_eq!(r.status, 200);
    let q = request(gw.client, "GET", &format!("/poll?channels=c&token={jwt}"), &[], b"").await;
    assert_eq!(q.status, 200, "a token in the URL: {}", q.body);
    let ping = br#"{"op":"ping","ref":"1"}"#;
    // The gateway's own origin (the Host the request names) with the cookie: admitted.
    let same = [("Cookie", cookie.as_str()), ("Origin", "http://test"), ("Content-Type", "text/plain")];
    let r = request(gw.client, "POST", "/command", &same, ping).await;
    assert_eq!((r.status, r.json()["type"].as_str()), (200, Some("pong")), "{}", r.body);
    // Another site's page posting with the visitor's cookie: refused, as a foreign origin.
    let foreign = [("Cookie", cookie.as_str()), ("Origin", "http://evil.example"), ("Content-Type", "text/plain")];
    let publish = br#"{"op":"publish","channel":"c","data":"forged"}"#;
    let r = request(gw.client, "POST", "/command", &foreign, publish).await;
    assert_eq!(r.status, 403, "{}", r.body);
    let r = Sse::open(gw.client, "/sse?channels=c", &foreign[..2]).await.unwrap_err();
    assert_eq!(r.status, 403);
    // From that origin a token it holds in `Authorization` is fine (any origin is admitted).
    let auth = bearer("kim");
    let r = request(
        gw.client,
        "POST",
        "/command",
        &[("Authorization", auth.as_str()), ("Origin", "http://evil.example")],
        ping,
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    // Listed explicitly, an origin may use the cookie.
    let gw = Gateway::start(&["--allowed-origins", "http://app.example"]).await;
    let listed = [("Cookie", cookie.as_str()), ("Origin", "http://app.example")];
    let r = request(gw.client, "POST", "/command", &listed, ping).await;
    assert_eq!(r.status, 200, "{}", r.body);
}

/// Under a cap set by the cgroup memory limit, an SSE stream or a waiting poll takes the
/// slots its memory needs (hyper's two 8 KiB buffers beside the session: 3 slots of the
/// default 8 KiB), so a node full of streams stays inside its memory limit.
#[tokio::test]
async fn a_memory_cap_counts_an_http_session_at_its_memory() {
    let root = std::env::temp_dir().join(format!("sb-cg-http-{}", std::process::id()));
    std::fs::create_dir_all(&root).unwrap();
    // 64 MiB kept for the process, then 10 sessions of 8 KiB in 80 % of the rest.
    std::fs::write(root.join("memory.max"), format!("{}\n", (64 << 20) + 10 * 8192 * 10 / 8)).unwrap();
    let gw = Gateway::start(&["--cgroup-root", root.to_str().unwrap()]).await;
    let page = gw.admin_get("/metrics").await.1;
    assert_eq!(metric(&page, "switchboard_gateway_connections_limit", ""), 10.0, "the memory cap");
    // Three streams: 9 of the 10 slots.
    let mut streams = Vec::new();
    for user in ["a", "b", "c"] {
        streams.push(stream(&gw, user, "").await);
    }
    let r = sse(&gw, "d", "", &[]).await.unwrap_err();
    assert_eq!(r.status, 503, "a fourth stream does not fit: {}", r.body);
    assert!(r.header("retry-after").is_some());
    let r = poll(&gw, "d", "?channels=x").await;
    assert_eq!(r.status, 503, "nor a poll");
    // A WebSocket session (one slot) still fits, then nothing does.
    let (_ws, _) = gw.ws("e").await;
    assert!(gw.ws_with_header(&token(json!({"sub":"f","exp":now()+60}))).await.is_err(), "the cap is full");
    std::fs::remove_dir_all(&root).unwrap();
}

#[tokio::test]
async fn a_client_that_never_reads_its_stream_is_closed_as_a_slow_consumer() {
    let gw = Gateway::start(&[
        "--send-queue",
        "8",
        "--slow-consumer-timeout",
        "200ms",
        "--publish-rate",
        "100000",
        "--publish-burst",
        "100000",
    ])
    .await;
    let (_never_read, _) = stream(&gw, "slow", "?channels=firehose").await;
    let big = "x".repeat(60_000);
    // Publish until the queue overflows (the session is marked a slow consumer); the
    // stream then ends once its close event was written or, to a client that does not
    // read, CLOSE_WRITE_TIMEOUT (1 s) passed.
    let overflowed = |page: &String| metric(page, "switchboard_gateway_queue_full_total", "") >= 1.0;
    let mut page = String::new();
    for _ in 0..400 {
        publish(&gw, "p", "firehose", json!(big)).await;
        page = gw.admin_get("/metrics").await.1;
        if overflowed(&page) {
            break;
        }
    }
    assert!(overflowed(&page), "{page}");
    let closed = |page: &String| {
        metric(page, "switchboard_gateway_connections_closed_total", "reason=\"slow_consumer\"") == 1.0
            && metric(page, "switchboard_gateway_transport_sessions_active", "transport=\"sse\"") == 0.0
    };
    eventually!(closed(&gw.admin_get("/metrics").await.1), "closed as a slow consumer");
}

#[tokio::test]
async fn sse_and_commands_work_over_http2_cleartext() {
    use http_body_util::{BodyExt, Full};
    let gw = Gateway::start(&[]).await;
    let tcp = tokio::net::TcpStream::connect(gw.client).await.unwrap();
    let (mut h2, conn) =
        hyper::client::conn::http2::handshake(hyper_util::rt::TokioExecutor::new(), hyper_util::rt::TokioIo::new(tcp))
            .await
            .expect("h2c prior knowledge");
    tokio::spawn(conn);
    let auth = bearer("h2");
    let req = http::Request::get(format!("http://{}/sse?channels=c", gw.client))
        .header("authorization", &auth)
        .body(Full::new(bytes::Bytes::new()))
        .unwrap();
    let resp = h2.send_request(req).await.expect("stream");
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.version(), http::Version::HTTP_2);
    let mut body = resp.into_body();
    let mut text = String::new();
    let mut next = async || {
        let f = tokio::time::timeout(WAIT, body.frame()).await.expect("data in time").expect("open").unwrap();
        String::from_utf8(f.into_data().unwrap().to_vec()).unwrap()
    };
    while !text.contains("\"type\":\"ack\"") {
        text.push_str(&next().await);
    }
    // A command on the same connection, beside the stream.
    let cmd = json!({"op":"publish","channel":"c","data":"over h2"}).to_string();
    let req = http::Request::post(format!("http://{}/command", gw.client))
        .header("authorization", &auth)
        .body(Full::new(bytes::Bytes::from(cmd)))
        .unwrap();
    let resp = h2.send_request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    let ack: Value = serde_json::from_slice(&resp.into_body().collect().await.unwrap().to_bytes()).unwrap();
    assert_eq!(ack["type"], "ack");
    while !text.contains("over h2") {
        text.push_str(&next().await);
    }
    assert!(text.contains(&format!("\"seq\":{}", ack["seq"])), "{text}");
}
