//! A lean client of the gateway's HTTP fallback transports for load generation,
//! written against the wire: a Server-Sent Events stream (`GET /sse`, chunked
//! transfer coding, one `data:` line per event) and a long-poll that waits.

use std::net::{IpAddr, SocketAddr};

use anyhow::{Context, bail};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use switchboard_tests::monitoring::url_encode;

use crate::wsclient;

/// Opens `GET /sse?channels=<channel>` (none without one) with `bearer`; returns the
/// stream and the body bytes read with the head (still chunk-framed).
pub(crate) async fn sse(
    server: SocketAddr,
    source: Option<IpAddr>,
    channel: Option<&str>,
    bearer: Option<&str>,
) -> anyhow::Result<(TcpStream, Vec<u8>)> {
    let mut s = wsclient::tcp(server, source).await?;
    let query = channel.map(|c| format!("?channels={}", url_encode(c))).unwrap_or_default();
    let auth = bearer.map(|t| format!("Authorization: Bearer {t}\r\n")).unwrap_or_default();
    let req = format!("GET /sse{query} HTTP/1.1\r\nHost: {server}\r\nAccept: text/event-stream\r\n{auth}\r\n");
    s.write_all(req.as_bytes()).await?;
    let (head, rest) = wsclient::read_head(&mut s).await?;
    let head = String::from_utf8_lossy(&head).to_ascii_lowercase();
    if !head.starts_with("http/1.1 200") || !head.contains("transfer-encoding: chunked") {
        bail!("no event stream: {}", head.lines().next().unwrap_or(""));
    }
    Ok((s, rest))
}

/// Long-polling from `source`: a first poll of `channel` (answered at once with the
/// subscribe ack and the cursor to poll from), then a second one on the same
/// connection that waits for the next message (up to `wait_ms`). Returns the
/// connection with that poll waiting.
pub(crate) async fn waiting_poll(
    server: SocketAddr,
    source: Option<IpAddr>,
    channel: &str,
    bearer: &str,
    wait_ms: u64,
) -> anyhow::Result<TcpStream> {
    let mut s = wsclient::tcp(server, source).await?;
    let ch = url_encode(channel);
    let first = format!("GET /poll?channels={ch} HTTP/1.1\r\nHost: {server}\r\nAuthorization: Bearer {bearer}\r\n\r\n");
    s.write_all(first.as_bytes()).await?;
    let (head, mut body) = wsclient::read_head(&mut s).await?;
    let head = String::from_utf8_lossy(&head).to_ascii_lowercase();
    if !head.starts_with("http/1.1 200") {
        bail!("poll refused: {}", head.lines().next().unwrap_or(""));
    }
    let len: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .context("a poll answer without content-length")?
        .trim()
        .parse()?;
    while body.len() < len {
        let mut chunk = [0u8; 4096];
        let n = s.read(&mut chunk).await?;
        if n == 0 {
            bail!("closed in the poll answer");
        }
        body.extend_from_slice(&chunk[..n]);
    }
    let answer: serde_json::Value = serde_json::from_slice(&body[..len])?;
    let cursor = answer["cursor"].as_str().context("a poll answer without cursor")?;
    let second = format!(
        "GET /poll?channels={ch}&cursor={}&timeout_ms={wait_ms} HTTP/1.1\r\nHost: {server}\r\n\
         Authorization: Bearer {bearer}\r\n\r\n",
        url_encode(cursor)
    );
    s.write_all(second.as_bytes()).await?;
    Ok(s)
}

/// The chunked transfer coding of a response body, decoded as it arrives.
#[derive(Debug, Default)]
pub(crate) struct Chunked {
    /// Bytes of the current chunk still to come.
    left: usize,
    /// The CRLF after a chunk's data is still to come.
    crlf: bool,
    /// Decoded body not yet taken as events.
    pub(crate) body: Vec<u8>,
    /// The last chunk came: the response ended.
    pub(crate) ended: bool,
}

impl Chunked {
    /// Decodes what `raw` holds into `body`, leaving an incomplete chunk header in `raw`.
    pub(crate) fn feed(&mut self, raw: &mut Vec<u8>) -> anyhow::Result<()> {
        if self.ended {
            if raw.starts_with(b"\r\n") {
                raw.drain(..2); // the empty trailer after the last chunk
            }
            return Ok(());
        }
        let mut at = 0;
        while !self.ended {
            if self.left > 0 {
                let k = self.left.min(raw.len() - at);
                self.body.extend_from_slice(&raw[at..at + k]);
                (at, self.left) = (at + k, self.left - k);
                if self.left > 0 {
                    break;
                }
                self.crlf = true;
            }
            let rest = &raw[at..];
            let skip = if self.crlf { 2 } else { 0 };
            if rest.len() < skip {
                break;
            }
            if rest[..skip] != b"\r\n"[..skip] {
                bail!("bad chunk framing");
            }
            let Some(nl) = rest[skip..].windows(2).position(|w| w == b"\r\n") else {
                if rest.len() > 64 {
                    bail!("bad chunk header");
                }
                break;
            };
            let line = std::str::from_utf8(&rest[skip..skip + nl])?;
            let size = usize::from_str_radix(line.split(';').next().unwrap_or("").trim(), 16)
                .with_context(|| format!("bad chunk size `{line}`"))?;
            at += skip + nl + 2;
            self.crlf = false;
            if size == 0 {
                // The last chunk, and the empty trailer after it (when it came).
                self.ended = true;
                if raw[at..].starts_with(b"\r\n") {
                    at += 2;
                }
            }
            self.left = size;
        }
        raw.drain(..at);
        Ok(())
    }

    /// Hands the `data:` of every complete event in `body` to `on_data`, and drops them.
    pub(crate) fn events(&mut self, mut on_data: impl FnMut(&[u8])) {
        let mut start = 0;
        while let Some(end) = self.body[start..].windows(2).position(|w| w == b"\n\n") {
            for line in self.body[start..start + end].split(|&b| b == b'\n') {
                if let Some(data) = line.strip_prefix(b"data: ") {
                    on_data(data);
                }
            }
            start += end + 2;
        }
        self.body.drain(..start);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunked_events_split_anywhere() {
        let mut wire = Vec::new();
        for piece in [&b": heartbeat\n\nid: a=1@e\ndata"[..], b": {\"x\":1}\n", b"\n"] {
            wire.extend_from_slice(format!("{:x}\r\n", piece.len()).as_bytes());
            wire.extend_from_slice(piece);
            wire.extend_from_slice(b"\r\n");
        }
        wire.extend_from_slice(b"0\r\n\r\n");
        // Every split point of the wire gives the same events.
        for cut in 0..wire.len() {
            let mut c = Chunked::default();
            let mut raw = wire[..cut].to_vec();
            let mut got = Vec::new();
            c.feed(&mut raw).unwrap();
            c.events(|d| got.push(d.to_vec()));
            raw.extend_from_slice(&wire[cut..]);
            c.feed(&mut raw).unwrap();
            c.events(|d| got.push(d.to_vec()));
            assert_eq!(got, vec![b"{\"x\":1}".to_vec()], "cut at {cut}");
            assert!(c.ended && raw.is_empty(), "cut at {cut}");
        }
        let mut raw = b"zz\r\n".to_vec();
        assert!(Chunked::default().feed(&mut raw).is_err());
    }
}
