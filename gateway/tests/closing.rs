//! Closes that must reach the client: the close frame and the replies before it
//! arrive even when the client is still sending, and control-frame floods from a
//! client that reads are answered without closing it.

mod common;

use common::*;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// One server frame: (opcode, payload).
async fn read_frame(s: &mut TcpStream) -> std::io::Result<(u8, Vec<u8>)> {
    let mut h = [0u8; 2];
    s.read_exact(&mut h).await?;
    let len = match h[1] & 0x7f {
        126 => s.read_u16().await? as usize,
        127 => s.read_u64().await? as usize,
        n => n as usize,
    };
    let mut p = vec![0u8; len];
    s.read_exact(&mut p).await?;
    Ok((h[0] & 0x0f, p))
}

fn text(payload: &[u8]) -> Vec<u8> {
    masked_frame(0x81, payload, [1, 2, 3, 4])
}

#[tokio::test]
async fn a_flood_close_and_the_replies_before_it_always_arrive() {
    let gw = Gateway::start(&["--publish-rate", "1", "--publish-burst", "5"]).await;
    for attempt in 0..10 {
        let mut s = raw_session(&gw).await;
        let burst: Vec<u8> = (0..200)
            .flat_map(|i| text(json!({"op":"publish","channel":"c","data":i,"ref":i}).to_string().as_bytes()))
            .collect();
        s.write_all(&burst).await.unwrap();
        let (mut acks, mut limited) = (0, 0);
        let code = tokio::time::timeout(WAIT, async {
            loop {
                let (op, p) = read_frame(&mut s)
                    .await
                    .unwrap_or_else(|e| panic!("attempt {attempt}: connection lost before the close frame: {e}"));
                match op {
                    0x1 => {
                        let v: serde_json::Value = serde_json::from_slice(&p).unwrap();
                        match (v["type"].as_str(), v["code"].as_str()) {
                            (Some("ack"), _) => acks += 1,
                            (Some("error"), Some("rate_limited")) => limited += 1,
                            _ => {}
                        }
                    }
                    0x8 => return u16::from_be_bytes([p[0], p[1]]),
                    _ => {}
                }
            }
        })
        .await
        .expect("a close frame");
        assert_eq!(code, 4003, "attempt {attempt}");
        assert_eq!(acks, 5, "attempt {attempt}: the burst's acks arrive before the close");
        assert!(limited >= 5, "attempt {attempt}: {limited} rate_limited replies");
        // Answer the close as a client does, then the server ends the connection cleanly.
        s.write_all(&masked_frame(0x88, &4003u16.to_be_bytes(), [9, 9, 9, 9])).await.unwrap();
        let mut rest = Vec::new();
        let end = tokio::time::timeout(WAIT, s.read_to_end(&mut rest)).await.expect("the server closes");
        assert!(end.is_ok(), "attempt {attempt}: {end:?} (a reset instead of a clean close)");
    }
}

#[tokio::test]
async fn a_ping_flood_from_a_reading_client_is_answered_and_the_session_lives() {
    let gw = Gateway::start(&[]).await;
    let mut s = raw_session(&gw).await;
    let pings: Vec<u8> = (0..10_000u32).flat_map(|i| masked_frame(0x89, &i.to_be_bytes(), [5, 6, 7, 8])).collect();
    s.write_all(&pings).await.unwrap();
    s.write_all(&text(br#"{"op":"ping","ref":"after"}"#)).await.unwrap();
    let mut pongs = Vec::new();
    tokio::time::timeout(WAIT, async {
        loop {
            let (op, p) = read_frame(&mut s).await.expect("the session stays open");
            match op {
                0xA => pongs.push(u32::from_be_bytes(p[..4].try_into().unwrap())),
                0x8 => panic!("closed with {}", u16::from_be_bytes([p[0], p[1]])),
                0x1 if serde_json::from_slice::<serde_json::Value>(&p).unwrap()["ref"] == "after" => return,
                _ => {}
            }
        }
    })
    .await
    .expect("the reply to the command after the flood");
    assert!(!pongs.is_empty(), "no pong at all");
    assert!(pongs.windows(2).all(|w| w[0] < w[1]), "pongs answer pings in order");
    assert_eq!(pongs.last(), Some(&9_999), "the latest ping is answered");
}
