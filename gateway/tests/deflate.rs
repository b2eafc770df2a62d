//! permessage-deflate (RFC 7692), checked by our own client: frames written and read by
//! hand over a raw TCP socket, compressed and inflated with flate2 (not the gateway's
//! code), next to tokio-tungstenite clients that do not offer the extension.

mod common;

use std::time::{Duration, Instant};

use common::*;
use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Slow heartbeats: the raw clients here do not answer pings.
const SLOW_HEARTBEAT: [&str; 4] = ["--heartbeat-interval", "60s", "--heartbeat-timeout", "60s"];

const ANSWER: &str = "permessage-deflate; server_no_context_takeover; client_no_context_takeover";

/// Upgrades with these extension offers (none when empty); returns the stream and the
/// response's `Sec-WebSocket-Extensions` value, if any.
async fn upgrade(gw: &Gateway, user: &str, offers: &[&str]) -> (TcpStream, Option<String>) {
    let headers: Vec<String> = offers.iter().map(|o| format!("Sec-WebSocket-Extensions: {o}")).collect();
    let (s, head) = raw_upgrade(gw, user, 600, &headers).await;
    let ext = head.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.eq_ignore_ascii_case("sec-websocket-extensions").then(|| v.trim().to_owned())
    });
    (s, ext)
}

/// A server frame as read off the wire.
#[derive(Debug)]
struct Frame {
    first: u8,
    payload: Vec<u8>,
}

impl Frame {
    fn rsv1(&self) -> bool {
        self.first & 0x40 != 0
    }
    fn opcode(&self) -> u8 {
        self.first & 0x0f
    }
}

async fn read_frame(s: &mut TcpStream) -> Frame {
    tokio::time::timeout(WAIT, async {
        let mut h = [0u8; 2];
        s.read_exact(&mut h).await.expect("a frame");
        assert_eq!(h[1] & 0x80, 0, "server frames are not masked");
        let len = match h[1] & 0x7f {
            126 => s.read_u16().await.unwrap() as usize,
            127 => s.read_u64().await.unwrap() as usize,
            n => n as usize,
        };
        let mut payload = vec![0u8; len];
        s.read_exact(&mut payload).await.unwrap();
        Frame { first: h[0], payload }
    })
    .await
    .expect("timed out waiting for a frame")
}

/// Raw deflate with a sync flush, the 0x00 0x00 0xff 0xff tail removed (RFC 7692 §7.2.1).
fn deflate(data: &[u8], level: Compression) -> Vec<u8> {
    let mut c = Compress::new(level, false);
    let mut out = Vec::with_capacity(data.len() / 2 + 1024);
    let mut input = data;
    loop {
        let before = c.total_in();
        c.compress_vec(input, &mut out, FlushCompress::Sync).unwrap();
        input = &input[(c.total_in() - before) as usize..];
        if input.is_empty() && out.len() < out.capacity() {
            break;
        }
        out.reserve(out.capacity());
    }
    assert!(out.ends_with(&[0, 0, 0xff, 0xff]));
    out.truncate(out.len() - 4);
    out
}

/// `mib` MiB of zeros deflated: one MiB compressed (sync flush: it ends on a byte
/// boundary with an empty stored block) repeated, so the test need not compress it all.
fn bomb(mib: usize) -> Vec<u8> {
    let mut unit = deflate(&vec![0u8; 1 << 20], Compression::best());
    unit.extend_from_slice(&[0, 0, 0xff, 0xff]);
    let mut out = unit.repeat(mib);
    out.truncate(out.len() - 4);
    out
}

/// Inflates a message the server compressed (the tail appended, §7.2.2).
fn inflate(payload: &[u8]) -> Vec<u8> {
    let mut d = Decompress::new(false);
    let mut input = payload.to_vec();
    input.extend_from_slice(&[0, 0, 0xff, 0xff]);
    let mut out = Vec::with_capacity(1 << 20);
    d.decompress_vec(&input, &mut out, FlushDecompress::Sync).unwrap();
    assert_eq!(d.total_in() as usize, input.len(), "all input used");
    out
}

/// The JSON of a text message from the server, inflated when RSV1 says so.
fn json_of(f: &Frame) -> Value {
    assert_eq!(f.opcode(), 0x1, "a text frame: {f:?}");
    let bytes = if f.rsv1() { inflate(&f.payload) } else { f.payload.clone() };
    serde_json::from_slice(&bytes).unwrap()
}

/// Reads server frames until one whose JSON has `type`; returns it and the frame.
async fn read_type(s: &mut TcpStream, kind: &str) -> (Value, Frame) {
    loop {
        let f = read_frame(s).await;
        if f.opcode() == 0x9 || f.opcode() == 0xA {
            continue;
        }
        let v = json_of(&f);
        if v["type"] == kind {
            return (v, f);
        }
    }
}

async fn send_plain(s: &mut TcpStream, v: &Value) {
    s.write_all(&masked_frame(0x81, v.to_string().as_bytes(), [1, 2, 3, 4])).await.unwrap();
}

async fn send_compressed(s: &mut TcpStream, v: &Value) {
    let z = deflate(v.to_string().as_bytes(), Compression::default());
    s.write_all(&masked_frame(0xC1, &z, [5, 6, 7, 8])).await.unwrap();
}

#[tokio::test]
async fn negotiation_answers() {
    let gw = Gateway::start(&[]).await;
    // What browsers offer.
    let (_s, ext) = upgrade(&gw, "a", &["permessage-deflate; client_max_window_bits"]).await;
    assert_eq!(ext.as_deref(), Some(ANSWER));
    // Every parameter, honoured; a server window is echoed.
    let (_s, ext) = upgrade(
        &gw,
        "a",
        &["permessage-deflate; server_no_context_takeover; client_no_context_takeover; server_max_window_bits=10; client_max_window_bits=12"],
    )
    .await;
    assert_eq!(ext, Some(format!("{ANSWER}; server_max_window_bits=10")));
    // Offers we cannot honour are declined and the next one tried (over two header lines too).
    let (_s, ext) = upgrade(
        &gw,
        "a",
        &["x-webkit-deflate-frame, permessage-deflate; server_max_window_bits=7", "permessage-deflate; mystery"],
    )
    .await;
    assert_eq!(ext, None);
    let (_s, ext) = upgrade(
        &gw,
        "a",
        &["permessage-deflate; client_max_window_bits=16, permessage-deflate; server_max_window_bits=9"],
    )
    .await;
    assert_eq!(ext, Some(format!("{ANSWER}; server_max_window_bits=9")));
    // No offer, no extension.
    let (_s, ext) = upgrade(&gw, "a", &[]).await;
    assert_eq!(ext, None);
    let (_, page) = gw.admin_get("/metrics").await;
    assert!(metric(&page, "switchboard_gateway_deflate_sessions_total", "") >= 3.0);

    // Turned off by the flag: the browser's offer is answered without it.
    let off = Gateway::start(&["--permessage-deflate=false"]).await;
    let (mut s, ext) = upgrade(&off, "a", &["permessage-deflate; client_max_window_bits"]).await;
    assert_eq!(ext, None);
    // And a compressed frame is then a protocol error, as without the offer.
    send_compressed(&mut s, &json!({"op":"ping"})).await;
    assert_eq!(raw_close_code(&mut s).await, 1002);
}

#[tokio::test]
async fn a_compressed_publish_reaches_deflate_and_plain_subscribers() {
    let gw = Gateway::start(&SLOW_HEARTBEAT).await;
    let channel = "news:deflate";
    let (mut zsub, ext) = upgrade(&gw, "zsub", &["permessage-deflate"]).await;
    assert_eq!(ext.as_deref(), Some(ANSWER));
    let (welcome, f) = read_type(&mut zsub, "welcome").await;
    assert_eq!(welcome["user"], "zsub");
    assert!(!f.rsv1(), "replies are sent plain");
    send_compressed(&mut zsub, &json!({"op":"subscribe","channel":channel,"ref":"s"})).await;
    let (ack, _) = read_type(&mut zsub, "ack").await;
    assert_eq!(ack["ref"], "s", "{ack}");

    let (mut plain, _) = gw.ws("plain").await;
    assert_eq!(call(&mut plain, json!({"op":"subscribe","channel":channel})).await["type"], "ack");

    let (mut publisher, ext) = upgrade(&gw, "alice", &["permessage-deflate; client_max_window_bits"]).await;
    assert!(ext.is_some());
    read_type(&mut publisher, "welcome").await;
    let data = json!({"text": "hello everyone, hello everyone, hello everyone: the same words compress"});
    send_compressed(&mut publisher, &json!({"op":"publish","channel":channel,"data":data,"ref":"p"})).await;
    let (ack, _) = read_type(&mut publisher, "ack").await;
    assert_eq!(ack["ref"], "p", "{ack}");

    let got_plain = recv_type(&mut plain, "message").await;
    let (got_z, frame) = read_type(&mut zsub, "message").await;
    assert!(frame.rsv1(), "the publication is compressed for a session that negotiated");
    assert!(frame.first & 0x80 != 0, "one frame (FIN)");
    assert!(frame.payload.len() < got_plain.to_string().len(), "and smaller than the JSON");
    assert_eq!(got_z, got_plain, "the same message to both");
    assert_eq!(got_z["data"], data);
    assert_eq!(got_z["seq"], ack["seq"]);

    // A direct message too, compressed for the deflate session only.
    send_plain(&mut publisher, &json!({"op":"send","user":"zsub","data":data,"ref":"d"})).await;
    let (ack, _) = read_type(&mut publisher, "ack").await;
    assert_eq!(ack["delivered"], 1, "{ack}");
    let (direct, frame) = read_type(&mut zsub, "direct").await;
    assert!(frame.rsv1());
    assert_eq!(direct["data"], data);

    // A broadcast from the Push API: compressed for the deflate sessions (the same
    // bytes for both: compressed once, no context), plain for the other.
    let mut push = proto::push::v1::push_client::PushClient::connect(format!("http://{}", gw.grpc)).await.unwrap();
    let words = json!({"notice": "maintenance tonight, maintenance tonight, maintenance tonight"});
    let compressed = |page: &str| metric(page, "switchboard_gateway_deflate_frames_total", "");
    let before = compressed(&gw.admin_get("/metrics").await.1);
    let r = push
        .broadcast(proto::push::v1::BroadcastRequest { data_json: words.to_string(), from: String::new() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.delivered, Some(3));
    let (b1, f1) = read_type(&mut zsub, "broadcast").await;
    let (b2, f2) = read_type(&mut publisher, "broadcast").await;
    assert!(f1.rsv1() && f2.rsv1());
    assert_eq!(f1.payload, f2.payload);
    assert_eq!((&b1["data"], &b2["data"]), (&words, &words));
    assert_eq!(recv_type(&mut plain, "broadcast").await["data"], words);
    // Compressed once for both deflate sessions.
    assert_eq!(compressed(&gw.admin_get("/metrics").await.1) - before, 1.0);

    // Small replies that would not shrink are plain; control frames are never compressed.
    send_compressed(&mut zsub, &json!({"op":"ping","ref":"x"})).await;
    let (pong, frame) = read_type(&mut zsub, "pong").await;
    assert_eq!(pong["ref"], "x");
    assert!(!frame.rsv1());
    zsub.write_all(&masked_frame(0x89, b"are you there", [9, 9, 9, 9])).await.unwrap();
    let f = read_frame(&mut zsub).await;
    assert_eq!((f.first, f.payload.as_slice()), (0x8A, &b"are you there"[..]), "a plain pong");
}

#[tokio::test]
async fn a_fragmented_compressed_message_is_inflated_whole() {
    let gw = Gateway::start(&SLOW_HEARTBEAT).await;
    let (mut plain, _) = gw.ws("plain").await;
    assert_eq!(call(&mut plain, json!({"op":"subscribe","channel":"room:frag"})).await["type"], "ack");
    let (mut s, ext) = upgrade(&gw, "alice", &["permessage-deflate"]).await;
    assert!(ext.is_some());
    read_type(&mut s, "welcome").await;
    let text = "fragments ".repeat(300);
    let msg = json!({"op":"publish","channel":"room:frag","data":{"text":text},"ref":"f"});
    let z = deflate(msg.to_string().as_bytes(), Compression::default());
    let third = z.len() / 3;
    // RSV1 on the first frame only; a ping between the fragments.
    let mut bytes = masked_frame(0x41, &z[..third], [1, 1, 1, 1]);
    bytes.extend(masked_frame(0x00, &z[third..2 * third], [2, 2, 2, 2]));
    bytes.extend(masked_frame(0x89, b"", [0; 4]));
    bytes.extend(masked_frame(0x80, &z[2 * third..], [3, 3, 3, 3]));
    s.write_all(&bytes).await.unwrap();
    let (ack, _) = read_type(&mut s, "ack").await;
    assert_eq!(ack["ref"], "f", "{ack}");
    assert_eq!(recv_type(&mut plain, "message").await["data"]["text"], text);

    // RSV1 on a continuation frame is a protocol error.
    let z = deflate(br#"{"op":"ping"}"#, Compression::default());
    let mut bytes = masked_frame(0x41, &z[..2], [0; 4]);
    bytes.extend(masked_frame(0xC0, &z[2..], [0; 4]));
    s.write_all(&bytes).await.unwrap();
    assert_eq!(raw_close_code(&mut s).await, 1002);
}

#[tokio::test]
async fn a_zip_bomb_is_refused_with_1009_promptly() {
    let gw = Gateway::start(&SLOW_HEARTBEAT).await; // --max-message-bytes 65536 (default)
    let (mut bystander, _) = gw.ws("bystander").await;

    // The bomb is what it claims to be.
    let mut d = Decompress::new(false);
    let mut out = vec![0u8; 4 << 20];
    let small = bomb(4);
    d.decompress(&[&small[..], &[0, 0, 0xff, 0xff]].concat(), &mut out, FlushDecompress::Sync).unwrap();
    assert_eq!((d.total_out(), out.iter().all(|&b| b == 0)), (4 << 20, true));

    // 100 MiB of zeros: about 100 KB deflated, over the limit already on the wire.
    let big = bomb(100);
    assert!(big.len() > 65536, "{}", big.len());
    let (mut s, _) = upgrade(&gw, "bomber", &["permessage-deflate"]).await;
    let started = Instant::now();
    s.write_all(&masked_frame(0xC1, &big, [7, 7, 7, 7])).await.unwrap();
    assert_eq!(raw_close_code(&mut s).await, 1009, "one frame");
    drop(s);
    // The same in fragments: the compressed bytes are capped as they arrive.
    let (mut s, _) = upgrade(&gw, "bomber", &["permessage-deflate"]).await;
    let mut chunks = big.chunks(8192);
    let mut bytes = masked_frame(0x41, chunks.next().unwrap(), [1, 2, 3, 4]);
    for c in chunks {
        bytes.extend(masked_frame(0x00, c, [1, 2, 3, 4]));
    }
    // The gateway closes before reading it all: the write may fail, the close code tells.
    let _ = s.write_all(&bytes).await;
    assert_eq!(raw_close_code(&mut s).await, 1009, "fragments");
    drop(s);

    // 50 MiB of zeros fits under the limit compressed: inflation stops at 64 KiB.
    let under = bomb(50);
    assert!(under.len() < 65536, "{}", under.len());
    let (mut s, _) = upgrade(&gw, "bomber", &["permessage-deflate"]).await;
    let sent = Instant::now();
    s.write_all(&masked_frame(0xC1, &under, [7, 7, 7, 7])).await.unwrap();
    assert_eq!(raw_close_code(&mut s).await, 1009, "inflated over the limit");
    drop(s);
    // Inflating 50 MiB would take far longer than stopping at 64 KiB.
    assert!(sent.elapsed() < Duration::from_secs(2), "{:?}", sent.elapsed());
    assert!(started.elapsed() < Duration::from_secs(10));

    // Invalid compressed data is a protocol error.
    let (mut s, _) = upgrade(&gw, "bomber", &["permessage-deflate"]).await;
    s.write_all(&masked_frame(0xC1, &[0xff; 16], [0; 4])).await.unwrap();
    assert_eq!(raw_close_code(&mut s).await, 1002, "not deflate");
    drop(s);

    assert_eq!(call(&mut bystander, json!({"op":"ping"})).await["type"], "pong");
    // Counted when each session has finished closing.
    eventually!(
        metric(&gw.admin_get("/metrics").await.1, "switchboard_gateway_connections_closed_total", "reason=\"too_big\"")
            >= 3.0,
        "three sessions closed as too big"
    );
}

#[tokio::test]
async fn rsv1_without_the_extension_is_a_protocol_error() {
    let gw = Gateway::start(&SLOW_HEARTBEAT).await;
    let (mut s, ext) = upgrade(&gw, "plain", &[]).await;
    assert_eq!(ext, None);
    read_type(&mut s, "welcome").await;
    // A well-formed compressed message, but nothing was negotiated.
    send_compressed(&mut s, &json!({"op":"ping"})).await;
    assert_eq!(raw_close_code(&mut s).await, 1002);
    // Declined offer: same.
    let (mut s, ext) = upgrade(&gw, "plain", &["permessage-deflate; server_max_window_bits=3"]).await;
    assert_eq!(ext, None);
    send_compressed(&mut s, &json!({"op":"ping"})).await;
    assert_eq!(raw_close_code(&mut s).await, 1002);
}
