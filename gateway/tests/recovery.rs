//! Positions, recovery and history on a standalone gateway, through real sockets
//! (docs/protocol.md "Positions and recovery").

mod common;

use common::*;
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

const FAST: &[&str] = &["--publish-rate", "100000", "--publish-burst", "100000"];

/// Publishes `n` messages to `channel` (and one to another channel between each,
/// so seqs are not contiguous); returns the acks' seqs.
async fn publish_n(ws: &mut Ws, channel: &str, n: usize, tag: &str) -> Vec<u64> {
    let mut seqs = Vec::new();
    for i in 0..n {
        let ack = call(ws, json!({"op":"publish","channel":channel,"data":{"tag":tag,"i":i}})).await;
        assert_eq!(ack["type"], "ack", "{ack}");
        seqs.push(ack["seq"].as_u64().unwrap());
        call(ws, json!({"op":"publish","channel":"noise","data":i})).await;
    }
    seqs
}

/// Reads `n` messages of `channel`, skipping other frames.
async fn read_messages(ws: &mut Ws, channel: &str, n: usize) -> Vec<Value> {
    let mut got = Vec::new();
    while got.len() < n {
        let v = recv_json(ws).await;
        if v["type"] == "message" && v["channel"] == channel {
            got.push(v);
        }
    }
    got
}

fn seqs(msgs: &[Value]) -> Vec<u64> {
    msgs.iter().map(|m| m["seq"].as_u64().unwrap()).collect()
}

fn since(m: &Value) -> Value {
    json!({"seq": m["seq"], "epoch": m["epoch"]})
}

#[tokio::test]
async fn a_client_that_reconnects_recovers_what_it_missed_in_order_once() {
    let gw = Gateway::start(FAST).await;
    let (mut publisher, _) = gw.ws("pub").await;
    let (mut a, _) = gw.ws("alice").await;
    let ack = call(&mut a, json!({"op":"subscribe","channel":"room:1"})).await;
    assert_eq!(ack["channel"], "room:1");
    assert!(ack["position"]["epoch"].as_str().is_some_and(|e| !e.is_empty()), "{ack}");
    assert!(ack.get("recovered").is_none(), "no since, no recovered: {ack}");
    let first = publish_n(&mut publisher, "room:1", 1, "before").await;
    let got = read_messages(&mut a, "room:1", 1).await;
    assert_eq!(seqs(&got), first);
    let last = got[0].clone();
    a.close(None).await.unwrap();

    let missed = publish_n(&mut publisher, "room:1", 50, "away").await;
    let (mut a, _) = gw.ws("alice").await;
    // Publishes keep coming while the recovery runs: they follow it, once, in order.
    let during = tokio::spawn(async move {
        let later = publish_n(&mut publisher, "room:1", 50, "during").await;
        (publisher, later)
    });
    let ack = call(&mut a, json!({"op":"subscribe","channel":"room:1","since":since(&last)})).await;
    assert_eq!(ack["recovered"], true, "{ack}");
    let (_publisher, later) = during.await.unwrap();
    let got = read_messages(&mut a, "room:1", missed.len() + later.len()).await;
    let want: Vec<u64> = missed.iter().chain(&later).copied().collect();
    assert_eq!(seqs(&got), want, "every message after since, in order, once");
    assert!(got.iter().all(|m| m["epoch"] == last["epoch"]));
    // Nothing more: a ping's pong is the next frame.
    let pong = call(&mut a, json!({"op":"ping"})).await;
    assert_eq!(pong["type"], "pong");
}

#[tokio::test]
async fn the_subscribe_position_resumes_a_client_that_never_got_a_message() {
    let gw = Gateway::start(FAST).await;
    let (mut a, _) = gw.ws("alice").await;
    let ack = call(&mut a, json!({"op":"subscribe","channel":"quiet"})).await;
    let position = ack["position"].clone();
    a.close(None).await.unwrap();
    let (mut publisher, _) = gw.ws("pub").await;
    let missed = publish_n(&mut publisher, "quiet", 3, "away").await;
    let (mut a, _) = gw.ws("alice").await;
    let ack = call(&mut a, json!({"op":"subscribe","channel":"quiet","since":position})).await;
    assert_eq!(ack["recovered"], true, "{ack}");
    assert_eq!(seqs(&read_messages(&mut a, "quiet", 3).await), missed);
}

#[tokio::test]
async fn beyond_the_window_is_recovered_false_never_a_partial_stream() {
    let gw =
        Gateway::start(&["--history", "room:*=5/1h,*=off", "--publish-rate", "1000", "--publish-burst", "1000"]).await;
    let (mut publisher, _) = gw.ws("pub").await;
    let (mut a, _) = gw.ws("alice").await;
    let ack = call(&mut a, json!({"op":"subscribe","channel":"room:w"})).await;
    let position = ack["position"].clone();
    a.close(None).await.unwrap();
    // Six while away: the ring keeps five, so the first after `position` is gone.
    let sent = publish_n(&mut publisher, "room:w", 6, "away").await;
    let (mut a, _) = gw.ws("alice").await;
    let ack = call(&mut a, json!({"op":"subscribe","channel":"room:w","since":position.clone()})).await;
    assert_eq!((ack["recovered"].clone(), ack["reason"].clone()), (json!(false), json!("too_old")), "{ack}");
    assert!(ack["position"]["seq"].as_u64() >= sent.last().copied(), "the current position: {ack}");
    // Nothing of the partial history is sent; the live stream goes on.
    let live = publish_n(&mut publisher, "room:w", 1, "live").await;
    assert_eq!(seqs(&read_messages(&mut a, "room:w", 1).await), live);
    // Five back is still complete.
    let (mut b, _) = gw.ws("bob").await;
    let from = json!({"seq": sent[1], "epoch": position["epoch"]});
    let ack = call(&mut b, json!({"op":"subscribe","channel":"room:w","since":from})).await;
    assert_eq!(ack["recovered"], true, "{ack}");
    let want: Vec<u64> = sent[2..].iter().chain(&live).copied().collect();
    assert_eq!(seqs(&read_messages(&mut b, "room:w", want.len()).await), want);
    // A channel without a rule: no history.
    let ack = call(&mut b, json!({"op":"subscribe","channel":"other","since":from})).await;
    assert_eq!((ack["recovered"].clone(), ack["reason"].clone()), (json!(false), json!("no_history")), "{ack}");
}

#[tokio::test]
async fn more_missed_than_the_recovery_limit_is_too_many() {
    let gw = Gateway::start(&["--recovery-max", "10", "--publish-rate", "1000", "--publish-burst", "1000"]).await;
    let (mut publisher, _) = gw.ws("pub").await;
    let (mut a, _) = gw.ws("alice").await;
    let position = call(&mut a, json!({"op":"subscribe","channel":"c"})).await["position"].clone();
    publish_n(&mut publisher, "c", 11, "x").await;
    let (mut b, _) = gw.ws("bob").await;
    let ack = call(&mut b, json!({"op":"subscribe","channel":"c","since":position})).await;
    assert_eq!((ack["recovered"].clone(), ack["reason"].clone()), (json!(false), json!("too_many")), "{ack}");
    let pong = call(&mut b, json!({"op":"ping"})).await;
    assert_eq!(pong["type"], "pong", "no message was sent after too_many");
}

#[tokio::test]
async fn an_unknown_epoch_or_a_future_position_has_a_defined_answer() {
    let gw = Gateway::start(FAST).await;
    let (mut a, _) = gw.ws("alice").await;
    let now = call(&mut a, json!({"op":"subscribe","channel":"c"})).await["position"].clone();
    let (mut b, _) = gw.ws("bob").await;
    let ack =
        call(&mut b, json!({"op":"subscribe","channel":"c","since":{"seq":now["seq"],"epoch":"s-not-this-one"}})).await;
    assert_eq!((ack["recovered"].clone(), ack["reason"].clone()), (json!(false), json!("epoch_changed")), "{ack}");
    assert_eq!(ack["position"]["epoch"], now["epoch"]);
    let ahead = json!({"seq": now["seq"].as_u64().unwrap() + 1000, "epoch": now["epoch"]});
    let ack = call(&mut b, json!({"op":"subscribe","channel":"d","since":ahead})).await;
    assert_eq!((ack["recovered"].clone(), ack["reason"].clone()), (json!(false), json!("ahead")), "{ack}");
    let h = call(&mut b, json!({"op":"history","channel":"c","since":ahead})).await;
    assert_eq!((h["type"].clone(), h["lost"].clone()), (json!("history"), json!("ahead")), "{h}");
    assert_eq!(h["messages"], json!([]));
}

#[tokio::test]
async fn a_restarted_gateway_has_a_new_epoch() {
    let gw = Gateway::start(FAST).await;
    let (mut a, _) = gw.ws("alice").await;
    let before = call(&mut a, json!({"op":"subscribe","channel":"c"})).await["position"].clone();
    drop(a);
    gw.stop().await;
    let gw = Gateway::start(FAST).await;
    let (mut a, _) = gw.ws("alice").await;
    let ack = call(&mut a, json!({"op":"subscribe","channel":"c","since":before})).await;
    assert_eq!((ack["recovered"].clone(), ack["reason"].clone()), (json!(false), json!("epoch_changed")), "{ack}");
    assert_ne!(ack["position"]["epoch"], before["epoch"]);
}

#[tokio::test]
async fn bad_since_and_limit_values_are_bad_requests() {
    let gw = Gateway::start(FAST).await;
    let (mut a, _) = gw.ws("alice").await;
    let long = "e".repeat(65);
    for bad in [
        json!({"op":"subscribe","channel":"c","since":{"seq":-1,"epoch":"e"}}),
        json!({"op":"subscribe","channel":"c","since":{"seq":"1","epoch":"e"}}),
        json!({"op":"subscribe","channel":"c","since":{"seq":1.5,"epoch":"e"}}),
        json!({"op":"subscribe","channel":"c","since":{"seq":1}}),
        json!({"op":"subscribe","channel":"c","since":{"seq":1,"epoch":"e","x":1}}),
        json!({"op":"subscribe","channel":"c","since":{"seq":1,"epoch":long}}),
        json!({"op":"subscribe","channel":"c","since":{"seq":1,"epoch":"a b"}}),
        json!({"op":"subscribe","channel":"c","since":[1,"e"]}),
        json!({"op":"history","channel":"c","limit":0}),
        json!({"op":"history","channel":"c","limit":-5}),
        json!({"op":"history","channel":"c","limit":1001}),
        json!({"op":"history","channel":"c","limit":1.5}),
        json!({"op":"history","channel":"c","limit":"10"}),
        json!({"op":"history","channel":"c","limit":1e12}),
    ] {
        let r = call(&mut a, bad.clone()).await;
        assert_eq!((r["type"].clone(), r["code"].clone()), (json!("error"), json!("bad_request")), "{bad} → {r}");
    }
    // A seq beyond u64 (written by hand: serde_json would not encode it).
    let huge = r#"{"op":"subscribe","channel":"c","ref":"h","since":{"seq":18446744073709551616,"epoch":"e"}}"#;
    a.send(Message::Text(huge.into())).await.unwrap();
    let r = recv_json(&mut a).await;
    assert_eq!((r["code"].clone(), r["ref"].clone()), (json!("bad_request"), json!("h")), "{r}");
    // None of them subscribed: a publish reaches nobody.
    let (mut p, _) = gw.ws("pub").await;
    call(&mut p, json!({"op":"publish","channel":"c","data":1})).await;
    assert_eq!(call(&mut a, json!({"op":"ping"})).await["type"], "pong");
}

#[tokio::test]
async fn history_on_a_forbidden_channel_is_refused() {
    let gw = Gateway::start(FAST).await;
    let t = token(json!({"sub":"carol","exp":now()+60,"channels":["room:*"]}));
    let mut c = gw.ws_with_header(&t).await.unwrap();
    assert_eq!(recv_json(&mut c).await["type"], "welcome");
    let r = call(&mut c, json!({"op":"history","channel":"secret:1"})).await;
    assert_eq!((r["type"].clone(), r["code"].clone()), (json!("error"), json!("forbidden")), "{r}");
    let r = call(&mut c, json!({"op":"history","channel":"room:1"})).await;
    assert_eq!(r["type"], "history", "{r}");
}

#[tokio::test]
async fn history_returns_the_newest_or_pages_after_a_position() {
    let gw = Gateway::start(FAST).await;
    let (mut p, _) = gw.ws("pub").await;
    let sent = publish_n(&mut p, "h", 25, "x").await;
    let h = call(&mut p, json!({"op":"history","channel":"h","limit":5})).await;
    let got: Vec<u64> = h["messages"].as_array().unwrap().iter().map(|m| m["seq"].as_u64().unwrap()).collect();
    assert_eq!(got, sent[20..], "{h}");
    assert_eq!(h["messages"][0]["data"], json!({"tag":"x","i":20}));
    assert_eq!(h["more"], false);
    // Paged from the first message's position.
    let epoch = h["position"]["epoch"].clone();
    let mut cursor = json!({"seq": sent[0], "epoch": epoch});
    let mut all: Vec<u64> = Vec::new();
    loop {
        let h = call(&mut p, json!({"op":"history","channel":"h","since":cursor,"limit":10})).await;
        let page: Vec<u64> = h["messages"].as_array().unwrap().iter().map(|m| m["seq"].as_u64().unwrap()).collect();
        all.extend(&page);
        if h["more"] == false {
            break;
        }
        cursor = h["position"].clone();
        assert_eq!(cursor["seq"].as_u64(), page.last().copied());
    }
    assert_eq!(all, sent[1..]);
}

#[tokio::test]
async fn a_slow_consumer_closed_4002_recovers_what_its_queue_held() {
    // The default heartbeat (the harness's 300 ms would close a client that does not read as 4000 first).
    let gw = Gateway::start(&[FAST, &["--heartbeat-interval", "25s", "--heartbeat-timeout", "10s"]].concat()).await;
    let (mut slow, _) = gw.ws("slow").await;
    let position = call(&mut slow, json!({"op":"subscribe","channel":"burst"})).await["position"].clone();
    // 2 KB messages: far more than the socket buffers and twice the send queue hold.
    let body = "x".repeat(2048);
    let (mut p, _) = gw.ws("pub").await;
    let mut sent = Vec::new();
    for i in 0..4000 {
        let ack = call(&mut p, json!({"op":"publish","channel":"burst","data":{"i":i,"b":body}})).await;
        sent.push(ack["seq"].as_u64().unwrap());
    }
    // Read what reached the socket, up to the close.
    let mut got = Vec::new();
    let code = loop {
        match tokio::time::timeout(WAIT, slow.next()).await.expect("frames then a close") {
            Some(Ok(Message::Text(t))) => {
                let v: Value = serde_json::from_str(&t).unwrap();
                if v["type"] == "message" {
                    got.push(v);
                }
            }
            Some(Ok(Message::Close(Some(f)))) => break u16::from(f.code),
            Some(Ok(_)) => {}
            other => panic!("no close frame: {other:?}"),
        }
    };
    assert_eq!(code, 4002);
    assert!(got.len() < sent.len(), "the slow consumer was closed before it had everything");
    let resume = got.last().map_or(position, since);
    let (mut again, _) = gw.ws("slow").await;
    let ack = call(&mut again, json!({"op":"subscribe","channel":"burst","since":resume})).await;
    assert_eq!(ack["recovered"], true, "{ack}");
    let rest = read_messages(&mut again, "burst", sent.len() - got.len()).await;
    let all: Vec<u64> = seqs(&got).into_iter().chain(seqs(&rest)).collect();
    assert_eq!(all, sent, "every message once, in order, across the close");
    let _ = again.send(Message::Close(None)).await;
}

#[tokio::test]
async fn the_push_api_reads_history_with_defined_answers() {
    use proto::push::v1 as pb;
    let gw = Gateway::start(FAST).await;
    let mut push = pb::push_client::PushClient::connect(format!("http://{}", gw.grpc)).await.unwrap();
    let mut seqs = Vec::new();
    for i in 0..5 {
        let r = push
            .publish(pb::PublishRequest {
                channel: "feed".into(),
                data_json: format!("{{\"i\":{i}}}"),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        seqs.push(r.seq);
    }
    let h = push
        .history(pb::HistoryRequest { channel: "feed".into(), limit: 3, ..Default::default() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(h.messages.iter().map(|m| m.seq).collect::<Vec<_>>(), seqs[2..]);
    assert_eq!(h.messages[0].data_json, r#"{"i":2}"#);
    assert_eq!(h.messages[0].from, "system");
    assert_eq!(h.lost, 0);
    let epoch = h.position.clone().unwrap().epoch;
    let after = push
        .history(pb::HistoryRequest {
            channel: "feed".into(),
            since: Some(pb::Position { seq: seqs[0], epoch: epoch.clone() }),
            limit: 2,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(after.messages.iter().map(|m| m.seq).collect::<Vec<_>>(), seqs[1..3]);
    assert!(after.more);
    let pos = push
        .history(pb::HistoryRequest { channel: "feed".into(), position_only: true, ..Default::default() })
        .await
        .unwrap()
        .into_inner();
    assert!(pos.messages.is_empty());
    assert!(pos.position.unwrap().seq >= seqs[4]);
    let lost = push
        .history(pb::HistoryRequest {
            channel: "feed".into(),
            since: Some(pb::Position { seq: 1, epoch: "other".into() }),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(lost.lost, pb::history_response::Lost::EpochChanged as i32);
    for bad in [
        pb::HistoryRequest { channel: "feed".into(), limit: 1001, ..Default::default() },
        pb::HistoryRequest { channel: "bad channel".into(), ..Default::default() },
    ] {
        let e = push.history(bad).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e}");
    }
}
