//! A lean WebSocket client for load generation: a hand-written upgrade and a
//! frame reader that parses every frame of one `read` in place. A general
//! client library (tungstenite) costs more CPU per message than the servers
//! measured here spend per delivery, so the load tool would be the bottleneck.

use std::net::{IpAddr, SocketAddr};

use anyhow::{Context, bail};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

/// Frame opcodes we act on.
pub(crate) const TEXT: u8 = 0x1;
pub(crate) const CLOSE: u8 = 0x8;
pub(crate) const PING: u8 = 0x9;

/// Opens a TCP connection from `source` (any port) and upgrades it on `path`.
/// `bearer` goes in an Authorization header.
pub(crate) async fn connect(
    server: SocketAddr,
    source: Option<IpAddr>,
    path: &str,
    bearer: Option<&str>,
) -> anyhow::Result<(TcpStream, Vec<u8>)> {
    let mut s = tcp(server, source).await?;
    let auth = bearer.map(|t| format!("Authorization: Bearer {t}\r\n")).unwrap_or_default();
    let req = format!(
        "GET {path} HTTP/1.1\r\nHost: {server}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n{auth}\r\n"
    );
    s.write_all(req.as_bytes()).await?;
    let (head, rest) = read_head(&mut s).await?;
    if !head.starts_with(b"HTTP/1.1 101") {
        let line = String::from_utf8_lossy(&head[..head.iter().position(|&b| b == b'\r').unwrap_or(0)]).into_owned();
        bail!("upgrade refused: {line}");
    }
    // Frames that arrived with the response.
    Ok((s, rest))
}

/// Reads an HTTP response head; returns it and the bytes read past it.
pub(crate) async fn read_head(s: &mut TcpStream) -> anyhow::Result<(Vec<u8>, Vec<u8>)> {
    let mut buf = Vec::with_capacity(512);
    let end = loop {
        let mut chunk = [0u8; 512];
        let n = s.read(&mut chunk).await?;
        if n == 0 {
            bail!("closed before the response head");
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        if buf.len() > 16 * 1024 {
            bail!("response head too long");
        }
    };
    let rest = buf.split_off(end);
    Ok((buf, rest))
}

/// A TCP connection to `server` from `source` (any port), no Nagle, reset on close.
pub(crate) async fn tcp(server: SocketAddr, source: Option<IpAddr>) -> anyhow::Result<TcpStream> {
    let socket = if server.is_ipv4() { TcpSocket::new_v4()? } else { TcpSocket::new_v6()? };
    // Load runs open and close tens of thousands of connections: ports still in
    // TIME_WAIT may be bound again, and closing resets the connection (linger 0) so
    // that no TIME_WAIT is left behind: otherwise the kernel's search for a free
    // port to bind becomes the bottleneck of the next run.
    socket.set_reuseaddr(true)?;
    if let Some(ip) = source {
        socket.bind(SocketAddr::new(ip, 0))?;
    }
    let s = socket.connect(server).await?;
    s.set_nodelay(true)?;
    s.set_zero_linger()?;
    Ok(s)
}

/// A masked client frame (mask key fixed: the server cannot tell, and the
/// XOR costs the same).
pub(crate) fn frame(opcode: u8, payload: &[u8]) -> Vec<u8> {
    switchboard_tests::ws::masked_frame(0x80 | opcode, payload, [0x37, 0xfa, 0x21, 0x3d])
}

/// Splits complete server frames off the front of `buf`, calling `on_frame(opcode, payload)`
/// for each; leaves a partial frame in place. Server frames are unmasked; fragmented
/// messages are not used by any server measured here (continuations are passed through).
pub(crate) fn parse(buf: &mut Vec<u8>, mut on_frame: impl FnMut(u8, &[u8])) -> anyhow::Result<()> {
    parse_raw(buf, |first, payload| on_frame(first & 0x0f, payload))
}

/// [`parse`], calling `on_frame` with the frame's whole first byte (FIN, RSV bits, opcode).
pub(crate) fn parse_raw(buf: &mut Vec<u8>, mut on_frame: impl FnMut(u8, &[u8])) -> anyhow::Result<()> {
    let mut at = 0;
    loop {
        let rest = &buf[at..];
        if rest.len() < 2 {
            break;
        }
        let first = rest[0];
        if rest[1] & 0x80 != 0 {
            bail!("masked server frame");
        }
        let (len, head) = match rest[1] & 0x7f {
            126 if rest.len() >= 4 => (u16::from_be_bytes([rest[2], rest[3]]) as usize, 4),
            127 if rest.len() >= 10 => (u64::from_be_bytes(rest[2..10].try_into().context("len")?) as usize, 10),
            126 | 127 => break,
            n => (n as usize, 2),
        };
        if rest.len() < head + len {
            break;
        }
        on_frame(first, &rest[head..head + len]);
        at += head + len;
    }
    buf.drain(..at);
    Ok(())
}

/// A 64-byte message body that carries its send time and sequence number:
/// `"<unix nanos> <seq> ..."` padded with dots.
pub(crate) fn stamped(seq: u64, len: usize) -> String {
    let mut s = format!("{} {seq} ", now_nanos());
    while s.len() < len {
        s.push('.');
    }
    s
}

/// (send time, sequence) from a stamped body found anywhere in `frame`
/// (our protocol wraps it in JSON; plain servers send it as is).
pub(crate) fn unstamp(frame: &[u8]) -> Option<(u128, u64)> {
    // The body starts at the first digit run of at least 16 digits.
    let start = frame.windows(16).position(|w| w.iter().all(u8::is_ascii_digit))?;
    let text = std::str::from_utf8(&frame[start..]).ok()?;
    let mut it = text.split(' ');
    let at = it.next()?.parse().ok()?;
    let seq = it.next()?.parse().ok()?;
    Some((at, seq))
}

pub(crate) fn now_nanos() -> u128 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_split_and_partial_kept() {
        let mut buf = vec![0x81, 3, b'a', b'b', b'c', 0x89, 0, 0x81, 126, 0, 200];
        let mut seen = Vec::new();
        parse(&mut buf, |op, p| seen.push((op, p.to_vec()))).unwrap();
        assert_eq!(seen, vec![(TEXT, b"abc".to_vec()), (PING, vec![])]);
        assert_eq!(buf, vec![0x81, 126, 0, 200]);
    }

    #[test]
    fn stamp_round_trip_inside_json() {
        let body = stamped(42, 64);
        assert_eq!(body.len(), 64);
        let json = format!(r#"{{"type":"message","seq":7,"data":"{body}"}}"#);
        let (at, seq) = unstamp(json.as_bytes()).unwrap();
        assert_eq!(seq, 42);
        assert!(at > 1_600_000_000_000_000_000);
    }

    #[test]
    fn masked_frame_lengths() {
        assert_eq!(frame(TEXT, &[0; 125])[1], 0x80 | 125);
        assert_eq!(frame(TEXT, &[0; 126])[1], 0x80 | 126);
        assert_eq!(frame(TEXT, &[0; 70000])[1], 0x80 | 127);
    }
}
