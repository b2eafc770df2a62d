//! `bench deflate`: bytes on the wire and gateway CPU per delivery for a typical JSON
//! chat message, with permessage-deflate and without. Each mode starts the gateway
//! binary (`--permessage-deflate=false` for plain), opens `subscribers` raw clients
//! that offer the extension as browsers do, publishes `messages` to their channel in
//! windows of acknowledged publishes, and reads the gateway's CPU time from /proc.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::wsclient;

#[derive(Debug)]
pub(crate) struct Options {
    pub(crate) gateway_bin: PathBuf,
    pub(crate) subscribers: usize,
    pub(crate) messages: usize,
}

/// What a browser offers.
const OFFER: &str = "permessage-deflate; client_max_window_bits";
const CHANNEL: &str = "chat:bench";
/// Publishes in flight at a time.
const WINDOW: usize = 50;

/// A typical chat message's `data`.
fn chat(i: usize) -> serde_json::Value {
    serde_json::json!({
        "kind": "chat",
        "text": format!("Hey, are we still on for the design review at 3pm? I'll bring the slides (#{i})."),
        "client_ts": 1_733_120_000_000u64 + i as u64,
        "reply_to": null,
        "mentions": ["bob", "carol"],
    })
}

/// User and system CPU time of `pid` so far.
fn cpu(pid: u32) -> anyhow::Result<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name (which may hold spaces, inside parentheses).
    let rest = stat.rsplit_once(')').context("stat")?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = f.get(11).context("utime")?.parse::<u64>()? + f.get(12).context("stime")?.parse::<u64>()?;
    // USER_HZ is 100 on Linux.
    Ok(Duration::from_millis(ticks * 10))
}

async fn open(gw: &crate::Gateway, user: &str) -> anyhow::Result<(TcpStream, bool)> {
    let token = crate::bench_token(user)?;
    let mut s = TcpStream::connect(gw.client).await?;
    s.set_nodelay(true)?;
    let req = format!(
        "GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\
         Sec-WebSocket-Extensions: {OFFER}\r\nAuthorization: Bearer {token}\r\n\r\n"
    );
    s.write_all(req.as_bytes()).await?;
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        head.push(s.read_u8().await?);
    }
    let head = String::from_utf8_lossy(&head).to_ascii_lowercase();
    if !head.starts_with("http/1.1 101") {
        bail!("upgrade refused: {head}");
    }
    Ok((s, head.contains("sec-websocket-extensions: permessage-deflate")))
}

/// Reads frames until `n` text frames came; returns the bytes read and the frames with RSV1.
async fn read_texts(s: &mut TcpStream, buf: &mut Vec<u8>, n: usize) -> anyhow::Result<(u64, usize)> {
    let (mut bytes, mut texts, mut compressed) = (0u64, 0, 0);
    let mut chunk = vec![0u8; 64 * 1024];
    while texts < n {
        wsclient::parse_raw(buf, |first, _| {
            if first & 0x0f == wsclient::TEXT {
                texts += 1;
                compressed += usize::from(first & 0x40 != 0);
            }
        })?;
        if texts >= n {
            break;
        }
        let k = tokio::time::timeout(Duration::from_secs(30), s.read(&mut chunk)).await.context("stalled")??;
        if k == 0 {
            bail!("closed after {texts} of {n} frames");
        }
        bytes += k as u64;
        buf.extend_from_slice(&chunk[..k]);
    }
    Ok((bytes, compressed))
}

struct Figures {
    negotiated: bool,
    wire_bytes: f64,
    cpu_us: f64,
    compressed_share: f64,
    seconds: f64,
}

async fn one(o: &Options, deflate: bool) -> anyhow::Result<Figures> {
    let flag = if deflate { "--permessage-deflate=true" } else { "--permessage-deflate=false" };
    let gw = crate::start_gateway_with(
        &o.gateway_bin,
        &[flag, "--publish-rate", "1000000", "--publish-burst", "1000000", "--history", "*=off"],
    )?;
    let sub = serde_json::json!({"op":"subscribe","channel":CHANNEL}).to_string();
    let mut negotiated = true;
    let mut readers = Vec::new();
    for i in 0..o.subscribers {
        let (mut s, ok) = open(&gw, &format!("sub-{i}")).await?;
        negotiated &= ok;
        s.write_all(&wsclient::frame(wsclient::TEXT, sub.as_bytes())).await?;
        let mut buf = Vec::new();
        read_texts(&mut s, &mut buf, 2).await?; // welcome, ack
        let n = o.messages;
        readers.push(tokio::spawn(async move { read_texts(&mut s, &mut buf, n).await }));
    }
    let (mut publisher, _) = open(&gw, "alice").await?;
    let mut pbuf = Vec::new();
    read_texts(&mut publisher, &mut pbuf, 1).await?;
    let pid = gw.child.id();
    let (cpu0, t0) = (cpu(pid)?, Instant::now());
    let mut sent = 0;
    while sent < o.messages {
        let k = WINDOW.min(o.messages - sent);
        let mut batch = Vec::new();
        for i in sent..sent + k {
            let cmd = serde_json::json!({"op":"publish","channel":CHANNEL,"data":chat(i)}).to_string();
            batch.extend(wsclient::frame(wsclient::TEXT, cmd.as_bytes()));
        }
        publisher.write_all(&batch).await?;
        read_texts(&mut publisher, &mut pbuf, k).await?;
        sent += k;
    }
    let (mut bytes, mut compressed) = (0u64, 0usize);
    for r in readers {
        let (b, c) = r.await??;
        bytes += b;
        compressed += c;
    }
    let (cpu1, seconds) = (cpu(pid)?, t0.elapsed().as_secs_f64());
    let deliveries = (o.subscribers * o.messages) as f64;
    Ok(Figures {
        negotiated,
        wire_bytes: bytes as f64 / deliveries,
        cpu_us: (cpu1 - cpu0).as_secs_f64() * 1e6 / deliveries,
        compressed_share: compressed as f64 / deliveries,
        seconds,
    })
}

pub(crate) async fn run(o: Options) -> anyhow::Result<()> {
    let json = serde_json::json!({"type":"message","channel":CHANNEL,"id":"gw-1.19a3c4e1f2b-000000000001a",
        "from":"alice","seq":42,"epoch":"s3f9c0d1e2a4b5c6d","data":chat(7)})
    .to_string();
    println!("typical message frame: {} bytes of JSON", json.len());
    println!(
        "{:<8} {:>10} {:>14} {:>16} {:>11} {:>8}",
        "mode", "negotiated", "wire B/deliv", "gw CPU us/deliv", "compressed", "secs"
    );
    let mut out = serde_json::Map::new();
    for (name, deflate) in [("plain", false), ("deflate", true)] {
        let f = one(&o, deflate).await?;
        println!(
            "{name:<8} {:>10} {:>14.1} {:>16.3} {:>10.0}% {:>8.2}",
            f.negotiated,
            f.wire_bytes,
            f.cpu_us,
            f.compressed_share * 100.0,
            f.seconds
        );
        out.insert(
            name.into(),
            serde_json::json!({"negotiated": f.negotiated, "wire_bytes_per_delivery": f.wire_bytes,
                "cpu_us_per_delivery": f.cpu_us, "compressed_share": f.compressed_share}),
        );
    }
    out.insert("subscribers".into(), o.subscribers.into());
    out.insert("messages".into(), o.messages.into());
    println!("{}", serde_json::Value::Object(out));
    Ok(())
}
