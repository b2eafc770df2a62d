//! Pub/sub, direct messages, presence and per-connection limits, through real sockets.

mod common;

use common::*;
use futures_util::future::join_all;
use serde_json::{Value, json};

#[tokio::test]
async fn every_subscriber_gets_every_message_in_the_same_order() {
    let gw = Gateway::start(&["--publish-rate", "10000", "--publish-burst", "10000"]).await;
    const SUBS: usize = 24;
    const PUBLISHERS: usize = 3;
    const EACH: usize = 100;
    let mut subs = Vec::new();
    for i in 0..SUBS {
        let (mut ws, _) = gw.ws(&format!("sub{i}")).await;
        assert_eq!(call(&mut ws, json!({"op":"subscribe","channel":"news"})).await["type"], "ack");
        subs.push(ws);
    }
    // Publishers publish concurrently; each checks its acks.
    let publishers = (0..PUBLISHERS).map(|p| {
        let gw = &gw;
        async move {
            let (mut ws, _) = gw.ws(&format!("pub{p}")).await;
            let mut acked = Vec::new();
            for n in 0..EACH {
                let ack = call(&mut ws, json!({"op":"publish","channel":"news","data":{"p":p,"n":n}})).await;
                assert_eq!(ack["type"], "ack", "{ack}");
                acked.push((ack["id"].as_str().unwrap().to_owned(), ack["seq"].as_u64().unwrap()));
            }
            acked
        }
    });
    let acked: Vec<(String, u64)> = join_all(publishers).await.into_iter().flatten().collect();
    assert_eq!(acked.len(), PUBLISHERS * EACH);

    let received = join_all(subs.iter_mut().map(|ws| async move {
        let mut got = Vec::new();
        while got.len() < PUBLISHERS * EACH {
            let m = recv_type(ws, "message").await;
            got.push(m);
        }
        got
    }))
    .await;
    let reference: Vec<(Value, Value)> = received[0].iter().map(|m| (m["id"].clone(), m["seq"].clone())).collect();
    for (i, got) in received.iter().enumerate() {
        let order: Vec<(Value, Value)> = got.iter().map(|m| (m["id"].clone(), m["seq"].clone())).collect();
        assert_eq!(order, reference, "subscriber {i} saw another order");
        // seq starts above 0 and strictly increases (docs/protocol.md: not contiguous), and
        // each publisher's own messages keep their order.
        assert!(got[0]["seq"].as_u64().unwrap() >= 1);
        for w in got.windows(2) {
            assert!(w[1]["seq"].as_u64().unwrap() > w[0]["seq"].as_u64().unwrap(), "{} then {}", w[0], w[1]);
        }
        assert!(got.iter().all(|m| m["channel"] == "news"));
        for p in 0..PUBLISHERS {
            let ns: Vec<u64> =
                got.iter().filter(|m| m["data"]["p"] == json!(p)).map(|m| m["data"]["n"].as_u64().unwrap()).collect();
            assert_eq!(ns, (0..EACH as u64).collect::<Vec<_>>());
        }
    }
    // Acks carry the same id and seq that subscribers saw.
    for (id, seq) in &acked {
        assert!(reference.contains(&(json!(id), json!(seq))));
    }
}

#[tokio::test]
async fn direct_message_reaches_every_connection_of_the_user() {
    let gw = Gateway::start(&[]).await;
    let (mut tab1, _) = gw.ws("bob").await;
    let (mut tab2, _) = gw.ws("bob").await;
    let (mut other, _) = gw.ws("carol").await;
    let (mut alice, _) = gw.ws("alice").await;
    let ack = call(&mut alice, json!({"op":"send","user":"bob","data":{"t":"psst"}})).await;
    assert_eq!((ack["type"].as_str(), ack["delivered"].as_u64()), (Some("ack"), Some(2)));
    for ws in [&mut tab1, &mut tab2] {
        let m = recv_json(ws).await;
        assert_eq!(m["type"], "direct");
        assert_eq!((m["from"].as_str(), m["to"].as_str()), (Some("alice"), Some("bob")));
        assert_eq!(m["data"]["t"], "psst");
        assert_eq!(m["id"], ack["id"]);
    }
    // carol got nothing: her next frame is the reply to her own ping.
    assert_eq!(call(&mut other, json!({"op":"ping"})).await["type"], "pong");
    // Offline users: acked with 0 deliveries.
    let ack = call(&mut alice, json!({"op":"send","user":"nobody","data":1})).await;
    assert_eq!(ack["delivered"], 0);
}

#[tokio::test]
async fn presence_channel_join_leave_and_query() {
    let gw = Gateway::start(&[]).await;
    let (mut watcher, _) = gw.ws("watcher").await;
    call(&mut watcher, json!({"op":"subscribe","channel":"room:1"})).await;
    assert_eq!(recv_type(&mut watcher, "join").await["user"], "watcher");
    let (mut t1, _) = gw.ws("dave").await;
    let (mut t2, _) = gw.ws("dave").await;
    call(&mut t1, json!({"op":"subscribe","channel":"room:1"})).await;
    call(&mut t2, json!({"op":"subscribe","channel":"room:1"})).await;
    let j = recv_type(&mut watcher, "join").await;
    assert_eq!(j["user"], "dave");
    let p = call(&mut watcher, json!({"op":"presence","channel":"room:1"})).await;
    assert_eq!(p["users"], json!(["dave", "watcher"]));
    // Closing one tab is not a leave; closing the last one is.
    let mut push = proto::push::v1::push_client::PushClient::connect(format!("http://{}", gw.grpc)).await.unwrap();
    let connections = |r: proto::push::v1::IsOnlineResponse| r.users[0].connections;
    t1.close(None).await.unwrap();
    eventually!(
        connections(
            push.is_online(proto::push::v1::IsOnlineRequest { users: vec!["dave".into()] }).await.unwrap().into_inner()
        ) == 1,
        "first tab never closed"
    );
    // Everything the watcher got until its pong: no leave.
    send_json(&mut watcher, json!({"op":"ping","ref":"sync"})).await;
    loop {
        let v = recv_json(&mut watcher).await;
        assert_ne!(v["type"], "leave", "a tab closing is not a leave");
        if v["ref"] == "sync" {
            break;
        }
    }
    t2.close(None).await.unwrap();
    let l = recv_type(&mut watcher, "leave").await;
    assert_eq!(l["user"], "dave");
    let p = call(&mut watcher, json!({"op":"presence","channel":"room:1"})).await;
    assert_eq!(p["users"], json!(["watcher"]));
}

#[tokio::test]
async fn channel_claims_are_enforced() {
    let gw = Gateway::start(&[]).await;
    let t = token(json!({"sub":"eve","exp":now()+60,"channels":["room:*"]}));
    let mut ws = gw.ws_with_header(&t).await.unwrap();
    recv_json(&mut ws).await;
    assert_eq!(call(&mut ws, json!({"op":"subscribe","channel":"room:9"})).await["type"], "ack");
    for op in [json!({"op":"subscribe","channel":"admin"}), json!({"op":"publish","channel":"admin","data":1})] {
        let e = call(&mut ws, op).await;
        assert_eq!((e["type"].as_str(), e["code"].as_str()), (Some("error"), Some("forbidden")));
    }
}

#[tokio::test]
async fn subscription_limit() {
    let gw = Gateway::start(&["--max-subscriptions", "3"]).await;
    let (mut ws, welcome) = gw.ws("a").await;
    assert_eq!(welcome["limits"]["max_subscriptions"], 3);
    for i in 0..3 {
        assert_eq!(call(&mut ws, json!({"op":"subscribe","channel":format!("c{i}")})).await["type"], "ack");
    }
    // Re-subscribing is fine; a fourth is not.
    assert_eq!(call(&mut ws, json!({"op":"subscribe","channel":"c0"})).await["type"], "ack");
    let e = call(&mut ws, json!({"op":"subscribe","channel":"c3"})).await;
    assert_eq!(e["code"], "too_many_subscriptions");
    assert_eq!(call(&mut ws, json!({"op":"unsubscribe","channel":"c0"})).await["type"], "ack");
    assert_eq!(call(&mut ws, json!({"op":"subscribe","channel":"c3"})).await["type"], "ack");
}

/// Sends `count` subscribe commands without waiting for replies while reading
/// the replies as they come; returns (acks, `too_many_subscriptions` errors)
/// and the session back.
async fn pipelined_subscribes(ws: Ws, count: usize) -> (usize, usize, Ws) {
    use futures_util::{SinkExt, StreamExt};
    let (mut tx, mut rx) = ws.split();
    let sender = tokio::spawn(async move {
        for i in 0..count {
            let cmd = json!({"op":"subscribe","channel":format!("ch{i}"),"ref":i}).to_string();
            tx.feed(tokio_tungstenite::tungstenite::Message::text(cmd)).await.expect("send");
        }
        tx.flush().await.expect("flush");
        tx
    });
    let (mut acks, mut refused) = (0, 0);
    while acks + refused < count {
        let msg = tokio::time::timeout(WAIT, rx.next()).await.expect("replies keep coming").expect("open").expect("ok");
        if !msg.is_text() {
            continue; // heartbeat pings
        }
        let v: Value = serde_json::from_str(msg.to_text().expect("text")).expect("json");
        if v.get("ref").is_none() {
            continue; // an event (the subscriber's own join)
        }
        match (v["type"].as_str(), v["code"].as_str()) {
            (Some("ack"), _) => acks += 1,
            (Some("error"), Some("too_many_subscriptions")) => refused += 1,
            _ => panic!("unexpected reply {v}"),
        }
    }
    let tx = sender.await.expect("sender");
    (acks, refused, tx.reunite(rx).expect("same session"))
}

/// 100k subscribes pipelined by a client that reads as it goes: with the limit
/// raised to 100k every channel is held (the client is paced by its reading,
/// not closed as a slow consumer for its own replies), a publish reaches the
/// last channel, and closing the session releases all of them.
#[tokio::test]
async fn subscribing_to_100k_channels_holds_them_and_releases_them() {
    const N: usize = 100_000;
    // Heartbeats slower than the harness default (300 ms): between steps this test does not
    // read the subscriber's socket (so it would not answer pings) for longer than that.
    let gw = Gateway::start(&[
        "--max-subscriptions",
        "100000",
        "--send-queue",
        "64",
        "--heartbeat-interval",
        "10s",
        "--heartbeat-timeout",
        "10s",
    ])
    .await;
    let (ws, _) = gw.ws("many").await;
    let (acks, refused, mut ws) = pipelined_subscribes(ws, N).await;
    assert_eq!((acks, refused), (N, 0));
    let page = gw.admin_get("/metrics").await.1;
    assert_eq!(metric(&page, "switchboard_gateway_subscriptions_active", ""), N as f64);
    assert_eq!(metric(&page, "switchboard_gateway_queue_full_total", ""), 0.0);

    let (mut publisher, _) = gw.ws("pub").await;
    assert_eq!(
        call(&mut publisher, json!({"op":"publish","channel":format!("ch{}", N - 1),"data":"last"})).await["type"],
        "ack"
    );
    let m = recv_type(&mut ws, "message").await;
    assert_eq!((m["channel"].as_str(), m["data"].as_str()), (Some("ch99999"), Some("last")));

    drop(ws);
    eventually!(
        metric(&gw.admin_get("/metrics").await.1, "switchboard_gateway_subscriptions_active", "") == 0.0,
        "closing the session releases its 100k subscriptions"
    );
    // The hub no longer knows the channels: a publish there reaches nobody.
    let a = call(&mut publisher, json!({"op":"publish","channel":"ch5","data":1})).await;
    assert_eq!(a["type"], "ack");
}

/// A flood of subscribes past the default limit (128) is refused one by one;
/// the session keeps working and nothing else is held.
#[tokio::test]
async fn a_flood_of_subscribes_past_the_limit_is_refused_one_by_one() {
    const N: usize = 100_000;
    let gw = Gateway::start(&["--heartbeat-interval", "10s", "--heartbeat-timeout", "10s"]).await;
    let (ws, welcome) = gw.ws("greedy").await;
    let limit = welcome["limits"]["max_subscriptions"].as_u64().unwrap() as usize;
    assert_eq!(limit, 128);
    let (acks, refused, mut ws) = pipelined_subscribes(ws, N).await;
    assert_eq!((acks, refused), (limit, N - limit));
    let page = gw.admin_get("/metrics").await.1;
    assert_eq!(metric(&page, "switchboard_gateway_subscriptions_active", ""), limit as f64);
    assert_eq!(call(&mut ws, json!({"op":"ping"})).await["type"], "pong");
}

#[tokio::test]
async fn publish_rate_limit_then_flood_close() {
    let gw = Gateway::start(&["--publish-rate", "1", "--publish-burst", "3"]).await;
    let (mut ws, _) = gw.ws("a").await;
    for _ in 0..3 {
        assert_eq!(call(&mut ws, json!({"op":"publish","channel":"c","data":1})).await["type"], "ack");
    }
    let e = call(&mut ws, json!({"op":"publish","channel":"c","data":1})).await;
    assert_eq!(e["code"], "rate_limited");
    assert!(e["retry_after_ms"].as_u64().unwrap() > 0);
    // Keep going while limited: closed with 4003.
    for _ in 0..10 {
        send_json(&mut ws, json!({"op":"publish","channel":"c","data":1})).await;
    }
    let close = expect_close(&mut ws).await;
    assert_eq!(u16::from(close.code), 4003);
}

#[tokio::test]
async fn command_errors_have_stable_codes_and_keep_the_session() {
    let gw = Gateway::start(&[]).await;
    let (mut ws, _) = gw.ws("a").await;
    let cases = [
        ("not json", "bad_json"),
        (r#"{"op":"dance","ref":"r1"}"#, "unknown_op"),
        (r#"{"op":"subscribe","ref":"r2"}"#, "bad_request"),
        (r#"{"op":"subscribe","channel":"has space","ref":"r3"}"#, "bad_channel"),
        (r#"{"op":"publish","channel":"c","ref":"r4"}"#, "bad_request"),
    ];
    for (text, code) in cases {
        ws_send_text(&mut ws, text).await;
        let e = recv_json(&mut ws).await;
        assert_eq!((e["type"].as_str(), e["code"].as_str()), (Some("error"), Some(code)), "{text}");
        assert!(e["message"].as_str().is_some_and(|m| !m.is_empty()));
    }
    assert_eq!(call(&mut ws, json!({"op":"ping"})).await["type"], "pong");
}

async fn ws_send_text(ws: &mut Ws, text: &str) {
    use futures_util::SinkExt;
    ws.send(tokio_tungstenite::tungstenite::Message::text(text)).await.unwrap();
}

#[tokio::test]
async fn a_publish_to_a_channel_nobody_follows_still_gets_an_increasing_seq() {
    let gw = Gateway::start(&[]).await;
    let (mut ws, _) = gw.ws("lonely").await;
    let mut last = 0;
    for n in 0..3 {
        let ack = call(&mut ws, json!({"op":"publish","channel":"void","data":n})).await;
        let seq = ack["seq"].as_u64().unwrap_or_else(|| panic!("{ack}"));
        assert!(seq > last, "{ack} after seq {last}");
        last = seq;
    }
    // A subscriber that comes later sees positions after those.
    let (mut sub, _) = gw.ws("late").await;
    call(&mut sub, json!({"op":"subscribe","channel":"void"})).await;
    let ack = call(&mut ws, json!({"op":"publish","channel":"void","data":"x"})).await;
    let m = recv_type(&mut sub, "message").await;
    assert_eq!(m["seq"], ack["seq"]);
    assert!(m["seq"].as_u64().unwrap() > last);
}

#[tokio::test]
async fn a_retry_with_the_same_idempotency_key_is_answered_once_and_shown_once() {
    let gw = Gateway::start(&[]).await;
    let (mut sub, _) = gw.ws("sub").await;
    call(&mut sub, json!({"op":"subscribe","channel":"pay"})).await;
    let (mut p, _) = gw.ws("payer").await;
    let publish = json!({"op":"publish","channel":"pay","data":{"amount":5},"idempotency_key":"pay-1"});
    let a1 = call(&mut p, publish.clone()).await;
    let a2 = call(&mut p, publish.clone()).await;
    assert_eq!(a1.get("duplicate"), None, "{a1}");
    assert_eq!((&a2["id"], &a2["seq"], &a2["duplicate"]), (&a1["id"], &a1["seq"], &json!(true)), "{a2}");
    // Another user's identical key is another message.
    let (mut q, _) = gw.ws("other").await;
    let b = call(&mut q, publish).await;
    assert_ne!(b["id"], a1["id"]);
    let send = json!({"op":"send","user":"sub","data":"hi","idempotency_key":"dm-1"});
    let s1 = call(&mut p, send.clone()).await;
    let s2 = call(&mut p, send).await;
    assert_eq!((s1["delivered"].as_u64(), &s2["id"], &s2["duplicate"]), (Some(1), &s1["id"], &json!(true)));
    let end = call(&mut p, json!({"op":"publish","channel":"pay","data":"end"})).await;
    let mut got = Vec::new();
    loop {
        let m = recv_json(&mut sub).await;
        if m["type"] == "message" || m["type"] == "direct" {
            got.push(m["id"].clone());
            if m["id"] == end["id"] {
                break;
            }
        }
    }
    assert_eq!(got, vec![a1["id"].clone(), b["id"].clone(), s1["id"].clone(), end["id"].clone()]);
}
