//! Authentication after the upgrade: `connect` as the first message of a session opened
//! without a token, and `refresh` of a live session's token (docs/protocol.md).

mod common;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::*;
use futures_util::{SinkExt, StreamExt};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_millis() as u64
}

/// A session upgraded without any token (no header, no subprotocol, no query).
async fn tokenless(gw: &Gateway) -> Ws {
    tokio_tungstenite::connect_async(gw.url("")).await.expect("a token-less upgrade is accepted").0
}

/// Reads (answering the server's pings) until the wall clock passes `unix_ms`;
/// panics if anything but a ping arrives meanwhile (a close above all).
async fn stay_open_until(ws: &mut Ws, unix_ms: u64) {
    loop {
        let Some(left) = unix_ms.checked_sub(now_ms()).filter(|ms| *ms > 0) else { return };
        match tokio::time::timeout(Duration::from_millis(left), ws.next()).await {
            Err(_) => return,
            Ok(Some(Ok(Message::Ping(_) | Message::Pong(_)))) => {}
            Ok(other) => panic!("session ended or sent something unasked: {other:?}"),
        }
    }
}

async fn close_of(ws: &mut Ws) -> (u16, String) {
    let c = expect_close(ws).await;
    (u16::from(c.code), c.reason.to_string())
}

#[tokio::test]
async fn a_tokenless_session_authenticates_with_connect() {
    let gw = Gateway::start(&[]).await;
    let mut ws = tokenless(&gw).await;
    // No welcome before `connect`: a pong queued now is the first frame that comes back.
    ws.send(Message::Ping(b"before".to_vec().into())).await.unwrap();
    match tokio::time::timeout(WAIT, ws.next()).await.expect("a pong") {
        Some(Ok(Message::Pong(p))) => assert_eq!(&p[..], b"before"),
        other => panic!("expected the pong first, got {other:?}"),
    }
    let exp = now() + 600;
    let t = token(json!({"sub": "dana", "exp": exp, "channels": ["room:*"]}));
    send_json(&mut ws, json!({"op": "connect", "token": t, "ref": "c1"})).await;
    let welcome = recv_json(&mut ws).await;
    assert_eq!(welcome["type"], "welcome", "{welcome}");
    assert_eq!(
        (&welcome["ref"], &welcome["user"], &welcome["expires_at"]),
        (&json!("c1"), &json!("dana"), &json!(exp))
    );

    // A session like any other: the token's claims apply, it can subscribe and publish.
    assert_eq!(call(&mut ws, json!({"op":"subscribe","channel":"admin"})).await["code"], "forbidden");
    assert_eq!(call(&mut ws, json!({"op":"subscribe","channel":"room:1"})).await["type"], "ack");
    let (mut other, _) = gw.ws("eve").await;
    let ack = call(&mut other, json!({"op":"publish","channel":"room:1","data":"hi"})).await;
    assert_eq!(ack["type"], "ack", "{ack}");
    let m = recv_type(&mut ws, "message").await;
    assert_eq!((&m["data"], &m["seq"]), (&json!("hi"), &ack["seq"]));
    // It is in presence now, and reachable by user id.
    let p = call(&mut other, json!({"op":"presence","channel":"room:1"})).await;
    assert_eq!(p["users"], json!(["dana"]), "{p}");
    let sent = call(&mut other, json!({"op":"send","user":"dana","data":1})).await;
    assert_eq!(sent["delivered"], 1, "{sent}");
    assert_eq!(recv_type(&mut ws, "direct").await["from"], "eve");

    let again = call(&mut ws, json!({"op":"connect","token":t})).await;
    assert_eq!((&again["code"], &again["message"]), (&json!("bad_request"), &json!("already connected")));
    let (_, page) = gw.admin_get("/metrics").await;
    assert!(metric(&page, "switchboard_gateway_connect_total", "outcome=\"ok\"") >= 1.0);
}

#[tokio::test]
async fn connect_with_a_bad_token_closes_4005_with_the_handshakes_reason() {
    let gw = Gateway::start(&[]).await;
    let wrong_key = jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &json!({"sub":"a","exp":now()+60}),
        &EncodingKey::from_secret(b"wrong").unwrap(),
    )
    .unwrap();
    let cases = [
        (json!({"op":"connect","token":wrong_key}), "unauthorized: bad signature"),
        (json!({"op":"connect","token":token(json!({"sub":"a","exp":now()-3600}))}), "unauthorized: token expired"),
        (json!({"op":"connect","token":"not.a.jwt"}), "unauthorized: malformed token"),
        (json!({"op":"connect"}), "unauthorized: missing token"),
    ];
    for (cmd, reason) in cases {
        let mut ws = tokenless(&gw).await;
        send_json(&mut ws, cmd).await;
        assert_eq!(close_of(&mut ws).await, (4005, reason.to_owned()));
    }
    let (_, page) = gw.admin_get("/metrics").await;
    assert!(metric(&page, "switchboard_gateway_connect_total", "outcome=\"unauthorized\"") >= 4.0);
    assert!(metric(&page, "switchboard_gateway_connections_closed_total", "reason=\"unauthenticated\"") >= 4.0);
}

#[tokio::test]
async fn a_first_message_other_than_connect_closes_4005() {
    let gw = Gateway::start(&[]).await;
    for first in [
        Message::text(json!({"op":"subscribe","channel":"room:1"}).to_string()),
        Message::text(json!({"op":"refresh","token":token(json!({"sub":"a","exp":now()+60}))}).to_string()),
        Message::text("not json"),
        Message::Binary(b"\x00\x01".to_vec().into()),
    ] {
        let mut ws = tokenless(&gw).await;
        ws.send(first.clone()).await.unwrap();
        assert_eq!(close_of(&mut ws).await, (4005, "connect required".to_owned()), "{first:?}");
    }
    let (_, page) = gw.admin_get("/metrics").await;
    assert!(metric(&page, "switchboard_gateway_connect_total", "outcome=\"connect_required\"") >= 4.0);
}

#[tokio::test]
async fn no_connect_within_the_deadline_closes_4005() {
    let gw = Gateway::start(&["--connect-timeout", "1s"]).await;
    let started = std::time::Instant::now();
    let mut ws = tokenless(&gw).await;
    // Reading answers the server's pings: only the connect deadline can end this session.
    assert_eq!(close_of(&mut ws).await, (4005, "connect timeout".to_owned()));
    assert!(started.elapsed() >= Duration::from_secs(1), "closed after {:?}", started.elapsed());
    let (_, page) = gw.admin_get("/metrics").await;
    assert!(metric(&page, "switchboard_gateway_connect_total", "outcome=\"timeout\"") >= 1.0);
}

#[tokio::test]
async fn the_connect_timeout_defaults_to_five_seconds() {
    let cli = <gateway::config::Cli as clap::Parser>::try_parse_from(["gateway", "--anonymous"]).unwrap();
    assert_eq!(cli.connect_timeout, Duration::from_secs(5));
    let s = gateway::Settings::from_cli(&cli).unwrap();
    assert_eq!(s.session.connect_timeout, Duration::from_secs(5));
    let zero =
        <gateway::config::Cli as clap::Parser>::try_parse_from(["gateway", "--anonymous", "--connect-timeout", "0s"])
            .unwrap();
    assert!(gateway::Settings::from_cli(&zero).is_err());
}

#[tokio::test]
async fn a_session_awaiting_connect_holds_a_slot_of_the_cap() {
    let gw = Gateway::start(&["--max-connections", "1"]).await;
    let waiting = tokenless(&gw).await;
    let t = token(json!({"sub": "b", "exp": now() + 60}));
    match tokio_tungstenite::connect_async(gw.url(&format!("?token={t}"))).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => assert_eq!(resp.status().as_u16(), 503),
        other => panic!("expected 503, got {:?}", other.map(|_| ())),
    }
    drop(waiting);
    eventually!(tokio_tungstenite::connect_async(gw.url(&format!("?token={t}"))).await.is_ok(), "slot never freed");
}

#[tokio::test]
async fn anonymous_mode_keeps_tokenless_sessions_anonymous() {
    let gw = Gateway::start(&["--anonymous"]).await;
    let (mut ws, _) = tokio_tungstenite::connect_async(gw.url("?user=zoe")).await.unwrap();
    assert_eq!(recv_json(&mut ws).await["user"], "zoe");
    // No token to refresh: a clear refusal, and the session goes on.
    let t = token(json!({"sub": "zoe", "exp": now() + 60}));
    let r = call(&mut ws, json!({"op":"refresh","token":t})).await;
    assert_eq!(
        (&r["code"], &r["message"]),
        (&json!("bad_request"), &json!("this session was not opened with a token"))
    );
    assert_eq!(call(&mut ws, json!({"op":"ping"})).await["type"], "pong");
}

/// Token A expires in about 2 s; a refresh with B (the same user, later exp, fewer
/// channels) keeps the session past A's exp, drops what B does not allow, and the
/// session is closed 4001 at B's exp.
#[tokio::test]
async fn refresh_moves_the_expiry_and_the_claims() {
    let gw = Gateway::start(&[]).await;
    let a_exp = now() + 2;
    let a = token(json!({"sub": "fay", "exp": a_exp, "channels": ["room:*", "admin:*"]}));
    let mut ws = gw.ws_with_header(&a).await.unwrap();
    assert_eq!(recv_json(&mut ws).await["expires_at"], a_exp);
    for c in ["room:1", "admin:x"] {
        assert_eq!(call(&mut ws, json!({"op":"subscribe","channel":c})).await["type"], "ack");
    }
    let b_exp = a_exp + 2;
    let b = token(json!({"sub": "fay", "exp": b_exp, "channels": ["room:*"]}));
    send_json(&mut ws, json!({"op":"refresh","token":b,"ref":"r1"})).await;
    let ack = recv_type(&mut ws, "ack").await;
    assert_eq!(ack, json!({"type":"ack","ref":"r1","expires_at":b_exp,"revoked":["admin:x"]}));

    // Past A's exp (the server closes at exp exactly; 200 ms for it to act): still open.
    stay_open_until(&mut ws, a_exp * 1000 + 200).await;
    assert_eq!(call(&mut ws, json!({"op":"ping"})).await["type"], "pong");
    // B's claims apply: admin:* is gone, for commands and for deliveries.
    assert_eq!(call(&mut ws, json!({"op":"publish","channel":"admin:x","data":1})).await["code"], "forbidden");
    let (mut ops, _) = gw.ws("ops").await;
    for c in ["admin:x", "room:1"] {
        assert_eq!(call(&mut ops, json!({"op":"publish","channel":c,"data":c})).await["type"], "ack");
    }
    // admin:x was published first: had it been delivered, it would come first.
    assert_eq!(recv_type(&mut ws, "message").await["channel"], "room:1");

    assert_eq!(close_of(&mut ws).await, (4001, "token expired".to_owned()));
    assert!(now_ms() >= b_exp * 1000, "closed at {} before B's exp {b_exp}", now_ms());
    let (_, page) = gw.admin_get("/metrics").await;
    assert!(metric(&page, "switchboard_gateway_auth_refresh_total", "outcome=\"ok\"") >= 1.0);
}

/// Refused refreshes change nothing: the old claims hold, and the session is closed
/// 4001 at the old exp.
#[tokio::test]
async fn refused_refreshes_keep_the_old_expiry_and_claims() {
    let gw = Gateway::start(&[]).await;
    let a_exp = now() + 2;
    let a = token(json!({"sub": "gus", "exp": a_exp, "channels": ["room:*"]}));
    let mut ws = gw.ws_with_header(&a).await.unwrap();
    assert_eq!(recv_json(&mut ws).await["type"], "welcome");
    let later = now() + 3600;
    let wrong_key = jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &json!({"sub":"gus","exp":later}),
        &EncodingKey::from_secret(b"wrong").unwrap(),
    )
    .unwrap();
    let cases: [(Value, &str, &str); 5] = [
        (
            json!({"op":"refresh","token":token(json!({"sub":"hal","exp":later,"channels":["*"]}))}),
            "forbidden",
            "token is for another user",
        ),
        (json!({"op":"refresh","token":wrong_key}), "unauthorized", "bad signature"),
        (json!({"op":"refresh","token":token(json!({"sub":"gus","exp":now()-3600}))}), "unauthorized", "token expired"),
        (json!({"op":"refresh","token":"garbage"}), "unauthorized", "malformed token"),
        (json!({"op":"refresh"}), "bad_request", "missing field `token`"),
    ];
    for (cmd, code, message) in cases {
        let e = call(&mut ws, cmd).await;
        assert_eq!(
            (e["type"].as_str(), e["code"].as_str(), e["message"].as_str()),
            (Some("error"), Some(code), Some(message))
        );
    }
    // The other user's token allowed every channel; A's claim still applies.
    assert_eq!(call(&mut ws, json!({"op":"subscribe","channel":"admin"})).await["code"], "forbidden");
    assert_eq!(close_of(&mut ws).await, (4001, "token expired".to_owned()));
    assert!(now_ms() >= a_exp * 1000, "closed at {} before A's exp {a_exp}", now_ms());
    let (_, page) = gw.admin_get("/metrics").await;
    assert!(metric(&page, "switchboard_gateway_auth_refresh_total", "outcome=\"forbidden\"") >= 1.0);
    assert!(metric(&page, "switchboard_gateway_auth_refresh_total", "outcome=\"unauthorized\"") >= 3.0);
    assert!(metric(&page, "switchboard_gateway_command_errors_total", "code=\"unauthorized\"") >= 3.0);
}

/// A refresh may also bring the expiry closer: the close follows the new exp, although
/// the egress timer was armed for a later one (heartbeats 30 s apart here, so no
/// heartbeat wake-up can stand in for the re-arming).
#[tokio::test]
async fn a_refresh_to_an_earlier_exp_closes_at_the_new_exp() {
    let gw = Gateway::start(&["--heartbeat-interval", "30s", "--heartbeat-timeout", "30s"]).await;
    let (mut ws, welcome) = gw.ws("kai").await;
    assert!(welcome["expires_at"].as_u64().unwrap() >= now() + 3000);
    let b_exp = now() + 2;
    let ack = call(&mut ws, json!({"op":"refresh","token":token(json!({"sub":"kai","exp":b_exp}))})).await;
    assert_eq!(ack["expires_at"], b_exp, "{ack}");
    assert_eq!(close_of(&mut ws).await, (4001, "token expired".to_owned()));
    assert!(now_ms() >= b_exp * 1000, "closed at {} before the new exp {b_exp}", now_ms());
}

#[tokio::test]
async fn refresh_takes_from_the_publish_bucket() {
    let gw = Gateway::start(&["--publish-rate", "1", "--publish-burst", "2"]).await;
    let (mut ws, _) = gw.ws("ida").await;
    let t = token(json!({"sub": "ida", "exp": now() + 3600}));
    for _ in 0..2 {
        assert_eq!(call(&mut ws, json!({"op":"refresh","token":t})).await["type"], "ack");
    }
    let limited = call(&mut ws, json!({"op":"refresh","token":t})).await;
    assert_eq!(limited["code"], "rate_limited", "{limited}");
    assert!(limited["retry_after_ms"].as_u64().unwrap() > 0);
    // The bucket is shared: a publish is refused too.
    assert_eq!(call(&mut ws, json!({"op":"publish","channel":"c","data":1})).await["code"], "rate_limited");
}

#[tokio::test]
async fn a_session_opened_with_connect_can_refresh() {
    let gw = Gateway::start(&[]).await;
    let mut ws = tokenless(&gw).await;
    let t = token(json!({"sub": "jo", "exp": now() + 60}));
    send_json(&mut ws, json!({"op":"connect","token":t})).await;
    assert_eq!(recv_json(&mut ws).await["type"], "welcome");
    let exp = now() + 3600;
    let ack = call(&mut ws, json!({"op":"refresh","token":token(json!({"sub":"jo","exp":exp}))})).await;
    assert_eq!((&ack["type"], &ack["expires_at"]), (&json!("ack"), &json!(exp)));
    assert!(ack.get("revoked").is_none(), "{ack}");
}

/// The query-string form of the request also counts as "a token": an invalid one is a 401.
#[tokio::test]
async fn an_invalid_token_in_the_handshake_is_still_401() {
    let gw = Gateway::start(&[]).await;
    let req = gw.url("?token=garbage").into_client_request().unwrap();
    match tokio_tungstenite::connect_async(req).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => assert_eq!(resp.status().as_u16(), 401),
        other => panic!("expected 401, got {:?}", other.map(|_| ())),
    }
}
