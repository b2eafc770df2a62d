//! RFC 6455 violations written as raw bytes by our own TCP client (no WebSocket
//! library would send them): each gets its documented close code, and the
//! gateway keeps serving everyone else.

mod common;

use common::*;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A masked client frame (mask key 0: payload bytes unchanged).
fn frame(first: u8, payload: &[u8]) -> Vec<u8> {
    masked_frame(first, payload, [0; 4])
}

async fn expect(gw: &Gateway, bytes: Vec<u8>, code: u16, what: &str) {
    let mut s = raw_session(gw).await;
    s.write_all(&bytes).await.unwrap();
    assert_eq!(raw_close_code(&mut s).await, code, "{what}");
}

#[tokio::test]
async fn each_violation_gets_its_close_code_and_others_are_untouched() {
    let gw = Gateway::start(&["--max-message-bytes", "1024"]).await;
    let (mut bystander, _) = gw.ws("bystander").await;

    let cases: Vec<(Vec<u8>, u16, &str)> = vec![
        (frame(0x81 | 0x40, b"{}"), 1002, "RSV1 set"),
        (frame(0x81 | 0x10, b"{}"), 1002, "RSV3 set"),
        (frame(0x83, b"{}"), 1002, "reserved data opcode 3"),
        (frame(0x8B, b""), 1002, "reserved control opcode 0xB"),
        (frame(0x09, b""), 1002, "fragmented ping (FIN clear)"),
        (frame(0x89, &[b'p'; 126]), 1002, "ping over 125 bytes"),
        (frame(0x80, b"x"), 1002, "continuation without a start"),
        ([frame(0x01, b"{\"op\""), frame(0x01, b":1}")].concat(), 1002, "a new text frame inside a fragmented one"),
        (frame(0x81, &[b'{', 0xC3]), 1007, "invalid UTF-8"),
        (
            [frame(0x01, &[b'"', 0xE2, 0x82]), frame(0x80, &[0x28, b'"'])].concat(),
            1007,
            "invalid UTF-8 split across fragments",
        ),
        (frame(0x88, &[0x03, 0xE7]), 1002, "close with code 999"),
        (frame(0x88, &[0x03, 0xEC]), 1002, "close with reserved code 1004"),
        (frame(0x88, &[0x03, 0xE8, 0xFF]), 1007, "close reason not UTF-8"),
        (frame(0x88, &[0x03]), 1002, "close payload of one byte"),
        (frame(0x82, b"\x00\x01"), 1003, "binary frame"),
    ];
    for (bytes, code, what) in cases {
        expect(&gw, bytes, code, what).await;
    }

    // A frame that declares 2^63 bytes: refused from its header, nothing allocated.
    let mut s = raw_session(&gw).await;
    let mut huge = vec![0x81, 0x80 | 127];
    huge.extend_from_slice(&(1u64 << 63).to_be_bytes());
    huge.extend_from_slice(&[0, 0, 0, 0]);
    s.write_all(&huge).await.unwrap();
    assert_eq!(raw_close_code(&mut s).await, 1009, "64-bit length with the top bit set");

    // 100 MiB declared, only the header sent: refused at once (no waiting for the payload).
    let mut s = raw_session(&gw).await;
    let mut big = vec![0x81, 0x80 | 127];
    big.extend_from_slice(&(100u64 << 20).to_be_bytes());
    big.extend_from_slice(&[0, 0, 0, 0]);
    s.write_all(&big).await.unwrap();
    assert_eq!(raw_close_code(&mut s).await, 1009, "declared size over the limit");

    // Fragments each under the limit whose sum is over it.
    let mut many = frame(0x01, &[b' '; 600]);
    many.extend(frame(0x00, &[b' '; 600]));
    expect(&gw, many, 1009, "fragmented message over the limit").await;

    // Through all of that, another session kept working.
    assert_eq!(call(&mut bystander, json!({"op":"ping"})).await["type"], "pong");
    let (_, page) = gw.admin_get("/metrics").await;
    assert!(metric(&page, "switchboard_gateway_connections_closed_total", "reason=\"protocol_error\"") >= 10.0);
}

#[tokio::test]
async fn slow_frames_do_not_hold_the_session_forever() {
    // A client that starts a frame and stops sending: the heartbeat (no traffic) closes it.
    let gw = Gateway::start(&[]).await; // 300 ms + 300 ms heartbeat in tests
    let mut s = raw_session(&gw).await;
    s.write_all(&[0x81, 0x80 | 100, 0, 0, 0, 0, b'{']).await.unwrap();
    assert_eq!(raw_close_code(&mut s).await, 4000);
}

#[tokio::test]
async fn handshake_variants_are_refused_with_400() {
    let gw = Gateway::start(&[]).await;
    let t = token(json!({"sub":"a","exp":now()+60}));
    let cases = [
        (
            "no key",
            format!(
                "GET /ws?token={t} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n\r\n"
            ),
        ),
        (
            "version 8",
            format!(
                "GET /ws?token={t} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 8\r\n\r\n"
            ),
        ),
        (
            "no upgrade header",
            format!(
                "GET /ws?token={t} HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
            ),
        ),
        (
            "HTTP/1.0",
            format!(
                "GET /ws?token={t} HTTP/1.0\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
            ),
        ),
    ];
    for (what, req) in cases {
        let mut s = TcpStream::connect(gw.client).await.unwrap();
        s.write_all(req.as_bytes()).await.unwrap();
        let mut buf = vec![0u8; 512];
        let n = tokio::time::timeout(WAIT, s.read(&mut buf)).await.unwrap().unwrap();
        let head = String::from_utf8_lossy(&buf[..n]);
        assert!(head.starts_with("HTTP/1.1 400") || head.starts_with("HTTP/1.0 400"), "{what}: {head}");
    }
    // Headers far over the limit: the connection is refused, not buffered without bound.
    let mut s = TcpStream::connect(gw.client).await.unwrap();
    let mut req = format!("GET /ws?token={t} HTTP/1.1\r\nHost: x\r\n");
    for i in 0..4000 {
        req.push_str(&format!("X-Pad-{i}: {}\r\n", "v".repeat(40)));
    }
    let _ = s.write_all(req.as_bytes()).await;
    let mut buf = vec![0u8; 512];
    let n = tokio::time::timeout(WAIT, s.read(&mut buf)).await.unwrap().unwrap_or(0);
    let head = String::from_utf8_lossy(&buf[..n]);
    assert!(n == 0 || head.starts_with("HTTP/1.1 431") || head.starts_with("HTTP/1.1 400"), "{head}");
}
