//! Session lifecycle: every close code, heartbeats, token expiry, slow consumers.

mod common;

use std::time::Duration;

use common::*;
use futures_util::{SinkExt, StreamExt};
use serde_json::json;
use tokio::io::AsyncWriteExt;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::frame::Frame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data, OpCode};

async fn close_code(ws: &mut Ws) -> u16 {
    u16::from(expect_close(ws).await.code)
}

#[tokio::test]
async fn binary_frame_closes_1003() {
    let gw = Gateway::start(&[]).await;
    let (mut ws, _) = gw.ws("a").await;
    ws.send(Message::binary(vec![1, 2, 3])).await.unwrap();
    assert_eq!(close_code(&mut ws).await, 1003);
}

#[tokio::test]
async fn oversized_message_closes_1009_whole_or_fragmented() {
    let gw = Gateway::start(&["--max-message-bytes", "1024"]).await;
    let (mut ws, _) = gw.ws("a").await;
    // Exactly the limit is fine.
    let at_limit = format!(r#"{{"op":"ping","pad":"{}"}}"#, "x".repeat(1024 - 22));
    assert_eq!(at_limit.len(), 1024);
    ws.send(Message::text(at_limit)).await.unwrap();
    assert_eq!(recv_json(&mut ws).await["type"], "pong");
    ws.send(Message::text("x".repeat(1025))).await.unwrap();
    assert_eq!(close_code(&mut ws).await, 1009);

    // Fragments of 600 bytes each: every frame is small, the message is not.
    let (mut ws, _) = gw.ws("b").await;
    ws.send(Message::Frame(Frame::message(vec![b' '; 600], OpCode::Data(Data::Text), false))).await.unwrap();
    ws.send(Message::Frame(Frame::message(vec![b' '; 600], OpCode::Data(Data::Continue), true))).await.unwrap();
    assert_eq!(close_code(&mut ws).await, 1009);
}

#[tokio::test]
async fn fragmented_message_within_the_limit_is_reassembled() {
    let gw = Gateway::start(&[]).await;
    let (mut ws, _) = gw.ws("a").await;
    let text = br#"{"op":"ping","ref":"frag"}"#;
    let (a, b) = text.split_at(10);
    ws.send(Message::Frame(Frame::message(a.to_vec(), OpCode::Data(Data::Text), false))).await.unwrap();
    ws.send(Message::Frame(Frame::message(b.to_vec(), OpCode::Data(Data::Continue), true))).await.unwrap();
    let pong = recv_json(&mut ws).await;
    assert_eq!((pong["type"].as_str(), pong["ref"].as_str()), (Some("pong"), Some("frag")));
}

#[tokio::test]
async fn invalid_utf8_closes_1007() {
    let gw = Gateway::start(&[]).await;
    let (mut ws, _) = gw.ws("a").await;
    ws.send(Message::Frame(Frame::message(vec![b'{', 0xff, 0xfe, b'}'], OpCode::Data(Data::Text), true)))
        .await
        .unwrap();
    assert_eq!(close_code(&mut ws).await, 1007);
}

#[tokio::test]
async fn unmasked_client_frame_closes_1002() {
    let gw = Gateway::start(&[]).await;
    let mut s = raw_session(&gw).await;
    s.write_all(b"\x81\x02{}").await.unwrap(); // FIN+text, no mask bit
    assert_eq!(raw_close_code(&mut s).await, 1002);
}

#[tokio::test]
async fn continuation_without_a_message_closes_1002() {
    let gw = Gateway::start(&[]).await;
    let mut s = raw_session(&gw).await;
    s.write_all(&[0x80, 0x80, 0, 0, 0, 0]).await.unwrap(); // FIN+continuation, masked, empty
    assert_eq!(raw_close_code(&mut s).await, 1002);
}

#[tokio::test]
async fn client_close_is_answered() {
    let gw = Gateway::start(&[]).await;
    let (mut ws, _) = gw.ws("a").await;
    ws.close(None).await.unwrap();
    // tungstenite reports the server's answer as the end of the stream.
    let end = tokio::time::timeout(WAIT, async {
        while let Some(m) = ws.next().await {
            if m.is_err() {
                break;
            }
        }
    })
    .await;
    assert!(end.is_ok(), "server never answered the close");
}

#[tokio::test]
async fn heartbeat_timeout_closes_a_silent_client_4000_and_frees_its_state() {
    let gw = Gateway::start(&[]).await; // 300 ms interval + 300 ms timeout
    let (mut silent, _) = gw.ws("silent").await;
    call(&mut silent, json!({"op":"subscribe","channel":"room:hb"})).await;
    let (mut watcher, _) = gw.ws("watcher").await;
    call(&mut watcher, json!({"op":"subscribe","channel":"room:hb"})).await;
    // Don't read from `silent`: tungstenite answers pings only while reading.
    let l = recv_type(&mut watcher, "leave").await;
    assert_eq!(l["user"], "silent");
    assert_eq!(close_code(&mut silent).await, 4000);
    let p = call(&mut watcher, json!({"op":"presence","channel":"room:hb"})).await;
    assert_eq!(p["users"], json!(["watcher"]));
}

#[tokio::test]
async fn a_client_that_answers_pings_stays() {
    let gw = Gateway::start(&[]).await;
    let (mut ws, _) = gw.ws("a").await;
    // Read (and so answer pings) for five heartbeat windows.
    let deadline = tokio::time::Instant::now() + Duration::from_millis(3000);
    let mut pings = 0;
    while let Ok(Some(m)) = tokio::time::timeout_at(deadline, ws.next()).await {
        match m.unwrap() {
            Message::Ping(_) => pings += 1,
            Message::Close(c) => panic!("closed: {c:?}"),
            _ => {}
        }
    }
    assert!(pings >= 3, "only {pings} pings");
    assert_eq!(call(&mut ws, json!({"op":"ping"})).await["type"], "pong");
}

#[tokio::test]
async fn expired_token_ends_the_session_4001() {
    let gw = Gateway::start(&["--heartbeat-interval", "30s"]).await;
    let t = token(json!({"sub":"a","exp":now()+2}));
    let mut ws = gw.ws_with_header(&t).await.unwrap();
    recv_json(&mut ws).await;
    assert_eq!(close_code(&mut ws).await, 4001);
}

#[tokio::test]
async fn slow_consumer_is_cut_and_does_not_stall_a_fast_one() {
    let gw = Gateway::start(&[
        "--send-queue",
        "256",
        "--publish-rate",
        "100000",
        "--publish-burst",
        "100000",
        "--heartbeat-interval",
        "30s",
    ])
    .await;
    let (mut slow, _) = gw.ws("slow").await;
    call(&mut slow, json!({"op":"subscribe","channel":"firehose"})).await;
    let (mut fast, _) = gw.ws("fast").await;
    call(&mut fast, json!({"op":"subscribe","channel":"firehose"})).await;
    let (mut publisher, _) = gw.ws("pub").await;
    let blob = "x".repeat(16 * 1024);
    const N: usize = 1500; // ~24 MiB: more than the slow socket's kernel buffers and queue
    let publish = async {
        for n in 0..N {
            let ack = call(&mut publisher, json!({"op":"publish","channel":"firehose","data":{"n":n,"b":blob}})).await;
            assert_eq!(ack["type"], "ack");
        }
    };
    let consume = async {
        let mut next = 0;
        while next < N {
            let m = recv_type(&mut fast, "message").await;
            assert_eq!(m["data"]["n"], next);
            next += 1;
        }
    };
    tokio::join!(publish, consume);
    eventually!(
        metric(&gw.admin_get("/metrics").await.1, "switchboard_gateway_connections_closed_total", "slow_consumer")
            >= 1.0,
        "slow consumer was not closed"
    );
    // The slow client now reads: it ends (4002 if the close frame fit, else a dropped connection)
    // and it never got all N messages.
    let mut got = 0;
    let ended = tokio::time::timeout(WAIT, async {
        loop {
            match slow.next().await {
                Some(Ok(Message::Text(_))) => got += 1,
                Some(Ok(Message::Close(c))) => return c.map(|c| u16::from(c.code)),
                Some(Ok(_)) => {}
                _ => return None,
            }
        }
    })
    .await
    .expect("slow session never ended");
    assert!(ended.is_none() || ended == Some(4002), "{ended:?}");
    assert!(got < N);
    assert!(metric(&gw.admin_get("/metrics").await.1, "switchboard_gateway_queue_full_total", "") >= 1.0);
}

#[tokio::test]
async fn echo_route_is_off_by_default_and_echoes_when_enabled() {
    let gw = Gateway::start(&[]).await;
    assert_eq!(http_get(gw.client, "/echo").await.0, 404);

    let gw = Gateway::start(&["--echo-route"]).await;
    let (mut ws, _) = tokio_tungstenite::connect_async(format!("ws://{}/echo", gw.client)).await.unwrap();
    ws.send(Message::text("héllo")).await.unwrap();
    ws.send(Message::binary(vec![0u8, 1, 2])).await.unwrap();
    let mut got = Vec::new();
    while got.len() < 2 {
        let m = tokio::time::timeout(WAIT, ws.next()).await.unwrap().unwrap().unwrap();
        if matches!(m, Message::Text(_) | Message::Binary(_)) {
            got.push(m);
        }
    }
    assert_eq!(got, vec![Message::text("héllo"), Message::binary(vec![0u8, 1, 2])]);
}
